"""Per-token log-probabilities (and entropies) by teacher forcing, in sequence chunks.

The model runs once to its final hidden states; the LM head and the softmax then run
over chunks of the length axis (`jax.lax.map`), each chunk rematerialised in the
backward pass, so the [B, T, V] logits never exist at once, forward or backward.
With V = 152k and T = 8k, full float32 logits would take ~5 GB per sequence.

Works with `DecoderLM` and `VisionLanguageLM` (pass `images=`).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwr_jax.models import packing


def hidden_states(model: nn.Module, params, tokens: jax.Array, positions: jax.Array, token_mask: jax.Array, *,
                  images=None) -> jax.Array:
    """Final-normed hidden states of a full (uncached) forward pass.

    Args:
      model: a `DecoderLM` or `VisionLanguageLM`.
      params: its parameter pytree (without the {"params": ...} wrapper).
      tokens: [B, T] int32.
      positions: [B, T] or [3, B, T] int32 rotary positions.
      token_mask: [B, T] bool, False on padding.
      images: optional `VisionInputs` (VisionLanguageLM only).

    Returns:
      [B, T, D] hidden states in the model's compute dtype.
    """
    kwargs = {} if images is None else {"images": images}
    hidden, _ = model.apply({"params": params}, tokens, positions, token_mask, return_hidden=True, **kwargs)
    return hidden


def softmax_stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[..., V] logits, [...] int32 targets -> float32 (log p(target) [...], entropy [...], softmax [..., V])."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    targets = jnp.clip(targets, 0, logits.shape[-1] - 1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse[..., None])
    return picked - lse, lse - jnp.sum(probs * logits, axis=-1), probs


def chunked_logprobs(model: nn.Module, params, hidden: jax.Array, targets: jax.Array, *, chunk_size: int,
                     return_entropy: bool = False):
    """log p(targets) from hidden states, the LM head applied chunk by chunk.

    Args:
      model: the model whose `logits(hidden)` method is the LM head.
      params: its parameter pytree.
      hidden: [B, T, D] final hidden states.
      targets: [B, T] int32, the id whose probability position t predicts.
      chunk_size: positions per chunk (>= 1; need not divide T).
      return_entropy: also return the entropy of each predicted distribution.

    Returns:
      [B, T] float32 log-probabilities, and [B, T] float32 entropies if asked.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length, width = hidden.shape
    if targets.shape != (batch, length):
        raise ValueError(f"targets must be [B, T] = {(batch, length)}, got {targets.shape}")
    chunk = min(chunk_size, length)
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(batch, num_chunks, chunk, width).swapaxes(0, 1)
    targets = targets.reshape(batch, num_chunks, chunk).swapaxes(0, 1)

    # Closing over params (not passing the tree in) makes only the leaves the head
    # uses constants of the map. Rematerialised: the backward pass recomputes one
    # chunk's logits at a time instead of keeping all of them as residuals.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(args):
        h, t = args
        stats = softmax_stats(model.apply({"params": params}, h, method=type(model).logits), t)
        return stats[:2] if return_entropy else stats[:1]

    stats = jax.lax.map(one_chunk, (hidden, targets))
    stats = tuple(x.swapaxes(0, 1).reshape(batch, num_chunks * chunk)[:, :length] for x in stats)
    return stats if return_entropy else stats[0]


