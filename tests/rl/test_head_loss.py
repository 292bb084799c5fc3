"""The fused LM head + loss equals the head, then the loss, by autodiff (values, log-probs,
entropies, gradients) for every registered loss, computes each chunk's logits once, and
never trains silently on a too-small size."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import registry
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.rl import head_loss, losses
from rwr_jax.rl import logprobs as logprobs_lib
from tests.rl.test_logprobs import B, T, V, _decoder, _inputs

CHUNK = 4


def _case(tie=False, loss_type="dapo", empty=False):
    """Model, params, hidden [B, T, D], targets, the scored mask (all False if empty), and the loss
    numerator as a function of [B, T] log-probs (advantages and reference log-probs fixed)."""
    model, params = _decoder(tie)
    tokens, positions, mask, targets = _inputs()
    hidden = jax.jit(functools.partial(logprobs_lib.hidden_states, model))(params, tokens, positions, mask)
    score = mask.at[1, 0].set(False).at[2, 5:8].set(False)  # padding and an environment block not scored
    score = jnp.zeros_like(score) if empty else score
    rng = np.random.default_rng(4)
    advantages = jnp.asarray(rng.normal(size=B), jnp.float32)
    ref = jnp.asarray(rng.normal(-4.0, 1.0, (B, T)), jnp.float32)
    config = losses.LossConfig(loss_type=loss_type, beta=0.3, max_completion_length=T)
    return model, params, hidden, targets, score, lambda logp: losses.policy_loss(
        logp, score, advantages, config, ref_logprobs=ref).numerator


def _fused(model, loss_fn, targets, score, num_tokens, groups=1):
    return lambda p, h: head_loss.fused_head_loss(model, p, h, targets, score, loss_fn, num_tokens=num_tokens,
                                                  chunk_size=CHUNK, groups=groups)


def _unfused(model, loss_fn, targets, score):
    """The head (chunked, rematerialised), then the loss, differentiated by JAX."""
    count = int(score.sum())

    def run(p, h):
        logp, entropy = logprobs_lib.masked_logprobs(model, p, h, targets, score, num_tokens=count,
                                                     chunk_size=CHUNK, return_entropy=True)
        return loss_fn(logp), logp, entropy
    return run


@pytest.mark.parametrize("loss_type,tie", [*((name, False) for name in registry.names("loss")), ("dapo", True)])
def test_fused_equals_head_then_loss(loss_type, tie):
    model, params, hidden, targets, score, loss_fn = _case(tie, loss_type)
    count = int(score.sum())
    np.testing.assert_allclose(hidden @ model.apply({"params": params}, method=DecoderLM.head_kernel),
                               model.apply({"params": params}, hidden, method=DecoderLM.logits), atol=1e-5)
    expected = jax.jit(_unfused(model, loss_fn, targets, score))(params, hidden)
    per_row = int(score.sum(axis=1).max())  # B row groups of one row, each packed on its own
    for groups, num_tokens in ((1, count), (1, count + 3), (B, per_row)):  # chunks of 4 do not divide them
        ours = jax.jit(_fused(model, loss_fn, targets, score, num_tokens, groups))(params, hidden)
        for name, a, b in zip(("loss", "logp", "entropy"), ours, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{name}, G {groups}, N {num_tokens}")

    def value(fn):
        return lambda p, h: fn(p, h)[0]

    expected = jax.jit(jax.grad(value(_unfused(model, loss_fn, targets, score)), argnums=(0, 1)))(params, hidden)
    for groups, num_tokens in ((1, count + 3), (B, per_row)):
        grads = jax.jit(jax.grad(value(_fused(model, loss_fn, targets, score, num_tokens, groups)),
                                 argnums=(0, 1)))(params, hidden)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
        assert float(jnp.max(jnp.abs(grads[1]))) > 0


def _head_dots(jaxpr, width):
    """Count of dot_general equations producing a [..., CHUNK, width] array, sub-jaxprs included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape)[-2:] == (CHUNK, width)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    count += _head_dots(sub.jaxpr, width)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    count += _head_dots(sub, width)
    return count


def test_logits_computed_once_per_chunk():
    """The gradient's program forms a chunk's [CHUNK, V] logits in one place (inside the
    scan over chunks), where the head then its loss by autodiff forms them twice (forward,
    rematerialised backward)."""
    model, params, hidden, targets, score, loss_fn = _case()

    def dots(fn):
        return _head_dots(jax.make_jaxpr(jax.grad(lambda p: fn(p, hidden)[0]))(params).jaxpr, V)

    assert dots(_fused(model, loss_fn, targets, score, int(score.sum()))) == 1
    assert dots(_unfused(model, loss_fn, targets, score)) == 2


@pytest.mark.parametrize("empty", [False, True], ids=["too_small", "empty_mask"])
def test_too_small_size_is_nan_and_empty_mask_is_zero(empty):
    model, params, hidden, targets, score, loss_fn = _case(empty=empty)
    num_tokens = 1 if empty else int(score.sum()) - 1
    loss, grads = jax.jit(jax.value_and_grad(lambda p, h: _fused(model, loss_fn, targets, score, num_tokens)(p, h)[0],
                                             argnums=(0, 1)))(params, hidden)
    if empty:
        assert float(loss) == 0.0
        assert all(not bool(jnp.any(g)) for g in jax.tree_util.tree_leaves(grads))
    else:
        assert np.isnan(float(loss))  # and gradients: NaN reaches every parameter through the hidden states
        assert bool(jnp.isnan(grads[0]["lm_head"]["kernel"]).all()) and bool(jnp.isnan(grads[1]).any())
