"""Cached decoding (prefill + decode / extend) equals the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models.qwen2_vl import inference
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM, init_cache

ATOL = 1e-5
CONFIGS = {
    "qwen2": DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2),
    "mrope_tied": DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                num_kv_heads=1, mrope_section=(2, 3, 3), tie_word_embeddings=True,
                                qkv_bias=False),
    # Attention on 4 queries at a time: prefills and chunks of 2..9 tokens, padded to multiples of 4.
    "qwen2_query_chunks": DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                                        num_heads=4, num_kv_heads=2, attention_query_chunk=4),
}


def _setup(name, lengths=(9, 5, 7), total=9, seed=0):
    config = CONFIGS[name]
    model = DecoderLM(config)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (len(lengths), total)), jnp.int32)
    mask = jnp.asarray(np.arange(total)[None, :] >= total - np.asarray(lengths)[:, None])
    positions = inference.text_positions(mask)
    params = model.init(jax.random.key(seed), tokens, positions, mask)["params"]
    # Scale up the random init so logits are far from uniform and errors would show.
    params = jax.tree_util.tree_map(lambda p: p * 4.0, params)
    return config, model, params, tokens, mask, positions


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_decode_matches_full_forward(name):
    config, model, params, tokens, mask, positions = _setup(name)
    full, _ = jax.jit(model.apply)({"params": params}, tokens, positions, mask)
    prompt = 4
    cache = init_cache(config, batch=tokens.shape[0], max_length=16)
    logits, cache = inference.prefill(model, params, tokens[:, :prompt], mask[:, :prompt],
                                      positions[:, :prompt], cache)
    steps = [logits]
    for t in range(prompt, tokens.shape[1]):
        step_logits, cache = inference.decode(model, params, tokens[:, t], positions[:, t], cache)
        steps.append(step_logits[:, None])
    cached = jnp.concatenate(steps, axis=1)
    valid = np.asarray(mask)
    diff = float(np.max(np.abs(np.asarray(cached - full))[valid]))
    print(f"{name}: max |cached - full| = {diff:.2e} (logit scale {float(jnp.abs(full).max()):.1f})")
    assert diff <= ATOL
    assert int(cache.end_index) == tokens.shape[1]
    np.testing.assert_array_equal(np.asarray(cache.key_mask[:, :tokens.shape[1]]), valid)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chunked_extend_with_inner_padding(name):
    """A chunk whose padding sits mid-row (as when rows append blocks of different
    lengths) gives the same logits as the unpadded sequence."""
    config, model, params, tokens, mask, _ = _setup(name, lengths=(9, 9), total=9)
    # Row 1 carries 3 padding slots in the middle of the second chunk.
    chunk_mask = np.ones((2, 9), bool)
    chunk_mask[1, 5:8] = False
    chunk_mask = jnp.asarray(chunk_mask)
    positions = inference.text_positions(chunk_mask)
    cache = init_cache(config, batch=2, max_length=12)
    first, cache = inference.prefill(model, params, tokens[:, :4], chunk_mask[:, :4], positions[:, :4], cache)
    second, cache = inference.prefill(model, params, tokens[:, 4:], chunk_mask[:, 4:], positions[:, 4:], cache)
    cached = np.asarray(jnp.concatenate([first, second], axis=1))
    for row in range(2):
        keep = np.asarray(chunk_mask[row])
        row_tokens = tokens[row][keep][None]
        ref, _ = jax.jit(model.apply)({"params": params}, row_tokens, jnp.arange(row_tokens.shape[1])[None],
                             jnp.ones_like(row_tokens, bool))
        np.testing.assert_allclose(cached[row][keep], np.asarray(ref[0]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compacted_cache_decodes_as_the_full_one(name):
    """Compaction moves each row's real slots to the front in order: decoding on from it
    gives the logits of the uncompacted cache, and its end is the largest real count."""
    config, model, params, tokens, mask, positions = _setup(name)
    cache = init_cache(config, batch=tokens.shape[0], max_length=16)
    _, cache = inference.prefill(model, params, tokens[:, :5], mask[:, :5], positions[:, :5], cache)
    # Two chunks with holes mid-row (rows stopped or paused for some steps).
    for start, holes in ((5, ((1, 0), (1, 1))), (7, ((0, 1), (2, 0)))):
        chunk_mask = np.ones((3, 2), bool)
        for row, column in holes:
            chunk_mask[row, column] = False
        chunk_positions = positions[:, 5:6] + np.cumsum(chunk_mask, axis=1) - 1 + (start - 5)
        _, cache = inference.prefill(model, params, tokens[:, start:start + 2], jnp.asarray(chunk_mask),
                                     jnp.asarray(chunk_positions, jnp.int32), cache)
    compacted = jax.jit(lambda c: c.compacted())(cache)
    counts = np.asarray(cache.key_mask).sum(axis=1)
    assert int(compacted.end_index) == counts.max() < int(cache.end_index)
    np.testing.assert_array_equal(np.asarray(compacted.key_mask), np.arange(16)[None] < counts[:, None])
    next_tokens, next_positions = tokens[:, -1], jnp.asarray(positions[:, -1] + 3)
    expected, _ = inference.decode(model, params, next_tokens, next_positions, cache)
    got, after = inference.decode(model, params, next_tokens, next_positions, compacted)
    diff = float(jnp.max(jnp.abs(got - expected)))
    print(f"{name}: max |compacted - full| next-step logits = {diff:.2e}")
    assert diff <= ATOL
    assert int(after.end_index) == counts.max() + 1


def test_bf16_cache_runs_and_stays_close():
    config, model, params, tokens, mask, positions = _setup("qwen2")
    full, _ = jax.jit(model.apply)({"params": params}, tokens, positions, mask)
    bf16 = DecoderLM(config.replace(dtype="bfloat16", param_dtype="bfloat16"))
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    cache = init_cache(bf16.config, batch=tokens.shape[0], max_length=16)
    assert {k.dtype for k in cache.keys + cache.values} == {jnp.dtype(jnp.bfloat16)}
    logits, cache = inference.prefill(bf16, params16, tokens, mask, positions, cache)
    rel = float(np.max(np.abs(np.asarray(logits, np.float32) - np.asarray(full))[np.asarray(mask)]))
    rel /= float(np.abs(np.asarray(full)).max())
    print(f"bf16 prefill: max |dlogit| / max |logit| = {rel:.2e}")
    assert rel <= 5e-2


def test_text_positions_left_padding():
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(inference.text_positions(mask)),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]])


@pytest.mark.parametrize("policy,query_chunk", [("full", 0), ("dots_saveable", 0), ("none", 4), ("full", 4)])
def test_remat_policies_and_query_chunks_keep_loss_and_gradients(policy, query_chunk):
    config, model, params, tokens, mask, positions = _setup("qwen2")

    def loss(model):
        def fn(p):
            logits, _ = model.apply({"params": p}, tokens, positions, mask)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)
        return jax.jit(jax.value_and_grad(fn))(params)

    base_loss, base_grads = loss(model)
    remat_loss, remat_grads = loss(DecoderLM(config.replace(remat_policy=policy, attention_query_chunk=query_chunk)))
    np.testing.assert_allclose(remat_loss, base_loss, rtol=1e-6)
    atol = 1e-5 if query_chunk else 1e-6  # chunks sum dK, dV in another order
    for a, b in zip(jax.tree_util.tree_leaves(remat_grads), jax.tree_util.tree_leaves(base_grads)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5)
