"""Sampling rules, byte-level stop strings, and greedy decoding vs transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models.qwen2_vl import convert, vision
from rwr_jax.models.qwen2_vl.config import read_hf_config
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, read_vl_config
from rwr_jax.models.qwen2_vl.positions import rope_index
from rwr_jax.rollout import engine, sampler, stop_strings
from tests.models import hf_models

torch = hf_models.torch


def _uniforms(seed: int, rows: int) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (rows,))


def test_greedy_takes_argmax_and_reports_logprob():
    logits = jnp.asarray([[0.0, 2.0, 1.0], [3.0, -1.0, 0.0]])
    tokens, logprobs = sampler.sample_tokens(logits, jnp.zeros(2), sampler.SamplingConfig(temperature=0))
    assert tokens.tolist() == [1, 0]
    np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], rtol=1e-6)


@pytest.mark.parametrize("config,allowed", [
    (sampler.SamplingConfig(top_k=2), {0, 1}),
    (sampler.SamplingConfig(top_p=0.7), {0, 1}),  # p = [.5, .3, .15, .05]: .5 < .7, then .8 >= .7
    (sampler.SamplingConfig(top_p=0.4), {0}),
])
def test_top_k_and_top_p_restrict_support(config, allowed):
    probs = np.asarray([0.5, 0.3, 0.15, 0.05])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (4000, 4))
    tokens, logprobs = sampler.sample_tokens(logits, _uniforms(1, 4000), config)
    assert set(np.asarray(tokens).tolist()) == allowed
    # Logprobs are those of the full tempered distribution, not the truncated one.
    np.testing.assert_allclose(logprobs, np.log(probs)[np.asarray(tokens)], rtol=1e-5)


def test_temperature_one_matches_the_distribution():
    probs = np.asarray([0.6, 0.3, 0.1])
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs)), (20000, 3))
    tokens, _ = sampler.sample_tokens(logits, _uniforms(2, 20000), sampler.SamplingConfig())
    np.testing.assert_allclose(np.bincount(np.asarray(tokens), minlength=3) / 20000, probs, atol=0.015)


def test_bad_sampling_config():
    with pytest.raises(ValueError, match="top_p must be in"):
        sampler.SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sampler.SamplingConfig(temperature=-1)


def test_stop_strings_match_any_tokenisation():
    """Random token streams over pieces of the tags: a stop fires at exactly the first
    token whose bytes complete the string (reference: substring search)."""
    vocab = [b"</", b"query", b">", b"</query>", b">\n\n", b"abc", b"</answer>x", b"q", b"uery>", b"", b" </que",
             b"ry>", b"</ans", b"wer>", b"<", b"/"]
    tables = stop_strings.build_stop_tables(vocab, ("</query>", "</answer>"))
    match = jax.jit(stop_strings.match_stop)
    rng = np.random.default_rng(0)
    streams = rng.integers(0, len(vocab), (512, 14))
    tail = stop_strings.initial_tail(512, tables)
    first = np.full((512, 2), -1)
    for t in range(streams.shape[1]):
        matched, tail = match(tables, tail, jnp.asarray(streams[:, t]))
        first = np.where((first < 0) & np.asarray(matched), t, first)
    for row in range(512):
        for s, stop in enumerate((b"</query>", b"</answer>")):
            text, expected = b"", -1
            for t, token in enumerate(streams[row]):
                text += vocab[token]
                if stop in text:
                    expected = t
                    break
            assert first[row, s] == expected, (row, stop)
    assert (first >= 0).any(axis=0).all()


def _no_stops(vocab_size):
    return stop_strings.build_stop_tables([b""] * vocab_size, ("</query>", "</answer>"))


def _never_called(queries):
    raise AssertionError("no retrieval expected")


def _greedy_config(new_tokens):
    return engine.RolloutConfig(max_rounds=1, max_new_tokens_per_round=new_tokens, max_completion_length=new_tokens,
                                group_size=1, sampling=sampler.SamplingConfig(temperature=0))


@pytest.mark.parametrize("eigen_dots", [False, True], ids=["ynnpack_dots", "eigen_dots"])
def test_greedy_equals_transformers_generate_text(tmp_path, monkeypatch, eigen_dots):
    """Both of XLA:CPU's dot libraries (chosen by model size, see `sampler.decode_with_eigen_dots`)."""
    monkeypatch.setattr(sampler, "EIGEN_DOTS_MIN_WEIGHT_BYTES", 0 if eigen_dots else 1 << 62)
    hf = hf_models.make_causal_lm("qwen2_bias")
    hf.save_pretrained(tmp_path)
    config, _ = read_hf_config(str(tmp_path))
    params = convert.load_hf_params(str(tmp_path), config, progress=False)
    tokens, mask, positions = hf_models.left_padded_batch([7, 4, 6], total=7)
    new_tokens = 20
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                          pad_token_id=0)[:, tokens.shape[1]:].numpy()
    prompts = engine.PromptBatch(tokens=tokens.astype(np.int32), token_mask=mask.astype(bool),
                                 positions=positions.astype(np.int32))
    traj = engine.rollout(convert.build_model(config), params, prompts, None, _never_called,
                          _greedy_config(new_tokens), jax.random.key(0), stop_tables=_no_stops(config.vocab_size),
                          eos_ids=())
    assert sampler.decode_with_eigen_dots(config) == eigen_dots
    np.testing.assert_array_equal(traj.tokens, ref)


