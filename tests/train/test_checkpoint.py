"""Checkpoints: a save / restore round trip, and orbax's INFO logs kept off the console."""

import logging
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint
import pytest
from absl import logging as absl_logging

from rwr_jax.train import checkpoint


def _record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "message", None, None)


@pytest.fixture
def verbosity():
    previous = absl_logging.get_verbosity()
    yield absl_logging.set_verbosity
    absl_logging.set_verbosity(previous)


def test_orbax_info_is_dropped_unless_verbose(verbosity):
    orbax_file = os.path.join(os.path.dirname(orbax.checkpoint.__file__), "checkpoint_manager.py")
    ours = checkpoint.__file__
    keep = checkpoint.OrbaxInfoFilter().filter
    verbosity(absl_logging.INFO)
    assert not keep(_record(orbax_file, logging.INFO))
    assert keep(_record(orbax_file, logging.WARNING)) and keep(_record(orbax_file, logging.ERROR))
    assert keep(_record(ours, logging.INFO))
    verbosity(absl_logging.DEBUG)  # --verbosity=1: orbax's INFO is back
    assert keep(_record(orbax_file, logging.INFO))


def test_save_and_restore_round_trip(tmp_path):
    manager = checkpoint.make_manager(checkpoint.CheckpointConfig(directory=str(tmp_path), async_save=False))
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3, jnp.int32)}
    assert checkpoint.restore(manager, checkpoint.abstract_like(state)) is None  # nothing saved yet
    assert checkpoint.save(manager, 3, state, metadata={"elapsed_s": 1.5}, force=True)
    manager.wait_until_finished()
    restored, metadata = checkpoint.restore(manager, checkpoint.abstract_like(state))
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert int(restored["step"]) == 3 and metadata == {"elapsed_s": 1.5}
    assert any(isinstance(f, checkpoint.OrbaxInfoFilter) for f in absl_logging.get_absl_logger().filters)
