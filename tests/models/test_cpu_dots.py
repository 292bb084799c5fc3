"""`cpu_dots`: low-precision products that XLA:CPU keeps in bfloat16 (AMX), with exact-enough values."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import cpu_dots


def dot_operand_dtypes(hlo: str) -> list[tuple[str, ...]]:
    """The element types of the operands of every dot (plain or a YNNPACK fusion) in compiled HLO text."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    operands = []
    for line in hlo.splitlines():
        if '"__ynn_fusion"' in line or " dot(" in line:
            args = re.search(r"(?:fusion|dot)\(([^)]*)\)", line).group(1)
            operands.append(tuple(types[name] for name in re.findall(r"%([\w.\-]+)", args)))
    return operands


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 5, 7)])
def test_transposed_swaps_the_last_two_axes(shape):
    a = _random(shape, 0).astype(jnp.bfloat16)
    np.testing.assert_array_equal(jax.jit(cpu_dots.transposed)(a), jnp.swapaxes(a, -1, -2))


@pytest.mark.parametrize("a_shape,b_shape", [((2, 6, 16), (12, 16)), ((2, 3, 6, 16), (2, 3, 12, 16))])
def test_dot_transposed_is_a_times_b_transposed(a_shape, b_shape):
    a, b = _random(a_shape, 4).astype(jnp.bfloat16), _random(b_shape, 5).astype(jnp.bfloat16)
    expected = jnp.matmul(a.astype(jnp.float32), jnp.swapaxes(b, -1, -2).astype(jnp.float32))
    got = jax.jit(cpu_dots.dot_transposed, static_argnums=2)(a, b, jnp.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 accumulation of exact products


@pytest.mark.parametrize("a_shape,b_shape", [((2, 6, 16), (16, 12)),  # a projection: b shared by all rows
                                             ((2, 3, 6, 16), (2, 3, 16, 12))])  # batched, as in attention
@pytest.mark.parametrize("out_dtype", [None, jnp.float32])
def test_matmul_values_and_gradients_match_float32(a_shape, b_shape, out_dtype):
    a, b = _random(a_shape, 1), _random(b_shape, 2)
    cotangent = _random(a_shape[:-1] + b_shape[-1:], 3)
    ours, pullback = jax.vjp(lambda a, b: cpu_dots.matmul(a, b, out_dtype), a.astype(jnp.bfloat16),
                             b.astype(jnp.bfloat16))
    expected, expected_pullback = jax.vjp(jnp.matmul, a, b)
    assert ours.dtype == (out_dtype or jnp.bfloat16)
    # bfloat16 keeps 8 significant bits: inputs and outputs are each rounded once (rel. 2^-8 = 3.9e-3).
    np.testing.assert_allclose(ours.astype(jnp.float32), expected, rtol=0.03, atol=0.03 * np.abs(expected).max())
    grads = pullback(cotangent.astype(ours.dtype))
    for name, got, want in zip("ab", grads, expected_pullback(cotangent)):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape, name
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.03, atol=0.03 * np.abs(want).max(),
                                   err_msg=name)


def test_matmul_and_its_gradients_stay_in_bfloat16_on_xla_cpu():
    """The point of the module: every dot of the forward and backward pass reads bfloat16 operands.
    A plain bfloat16 product's backward pass (and its forward pass, returning bfloat16) is run by
    XLA:CPU on float32 copies; if a jaxlib update changes that, this test names the change."""
    def compiled_dots(product, a_shape, b_shape):
        grad = jax.grad(lambda a, b: jnp.sum(product(a, b).astype(jnp.float32) ** 2), argnums=(0, 1))
        args = (jnp.ones(a_shape, jnp.bfloat16), jnp.ones(b_shape, jnp.bfloat16))
        return dot_operand_dtypes(jax.jit(grad).lower(*args).compile().as_text())

    projection = compiled_dots(cpu_dots.matmul, (4, 32, 64), (64, 96))
    assert len(projection) >= 3 and set(projection) == {("bf16", "bf16")}
    assert ("f32", "f32") in compiled_dots(jnp.matmul, (4, 32, 64), (64, 96))
    scores = compiled_dots(lambda q, k: cpu_dots.matmul(q, cpu_dots.transposed(k), jnp.float32), (2, 2, 16, 8),
                           (2, 2, 12, 8))
    assert len(scores) >= 3 and set(scores) == {("bf16", "bf16")}


def test_on_cpu_picks_the_cpu_form_for_low_precision_on_cpu_only():
    op = cpu_dots.on_cpu(lambda x: x * 2, lambda x: x * 3)
    assert float(jax.jit(op)(jnp.ones((), jnp.bfloat16))) == 3.0
    assert float(jax.jit(op)(jnp.ones((), jnp.float32))) == 2.0  # float32: the default, unchanged
    for platform in ("cuda", "tpu"):  # lowered for another platform: the default
        text = jax.jit(op).trace(jnp.ones((), jnp.bfloat16)).lower(lowering_platforms=(platform,)).as_text()
        assert "2.000000e+00" in text and "3.000000e+00" not in text, platform
