"""The launch scripts as a user runs them: --help, the README demo, checkpoint conversion."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from rwr_jax.models import checkpoint_io
from tests.models import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_SCRIPTS = sorted(f for f in os.listdir(os.path.join(ROOT, "launch")) if f.endswith(".py"))


def _run(*args, timeout=600, ok_codes=(0,)):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # a user's single-device CPU run
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode in ok_codes, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS)
def test_help(script):
    # absl exits with status 1 after printing --help.
    output = _run(os.path.join("launch", script), "--help", ok_codes=(0, 1))
    with open(os.path.join(ROOT, "launch", script)) as f:
        summary = ast.get_docstring(ast.parse(f.read())).splitlines()[0]
    assert output.startswith(summary) and "--helpfull" in output


@pytest.mark.slow
def test_readme_demo(tmp_path):
    output = _run("launch/generate.py", "--config=configs/generate.py:demo,max_new_tokens=8",
                  f"--workdir={tmp_path}")
    assert "cached decoding vs full forward" in output
    assert "transformers on" in output  # torch is installed in the dev extra
    assert os.path.isfile(tmp_path / "hf_export" / "model.safetensors")


@pytest.mark.slow
def test_convert_checkpoint_both_directions(tmp_path):
    source = tmp_path / "hf"
    hf_models.make_causal_lm("qwen2_bias").save_pretrained(source, max_shard_size="40KB")
    _run("launch/convert_checkpoint.py", "--direction=hf_to_jax", f"--src={source}", f"--dst={tmp_path / 'jax'}")
    _run("launch/convert_checkpoint.py", "--direction=jax_to_hf", f"--src={tmp_path / 'jax'}",
         f"--dst={tmp_path / 'back'}")
    read = lambda d: {n: np.array(a) for p in checkpoint_io.checkpoint_files(str(d))  # noqa: E731
                      for n, a in checkpoint_io.iter_file_tensors(p)}
    before, after = read(source), read(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name in before:
        np.testing.assert_array_equal(before[name], after[name], err_msg=name)
