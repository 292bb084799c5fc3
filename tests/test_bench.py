"""The benchmark plumbing (the benchmarks themselves never run in tests: BENCHMARKS.md)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from rwr_jax.bench import common, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_summary_line_follows_the_protocol():
    line = common.summary("rollout", "tiny", 12000.0, "hf_generate", 3000.0, "tokens/s", "batch 16")
    assert line == "rollout [tiny]: ours 12000 tokens/s | hf_generate 3000 tokens/s | ratio 4.00x | batch 16"
    build = common.summary("retrieval_build", "1M", 2.0, "faiss", 3.0, "s", "x", higher_is_better=False)
    assert "ratio 1.50x" in build and "ours 2 s" in build


def test_time_interleaved_reports_first_call_median_and_phases():
    calls = []

    def run(clock):
        calls.append(1)
        clock.mark("work")

    first, median, phases = common.time_interleaved({"a": run, "b": run}, repeats=3)
    assert len(calls) == 8 and set(first) == set(median) == {"a", "b"}
    assert set(phases["a"]) == {"work"}


def test_launcher_rejects_unknown_names_and_shapes():
    for args, message in ((["nope"], "unknown benchmark"), (["rollout", "--shapes=huge"], "--shapes"),
                          (["train_step", "--attention_kernel=flash"], "--attention_kernel")):
        out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "bench.py"), *args],
                             capture_output=True, text=True, check=False)
        assert out.returncode != 0 and message in out.stderr, out.stderr


@pytest.mark.parametrize("work", [train_step.Workload(), train_step.WORKLOADS["0.5b"]])
def test_train_step_batch_is_grouped_like_grpo(work):
    rows = train_step.trajectories(vocab_size=100, work=work)
    assert rows["tokens"].shape == (work.batch, work.prompt + work.completion)
    prompt = work.prompt
    for name in ("tokens", "token_mask", "positions"):
        grouped = rows[name][:, :prompt].reshape(-1, train_step.GROUP, prompt)
        assert (grouped == grouped[:, :1]).all(), name
    assert rows["token_mask"][:, :prompt].all(axis=1).any() and not rows["token_mask"][:, :prompt].all()
    assert rows["loss_mask"].sum(axis=1).min() >= work.completion // 2


def test_reference_mask_is_causal_over_real_keys_and_never_empty():
    token_mask = np.array([[False, True, True, False], [True, True, True, True]])
    mask = train_step._torch_attention_mask(token_mask)  # pylint: disable=protected-access
    expected = np.array([[[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]],  # left pad: itself only
                         [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]], dtype=bool)[:, None]
    np.testing.assert_array_equal(mask, expected)
    rows = train_step.trajectories(vocab_size=100)
    mask = train_step._torch_attention_mask(rows["token_mask"])  # pylint: disable=protected-access
    real = rows["token_mask"].astype(bool)
    causal_real_keys = np.tri(real.shape[1], dtype=bool)[None] & real[:, None, :]
    assert not causal_real_keys.any(-1).all()  # the [B, T] mask leaves left-padding rows empty
    assert mask[:, 0].any(-1).all()
    np.testing.assert_array_equal(mask[:, 0][real], causal_real_keys[real])  # real queries attend as before


def test_first_updates_must_agree_within_the_dtype_tolerance():
    ours, reference = dict(loss=1.0, grad_norm=2.0, kl=0.01), dict(loss=1.0, grad_norm=2.02, kl=0.01)
    assert "grad_norm ours 2 torch 2.02 (rel 9.9e-03)" in train_step.check_first_update(ours, reference, "bfloat16")
    with pytest.raises(RuntimeError, match="disagree"):
        train_step.check_first_update(ours, reference, "float32")
    nan = dict(ours, grad_norm=float("nan"))
    with pytest.raises(RuntimeError, match="disagree"):
        train_step.check_first_update(nan, dict(reference, grad_norm=float("nan")), "bfloat16")
