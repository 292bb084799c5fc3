"""The SwiGLU feed-forward down(silu(x @ gate) * (x @ up)) with a hand-written backward pass.

The backward pass keeps only x and the two projections (the sigmoid is recomputed) and
forms each weight gradient as one plain matmul, x^T @ d. Left to autodiff, XLA:CPU
first writes the [N, F] gate gradient out transposed for that matmul (a strided copy
fused with the SiLU derivative); avoiding it makes a small model's GRPO update ~5 %
faster on CPU. Values and gradients equal autodiff's (tests/models/test_swiglu.py).
"""

import flax.linen as nn
import jax

_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


@jax.custom_vjp
def swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """[B, T, D] x, [D, F] gate and up, [F, D] down (one dtype) -> [B, T, D]."""
    return _forward(x, gate, up, down)[0]


def _forward(x, gate, up, down):
    g, u = x @ gate, x @ up
    return nn.with_logical_constraint(jax.nn.silu(g) * u, _HIDDEN) @ down, (x, gate, up, down, g, u)


def _backward(residuals, dy):
    x, gate, up, down, g, u = residuals
    sigmoid = jax.nn.sigmoid(g)
    silu = g * sigmoid
    dh = nn.with_logical_constraint(dy @ down.T, _HIDDEN)
    du = dh * silu
    dg = dh * u * sigmoid * (1.0 + g * (1.0 - sigmoid))
    width, features = gate.shape

    def flat(a, n):
        return a.reshape(-1, n)

    x_t = flat(x, width).T
    return (dg @ gate.T + du @ up.T, x_t @ flat(dg, features), x_t @ flat(du, features),
            flat(silu * u, features).T @ flat(dy, width))


swiglu.defvjp(_forward, _backward)
