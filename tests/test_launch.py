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
    if script in ("train.py", "eval.py"):  # the multi-host flags, listed with the script's own
        assert "--[no]distributed" in output and "--coordinator_address" in output


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


def _fake_tool(directory, name):
    """An executable `name` on PATH that writes its arguments, one per line, to <name>.args."""
    path = directory / name
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{directory}/{name}.args"\n')
    path.chmod(0o755)


@pytest.mark.parametrize("script,tool,args", [
    ("launch/tpu/run.sh", "gcloud", ["pod", "zone-a", "configs/stage2.py:data=/d/a b.jsonl", "/runs/s2",
                                     "--config.seed=3"]),
    ("launch/gpu/run.sbatch", "srun", ["configs/stage2.py:data=/d/a b.jsonl", "/runs/s2", "--config.seed=3"]),
])
@pytest.mark.parametrize("entry", ["train", "eval"])
def test_multihost_launch_scripts_start_every_process_with_distributed(tmp_path, script, tool, args, entry):
    """The pod / cluster scripts hand launch/train.py or launch/eval.py the config (spaces kept),
    the workdir, --distributed (test_help: both define it) and the extra flags; a wrong call prints the usage."""
    _fake_tool(tmp_path, tool)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    subprocess.run(["bash", script, entry, *args], cwd=ROOT, env=env, check=True, timeout=60)
    called = (tmp_path / f"{tool}.args").read_text().splitlines()
    if tool == "gcloud":  # one shell command for every worker
        assert called[:5] == ["compute", "tpus", "tpu-vm", "ssh", "pod"] and "--worker=all" in called
        command = called[-1].removeprefix("--command=")
        called = subprocess.run(["bash", "-c", f"printf '%s\\n' {command.split('&& ', 1)[1]}"], check=True,
                                capture_output=True, text=True).stdout.splitlines()
    start = called.index(f"launch/{entry}.py")
    assert called[start:] == [f"launch/{entry}.py", "--config=configs/stage2.py:data=/d/a b.jsonl",
                              "--workdir=/runs/s2", "--distributed", "--config.seed=3"]
    for wrong in ([], ["bench", *args]):
        usage = subprocess.run(["bash", script, *wrong], cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=60)
        assert usage.returncode == 2 and "train|eval" in usage.stderr
