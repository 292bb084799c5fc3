"""GRPO losses against a plain NumPy reference (values and analytic gradients), a
hand-computed example, diagnostics, and gradient accumulation through a real model."""

import functools
import math

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import registry
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.rl import logprobs as logprobs_lib
from rwr_jax.rl.losses import LossConfig, add_terms, loss_diagnostics, per_token_loss, policy_loss
from rwr_jax.rollout import sampler
from rwr_jax.rollout.trajectory import Trajectory
from tests.rl.random_params import random_params

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
MAX_LEN = 16


def _config(loss_type, beta=0.04, **kwargs):
    return LossConfig(loss_type=loss_type, beta=beta, max_completion_length=MAX_LEN, **kwargs)


# ---------------------------------------------------------------- NumPy reference


def _ref_token_loss_and_grad(logp, old, ref, adv, beta, eps_low, eps_high):
    """Per-token loss and its derivative w.r.t. logp, written out by hand (float64)."""
    ratio = np.exp(logp - (logp if old is None else old))
    a = adv[:, None]
    clipped = np.clip(ratio, 1 - eps_low, 1 + eps_high)
    unclipped_wins = ratio * a <= clipped * a
    loss = -np.minimum(ratio * a, clipped * a)
    grad = np.where(unclipped_wins | ((ratio >= 1 - eps_low) & (ratio <= 1 + eps_high)), -a * ratio, 0.0)
    if beta:
        d = ref - logp
        loss = loss + beta * (np.exp(d) - d - 1)
        grad = grad + beta * (1 - np.exp(d))
    return loss, grad


def _ref_weights(mask, loss_type):
    """[B, C] weights w with loss = sum w * l, for one micro-batch."""
    m = mask.astype(np.float64)
    counts = m.sum(1, keepdims=True)
    rows = (counts > 0).sum()
    if loss_type == "grpo":
        return m / np.maximum(counts, 1) / rows
    if loss_type == "dr_grpo":
        return m / (rows * MAX_LEN)
    return m / m.sum()  # bnpo and dapo agree on a single micro-batch


def _random_inputs(seed, batch=6, length=7, with_old=False):
    rng = np.random.default_rng(seed)
    logp = -np.abs(rng.normal(1.0, 1.0, (batch, length)))
    old = logp + rng.normal(0, 0.4, logp.shape) if with_old else None
    ref = logp + rng.normal(0, 0.5, logp.shape)
    adv = rng.normal(size=batch)
    lengths = rng.integers(1, length + 1, batch)
    mask = np.arange(length)[None] < lengths[:, None]
    mask &= rng.random((batch, length)) > 0.2  # environment tokens inside completions
    mask[:, 0] = True
    mask[-1] = False  # a padding row counts for nothing
    return logp, old, ref, adv, mask


def _f32(x):
    return None if x is None else jnp.asarray(x, jnp.float32)


@functools.partial(jax.jit, static_argnames="config")
def _value_and_grad(logp, mask, adv, config, old, ref):
    """((loss, LossTerms), d loss / d logp) of `policy_loss`."""
    def loss_fn(lp):
        terms = policy_loss(lp, mask, adv, config, old_logprobs=old, ref_logprobs=ref)
        return terms.value(), terms

    return jax.value_and_grad(loss_fn, has_aux=True)(logp)


