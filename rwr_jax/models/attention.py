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
less memory for them. Its gradient (a custom VJP) keeps only q, k, v and the mask, and
goes back chunk by chunk, recomputing each chunk's attention (one more forward of the
attention, as flash attention's backward does) and summing dK and dV in float32: an
update's attention memory is one chunk's too.
"""

import functools

import jax
import jax.numpy as jnp

from rwr_jax import registry
from rwr_jax.models import cpu_dots


# Scores [B, K, rows, hd] x [B, K, S, hd] -> [B, K, rows, S] float32; weighted values
# [B, K, rows, S] x [B, K, S, hd] -> [B, K, rows, hd].
_scores = cpu_dots.on_cpu(functools.partial(jnp.einsum, "bkqh,bksh->bkqs", preferred_element_type=jnp.float32),
                          lambda q, k: cpu_dots.matmul(q, cpu_dots.transposed(k), jnp.float32))
_weighted_values = cpu_dots.on_cpu(functools.partial(jnp.einsum, "bkqs,bksh->bkqh"), cpu_dots.matmul)


@registry.register("attention", "xla")
def _xla_attention(query, key, value, mask, scale):
    batch, length, heads, head_dim = query.shape
    kv_heads = key.shape[2]
    group = heads // kv_heads
    # [B, T, H, hd] -> [B, K, G * T, hd]; keys / values [B, S, K, hd] -> [B, K, S, hd].
    q = query.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, kv_heads, group * length, head_dim)
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    scores = _scores(q, k) * scale
    scores = scores.reshape(batch, kv_heads, group, length, -1)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    # Softmax over rows [B K G T, S]: XLA:CPU (YNNPACK) runs it several times slower on the 5-D array.
    probs = jax.nn.softmax(scores.reshape(-1, scores.shape[-1]), axis=-1).astype(value.dtype)
    probs = probs.reshape(batch, kv_heads, group * length, -1)
    out = _weighted_values(probs, v).reshape(batch, kv_heads, group, length, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(query.dtype)


@registry.register("attention", "cudnn")
def _cudnn_attention(query, key, value, mask, scale):
    # A query row with no key to attend to (a left-padding position) gets every key, as the xla kernel's
    # all-masked softmax does: cuDNN's backward gives NaN gradients on fully masked rows (H100, bf16).
    mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)
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
    out = _chunked_attention(kernel_fn, scale, chunked(query, 0), key, value, chunked(mask, True))
    return jnp.moveaxis(out, 0, 1).reshape(batch, chunks * query_chunk, *out.shape[3:])[:, :length]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_attention(kernel_fn, scale, query_chunks, key, value, mask_chunks):
    """[chunks, B, c, H, head_dim] outputs of `kernel_fn` on each chunk of queries (`lax.map`)."""
    return jax.lax.map(lambda qm: kernel_fn(qm[0], key, value, qm[1], scale), (query_chunks, mask_chunks))


def _chunked_attention_fwd(kernel_fn, scale, query_chunks, key, value, mask_chunks):
    # Only the inputs are kept for the gradient: no chunk's scores outlive its own step.
    return _chunked_attention(kernel_fn, scale, query_chunks, key, value, mask_chunks), (
        query_chunks, key, value, mask_chunks)


def _chunked_attention_bwd(kernel_fn, scale, residuals, out_grad):
    """Chunk by chunk: recompute the chunk's attention, pull its cotangent back, sum dK and dV (float32)."""
    query_chunks, key, value, mask_chunks = residuals

    def chunk_grads(kv_grads, chunk):
        query, mask, grad = chunk
        _, pullback = jax.vjp(lambda q, k, v: kernel_fn(q, k, v, mask, scale), query, key, value)
        query_grad, *chunk_kv_grads = pullback(grad)
        return tuple(total + g.astype(jnp.float32) for total, g in zip(kv_grads, chunk_kv_grads)), query_grad

    zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (key, value))
    (key_grad, value_grad), query_grads = jax.lax.scan(chunk_grads, zeros, (query_chunks, mask_chunks, out_grad))
    return query_grads, key_grad.astype(key.dtype), value_grad.astype(value.dtype), None


_chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)
