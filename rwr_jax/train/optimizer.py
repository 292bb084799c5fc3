"""The optimiser: AdamW with cosine decay after linear warm-up, global-norm clipping,
weight decay on matrices only, frozen parameters untouched, non-finite updates skipped.
"""

import dataclasses
import math

import jax
import optax


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Med-RwR release settings by default.

    Attributes:
      learning_rate: peak learning rate.
      warmup_ratio: fraction of total steps spent warming up linearly from 0.
      total_steps: optimiser steps of the run (for the schedule).
      b1, b2, eps: Adam moments.
      weight_decay: decoupled weight decay, applied to matrices (ndim >= 2) only, as
        Hugging Face's Trainer does (no decay on biases and norm scales).
      max_grad_norm: global-norm clip; 0 disables.
      frozen_prefixes: top-level param keys that never change (e.g. ("visual",)).
      max_consecutive_nonfinite: after this many non-finite updates in a row the run
        fails instead of skipping (optax.apply_if_finite).
    """

    learning_rate: float = 1e-6
    warmup_ratio: float = 0.05
    total_steps: int = 1000
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    frozen_prefixes: tuple[str, ...] = ()
    max_consecutive_nonfinite: int = 10

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"optimizer.total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optimizer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over ceil(warmup_ratio * total_steps) steps (as
    Hugging Face's Trainer counts them), then cosine decay to 0 at total_steps."""
    warmup = math.ceil(config.warmup_ratio * config.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1), end_value=0.0)


def _labels(params, frozen_prefixes):
    return {key: jax.tree_util.tree_map(lambda _: "frozen" if key in frozen_prefixes else "trained", value)
            for key, value in params.items()}


def make_optimizer(config: OptimizerConfig, params) -> optax.GradientTransformation:
    """The optax transformation for `params` (a dict whose top-level keys are modules)."""
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    chain = []
    if config.max_grad_norm:
        chain.append(optax.clip_by_global_norm(config.max_grad_norm))
    chain.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=decay_mask))
    trained = optax.chain(*chain)
    if config.frozen_prefixes:
        trained = optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()},
                                        _labels(params, config.frozen_prefixes))
    return optax.apply_if_finite(trained, max_consecutive_errors=config.max_consecutive_nonfinite)
