"""Chunked log-probs and entropies equal those of the full logits (values and
gradients), for any chunk size, tied heads and images, without [B, T, V] arrays."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import packing
from rwr_jax.models.qwen2_vl import vision
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, VLConfig
from rwr_jax.rl import logprobs as logprobs_lib
from tests.rl.random_params import random_params

B, T, V, PROMPT = 3, 11, 64, 4


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), bool)
    mask[0, :3] = False  # left padding
    mask[1, -2:] = False  # right padding
    tokens = np.where(mask, rng.integers(0, V, (B, T)), 0).astype(np.int32)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    return jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask), jnp.asarray(targets)


@functools.cache
def _decoder(tie=False):
    config = DecoderConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                           num_kv_heads=2, tie_word_embeddings=tie)  # no width equals V (shape test below)
    model = DecoderLM(config)
    tokens, positions, mask, _ = _inputs()
    return model, random_params(model, 1, tokens, positions, mask)


def _reference(model, params, tokens, positions, mask, targets, **kwargs):
    logits, _ = model.apply({"params": params}, tokens, positions, mask, **kwargs)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], entropy


def _reference_from_hidden(model, params, hidden, targets):
    logits = model.apply({"params": params}, hidden, method=DecoderLM.logits)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0], entropy


@pytest.mark.parametrize("tie", [False, True], ids=["lm_head", "tied"])
def test_chunked_equals_full_logits(tie):
    model, params = _decoder(tie)
    tokens, positions, mask, targets = _inputs()
    hidden = jax.jit(functools.partial(logprobs_lib.hidden_states, model))(params, tokens, positions, mask)
    ref_logp, ref_entropy = jax.jit(functools.partial(_reference_from_hidden, model))(params, hidden, targets)
    assert float(jnp.min(ref_logp)) < -6.0  # far from uniform (log 64 = 4.16)
    chunked = jax.jit(functools.partial(logprobs_lib.chunked_logprobs, model, return_entropy=True),
                      static_argnames="chunk_size")
    for chunk_size in (1, 3, 4, T, 16) if not tie else (3,):  # 3 and 4 do not divide T = 11; 16 > T
        logp, entropy = chunked(params, hidden, targets, chunk_size=chunk_size)
        assert logp.shape == entropy.shape == (B, T) and logp.dtype == jnp.float32
        np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=0, err_msg=f"chunk {chunk_size}")
        np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5, rtol=0, err_msg=f"chunk {chunk_size}")
    if not tie:  # end to end from tokens
        logp = jax.jit(functools.partial(logprobs_lib.token_logprobs, model, chunk_size=4))(
            params, tokens, positions, mask, targets)
        np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=0)


def test_entropy_of_known_distributions():
    # Uniform over V: entropy log V. One-hot-ish: entropy ~ 0.
    hidden = jnp.zeros((1, 2, 4))
    model = DecoderLM(DecoderConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_layers=1, num_heads=1,
                                    num_kv_heads=1))
    kernel = jnp.zeros((4, 8))
    params = {"lm_head": {"kernel": kernel}}
    logp, entropy = logprobs_lib.chunked_logprobs(model, params, hidden, jnp.asarray([[0, 7]]), chunk_size=1,
                                                  return_entropy=True)
    np.testing.assert_allclose(logp, np.log(1 / 8), rtol=1e-6)
    np.testing.assert_allclose(entropy, np.log(8), rtol=1e-6)
    params = {"lm_head": {"kernel": kernel.at[0, 3].set(100.0)}}
    logp, entropy = logprobs_lib.chunked_logprobs(model, params, hidden.at[..., 0].set(1.0), jnp.asarray([[3, 0]]),
                                                  chunk_size=2, return_entropy=True)
    np.testing.assert_allclose(logp[0, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(entropy, 0.0, atol=1e-6)


def test_gradients_equal_full_logits():
    model, params = _decoder()
    inputs = _inputs()
    weights = jnp.asarray(np.random.default_rng(2).normal(size=(B, T)), jnp.float32)

    def ours(p):
        logp, entropy = logprobs_lib.token_logprobs(model, p, *inputs, chunk_size=3, return_entropy=True)
        return jnp.sum(weights * logp) + 0.1 * jnp.sum(entropy)

    def reference(p):
        logp, entropy = _reference(model, p, *inputs)
        return jnp.sum(weights * logp) + 0.1 * jnp.sum(entropy)

    grads, ref_grads = jax.jit(lambda p: (jax.grad(ours)(p), jax.grad(reference)(p)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_masked_logprobs_score_only_the_masked_positions():
    """Values, entropies and gradients equal the full head's at masked positions, 0 elsewhere;
    the head sees only N positions; N below the count poisons the result with NaN."""
    model, params = _decoder()
    tokens, positions, mask, targets = _inputs()
    hidden = jax.jit(functools.partial(logprobs_lib.hidden_states, model))(params, tokens, positions, mask)
    score = mask.at[1, 0].set(False).at[2, 5:8].set(False)  # padding and an environment block skipped
    count = int(score.sum())
    weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, T)), jnp.float32)

    def masked(p, h, num_tokens):
        return logprobs_lib.masked_logprobs(model, p, h, targets, score, num_tokens=num_tokens, chunk_size=4,
                                            return_entropy=True)

    def full(p, h):
        logp, entropy = _reference_from_hidden(model, p, h, targets)
        return jnp.where(score, logp, 0.0), jnp.where(score, entropy, 0.0)

    def objective(fn):
        return lambda p, h: sum(jnp.sum(w * x) for w, x in zip((weights, 0.1), fn(p, h)))

    run = jax.jit(masked, static_argnums=2)
    for num_tokens in (count, packing.token_bucket(count, 4)):
        for ours, expected in zip(run(params, hidden, num_tokens), full(params, hidden)):
            np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=f"N {num_tokens}")
    grads = jax.jit(jax.grad(objective(lambda p, h: masked(p, h, count + 3)), argnums=(0, 1)))(params, hidden)
    expected = jax.jit(jax.grad(objective(full), argnums=(0, 1)))(params, hidden)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    one_chunk = jax.make_jaxpr(lambda p: logprobs_lib.masked_logprobs(model, p, hidden, targets, score,
                                                                      num_tokens=count, chunk_size=64))(params)
    assert [s for s in _shapes_in(one_chunk.jaxpr) if s[-1:] == (V,)] == [(1, count, V)]  # the head's only logits
    assert all(bool(jnp.isnan(x).all()) for x in run(params, hidden, count - 1))


def _shapes_in(jaxpr):
    """All array shapes produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    shapes |= _shapes_in(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    shapes |= _shapes_in(sub)
    return shapes


def test_full_logits_never_materialised():
    model, params = _decoder()
    tokens, positions, mask, targets = _inputs()

    def loss(p):
        return jnp.sum(logprobs_lib.token_logprobs(model, p, tokens, positions, mask, targets, chunk_size=4))

    for fn in (loss, jax.grad(loss)):
        shapes = _shapes_in(jax.make_jaxpr(fn)(params).jaxpr)
        assert (B, 4, V) in shapes  # one chunk's logits
        assert not any(len(s) >= 2 and s[-1] == V and np.prod(s) >= B * T * V for s in shapes), sorted(shapes)


def test_completion_logprobs_alignment():
    model, params = _decoder()
    tokens, positions, mask, _ = _inputs()

    @jax.jit
    def run(params):
        ours = logprobs_lib.completion_logprobs(model, params, tokens, positions, mask, prompt_length=PROMPT,
                                                chunk_size=3, return_entropy=True)
        return ours, jax.nn.log_softmax(model.apply({"params": params}, tokens, positions, mask)[0], axis=-1)

    (logp, entropy), full = run(params)
    assert logp.shape == entropy.shape == (B, T - PROMPT)
    # Completion token t (sequence position PROMPT + t) is predicted at position PROMPT + t - 1.
    for t in range(T - PROMPT):
        np.testing.assert_allclose(logp[:, t], full[jnp.arange(B), PROMPT + t - 1, tokens[:, PROMPT + t]], atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt_length must be in \[1, 11\) for sequences of length 11, got 0"):
        logprobs_lib.completion_logprobs(model, params, tokens, positions, mask, prompt_length=0, chunk_size=3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        logprobs_lib.token_logprobs(model, params, tokens, positions, mask, tokens, chunk_size=0)


def test_vision_language_model_with_images():
    text = DecoderConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                         num_kv_heads=2, mrope_section=(2, 1, 1))
    vis = vision.VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                              fullatt_block_indexes=(0,))
    image_token = 5
    model = VisionLanguageLM.from_config(VLConfig(text=text, vision=vis, image_token_id=image_token))
    rng = np.random.default_rng(3)
    grid = np.asarray([[1, 4, 4]])  # 16 patches -> 4 merged tokens
    images = vision.pack_images(rng.normal(size=(16, vis.patch_dim)).astype(np.float32), grid, vis, num_images=1,
                                num_patches=16)
    images = jax.tree_util.tree_map(jnp.asarray, images)
    tokens = rng.integers(6, V, (1, T)).astype(np.int32)
    tokens[0, 2:6] = image_token
    tokens, mask = jnp.asarray(tokens), jnp.ones((1, T), bool)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (3, 1, T))
    targets = jnp.roll(tokens, -1, axis=1)
    params = random_params(model, 0, tokens, positions, mask, images=images)

    @jax.jit
    def run(params):
        ours = logprobs_lib.token_logprobs(model, params, tokens, positions, mask, targets, chunk_size=4,
                                           images=images, return_entropy=True)
        text_only = logprobs_lib.token_logprobs(model, params, tokens, positions, mask, targets, chunk_size=4)
        return ours, _reference(model, params, tokens, positions, mask, targets, images=images), text_only

    (logp, entropy), (ref_logp, ref_entropy), text_only = run(params)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(entropy, ref_entropy, atol=1e-5, rtol=0)
    # The images matter: dropping them changes the log-probs after the image tokens.
    assert float(jnp.max(jnp.abs(text_only[:, 2:] - logp[:, 2:]))) > 1e-4
