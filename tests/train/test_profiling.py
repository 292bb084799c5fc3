"""The profile window: a jax.profiler trace of exactly its steps, also when the run stops inside it."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from rwr_jax.train import profiling


def _traces(logdir) -> list[str]:
    return glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))


@jax.jit
def _profiled_step(x):
    return jnp.tanh(x) @ x


def test_traces_the_steps_of_the_window(tmp_path):
    window = profiling.ProfileWindow(str(tmp_path), first_step=1, num_steps=2, total_steps=4)
    running = []
    for steps_done in range(1, 5):
        _profiled_step(jnp.full((8, 8), float(steps_done))).block_until_ready()
        window.after_step(steps_done)
        running.append(window.running)
    assert running == [True, True, False, False]  # started after step 1, stopped after step 3
    traces = _traces(tmp_path)
    assert len(traces) == 1
    with open(traces[0], "rb") as f:
        assert b"_profiled_step" in f.read()


def test_stop_inside_the_window_keeps_the_trace(tmp_path):
    window = profiling.ProfileWindow(str(tmp_path), first_step=1, num_steps=3, total_steps=4)
    window.after_step(1)
    _profiled_step(jnp.ones((8, 8))).block_until_ready()
    window.stop()  # the run failed in step 2
    window.stop()  # and a second stop does nothing
    assert not window.running and len(_traces(tmp_path)) == 1


def test_a_run_resumed_inside_the_window_traces_the_steps_left(tmp_path):
    window = profiling.ProfileWindow(str(tmp_path), first_step=1, num_steps=3, total_steps=5)
    window.begin(2)  # resumed after step 2: steps 3 and 4 are left
    assert window.running
    _profiled_step(jnp.ones((8, 8))).block_until_ready()
    window.after_step(3)
    assert window.running
    window.after_step(4)
    assert not window.running and len(_traces(tmp_path)) == 1


@pytest.mark.parametrize("steps_done,running", [(0, False), (1, True), (3, True), (4, False), (5, False)])
def test_begin_starts_only_inside_the_window(tmp_path, steps_done, running):
    """Window = steps 2-4 (first_step 1, num_steps 3): a run resumed after step 1 starts tracing at
    once, one resumed after step 4 or later is past it (a warning, nothing traced)."""
    window = profiling.ProfileWindow(str(tmp_path), first_step=1, num_steps=3, total_steps=5)
    window.begin(steps_done)
    assert window.running == running
    window.stop()


@pytest.mark.parametrize("first_step,num_steps", [(0, 1), (3, 2), (1, 0), (1, -1)])
def test_a_window_outside_the_run_is_refused(tmp_path, first_step, num_steps):
    with pytest.raises(ValueError, match=f"profile.first_step={first_step}, profile.num_steps={num_steps}"):
        profiling.ProfileWindow(str(tmp_path), first_step, num_steps, total_steps=4)
