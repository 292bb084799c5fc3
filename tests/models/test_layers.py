"""`layers.contract`: the projections' einsum, contracting in the kernel's memory order."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import layers
from tests.models.test_cpu_dots import dot_operand_dtypes

# The equations the model ports use: (equation, x shape, kernel shape).
EQUATIONS = [
    ("btd,dnh->btnh", (2, 3, 6), (6, 4, 5)),  # q / k / v projections
    ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 6)),  # o_proj: two contracted axes
    ("npd,dshk->npshk", (2, 3, 6), (6, 3, 4, 5)),  # the vision tower's fused qkv
    ("nphk,hkd->npd", (2, 3, 4, 5), (4, 5, 6)),
    ("nd,dp->np", (3, 6), (6, 4)),
]


@pytest.mark.parametrize("equation,x_shape,kernel_shape", EQUATIONS)
def test_contract_equals_einsum(equation, x_shape, kernel_shape):
    rng = np.random.default_rng(0)
    x, kernel = rng.normal(size=x_shape).astype(np.float32), rng.normal(size=kernel_shape).astype(np.float32)
    np.testing.assert_allclose(layers.contract(equation, x, kernel), np.einsum(equation, x, kernel), rtol=1e-5,
                               atol=1e-5)


def test_contract_keeps_the_kernels_axis_order():
    """o_proj contracts (heads, head_dim) as both operands store them; `jnp.einsum` sorts them
    alphabetically to (head_dim, heads), which made XLA copy the weight transposed on every call."""
    x, kernel = jnp.ones((16, 1, 8, 64)), jnp.ones((8, 64, 512))
    (equation,) = jax.make_jaxpr(lambda a, b: layers.contract("btnh,nhd->btd", a, b))(x, kernel).eqns
    assert equation.params["dimension_numbers"] == (((2, 3), (0, 1)), ((), ()))


def test_contract_refuses_other_output_orders():
    with pytest.raises(ValueError, match="x's free axes then the kernel's, 'btnh'"):
        layers.contract("btd,dnh->bnth", jnp.ones((2, 3, 6)), jnp.ones((6, 4, 5)))


@pytest.mark.parametrize("equation,x_shape,kernel_shape", EQUATIONS)
def test_bfloat16_contract_on_cpu_is_one_bfloat16_product(equation, x_shape, kernel_shape):
    """In bfloat16 on a CPU, `contract` flattens to `cpu_dots.matmul`: values and gradients within
    bfloat16 rounding of float32, every compiled dot on bfloat16 operands."""
    rng = np.random.default_rng(1)
    x_shape = (8 * x_shape[0], *x_shape[1:])  # XLA:CPU keeps dots of very few rows to itself
    x, kernel = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in (x_shape, kernel_shape))
    expected, expected_pullback = jax.vjp(lambda x, k: jnp.einsum(equation, x, k), x, kernel)
    cotangent = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    ours, pullback = jax.vjp(functools.partial(layers.contract, equation), x.astype(jnp.bfloat16),
                             kernel.astype(jnp.bfloat16))
    for got, want in ((ours, expected), *zip(pullback(cotangent.astype(jnp.bfloat16)), expected_pullback(cotangent))):
        assert got.dtype == jnp.bfloat16  # 8 significant bits: inputs and result each rounded once
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.02, atol=0.02 * float(jnp.abs(want).max()))
    grads = jax.grad(lambda x, k: jnp.sum(layers.contract(equation, x, k).astype(jnp.float32) * cotangent), (0, 1))
    dots = dot_operand_dtypes(jax.jit(grads).lower(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
                              .compile().as_text())
    assert dots and set(dots) == {("bf16", "bf16")}
