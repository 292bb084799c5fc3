"""The LM head and a per-token loss in one pass: each chunk's logits are computed once.

Differentiating `logprobs.masked_logprobs` computes every chunk's logits twice: in the
forward pass, and again in the backward pass (rematerialised, so that no [N, V] array
is kept). When the loss is a sum of per-position terms, each a function of that
position's log-prob alone (every GRPO loss in `rl.losses` is: the ratio and k3 are
per token, the normalisers depend on the masks only), its derivative g at a position
is known as soon as the position's log-prob is. The head's backward pass then runs
right after its forward pass, chunk by chunk, while the logits are live:

    p = softmax(logits)    dlogits = g * (onehot(target) - p)
    d hidden = dlogits @ W.T    d W += hidden.T @ dlogits

(the idea of Liger-Kernel's fused linear cross-entropy). The loss is returned with
these gradients attached (value: the loss; gradient with respect to the hidden states
and the head's weight: the ones formed here), so callers differentiate it like any
loss: the head costs 6 N V D FLOPs instead of 8, and no [N, V] array outlives its chunk.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwr_jax.models import cpu_dots, packing
from rwr_jax.rl import logprobs

# The head's three products, float32 results of compute-dtype operands (in low precision on a CPU,
# in the form `cpu_dots` describes): logits h @ W [N, V], d hidden = dlogits @ W^T [N, D],
# d W = h^T @ dlogits [D, V].
_F32 = jnp.float32
_LOGITS = cpu_dots.on_cpu(functools.partial(jnp.dot, preferred_element_type=_F32),
                          functools.partial(cpu_dots.dot, out_dtype=_F32))
_HIDDEN_GRAD = cpu_dots.on_cpu(
    functools.partial(jax.lax.dot_general, dimension_numbers=(((1,), (1,)), ((), ())), preferred_element_type=_F32),
    functools.partial(cpu_dots.dot_transposed, out_dtype=_F32))
_WEIGHT_GRAD = cpu_dots.on_cpu(
    functools.partial(jax.lax.dot_general, dimension_numbers=(((0,), (0,)), ((), ())), preferred_element_type=_F32),
    lambda h, dlogits: cpu_dots.dot(cpu_dots.transposed(h), dlogits, _F32))


def fused_head_loss(model: nn.Module, params, hidden: jax.Array, targets: jax.Array, mask: jax.Array, loss_fn, *,
                    num_tokens: int, chunk_size: int, groups: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """loss_fn(log p(targets)) with its gradient formed in the forward pass, on `mask` only.

    Args:
      model: a `DecoderLM` or `VisionLanguageLM` (its `head_kernel`).
      params: its parameter pytree.
      hidden: [B, T, D] final hidden states.
      targets: [B, T] int32, the id whose probability position t predicts.
      mask: [B, T] bool, the positions scored (packed: others cost no head work).
      loss_fn: [B, T] float32 log-probs (0 where mask is False) -> [] float32, a sum
        of per-position terms, the term at a position a function of its log-prob only
        (e.g. `losses.policy_loss(...).numerator`). Not checked: another loss gets
        a wrong gradient.
      num_tokens: N >= the True positions of each group of rows, static
        (`packing.token_bucket`). If a group has more, the loss, log-probs and gradients
        are NaN.
      chunk_size: positions per LM-head chunk and group (the [groups, chunk, V] logits
        are the largest array formed).
      groups: G, row groups packed separately (`models.packing`; the batch shards).

    Returns:
      (loss [] float32, differentiable with respect to params and hidden;
       log-probs [B, T] and entropies [B, T] float32, 0 where mask is False, no gradient).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, length, _ = hidden.shape
    if targets.shape != (batch, length) or mask.shape != (batch, length):
        raise ValueError(f"targets and mask must be [B, T] = {(batch, length)}, got {targets.shape} and {mask.shape}")
    if groups < 1 or batch % groups:
        raise ValueError(f"groups must divide the batch's {batch} rows, got {groups}")
    index = packing.pack_index(mask, num_tokens, groups)
    kernel = model.apply({"params": params}, method=type(model).head_kernel)
    packed = packing.pack(hidden, index)  # [G, N, D]
    chunk = min(chunk_size, num_tokens)
    num_chunks = -(-num_tokens // chunk)

    def chunked(x, fill=0):  # [G, N, ...] -> [num_chunks, G, chunk, ...]
        x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk - num_tokens)) + ((0, 0),) * (x.ndim - 2),
                    constant_values=fill)
        return jnp.moveaxis(x.reshape(groups, num_chunks, chunk, *x.shape[2:]), 1, 0)

    def unchunked(x):  # [num_chunks, G, chunk, ...] -> [G, N, ...]
        return jnp.moveaxis(x, 0, 1).reshape(groups, num_chunks * chunk, *x.shape[3:])[:, :num_tokens]

    chunks = (chunked(jax.lax.stop_gradient(packed)), chunked(packing.pack(targets, index)),
              chunked(packing.flat_positions(index, batch, length), fill=batch * length))
    weight = jax.lax.stop_gradient(kernel)

    def loss_derivative(logp: jax.Array, slots: jax.Array) -> jax.Array:
        """d loss / d logp at flat positions `slots` (the loss is separable: other positions' values do
        not matter, so they are 0); 0 at empty slots."""
        full = jnp.zeros(batch * length, jnp.float32).at[slots].set(logp, mode="drop").reshape(batch, length)
        return jax.grad(loss_fn)(full).reshape(-1).at[slots].get(mode="fill", fill_value=0.0)

    def one_chunk(kernel_grad, xs):
        h, t, slots = (x.reshape(groups * chunk, *x.shape[2:]) for x in xs)  # [G c, D], [G c], [G c]: 2-D dots
        h = h.astype(weight.dtype)
        logits = _LOGITS(h, weight)
        logp, entropy, probs = logprobs.softmax_stats(logits, t)
        g = loss_derivative(logp, slots)
        dlogits = (-g[:, None] * probs).at[jnp.arange(groups * chunk), jnp.clip(t, 0, probs.shape[-1] - 1)].add(g)
        dlogits = dlogits.astype(weight.dtype)
        h_grad, w_grad = _HIDDEN_GRAD(dlogits, weight), _WEIGHT_GRAD(h, dlogits)
        rows = (groups, chunk)
        return kernel_grad + w_grad, (logp.reshape(rows), entropy.reshape(rows), h_grad.reshape(*rows, -1))

    kernel_grad, (logp, entropy, hidden_grad) = jax.lax.scan(
        one_chunk, jnp.zeros(kernel.shape, jnp.float32), chunks)
    poison = jnp.where(packing.overflows(mask, num_tokens, groups), jnp.nan, 1.0)  # a too-small N never trains
    logp, entropy = (packing.unpack(unchunked(x), index, batch, length) * poison for x in (logp, entropy))
    hidden_grad = unchunked(hidden_grad)
    # Value 0, gradient (hidden_grad, kernel_grad): the precomputed gradients, attached.
    attached = (jnp.sum(jax.lax.stop_gradient(hidden_grad).astype(jnp.float32) * packed.astype(jnp.float32))
                + jnp.sum(jax.lax.stop_gradient(kernel_grad) * kernel.astype(jnp.float32)))
    loss = loss_fn(logp) + (attached - jax.lax.stop_gradient(attached)) * poison
    return loss, logp, entropy
