"""Rotary position embeddings: 1-D RoPE and Qwen2-VL's multimodal RoPE (mRoPE).

mRoPE gives every token three position ids (temporal, height, width). The head_dim // 2
rotary frequencies are split into `mrope_section` consecutive groups; group i rotates
with position axis i % 3. Text tokens carry the same id on all three axes, so for text
mRoPE equals 1-D RoPE.
"""

from typing import Sequence

import jax
import jax.numpy as jnp


def rope_cos_sin(
    positions: jax.Array,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Computes the rotation tables for the given positions.

    Args:
      positions: [B, T] int32 (1-D RoPE), or [3, B, T] int32 (mRoPE; [B, T] is
        broadcast to all three axes).
      head_dim: per-head width (even).
      theta: rotary base.
      mrope_section: frequencies per position axis, summing to head_dim // 2; None for
        1-D RoPE.

    Returns:
      (cos, sin), each [B, T, head_dim] float32.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if mrope_section is None:
        if positions.ndim != 2:
            raise ValueError(f"positions must be [B, T] for 1-D RoPE, got shape {positions.shape}")
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    else:
        if positions.ndim == 2:
            positions = jnp.broadcast_to(positions, (3, *positions.shape))
        if positions.ndim != 3 or positions.shape[0] != 3:
            raise ValueError(f"positions must be [3, B, T] or [B, T] for mRoPE, got shape {positions.shape}")
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, hd/2]
        axis_of_freq = jnp.concatenate(
            [jnp.full((n,), i % 3, jnp.int32) for i, n in enumerate(mrope_section)])
        freqs = jnp.take_along_axis(freqs, axis_of_freq[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates queries or keys (rotate-half convention of transformers), in float32.

    A bfloat16 x is rotated in float32 and rounded once (transformers rounds cos and sin,
    and each product and sum, to bfloat16; XLA:CPU, which has no bfloat16 arithmetic,
    would convert to float32 and back around every one of those steps).

    Args:
      x: [B, T, N, head_dim].
      cos, sin: [B, T, head_dim] float32, from `rope_cos_sin`.

    Returns:
      [B, T, N, head_dim], dtype of x.
    """
    rows = x.astype(jnp.float32)
    x1, x2 = jnp.split(rows, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (rows * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)
