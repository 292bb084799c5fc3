"""Attention kernels behind one signature, chosen by name (config `attention_kernel`).

Every kernel computes softmax(q k^T * scale + mask) v with grouped-query heads and a
boolean mask, and never needs the caller to repeat K/V heads.
  - "xla": `jax.nn.dot_product_attention` lowered by XLA (any backend; builds the
    [T, S] score matrix).
  - "cudnn": the same call lowered to cuDNN flash attention (NVIDIA GPUs, bf16/fp16);
    never materialises [T, S] scores in HBM.
"""

import functools

import jax

from rwr_jax import registry


def _dot_product_attention(query, key, value, mask, scale, *, implementation):
    return jax.nn.dot_product_attention(
        query, key, value, mask=mask[:, None, :, :], scale=scale, implementation=implementation)


for _name in ("xla", "cudnn"):
    registry.register("attention", _name)(
        functools.partial(_dot_product_attention, implementation=_name))


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    kernel: str = "xla",
) -> jax.Array:
    """Grouped-query attention.

    Args:
      query: [B, T, H, head_dim].
      key, value: [B, S, K, head_dim], H % K == 0.
      mask: [B, T, S] bool, True where query t may attend to key s.
      scale: multiplier of the scores (usually head_dim ** -0.5).
      kernel: registered kernel name.

    Returns:
      [B, T, H, head_dim], dtype of query.
    """
    return registry.lookup("attention", kernel)(query, key, value, mask, scale)
