"""Attention on query chunks (`attend(query_chunk=c)`) equals attention on all queries at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import attention


def _inputs(batch=2, length=11, keys=13, heads=4, kv_heads=2, head_dim=8, seed=0):
    rng = np.random.default_rng(seed)
    query, key, value = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in (
        (batch, length, heads, head_dim), (batch, keys, kv_heads, head_dim), (batch, keys, kv_heads, head_dim)))
    # Causal over the last `length` slots, row 1 left-padded by 3 (its first queries see no key).
    causal = np.arange(keys)[None, :] <= np.arange(keys - length, keys)[:, None]
    padded = np.arange(keys) >= 3
    mask = jnp.asarray(np.stack([causal, causal & padded[None, :] & padded[-length:, None]]))
    return query, key, value, mask


@pytest.mark.parametrize("chunk", [1, 4, 5, 11])
def test_query_chunks_give_the_same_output_and_gradients(chunk):
    query, key, value, mask = _inputs()

    def loss(q, k, v, query_chunk):
        out = attention.attend(q, k, v, mask, scale=8 ** -0.5, query_chunk=query_chunk)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), out

    (_, whole), whole_grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(query, key, value, 0)
    (_, chunked), chunked_grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                                          static_argnums=3)(query, key, value, chunk)
    assert chunked.shape == whole.shape
    diff = float(jnp.max(jnp.abs(chunked - whole)))
    print(f"chunk {chunk}: max |chunked - whole| output {diff:.1e}")
    np.testing.assert_allclose(chunked, whole, atol=1e-6, rtol=0)
    for name, got, expected in zip("qkv", chunked_grads, whole_grads):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0, err_msg=f"d loss / d {name}")


def test_query_chunks_bound_the_memory_of_a_gradient():
    """XLA's temporaries for the gradient (CPU compiler): chunked, they stay below one [H, T, S] float32 score
    matrix; all at once, above it."""
    batch, length, heads, kv_heads, head_dim, chunk = 1, 1024, 4, 2, 16, 128
    query = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.float32)
    key = jax.ShapeDtypeStruct((batch, length, kv_heads, head_dim), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, length, length), jnp.bool_)

    def temporaries(query_chunk):
        def loss(q, k, v, m):
            return jnp.sum(attention.attend(q, k, v, m, scale=0.25, query_chunk=query_chunk) ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(query, key, key, mask).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores = batch * heads * length * length * 4
    whole, chunked = temporaries(0), temporaries(chunk)
    print(f"gradient temporaries: all queries {whole / 2**20:.1f} MiB, chunks of {chunk} {chunked / 2**20:.1f} MiB, "
          f"one score matrix {scores / 2**20:.1f} MiB")
    assert whole > scores > 1.5 * chunked


def test_bfloat16_chunked_gradients_keep_their_dtype_and_match_float32():
    query, key, value, mask = _inputs(length=13, keys=13)

    def grads(dtype, query_chunk):
        def loss(q, k, v):
            out = attention.attend(q, k, v, mask, scale=8 ** -0.5, query_chunk=query_chunk)
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(out.size).reshape(out.shape)))
        return jax.grad(loss, argnums=(0, 1, 2))(*(x.astype(dtype) for x in (query, key, value)))

    expected = grads(jnp.float32, 0)
    for name, got, want in zip("qkv", grads(jnp.bfloat16, 4), expected):
        assert got.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(got.astype(jnp.float32), want, atol=0.03, rtol=0, err_msg=f"d loss / d {name}")