def masked_logprobs(model: nn.Module, params, hidden: jax.Array, targets: jax.Array, mask: jax.Array, *,
                    num_tokens: int, chunk_size: int, return_entropy: bool = False, groups: int = 1):
    """log p(targets) where `mask` is True, the LM head run on those positions only.

    The True positions are packed into dense rows (`models.packing`), scored by
    `chunked_logprobs` and scattered back, so padding and environment tokens
    (retrieved passages) cost no LM-head work. `num_tokens` is static: pass a bucketed
    count (`packing.token_bucket`) so batches of similar size share one compilation.

    Args:
      model, params: as in `chunked_logprobs`.
      hidden: [B, T, D] final hidden states.
      targets: [B, T] int32.
      mask: [B, T] bool, the positions to score.
      num_tokens: N >= the True positions of each group of rows, static. If a group has
        more, the result and its gradients are NaN (a too-small bucket must never train
        silently).
      chunk_size: positions per LM-head chunk.
      return_entropy: also return entropies.
      groups: G, row groups packed separately (`models.packing`; the batch shards).

    Returns:
      [B, T] float32 log-probabilities (and entropies), 0 where mask is False.
    """
    index = packing.pack_index(mask, num_tokens, groups)
    stats = chunked_logprobs(model, params, packing.pack(hidden, index), packing.pack(targets, index),
                             chunk_size=chunk_size, return_entropy=return_entropy)
    poison = jnp.where(packing.overflows(mask, num_tokens, groups), jnp.nan, 1.0)  # NaN values, gradients
    stats = tuple(packing.unpack(x, index, *mask.shape) * poison for x in (stats if return_entropy else (stats,)))
    return stats if return_entropy else stats[0]


def token_logprobs(model: nn.Module, params, tokens: jax.Array, positions: jax.Array, token_mask: jax.Array,
                   targets: jax.Array, *, chunk_size: int, images=None, return_entropy: bool = False):
    """Teacher-forced log p(targets[b, t] | tokens[b, :t + 1]) at every position.

    Args:
      model: a `DecoderLM` or `VisionLanguageLM`.
      params: its parameter pytree.
      tokens: [B, T] int32 input tokens.
      positions: [B, T] or [3, B, T] int32 rotary positions.
      token_mask: [B, T] bool, False on padding.
      targets: [B, T] int32 ids scored at each position (usually tokens shifted left).
      chunk_size: positions per LM-head chunk.
      images: optional `VisionInputs` (VisionLanguageLM only).
      return_entropy: also return per-position entropies.

    Returns:
      [B, T] float32 log-probabilities (and [B, T] float32 entropies).
    """
    hidden = hidden_states(model, params, tokens, positions, token_mask, images=images)
    return chunked_logprobs(model, params, hidden, targets, chunk_size=chunk_size, return_entropy=return_entropy)


def completion_logprobs(model: nn.Module, params, tokens: jax.Array, positions: jax.Array, token_mask: jax.Array,
                        *, prompt_length: int, chunk_size: int, images=None, return_entropy: bool = False):
    """Log-probabilities of the completion part of prompt + completion sequences.

    Completion token t sits at sequence position P + t and is predicted at position
    P + t - 1, so only positions P - 1 ... P + C - 2 go through the LM head (the
    prompt's logits are never computed). Inputs are `Trajectory.full_sequence()`.

    Args:
      model: a `DecoderLM` or `VisionLanguageLM`.
      params: its parameter pytree.
      tokens: [B, P + C] int32 prompt (left-padded) + completion tokens.
      positions: [B, P + C] or [3, B, P + C] int32 rotary positions.
      token_mask: [B, P + C] bool, False on padding.
      prompt_length: P (static), >= 1.
      chunk_size: positions per LM-head chunk.
      images: optional `VisionInputs` of the prompts (VisionLanguageLM only).
      return_entropy: also return entropies of the predicted distributions.

    Returns:
      [B, C] float32 log-probabilities aligned with the completion tokens (and
      [B, C] float32 entropies). Pad positions hold finite garbage; mask them.
    """
    total = tokens.shape[1]
    if not 1 <= prompt_length < total:
        raise ValueError(f"prompt_length must be in [1, {total}) for sequences of length {total}, got "
                         f"{prompt_length}")
    hidden = hidden_states(model, params, tokens, positions, token_mask, images=images)
    return chunked_logprobs(model, params, hidden[:, prompt_length - 1:-1], tokens[:, prompt_length:],
                            chunk_size=chunk_size, return_entropy=return_entropy)