@pytest.mark.parametrize("with_old", [False, True], ids=["ratio1", "clipped"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_numpy_reference(loss_type, beta, with_old):
    seed = 10 * LOSS_TYPES.index(loss_type) + 2 * int(beta > 0) + with_old
    logp, old, ref, adv, mask = _random_inputs(seed, with_old=with_old)
    config = _config(loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28)
    token_loss, token_grad = _ref_token_loss_and_grad(logp, old, ref, adv, beta, 0.2, 0.28)
    weights = _ref_weights(mask, loss_type)
    if with_old:  # the clip must really bite on both sides
        ratio = np.exp(logp - old)[mask]
        assert (ratio < 0.8).any() and (ratio > 1.28).any()

    (value, terms), grad = _value_and_grad(_f32(logp), jnp.asarray(mask), _f32(adv), config, _f32(old),
                                           _f32(ref) if beta else None)
    np.testing.assert_allclose(float(value), np.sum(weights * token_loss), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grad), weights * token_grad, rtol=1e-5, atol=1e-7)
    assert float(terms.denominator) > 0
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_hand_computed_example():
    # Two rows; ratio == 1; ref - logp = [[0, ln 2], [0, pad]], A = [1, -2], beta 0.1.
    logp = jnp.asarray([[-1.0, -2.0], [-0.5, -3.0]])
    ref = logp + jnp.asarray([[0.0, math.log(2.0)], [0.0, 5.0]])
    mask = jnp.asarray([[True, True], [True, False]])
    adv = jnp.asarray([1.0, -2.0])
    k3 = 1 - math.log(2.0)  # exp(ln 2) - ln 2 - 1
    tokens = [-1.0, -1.0 + 0.1 * k3, 2.0]
    expected = {
        "dapo": (sum(tokens), 3.0),
        "bnpo": (sum(tokens) / 3, 1.0),
        "grpo": ((tokens[0] + tokens[1]) / 2 + tokens[2], 2.0),
        "dr_grpo": (sum(tokens), 2.0 * MAX_LEN),
    }
    # d/dlogp: -A + beta * (1 - exp(ref - logp)).
    token_grads = np.array([[-1.0, -1.0 + 0.1 * (1 - 2.0)], [2.0, 0.0]])
    grad_scale = {"dapo": [[1 / 3] * 2] * 2, "bnpo": [[1 / 3] * 2] * 2, "grpo": [[1 / 4, 1 / 4], [1 / 2, 0]],
                  "dr_grpo": [[1 / (2 * MAX_LEN)] * 2] * 2}
    for loss_type, (numerator, denominator) in expected.items():
        (_, terms), grad = _value_and_grad(logp, mask, adv, _config(loss_type, beta=0.1), None, ref)
        np.testing.assert_allclose([float(terms.numerator), float(terms.denominator)], [numerator, denominator],
                                   rtol=1e-6, err_msg=loss_type)
        np.testing.assert_allclose(np.asarray(grad), token_grads * np.asarray(grad_scale[loss_type]), rtol=1e-6,
                                   atol=1e-7, err_msg=loss_type)


def test_ratio_one_gives_advantage_gradient():
    logp = jnp.asarray([[-1.0, -2.0, -0.3]])
    mask = jnp.ones((1, 3), bool)
    config = _config("dapo", beta=0.0)
    per_token, grad = jax.jit(jax.value_and_grad(
        lambda lp: jnp.sum(per_token_loss(lp, mask, jnp.asarray([0.7]), config))))(logp)
    np.testing.assert_allclose(float(per_token), -0.7 * 3, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), -0.7, rtol=1e-6)


def test_log_ratio_clamp_keeps_values_finite():
    logp = jnp.asarray([[-0.1, -200.0]])
    old = jnp.asarray([[-300.0, -0.1]])  # ratio e^300 and e^-200 without the clamp
    ref = jnp.asarray([[-400.0, 0.0]])
    config = _config("dapo", beta=1.0, log_ratio_clamp=20.0)
    (value, _), grad = _value_and_grad(logp, jnp.ones((1, 2), bool), jnp.asarray([-1.0]), config, old, ref)
    assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def test_all_masked_micro_batch_is_zero_over_zero():
    logp = jnp.full((2, 3), jnp.nan)  # whatever sits under the mask never leaks
    for loss_type in LOSS_TYPES:
        (value, terms), grad = _value_and_grad(logp, jnp.zeros((2, 3), bool), jnp.ones(2), _config(loss_type),
                                               logp, logp)
        assert float(terms.numerator) == 0.0 and float(terms.denominator) == 0.0 and float(value) == 0.0
        np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_config_validation():
    with pytest.raises(ValueError, match=r"LossConfig.loss_type must be one of \['bnpo', 'dapo', 'dr_grpo', "
                                         r"'grpo'.*got 'ppo'"):
        LossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length must be >= 1 for loss_type 'dr_grpo', got None"):
        LossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="LossConfig.beta must be >= 0, got -0.1"):
        LossConfig(beta=-0.1)
    with pytest.raises(ValueError, match=r"LossConfig.epsilon_low must be in \[0, 1\), got 1.0"):
        LossConfig(epsilon_low=1.0)
    with pytest.raises(ValueError, match="ref_logprobs is required when LossConfig.beta > 0"):
        policy_loss(jnp.zeros((1, 2)), jnp.ones((1, 2), bool), jnp.ones(1), LossConfig(beta=0.1))
    with pytest.raises(ValueError, match=r"advantages \[B\], got shapes \(2, 3\), \(2, 3\) and \(2, 1\)"):
        policy_loss(jnp.zeros((2, 3)), jnp.ones((2, 3), bool), jnp.ones((2, 1)), LossConfig(beta=0.0))
    assert set(LOSS_TYPES) <= set(registry.names("loss"))
    assert LossConfig().loss_type == "bnpo" and LossConfig().beta == 0.001


