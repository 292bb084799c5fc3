"""Pure prefill / decode steps over an explicit KV cache.

    cache = decoder.init_cache(config, batch, max_length)
    logits, cache = prefill(model, params, tokens, token_mask, positions, cache)
    next_logits, cache = decode(model, params, next_tokens, next_positions, cache)

Both are jitted with the model static and the cache donated; cached decoding equals
the full forward pass (tests/models/test_decoder_cache.py).
"""

import functools

import jax
import jax.numpy as jnp

from rwr_jax.models.kv_cache import KVCache
from rwr_jax.models.qwen2_vl.decoder import DecoderLM


def text_positions(token_mask: jax.Array) -> jax.Array:
    """Rotary positions of left- (or right-) padded text: 0, 1, ... over real tokens.

    Args:
      token_mask: [B, T] bool.

    Returns:
      [B, T] int32; padding gets the position of its nearest real token to the left (0
      before the first).
    """
    return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def prefill(model: DecoderLM, params, tokens: jax.Array, token_mask: jax.Array, positions: jax.Array,
            cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Writes a prompt into the cache.

    Args:
      model: the DecoderLM (static).
      params: its parameter pytree.
      tokens: [B, T] int32 prompt ids (left padded).
      token_mask: [B, T] bool, False on padding.
      positions: [B, T] or [3, B, T] int32 rotary positions.
      cache: KVCache with at least T free slots (donated).

    Returns:
      ([B, T, V] logits, updated cache).
    """
    return model.apply({"params": params}, tokens, positions, token_mask, cache)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("cache",))
def decode(model: DecoderLM, params, tokens: jax.Array, positions: jax.Array,
           cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Appends one token per row and returns the next-token logits.

    Args:
      model: the DecoderLM (static).
      params: its parameter pytree.
      tokens: [B] int32.
      positions: [B] or [3, B] int32 rotary positions of these tokens.
      cache: KVCache (donated).

    Returns:
      ([B, V] logits, updated cache).
    """
    token_mask = jnp.ones((tokens.shape[0], 1), bool)
    logits, cache = model.apply({"params": params}, tokens[:, None], positions[..., None], token_mask, cache)
    return logits[:, 0], cache
