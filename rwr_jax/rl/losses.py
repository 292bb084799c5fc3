"""GRPO policy losses, chosen by name from the "loss" registry.

Per model-written completion token (loss_mask 1), with ratio = exp(logp - old_logp):

    l_t = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3
    k3  = exp(ref - logp) - (ref - logp) - 1     (KL to the frozen reference model)

With one policy update per rollout (the release), old_logp is the current logp under
`stop_gradient`: ratio == 1, clipping is inactive, and the gradient is A * grad(logp).

Every loss returns `LossTerms(numerator, denominator)` rather than a scalar. The loss of
an optimiser step is sum(numerators) / sum(denominators) over its micro-batches (and
devices), and its gradient sum(grad numerators) / sum(denominators), so gradient
accumulation and data parallelism compute exactly what the definition says. The
registered names differ only in how tokens are normalised (m = loss_mask, l = l_t;
#rows counts rows with at least one m = 1, so all-padding rows count for nothing):

    grpo:    numerator sum_b (sum_t m l / sum_t m)   denominator #rows
    bnpo:    numerator sum_bt m l / sum_bt m         denominator 1 (0 if sum_bt m = 0)
    dr_grpo: numerator sum_bt m l                    denominator #rows * max_completion_length
    dapo:    numerator sum_bt m l                    denominator sum_bt m

grpo, dr_grpo and dapo do not depend on how the batch is split. "bnpo" is the
release's loss: a token mean over each micro-batch (the batch this function sees),
then the mean over micro-batches, so it does depend on the split when token counts
differ. "dapo" is the same token mean over the whole optimiser batch. Diagnostics are
in `loss_diagnostics`.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rwr_jax import registry


class LossTerms(NamedTuple):
    """A loss (or metric) kept as a sum and the count it is to be divided by.

    Attributes:
      numerator: [] float32 sum.
      denominator: [] float32 count; terms combine by adding both fields.
    """

    numerator: jax.Array
    denominator: jax.Array

    def value(self) -> jax.Array:
        """[] float32 numerator / denominator (0 when the denominator is 0)."""
        return safe_divide(self.numerator, self.denominator)


def add_terms(a: LossTerms, b: LossTerms) -> LossTerms:
    """Combines the terms of two micro-batches (or devices)."""
    return LossTerms(a.numerator + b.numerator, a.denominator + b.denominator)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, 0 where the denominator is 0 (no NaN, no NaN gradient)."""
    ok = denominator > 0
    return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Settings of the GRPO policy loss.

    Attributes:
      loss_type: name in the "loss" registry (see the module docstring).
      beta: KL coefficient; 0 skips the reference model entirely.
      epsilon_low: ratio clip below, 1 - epsilon_low.
      epsilon_high: ratio clip above, 1 + epsilon_high.
      log_ratio_clamp: |log ratio| (policy/old and ref/policy) is clamped to this
        before exp, so one bad token cannot overflow.
      max_completion_length: the constant token normaliser of "dr_grpo" (required there).
    """

    loss_type: str = "bnpo"
    beta: float = 0.001
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    log_ratio_clamp: float = 20.0
    max_completion_length: int | None = None

    def __post_init__(self):
        if self.loss_type not in registry.names("loss"):
            raise ValueError(f"LossConfig.loss_type must be one of {registry.names('loss')}, got "
                             f"{self.loss_type!r}")
        if self.beta < 0:
            raise ValueError(f"LossConfig.beta must be >= 0, got {self.beta}")
        if not 0 <= self.epsilon_low < 1:
            raise ValueError(f"LossConfig.epsilon_low must be in [0, 1), got {self.epsilon_low}")
        if self.epsilon_high < 0:
            raise ValueError(f"LossConfig.epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.log_ratio_clamp <= 0:
            raise ValueError(f"LossConfig.log_ratio_clamp must be > 0, got {self.log_ratio_clamp}")
        if self.loss_type == "dr_grpo" and (self.max_completion_length is None or self.max_completion_length < 1):
            raise ValueError(f"LossConfig.max_completion_length must be >= 1 for loss_type 'dr_grpo', got "
                             f"{self.max_completion_length}")


def _ratio(logprobs, old_logprobs, loss_mask, config):
    """[B, C] exp(clamped logp - old); old = stop_gradient(logp) when None."""
    old = jax.lax.stop_gradient(logprobs) if old_logprobs is None else old_logprobs
    log_ratio = jnp.where(loss_mask, logprobs - old, 0.0)
    return jnp.exp(jnp.clip(log_ratio, -config.log_ratio_clamp, config.log_ratio_clamp))


def _k3(logprobs, ref_logprobs, loss_mask, config):
    """[B, C] k3 estimate of KL(policy || ref): exp(d) - d - 1, d = ref - logp (clamped)."""
    d = jnp.where(loss_mask, ref_logprobs - logprobs, 0.0)
    d = jnp.clip(d, -config.log_ratio_clamp, config.log_ratio_clamp)
    return jnp.exp(d) - d - 1.0


def per_token_loss(logprobs: jax.Array, loss_mask: jax.Array, advantages: jax.Array, config: LossConfig, *,
                   old_logprobs: jax.Array | None = None, ref_logprobs: jax.Array | None = None) -> jax.Array:
    """The clipped surrogate plus beta * k3, per completion token.

    Args:
      logprobs: [B, C] float32 log-probabilities of the completion tokens under the policy.
      loss_mask: [B, C] bool, True on model-written tokens.
      advantages: [B] float32.
      config: the loss settings.
      old_logprobs: [B, C] float32 of the policy that sampled (None: ratio == 1).
      ref_logprobs: [B, C] float32 of the reference model; required iff beta > 0.

    Returns:
      [B, C] float32, 0 where loss_mask is False.
    """
    if loss_mask.shape != logprobs.shape or advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"expected logprobs [B, C], loss_mask [B, C] and advantages [B], got shapes "
                         f"{logprobs.shape}, {loss_mask.shape} and {advantages.shape}")
    mask = loss_mask.astype(bool)
    logprobs = jnp.where(mask, logprobs.astype(jnp.float32), 0.0)
    ratio = _ratio(logprobs, old_logprobs, mask, config)
    adv = advantages.astype(jnp.float32)[:, None]
    clipped = jnp.clip(ratio, 1.0 - config.epsilon_low, 1.0 + config.epsilon_high)
    loss = -jnp.minimum(ratio * adv, clipped * adv)
    if config.beta > 0:
        if ref_logprobs is None:
            raise ValueError(f"ref_logprobs is required when LossConfig.beta > 0, got beta={config.beta}")
        loss = loss + config.beta * _k3(logprobs, ref_logprobs, mask, config)
    return jnp.where(mask, loss, 0.0)


def _row_sums(per_token: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, C] -> ([B] masked sums, [B] float32 token counts)."""
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(per_token * mask, axis=1), jnp.sum(mask, axis=1)


