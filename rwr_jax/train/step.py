"""One jitted GRPO update: policy log-probs, loss, gradients, optimiser step.

The batch is split into micro-batches scanned in sequence; each returns its loss as a
(numerator, denominator) pair and the gradient of its numerator, so the accumulated
update equals the full-batch one exactly (gradient = sum of numerator gradients /
sum of denominators). Images are encoded once per step by the frozen vision tower and
scattered into each row's `<|image_pad|>` embeddings through a host-built index.
"""

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwr_jax.models import packing
from rwr_jax.models.qwen2_vl import decoder
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM
from rwr_jax.rl import head_loss
from rwr_jax.rl import logprobs as logprobs_lib
from rwr_jax.rl import losses


@flax.struct.dataclass(kw_only=True)
class TrainState:
    """Attributes:
      step: [] int32 optimiser steps taken.
      params: the policy parameters.
      opt_state: the optax state.
    """

    step: jax.Array
    params: Any
    opt_state: Any


@flax.struct.dataclass(kw_only=True)
class TrainBatch:
    """B = P * G prompt + completion sequences (device arrays).

    Attributes:
      tokens: [B, P + C] int32 left-padded prompt, then completion.
      token_mask: [B, P + C] bool.
      positions: [B, P + C] or [3, B, P + C] int32.
      loss_mask: [B, C] bool, model-written completion tokens.
      advantages: [B] float32.
      sampler_logprobs: [B, C] float32 log-probs recorded by the sampler.
      images: VisionInputs of the P prompts, or None.
      image_feature_index: [B, P + C] int32, for each `<|image_pad|>` token its rank
        among all image tokens of the batch's prompts (row-major), -1 elsewhere.
    """

    tokens: jax.Array
    token_mask: jax.Array
    positions: jax.Array
    loss_mask: jax.Array
    advantages: jax.Array
    sampler_logprobs: jax.Array
    images: Any = None
    image_feature_index: Any = None


def _split(x: jax.Array, num: int, axis: int = 0) -> jax.Array:
    """[..., B, ...] -> [num, ..., B / num, ...] along the batch `axis`."""
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(num, -1, *x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)


def _micro_batches(rows: dict[str, jax.Array], num: int) -> dict[str, jax.Array]:
    """Splits every row-major array (and [3, B, L] mRoPE positions) into num micro-batches."""
    return {name: _split(x, num, axis=1 if name == "positions" and x.ndim == 3 else 0) for name, x in rows.items()}


def _embeds(model, params, tokens, feature_index, features):
    embeds = model.apply({"params": params}, tokens, method=type(model).embed)
    if features is None:
        return embeds
    picked = features[jnp.maximum(feature_index, 0)].astype(embeds.dtype)
    return jnp.where((feature_index >= 0)[..., None], picked, embeds)


def _completion_hidden(model, params, micro, features, prompt_length, prompt_group, completion_tokens, row_groups):
    """[B, C, D] final hidden states predicting the completion tokens of a micro-batch.

    With completion_tokens = M, the completions' projections and MLPs run on their real
    tokens only (padding-free, `models.packing`: M >= the real tokens of each of the
    `row_groups` groups of rows).

    With prompt_group = g > 1, rows b * g ... b * g + g - 1 share one prompt: it runs
    once (a prefill into a KV cache), the cache is repeated for its g completions, and
    the completions run as one chunk attending to it, the gradient of the shared
    prompt summing over its completions: the same result as g full forward passes,
    with 1 / g of the prompt's work.
    """
    tokens, mask, positions, index = (micro[name] for name in ("tokens", "token_mask", "positions",
                                                              "image_feature_index"))
    if prompt_group == 1 and completion_tokens is None:
        hidden, _ = model.apply({"params": params}, tokens, positions, mask,
                                embeds=_embeds(model, params, tokens, index, features), return_hidden=True)
        return hidden[:, prompt_length - 1:-1]

    def prompt_rows(x, axis=0):  # the first row of every group, prompt positions only
        return jax.lax.slice_in_dim(x, 0, None, prompt_group, axis)[..., :prompt_length]

    prompt, completion = prompt_rows(tokens), tokens[:, prompt_length:]
    cache = decoder.init_cache(model.config, batch=prompt.shape[0], max_length=tokens.shape[1])
    prompt_hidden, cache = model.apply(
        {"params": params}, prompt, prompt_rows(positions, positions.ndim - 2), prompt_rows(mask), cache,
        embeds=_embeds(model, params, prompt, prompt_rows(index), features), return_hidden=True)
    completion_mask = mask[:, prompt_length:]
    pack_index = None if completion_tokens is None else packing.pack_index(completion_mask, completion_tokens,
                                                                           row_groups)
    hidden, _ = model.apply(
        {"params": params}, completion, positions[..., prompt_length:], completion_mask,
        cache.repeat_rows(prompt_group), embeds=_embeds(model, params, completion, index[:, prompt_length:],
                                                        features), return_hidden=True, pack_index=pack_index)
    if completion_tokens is not None:  # NaN values and gradients if some real token did not fit
        hidden = hidden * jnp.where(packing.overflows(completion_mask, completion_tokens, row_groups), jnp.nan, 1.0)
    # Completion token t is predicted at position P + t - 1: the prompt's last one for t = 0.
    last = jnp.repeat(prompt_hidden[:, -1:], prompt_group, axis=0)
    return jnp.concatenate([last, hidden[:, :-1]], axis=1)


