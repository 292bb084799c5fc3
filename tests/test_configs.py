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


def test_eval_presets():
    module = _load("eval.py")
    real, demo = module.get_config(None), module.get_config("demo")
    assert real.rollout.temperature == 0.0 and real.rollout.group_size == 1  # greedy, one completion
    assert demo.rollout.group_size == 1 and demo.model.checkpoint == "" and demo.data.demo
    text = module.get_config("demo,text")
    assert text.data.max_images_per_prompt == 0 and "image" not in text.system_prompt
    assert "model" not in text or "vision" not in text.model
    on = module.get_config("checkpoint=/ckpt/hf_export,cdir,cases=/d/cases.jsonl,clip=/m/clip,limit=5")
    assert (on.model.checkpoint, on.cdir.enabled, on.cdir.threshold) == ("/ckpt/hf_export", True, 0.9)
    assert (on.cdir.corpus_path, on.cdir.clip_checkpoint, on.data.limit) == ("/d/cases.jsonl", "/m/clip", 5)
    assert not module.get_config("demo").cdir.enabled