@registry.register("loss", "grpo")
def grpo_loss(per_token: jax.Array, loss_mask: jax.Array, config: LossConfig) -> LossTerms:
    """Token mean per sequence, then mean over sequences: (sum_b mean_b, #rows)."""
    sums, counts = _row_sums(per_token, loss_mask)
    return LossTerms(jnp.sum(safe_divide(sums, counts)), jnp.sum(counts > 0).astype(jnp.float32))


@registry.register("loss", "bnpo")
def bnpo_loss(per_token: jax.Array, loss_mask: jax.Array, config: LossConfig) -> LossTerms:
    """Token mean over this micro-batch, counted once: (sum m l / sum m, 1)."""
    sums, counts = _row_sums(per_token, loss_mask)
    total = jnp.sum(counts)
    return LossTerms(safe_divide(jnp.sum(sums), total), (total > 0).astype(jnp.float32))


@registry.register("loss", "dr_grpo")
def dr_grpo_loss(per_token: jax.Array, loss_mask: jax.Array, config: LossConfig) -> LossTerms:
    """Token sum over a constant: (sum m l, #rows * max_completion_length)."""
    sums, counts = _row_sums(per_token, loss_mask)
    rows = jnp.sum(counts > 0).astype(jnp.float32)
    return LossTerms(jnp.sum(sums), rows * float(config.max_completion_length))


