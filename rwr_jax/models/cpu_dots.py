"""Low-precision matrix products in the form XLA:CPU runs on the CPU's matrix units.

XLA:CPU (jaxlib 0.10) hands a bfloat16 dot to YNNPACK, which runs it on AMX tiles, only
when the dot returns float32 and contracts the last axis of its first operand, which must
not be a transpose XLA folded into the dot: a @ b or a @ b^T, never a^T @ b. Any other
bfloat16 dot (a bfloat16 result, a transposed first operand) it runs in float32 after
converting both operands. On a 2-core Xeon with AMX, a [3072, 512] x [512, 1536] bfloat16
dot runs at 1.2-2 TFLOP/s in that form and ~0.3 otherwise (float32: ~0.35).

`on_cpu(default, cpu)` makes an op that runs `cpu` where it is lowered for a CPU and its
first operand is bfloat16 or float16; float32 programs and other platforms get `default`,
unchanged. The CPU forms here:
  - `dot(a, b)`, `dot_transposed(a, b)` (a @ b^T): accumulated in float32, rounded to a's
    dtype (or `out_dtype`);
  - `transposed(a)`: a with its last two axes swapped, written out row-major;
  - `matmul(a, b)`: `dot` with a backward pass of the same form,
    da = dot_transposed(g, b), db = dot(transposed(a), g).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def on_cpu(default: Callable, cpu: Callable) -> Callable:
    """`default(*args)`, or `cpu(*args)` where lowered for a CPU with a bfloat16 or float16 `args[0]`."""

    def op(*args):
        if args[0].dtype not in (jnp.bfloat16, jnp.float16):
            return default(*args)
        return jax.lax.platform_dependent(*args, cpu=cpu, default=default)

    return op


def dot(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """[..., M, K] @ [K, N] or [..., K, N] -> [..., M, N], accumulated in float32, in `out_dtype`
    (default a's dtype)."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(out_dtype or a.dtype)


def dot_transposed(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """[..., M, K] @ [N, K]^T or [..., N, K]^T -> [..., M, N], accumulated in float32, in `out_dtype`
    (default a's dtype)."""
    batch = tuple(range(b.ndim - 2)) if b.ndim == a.ndim else ()
    out = jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (batch, batch)),
                              preferred_element_type=jnp.float32)
    return out.astype(out_dtype or a.dtype)


def transposed(a: jax.Array) -> jax.Array:
    """[..., M, K] -> [..., K, M], written out: XLA folds a plain transpose into the dot
    that reads it, which then reads a transposed operand; through a unit axis it does not."""
    *lead, rows, cols = a.shape
    n = len(lead)
    return a[..., None].transpose(*range(n), n + 1, n + 2, n).reshape(*lead, cols, rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """`dot(a, b, out_dtype)`, differentiable: b is [K, N] (shared by all of a's rows) or
    [..., K, N] with a's leading axes."""
    return dot(a, b, out_dtype)


def _matmul_fwd(a, b, out_dtype):
    return dot(a, b, out_dtype), (a, b)


def _matmul_bwd(out_dtype, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)
    a_grad = dot_transposed(g, b)
    if b.ndim == 2:  # b's gradient sums over all of a's rows
        a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return a_grad, dot(transposed(a), g, b.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)
