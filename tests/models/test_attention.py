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