@registry.register("loss", "dapo")
def dapo_loss(per_token: jax.Array, loss_mask: jax.Array, config: LossConfig) -> LossTerms:
    """Token mean over the global batch: (sum m l, sum m), denominators add up."""
    sums, counts = _row_sums(per_token, loss_mask)
    return LossTerms(jnp.sum(sums), jnp.sum(counts))


def policy_loss(logprobs: jax.Array, loss_mask: jax.Array, advantages: jax.Array, config: LossConfig, *,
                old_logprobs: jax.Array | None = None, ref_logprobs: jax.Array | None = None) -> LossTerms:
    """The GRPO loss of one micro-batch, normalised as `config.loss_type` says.

    Args:
      logprobs: [B, C] float32 policy log-probabilities of the completion tokens.
      loss_mask: [B, C] bool, True on model-written tokens.
      advantages: [B] float32.
      config: the loss settings.
      old_logprobs: [B, C] float32 of the sampling policy; None for one update per
        rollout (stop_gradient of `logprobs`, ratio == 1).
      ref_logprobs: [B, C] float32 of the reference model; required iff beta > 0.

    Returns:
      LossTerms; differentiate `numerator` and divide by the summed denominators.
    """
    per_token = per_token_loss(logprobs, loss_mask, advantages, config, old_logprobs=old_logprobs,
                               ref_logprobs=ref_logprobs)
    return registry.lookup("loss", config.loss_type)(per_token, loss_mask, config)


def loss_diagnostics(logprobs: jax.Array, loss_mask: jax.Array, advantages: jax.Array, config: LossConfig, *,
                     old_logprobs: jax.Array | None = None, ref_logprobs: jax.Array | None = None,
                     entropies: jax.Array | None = None) -> dict[str, LossTerms]:
    """Token-mean metrics of a micro-batch, each as (masked sum, token count).

    Args:
      logprobs: [B, C] float32 policy log-probabilities of the completion tokens.
      loss_mask: [B, C] bool, True on model-written tokens.
      advantages: [B] float32.
      config: the loss settings (clip range, clamp).
      old_logprobs: [B, C] float32 of the sampling policy, or None (ratio == 1).
      ref_logprobs: [B, C] float32 of the reference model, or None (no "kl").
      entropies: [B, C] float32 policy entropies, or None (no "entropy").

    Returns:
      {"ratio": mean ratio, "clip_low": share of tokens with ratio < 1 - eps_low and
      A < 0, "clip_high": ratio > 1 + eps_high and A > 0}, plus "kl" (mean k3) when
      ref_logprobs is given and "entropy" when entropies are given. No gradients.
    """
    mask = loss_mask.astype(bool)
    weight = mask.astype(jnp.float32)
    count = jnp.sum(weight)
    logprobs = jax.lax.stop_gradient(jnp.where(mask, logprobs.astype(jnp.float32), 0.0))

    def token_mean(values):
        return LossTerms(jnp.sum(jnp.where(mask, jax.lax.stop_gradient(values), 0.0)), count)

    ratio = _ratio(logprobs, old_logprobs, mask, config)
    adv = advantages.astype(jnp.float32)[:, None]
    metrics = {
        "ratio": token_mean(ratio),
        "clip_low": token_mean(((ratio < 1.0 - config.epsilon_low) & (adv < 0)).astype(jnp.float32)),
        "clip_high": token_mean(((ratio > 1.0 + config.epsilon_high) & (adv > 0)).astype(jnp.float32)),
    }
    if ref_logprobs is not None:
        metrics["kl"] = token_mean(_k3(logprobs, ref_logprobs, mask, config))
    if entropies is not None:
        metrics["entropy"] = token_mean(entropies.astype(jnp.float32))
    return metrics