def test_greedy_equals_transformers_generate_with_images(tmp_path):
    hf = hf_models.make_qwen2_5_vl()
    hf.save_pretrained(tmp_path)
    config, _ = read_vl_config(str(tmp_path))
    params = convert.load_hf_params(str(tmp_path), config, progress=False)
    rng = np.random.default_rng(0)
    grids = np.asarray([[1, 8, 12], [1, 4, 4]])
    rows = []
    for (_, h, w) in grids:
        rows.append(list(rng.integers(0, 140, 3)) + [hf_models.VISION_START_TOKEN_ID]
                    + [hf_models.IMAGE_TOKEN_ID] * (h * w // 4) + [hf_models.VISION_END_TOKEN_ID]
                    + list(rng.integers(0, 140, 4)))
    total = max(map(len, rows))
    tokens = np.zeros((2, total), np.int64)
    mask = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, total - len(row):] = row
        mask[i, total - len(row):] = 1
    pixels = rng.normal(size=(int(grids.prod(1).sum()), 1176)).astype(np.float32)
    new_tokens = 12
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                          mm_token_type_ids=torch.tensor((tokens == hf_models.IMAGE_TOKEN_ID).astype(np.int32)),
                          do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          eos_token_id=None, pad_token_id=0)[:, total:].numpy()
    positions, _ = rope_index(tokens, mask, grids, image_token_id=hf_models.IMAGE_TOKEN_ID)
    images = vision.pack_images(pixels, grids, config.vision, num_images=2, num_patches=128)
    prompts = engine.PromptBatch(tokens=tokens.astype(np.int32), token_mask=mask.astype(bool), positions=positions,
                                 images=images)
    traj = engine.rollout(VisionLanguageLM.from_config(config), params, prompts, None, _never_called,
                          _greedy_config(new_tokens), jax.random.key(0),
                          stop_tables=_no_stops(config.text.vocab_size), eos_ids=())
    np.testing.assert_array_equal(traj.tokens, ref)


def test_draw_matches_the_distribution_across_blocks_and_never_draws_zero_probability():
    """A 600-token vocabulary spans three 256-token blocks (the last one padded)."""
    probs = np.zeros(600, np.float32)
    probs[[0, 255, 256, 300, 599]] = [0.1, 0.2, 0.3, 0.15, 0.25]
    tokens = np.asarray(sampler.draw(_uniforms(0, 40000), jnp.broadcast_to(jnp.asarray(probs), (40000, 600))))
    counts = np.bincount(tokens, minlength=600) / len(tokens)
    np.testing.assert_allclose(counts, probs, atol=0.01)
    assert counts[probs == 0].sum() == 0
    # Uniforms at either end of the range cannot fall outside the support.
    edge = jnp.asarray([[0.0, 0.5, 0.5, 0.0]] * 2, jnp.float32)
    extremes = jnp.asarray([0.0, np.nextafter(np.float32(1), np.float32(0))])
    assert np.asarray(sampler.draw(extremes, edge, block=2)).tolist() == [1, 2]
