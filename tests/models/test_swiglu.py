"""The hand-written SwiGLU backward pass equals autodiff of the plain formula."""

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.models import swiglu
from tests.models.test_cpu_dots import dot_operand_dtypes


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


def test_bfloat16_on_cpu_matches_float32_and_keeps_its_dots_in_bfloat16():
    """In bfloat16 on a CPU the products take `cpu_dots`' form (AMX); values and gradients stay
    within bfloat16 rounding of float32 autodiff."""
    rng = np.random.default_rng(1)
    args = [jnp.asarray(rng.normal(0.0, scale, shape), jnp.float32) for shape, scale in
            (((2, 8, 16), 1.0), ((16, 24), 0.5), ((16, 24), 0.5), ((24, 16), 0.5))]
    low = [a.astype(jnp.bfloat16) for a in args]

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2)

    grads = jax.jit(jax.grad(loss(swiglu.swiglu), argnums=(0, 1, 2, 3)))
    expected = jax.grad(loss(_plain), argnums=(0, 1, 2, 3))(*args)
    np.testing.assert_allclose(swiglu.swiglu(*low).astype(jnp.float32), _plain(*args), rtol=0.05, atol=0.05)
    for name, got, want in zip(("x", "gate", "up", "down"), grads(*low), expected):
        assert got.dtype == jnp.bfloat16, name
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.05, atol=0.03 * scale, err_msg=name)
    dots = dot_operand_dtypes(grads.lower(*low).compile().as_text())
    assert len(dots) >= 9 and set(dots) == {("bf16", "bf16")}  # 3 products forward, 6 backward