def test_diagnostics():
    logp, old, ref, adv, mask = _random_inputs(6, with_old=True)
    entropies = np.abs(np.random.default_rng(1).normal(size=logp.shape))
    config = _config("dapo", epsilon_low=0.2, epsilon_high=0.28)
    metrics = loss_diagnostics(_f32(logp), jnp.asarray(mask), _f32(adv), config, old_logprobs=_f32(old),
                               ref_logprobs=_f32(ref), entropies=_f32(entropies))
    ratio = np.exp(logp - old)
    a = np.broadcast_to(adv[:, None], logp.shape)
    d = ref - logp
    expected = {"ratio": ratio, "clip_low": (ratio < 0.8) & (a < 0), "clip_high": (ratio > 1.28) & (a > 0),
                "kl": np.exp(d) - d - 1, "entropy": entropies}
    assert set(metrics) == set(expected)
    for name, values in expected.items():
        assert float(metrics[name].denominator) == mask.sum()
        np.testing.assert_allclose(float(metrics[name].value()), values[mask].mean(), rtol=1e-5, err_msg=name)
    assert float(metrics["clip_low"].value()) > 0 and float(metrics["clip_high"].value()) > 0
    plain = loss_diagnostics(_f32(logp), jnp.asarray(mask), _f32(adv), config)
    assert set(plain) == {"ratio", "clip_low", "clip_high"} and float(plain["ratio"].value()) == 1.0


# ------------------------------------------------ gradient accumulation through a model

PROMPT, COMPLETION, ROWS, PIECES = 4, 6, 8, 4
CONFIGS = tuple(_config(t, beta=0.04) for t in LOSS_TYPES)


@pytest.fixture(scope="module")
def tiny_batch():
    config = DecoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2)
    model = DecoderLM(config)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = random_params(model, 0, dummy, dummy, dummy >= 0)
    rng = np.random.default_rng(0)
    prompt_len = rng.integers(1, PROMPT + 1, ROWS)
    prompt_mask = np.arange(PROMPT)[None] >= PROMPT - prompt_len[:, None]
    lengths = rng.integers(1, COMPLETION + 1, ROWS)
    source = np.where(np.arange(COMPLETION)[None] < lengths[:, None], sampler.SOURCE_MODEL, sampler.SOURCE_PAD)
    source[(rng.random(source.shape) < 0.25) & (source == sampler.SOURCE_MODEL)] = sampler.SOURCE_ENV
    source[:, 0] = sampler.SOURCE_MODEL
    traj = Trajectory(
        prompt_tokens=np.where(prompt_mask, rng.integers(0, 64, (ROWS, PROMPT)), 0).astype(np.int32),
        prompt_mask=prompt_mask, prompt_positions=np.maximum(np.cumsum(prompt_mask, 1) - 1, 0).astype(np.int32),
        tokens=np.where(source != sampler.SOURCE_PAD, rng.integers(0, 64, (ROWS, COMPLETION)), 0).astype(np.int32),
        source=source.astype(np.int8), logprobs=np.zeros((ROWS, COMPLETION), np.float32), length=lengths,
        rounds=np.ones(ROWS, np.int32), finish_reason=np.zeros(ROWS, np.int32), queries=[[]] * ROWS,
        passages=[[]] * ROWS)
    tokens, mask, positions = traj.full_sequence()
    batch = dict(tokens=tokens, mask=mask, positions=positions, loss_mask=traj.loss_mask,
                 advantages=rng.normal(size=ROWS).astype(np.float32))
    current = np.asarray(jax.jit(_logprobs, static_argnums=0)(model, params, batch))
    batch["old"] = (current + rng.normal(0, 0.3, current.shape)).astype(np.float32)  # mu > 1: clipping active
    batch["ref"] = (current + rng.normal(0, 0.3, current.shape)).astype(np.float32)
    return model, params, batch


