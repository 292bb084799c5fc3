"""Attention kernels behind one signature, chosen by name (config `attention_kernel`).

Every kernel computes softmax(q k^T * scale + mask) v with grouped-query heads and a
boolean mask, and never needs the caller to repeat K/V heads.
  - "xla": explicit batched matmuls in the canonical [batch, kv_head, rows, head_dim]
    form (any backend; builds the [T, S] score matrix, softmax in float32). Keys and
    values are read as [B, K, S, head_dim]: the KV cache is stored that way, so the
    caller's transpose to [B, S, K, head_dim] and ours cancel and a decode step reads
    the cache without copying it.
  - "cudnn": `jax.nn.dot_product_attention` lowered to cuDNN flash attention (NVIDIA
    GPUs, bf16/fp16); never materialises [T, S] scores in HBM.
`attend(query_chunk=c)` runs any kernel on c queries at a time (a `lax.map`), so the
largest score matrix is [c, S]: a long prefill or retrieved block then needs T / c times
less memory for them. Not a saving for a gradient: XLA keeps every chunk's scores (a 7B
update planned with c = 256 needed more memory than without, see README), so it is off
(`DecoderConfig.attention_query_chunk` = 0) unless a config turns it on.
"""

import jax
import jax.numpy as jnp

from rwr_jax import registry


@registry.register("attention", "xla")
def _xla_attention(query, key, value, mask, scale):
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    group = heads // kv_heads
    # [B, T, H, hd] -> [B, K, G * T, hd]; keys / values [B, S, K, hd] -> [B, K, S, hd].
    q = query.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, group * length, head_dim)
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=jnp.float32) * scale
    scores = scores.reshape(batch, kv_heads, group, length, -1)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype).reshape(batch, kv_heads, group * length, -1)
    out = jnp.einsum("bkqs,bksh->bkqh", probs, v).reshape(batch, kv_heads, group, length, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(query.dtype)


@registry.register("attention", "cudnn")
def _cudnn_attention(query, key, value, mask, scale):
    return jax.nn.dot_product_attention(query, key, value, mask=mask[:, None], scale=scale, implementation="cudnn")


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    kernel: str = "xla",
    query_chunk: int = 0,
) -> jax.Array:
    """Grouped-query attention.

    Args:
      query: [B, T, H, head_dim].
      key, value: [B, S, K, head_dim], H % K == 0.
      mask: [B, T, S] bool, True where query t may attend to key s.
      scale: multiplier of the scores (usually head_dim ** -0.5).
      kernel: registered kernel name.
      query_chunk: c > 0: queries attend c at a time (T padded to a multiple of c);
        0: all at once.

    Returns:
      [B, T, H, head_dim], dtype of query.
    """
    kernel_fn = registry.lookup("attention", kernel)
    batch, length = query.shape[:2]
    if query_chunk < 1 or length <= query_chunk:
        return kernel_fn(query, key, value, mask, scale)
    chunks = -(-length // query_chunk)
    pad = chunks * query_chunk - length

    def chunked(x, fill):  # [B, T, ...] -> [chunks, B, c, ...]
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(batch, chunks, query_chunk, *x.shape[2:]), 1, 0)

    # Padded queries (outputs dropped) see every key: no kernel meets a row with nothing to attend to.
    out = jax.lax.map(lambda qm: kernel_fn(qm[0], key, value, qm[1], scale),
                      (chunked(query, 0), chunked(mask, True)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, chunks * query_chunk, *out.shape[3:])[:, :length]
