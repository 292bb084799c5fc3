"""Linen building blocks shared by the model ports (decoder, vision tower, text encoder).

Params are boxed with logical axis names (`nn.with_logical_partitioning`), so
`rwr_jax.sharding` maps them onto a mesh; the modules name axes only.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwr_jax.models import cpu_dots

# Initializer of kernels and embedding tables (the HF `initializer_range` default).
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def logical_init(init, axes: tuple[str | None, ...]):
    """`init` boxed with logical axis names, one per param dimension (None: replicated)."""
    return nn.with_logical_partitioning(init, axes)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like transformers."""

    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, ..., D] -> [batch, ..., D] in `dtype`."""
        scale = self.param("scale", logical_init(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        # Normalised as rows [N, D]: XLA:CPU reduced [1, N, D] rows several times slower (the
        # backward's sum(dy * x, -1)). The rows keep the batch's sharding (without the constraint
        # XLA shards the scales' update over fsdp instead of keeping them whole).
        rows = nn.with_logical_constraint(x.reshape(-1, x.shape[-1]), ("activation_batch", "activation_embed"))
        rows = rows.astype(jnp.float32)
        rows = rows * jax.lax.rsqrt(jnp.mean(rows * rows, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * rows.astype(self.dtype).reshape(x.shape)


def contract(equation: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`jnp.einsum(equation, x, kernel)` for an output of x's free axes then the kernel's,
    contracting the shared axes in the kernel's order.

    `jnp.einsum` orders contracted axes alphabetically: "btnh,nhd->btd" contracts (h, n),
    against both operands' memory order, and XLA then copies the kernel transposed on
    every call (a decode step copied each layer's o_proj weight). In low precision on a
    CPU, x's trailing axes and the kernel's leading ones (every equation of the ports)
    are flattened into one `cpu_dots.matmul`.
    """
    inputs, output = equation.split("->")
    x_axes, kernel_axes = inputs.split(",")
    shared = "".join(axis for axis in kernel_axes if axis in x_axes)
    free = [axis for axis in x_axes + kernel_axes if axis not in shared]
    if "".join(free) != output:
        raise ValueError(f"{equation!r}: the output must be x's free axes then the kernel's, {''.join(free)!r}")
    tensordot = functools.partial(
        jnp.tensordot, axes=([x_axes.index(a) for a in shared], [kernel_axes.index(a) for a in shared]))
    if not (x_axes.endswith(shared) and kernel_axes.startswith(shared)):
        return tensordot(x, kernel)
    return cpu_dots.on_cpu(tensordot, functools.partial(_flat_matmul, num_shared=len(shared)))(x, kernel)


def _flat_matmul(x: jax.Array, kernel: jax.Array, num_shared: int) -> jax.Array:
    """x's last `num_shared` axes contracted with the kernel's first ones, as one 2-D `cpu_dots.matmul`."""
    size = math.prod(kernel.shape[:num_shared])
    y = cpu_dots.matmul(x.reshape(-1, size), kernel.reshape(size, -1))
    return y.reshape(*x.shape[:x.ndim - num_shared], *kernel.shape[num_shared:])


def dense_dot_general(x, kernel, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense(dot_general=...)`: its [..., K] x [K, N] product, in `preferred_element_type` (default
    x's dtype), by `cpu_dots.matmul` in low precision on a CPU."""
    dot_general = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                                    preferred_element_type=preferred_element_type)
    cpu = functools.partial(cpu_dots.matmul, out_dtype=preferred_element_type)
    return cpu_dots.on_cpu(dot_general, cpu)(x, kernel)


class Projection(nn.Module):
    """A linear map written as one einsum over named axes (kernel + optional bias).

    Used instead of `nn.DenseGeneral`, whose flat-then-reshape kernel init breaks
    logical partitioning of multi-axis kernels under a mesh. The output's axes are x's
    uncontracted ones then the kernel's ("btnh,nhd->btd", "btd,dnh->btnh").
    """

    equation: str
    kernel_shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    bias_axes: tuple[str, ...] | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies `equation` to (x, kernel), then adds the bias over the trailing `bias_axes`."""
        kernel = self.param("kernel", logical_init(DEFAULT_INIT, self.kernel_axes), self.kernel_shape,
                            self.param_dtype)
        y = contract(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_axes is not None:
            bias_shape = y.shape[-len(self.bias_axes):]
            bias_init = logical_init(nn.initializers.zeros_init(), self.bias_axes)
            y = y + self.param("bias", bias_init, bias_shape, self.param_dtype).astype(self.dtype)
        return y


class Kernel(nn.Module):
    """A weight matrix on its own, for ops that take several layers' weights at once
    (`swiglu`); its param path ("<name>/kernel") is that of an `nn.Dense` of this name."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", logical_init(DEFAULT_INIT, self.axes), self.shape, self.param_dtype)