def _logprobs(model, params, b):
    return logprobs_lib.completion_logprobs(model, params, b["tokens"], b["positions"], b["mask"],
                                            prompt_length=PROMPT, chunk_size=4)


@functools.partial(jax.jit, static_argnums=0)
def _numerator_grads(model, params, b, weights):
    """Gradients of every loss type's numerator, and of sum(weights * per-token loss).

    One jacrev through the model serves all loss types (one compile per batch shape).

    Returns:
      ([L] LossTerms, [L, ...] numerator grads, [L] weighted losses, [L, ...] their grads).
    """
    def numerators(params):
        lp = _logprobs(model, params, b)
        kwargs = dict(old_logprobs=b["old"], ref_logprobs=b["ref"])
        terms = [policy_loss(lp, b["loss_mask"], b["advantages"], c, **kwargs) for c in CONFIGS]
        per_token = per_token_loss(lp, b["loss_mask"], b["advantages"], CONFIGS[0], **kwargs)
        weighted = jnp.sum(per_token[None] * weights, axis=(1, 2))
        stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *terms)
        return jnp.concatenate([stacked.numerator, weighted]), (stacked, weighted)

    grads, (terms, weighted) = jax.jacrev(numerators, has_aux=True)(params)
    n = len(CONFIGS)
    return terms, jax.tree_util.tree_map(lambda g: g[:n], grads), weighted, jax.tree_util.tree_map(
        lambda g: g[n:], grads)


def _reference_weights(mask):
    """[L, B, C] per-token weights each loss type defines for the PIECES-way split."""
    pieces = np.array_split(np.arange(ROWS), PIECES)
    bnpo = np.concatenate([_ref_weights(mask[rows], "dapo") for rows in pieces]) / PIECES
    return np.stack([bnpo if t == "bnpo" else _ref_weights(mask, t) for t in LOSS_TYPES]).astype(np.float32)


def _accumulate(model, params, batch, pieces):
    """(loss [L], grads [L, ...]) as a trainer would: sum numerators and grads, divide at the end."""
    grads = terms = None
    weights = np.zeros((len(CONFIGS), ROWS // pieces, COMPLETION), np.float32)
    for rows in np.array_split(np.arange(ROWS), pieces):
        t, g, _, _ = _numerator_grads(model, params, {k: v[rows] for k, v in batch.items()}, weights)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
        terms = t if terms is None else add_terms(terms, t)
    return terms.value(), jax.tree_util.tree_map(
        lambda g: g / terms.denominator.reshape((-1,) + (1,) * (g.ndim - 1)), grads)


def _assert_trees_close(a, b, err_msg):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        scale = float(jnp.max(jnp.abs(y)))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5 * scale, err_msg=err_msg)


def test_gradient_accumulation_through_model(tiny_batch):
    """For every loss type, 4 micro-batches of 2 == 1 of 8 (loss and parameter
    gradients), and both equal a full-batch weighted reference of the definition."""
    model, params, batch = tiny_batch
    full_loss, full_grads = _accumulate(model, params, batch, 1)
    piece_loss, piece_grads = _accumulate(model, params, batch, PIECES)
    _, _, ref_loss, ref_grads = _numerator_grads(model, params, batch, _reference_weights(batch["loss_mask"]))
    for i, loss_type in enumerate(LOSS_TYPES):
        piece_i, ref_i, full_i = (jax.tree_util.tree_map(lambda g: g[i], tree)
                                  for tree in (piece_grads, ref_grads, full_grads))
        assert float(jnp.max(jnp.abs(jax.flatten_util.ravel_pytree(piece_i)[0]))) > 0
        np.testing.assert_allclose(float(piece_loss[i]), float(ref_loss[i]), rtol=1e-5, err_msg=loss_type)
        _assert_trees_close(piece_i, ref_i, loss_type)
        if loss_type == "bnpo":  # the release's loss depends on the split when token counts differ
            assert abs(float(piece_loss[i]) - float(full_loss[i])) > 1e-4
        else:
            np.testing.assert_allclose(float(piece_loss[i]), float(full_loss[i]), rtol=1e-5, err_msg=loss_type)
            _assert_trees_close(piece_i, full_i, loss_type)