def _completion_logprobs(model, params, micro, features, prompt_length, chunk_size, prompt_group, loss_tokens,
                         completion_tokens, row_groups, entropy=False):
    """[B, C] log-probs (and entropies) of the completion tokens of a micro-batch.

    With loss_tokens = N, the LM head runs on the loss tokens only (N >= their count,
    see `packed_sizes`); other positions hold 0. Other arguments: `_completion_hidden`.
    """
    hidden = _completion_hidden(model, params, micro, features, prompt_length, prompt_group, completion_tokens,
                                row_groups)
    completion = micro["tokens"][:, prompt_length:]
    if loss_tokens is None:
        return logprobs_lib.chunked_logprobs(model, params, hidden, completion, chunk_size=chunk_size,
                                             return_entropy=entropy)
    return logprobs_lib.masked_logprobs(model, params, hidden, completion, micro["loss_mask"], num_tokens=loss_tokens,
                                        chunk_size=chunk_size, return_entropy=entropy, groups=row_groups)


@functools.partial(jax.jit, static_argnames=("model",))
def _image_features(model, params, images):
    """[K, D] real image tokens of the batch in order (frozen tower: no gradient); jitted, as the
    trainer also calls it outside the update (confidence gain)."""
    if images is None:
        return None
    features = model.apply({"params": params}, images, method=VisionLanguageLM.encode_images)
    flat = features.reshape(-1, features.shape[-1])
    valid = images.patch_mask.reshape(images.patch_mask.shape[0], -1, model.vision.merge_unit)[..., 0]
    order = jnp.argsort(~valid.reshape(-1), stable=True)
    return jax.lax.stop_gradient(flat[order])


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "loss_config", "num_micro_batches",
                                             "chunk_size", "prompt_length", "prompt_group", "loss_tokens",
                                             "completion_tokens", "row_groups"),
                   donate_argnames=("state",))
