"""The hand-written SwiGLU backward pass equals autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.models import swiglu


def _plain(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def test_values_and_gradients_equal_autodiff():
    rng = np.random.default_rng(0)
    args = [jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32) for shape, scale in
            (((2, 5, 8), 1.0), ((8, 12), 0.5), ((8, 12), 0.5), ((12, 8), 0.5))]
    cotangent = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    ours, ours_vjp = jax.vjp(swiglu.swiglu, *args)
    expected, expected_vjp = jax.vjp(_plain, *args)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("x", "gate", "up", "down"), ours_vjp(cotangent), expected_vjp(cotangent)):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(swiglu.swiglu(*a) ** 2), argnums=(0, 1, 2, 3)))(*args)
    expected = jax.grad(lambda *a: jnp.sum(_plain(*a) ** 2), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(grads, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
