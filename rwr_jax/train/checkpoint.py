"""Checkpoints: one orbax CheckpointManager holding the train state, the data
iterator's position and a small JSON of run metadata, so a resumed run continues
exactly where it stopped (same params, optimiser moments, step, RNG and data).

    manager = make_manager(CheckpointConfig(directory=...))
    save(manager, step, state, data_iterator, metadata)
    state, metadata = restore(manager, abstract_state, data_iterator)  # or None
"""

import dataclasses
import logging as python_logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Attributes:
      directory: where checkpoints live (created if missing).
      save_every: steps between saves (the last step is always saved).
      keep: how many recent checkpoints to keep.
      async_save: write in a background thread while training continues.
    """

    directory: str
    save_every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.save_every < 1 or self.keep < 1:
            raise ValueError(f"checkpoint.save_every and checkpoint.keep must be >= 1, got {self.save_every}, "
                             f"{self.keep}")


class OrbaxInfoFilter(python_logging.Filter):
    """Keeps orbax's INFO records (about 25 per save: handlers, renames, timings) out of the
    console unless --verbosity >= 1; its warnings and errors pass. `save` logs one line per
    checkpoint itself."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return (record.levelno >= python_logging.WARNING or logging.get_verbosity() >= logging.DEBUG
                or f"{os.sep}orbax{os.sep}" not in record.pathname)


_ORBAX_INFO_FILTER = OrbaxInfoFilter()


def make_manager(config: CheckpointConfig) -> ocp.CheckpointManager:
    """An orbax CheckpointManager of the train state, the data position and run metadata
    (orbax's INFO logs go to --verbosity=1, `OrbaxInfoFilter`)."""
    logging.get_absl_logger().addFilter(_ORBAX_INFO_FILTER)  # once: the same filter is not added twice
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep, save_interval_steps=config.save_every, create=True,
        enable_async_checkpointing=config.async_save)
    return ocp.CheckpointManager(
        os.path.abspath(config.directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                       "metadata": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator=None,
         metadata: dict | None = None, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    items = {"state": ocp.args.StandardSave(state), "metadata": ocp.args.JsonSave(metadata or {})}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
    if saved:
        logging.info("checkpoint step %d -> %s", step, manager.directory)
    return saved


def restore(manager: ocp.CheckpointManager, abstract_state: Any, data_iterator=None):
    """Restores the latest checkpoint into the shapes/shardings of `abstract_state`.

    Args:
      manager: from make_manager.
      abstract_state: pytree of jax.ShapeDtypeStruct (with shardings) of the state.
      data_iterator: a grain iterator to move to the saved position (in place).

    Returns:
      (state, metadata dict), or None when there is no checkpoint.
    """
    step = manager.latest_step()
    if step is None:
        return None
    items = {"state": ocp.args.StandardRestore(abstract_state), "metadata": ocp.args.JsonRestore()}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint step %d from %s", step, manager.directory)
    return restored["state"], dict(restored["metadata"] or {})


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a concrete pytree, for `restore`."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