def train_step(model, optimizer: optax.GradientTransformation, state: TrainState, batch: TrainBatch, ref_params,
               *, loss_config: losses.LossConfig, num_micro_batches: int, chunk_size: int, prompt_length: int,
               prompt_group: int = 1, loss_tokens: int | None = None, completion_tokens: int | None = None,
               row_groups: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on a batch of trajectories.

    Args:
      model: DecoderLM or VisionLanguageLM (static).
      optimizer: from `optimizer.make_optimizer` (static).
      state: TrainState (donated).
      batch: TrainBatch of B rows; B divisible by num_micro_batches.
      ref_params: frozen reference params for the KL term (unused when beta == 0).
      loss_config: the GRPO loss settings.
      num_micro_batches: gradient-accumulation steps.
      chunk_size: LM-head chunk for log-probs.
      prompt_length: P, the prompt part of every sequence.
      prompt_group: g, consecutive rows of every micro-batch that share one prompt
        (tokens, mask, positions, images: G completions of a prompt, see
        `shared_prompt_group`); each prompt then runs once, not g times. 1 = no sharing.
      loss_tokens: N >= the loss tokens of every row group of every micro-batch
        (`packed_sizes`): the LM head runs on those only, not on padding or retrieved
        text, its backward pass fused into its forward pass (`rl.head_loss`). None = on
        every completion position. A too-small N makes the update non-finite (skipped).
      completion_tokens: M >= the real completion tokens of every row group of every
        micro-batch (`packed_sizes`): the completions' position-wise work runs on those
        only (the prompts then run as a prefill even with prompt_group 1). None =
        padded. A too-small M makes the update non-finite (skipped).
      row_groups: G, groups of consecutive rows of a micro-batch whose tokens are packed
        separately (`models.packing`): the batch shards of the mesh (`batch_shard_groups`), so
        that each device packs and computes its own rows.

    Returns:
      (new state, metrics of this step as scalars).
    """
    rows_per_micro = batch.tokens.shape[0] // num_micro_batches
    for name, value in (("prompt_group", prompt_group), ("row_groups", row_groups)):
        if value < 1 or rows_per_micro % value:
            raise ValueError(f"{name} must divide the {rows_per_micro} rows of a micro-batch, got {value}")
    features = _image_features(model, state.params, batch.images)
    rows = {"tokens": batch.tokens, "token_mask": batch.token_mask, "positions": batch.positions,
            "loss_mask": batch.loss_mask, "advantages": batch.advantages, "sampler": batch.sampler_logprobs,
            "image_feature_index": (batch.image_feature_index if batch.image_feature_index is not None
                                    else jnp.full(batch.tokens.shape, -1, jnp.int32))}
    micro_batches = _micro_batches(rows, num_micro_batches)
    ref_features = None if loss_config.beta == 0 else _image_features(model, ref_params, batch.images)

    def loss_fn(params, micro):
        ref = None
        if loss_config.beta > 0:
            ref = jax.lax.stop_gradient(_completion_logprobs(model, ref_params, micro, ref_features, prompt_length,
                                                             chunk_size, prompt_group, loss_tokens,
                                                             completion_tokens, row_groups))

        def policy_loss(logp):
            return losses.policy_loss(logp, micro["loss_mask"], micro["advantages"], loss_config, ref_logprobs=ref)

        if loss_tokens is None:
            logp, entropy = _completion_logprobs(model, params, micro, features, prompt_length, chunk_size,
                                                  prompt_group, None, completion_tokens, row_groups, entropy=True)
            terms = policy_loss(logp)
        else:  # the LM head's backward pass fused into its forward pass (rl/head_loss.py)
            hidden = _completion_hidden(model, params, micro, features, prompt_length, prompt_group,
                                        completion_tokens, row_groups)
            numerator, logp, entropy = head_loss.fused_head_loss(
                model, params, hidden, micro["tokens"][:, prompt_length:], micro["loss_mask"],
                lambda x: policy_loss(x).numerator, num_tokens=loss_tokens, chunk_size=chunk_size,
                groups=row_groups)
            terms = policy_loss(logp)._replace(numerator=numerator)
        metrics = losses.loss_diagnostics(logp, micro["loss_mask"], micro["advantages"], loss_config,
                                          ref_logprobs=ref, entropies=entropy)
        mask = micro["loss_mask"]
        metrics["logprob_mismatch"] = losses.LossTerms(
            jnp.sum(jnp.where(mask, jnp.abs(jax.lax.stop_gradient(logp) - micro["sampler"]), 0.0)),
            jnp.sum(mask.astype(jnp.float32)))
        return terms.numerator, (terms, metrics)

    def accumulate(carry, micro):
        grads, totals = carry
        (_, (terms, metrics)), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, micro)
        grads = jax.tree_util.tree_map(jnp.add, grads, micro_grads)
        totals = jax.tree_util.tree_map(jnp.add, totals, {"loss": terms, **metrics})
        return (grads, totals), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
    first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
    _, (shape_terms, shape_metrics) = jax.eval_shape(loss_fn, state.params, first)
    totals = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), {"loss": shape_terms, **shape_metrics})
    (grad_sums, totals), _ = jax.lax.scan(accumulate, (zeros, totals), micro_batches)
    denominator = totals["loss"].denominator
    grads = jax.tree_util.tree_map(lambda g: losses.safe_divide(g, denominator), grad_sums)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {name: terms.value() for name, terms in totals.items()}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["nonfinite_updates"] = opt_state.total_notfinite.astype(jnp.float32)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def shared_prompt_group(group_size: int, batch_rows: int, num_micro_batches: int) -> int:
    """The largest `prompt_group` for B = batch_rows rows made of groups of `group_size`
    consecutive rows with one prompt each, split into `num_micro_batches` micro-batches:
    gcd(G, B / num_micro_batches) (a micro-batch boundary may cut a group)."""
    return math.gcd(group_size, batch_rows // num_micro_batches)


def batch_shard_groups(mesh: jax.sharding.Mesh, batch_rows: int, num_micro_batches: int) -> int:
    """`train_step`'s `row_groups` on `mesh`: its batch shards (data x fsdp), or their largest
    divisor that divides a micro-batch's rows, so each device packs its own rows."""
    return math.gcd(mesh.shape["data"] * mesh.shape["fsdp"], batch_rows // num_micro_batches)


def packed_sizes(loss_mask: np.ndarray, token_mask: np.ndarray, num_micro_batches: int,
                 chunk_size: int, row_groups: int = 1) -> dict[str, int]:
    """`train_step`'s static `loss_tokens` and `completion_tokens` for a batch's host masks.

    Args:
      loss_mask: [B, C] bool.
      token_mask: [B, P + C] bool.
      num_micro_batches: m.
      chunk_size: the LM-head chunk (the bucket granule, `packing.token_bucket`).
      row_groups: G, the row groups of a micro-batch packed separately.

    Returns:
      {"loss_tokens": N, "completion_tokens": M}: the largest row group's count of loss
      tokens / of real completion tokens, bucketed with at least one chunk (short
      batches share one program, as `Trajectory.trimmed` does), at most a group's
      B / (m G) * C.
    """
    loss_mask = np.asarray(loss_mask)
    completion_mask = np.asarray(token_mask)[:, -loss_mask.shape[1]:]
    limit = loss_mask.size // (num_micro_batches * row_groups)

    def bucket(mask):
        count = int(mask.reshape(num_micro_batches * row_groups, -1).sum(axis=1).max())
        return min(packing.token_bucket(max(count, chunk_size), chunk_size), limit)

    return {"loss_tokens": bucket(loss_mask), "completion_tokens": bucket(completion_mask)}
