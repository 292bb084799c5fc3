"""Every config file builds, with every preset, and presets change what they claim."""

import importlib.util
import os

import pytest

from rwr_jax import config_lib

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR)
                      if f.endswith(".py") and "def get_config" in open(os.path.join(CONFIG_DIR, f)).read())


def _load(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(CONFIG_DIR, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_builds_and_documents_its_command(name):
    module = _load(name)
    assert module.__doc__.lstrip().startswith("python launch/"), "first docstring line is the run command"
    default, demo = module.get_config(None), module.get_config("demo")
    assert default.to_dict() != demo.to_dict()
    with pytest.raises(ValueError, match="unknown preset key 'nope'"):
        module.get_config("nope")


def test_generate_presets():
    module = _load("generate.py")
    assert module.get_config("demo").model.checkpoint == ""
    assert module.get_config("demo,max_new_tokens=3").max_new_tokens == 3
    assert module.get_config("checkpoint=/m/q7b").model.checkpoint == "/m/q7b"


def test_parse_preset_types():
    preset = config_lib.parse_preset("demo,steps=5,lr=0.5,name=x", demo=False, steps=1, lr=1.0, name="")
    assert (preset.demo, preset.steps, preset.lr, preset.name) == (True, 5, 0.5, "x")
    with pytest.raises(ValueError, match="expects int"):
        config_lib.parse_preset("steps=many", steps=1)
    with pytest.raises(ValueError, match="needs a value"):
        config_lib.parse_preset("steps", steps=1)
