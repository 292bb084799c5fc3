"""Group-relative advantage estimators, chosen by name from the "advantage" registry.

A batch holds B = P * G completions, the G completions of prompt p in rows
p * G ... p * G + G - 1. Every estimator maps rewards [B] to advantages [B] using only
the statistics of each row's own group. With data parallelism, rewards must be the
global batch (gathered across devices) before grouping; under `jit` on a global array
that is automatic.

    config = AdvantageConfig(estimator="grpo", group_size=8)
    advantages = compute_advantages(rewards, config)

A group of one completion, or a group whose rewards are all equal, carries no signal:
every estimator returns exactly 0 for it, never NaN.
"""

import dataclasses

import jax
import jax.numpy as jnp

from rwr_jax import registry


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdvantageConfig:
    """How rewards become advantages.

    Attributes:
      estimator: name in the "advantage" registry ("grpo", "dr_grpo", "rloo").
      group_size: G, completions per prompt (contiguous rows).
      eps: added to the group standard deviation by "grpo" (the release: 1e-4).
    """

    estimator: str = "grpo"
    group_size: int = 8
    eps: float = 1e-4

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"AdvantageConfig.group_size must be >= 1, got {self.group_size}")
        if self.eps < 0:
            raise ValueError(f"AdvantageConfig.eps must be >= 0, got {self.eps}")


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
    """[B] -> [B / G, G] float32, checking that G divides B."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be [B], got shape {rewards.shape}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"batch size {rewards.shape[0]} is not a multiple of group_size {group_size}")
    return rewards.astype(jnp.float32).reshape(-1, group_size)


def _centered(groups: jax.Array) -> jax.Array:
    """[P, G] -> r - group mean, computed around the group's first reward.

    Shifting by the first reward first makes an all-equal group exactly 0 (a plain
    mean of 0.1s is not exactly 0.1 in float32) and loses less precision.
    """
    shifted = groups - groups[:, :1]
    return shifted - jnp.mean(shifted, axis=1, keepdims=True)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (no NaN, no NaN gradient)."""
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


@registry.register("advantage", "grpo")
def grpo_advantages(rewards: jax.Array, config: AdvantageConfig) -> jax.Array:
    """GRPO: A_i = (r_i - mean_G r) / (std_G r + eps), std unbiased (ddof = 1).

    Args:
      rewards: [B] float, B = P * G, groups contiguous.
      config: group_size and eps.

    Returns:
      [B] float32. A group of size 1 has std 0 (not NaN) and advantage 0.
    """
    groups = _grouped(rewards, config.group_size)
    centered = _centered(groups)
    ddof_count = max(config.group_size - 1, 1)
    variance = jnp.sum(jnp.square(centered), axis=1, keepdims=True) / ddof_count
    # sqrt has an infinite slope at 0: keep even the (unused) reward gradient finite.
    std = jnp.where(variance > 0, jnp.sqrt(jnp.where(variance > 0, variance, 1.0)), 0.0)
    return _safe_divide(centered, std + config.eps).reshape(-1)


@registry.register("advantage", "dr_grpo")
def dr_grpo_advantages(rewards: jax.Array, config: AdvantageConfig) -> jax.Array:
    """Dr. GRPO: A_i = r_i - mean_G r (no division by the group std).

    Args:
      rewards: [B] float, B = P * G, groups contiguous.
      config: group_size.

    Returns:
      [B] float32.
    """
    return _centered(_grouped(rewards, config.group_size)).reshape(-1)


@registry.register("advantage", "rloo")
def rloo_advantages(rewards: jax.Array, config: AdvantageConfig) -> jax.Array:
    """RLOO: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_G r).

    Args:
      rewards: [B] float, B = P * G, groups contiguous.
      config: group_size.

    Returns:
      [B] float32; 0 for groups of size 1 (no other sample to compare with).
    """
    centered = _centered(_grouped(rewards, config.group_size))
    scale = config.group_size / (config.group_size - 1) if config.group_size > 1 else 0.0
    return (centered * scale).reshape(-1)


def compute_advantages(rewards: jax.Array, config: AdvantageConfig) -> jax.Array:
    """Runs the estimator named by `config.estimator`.

    Args:
      rewards: [B] float, B = P * G, the G completions of a prompt in contiguous rows.
      config: the estimator and its settings.

    Returns:
      [B] float32 advantages.
    """
    return registry.lookup("advantage", config.estimator)(rewards, config)
