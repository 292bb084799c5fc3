"""Padding-free forward passes (packed position-wise work) equal the padded ones, with
and without a KV cache, values and gradients; packing round-trips."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import packing
from rwr_jax.models.qwen2_vl import inference
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM, init_cache

CONFIGS = {
    "qwen2": DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                           num_kv_heads=2),
    "mrope_remat": DecoderConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2,
                                 num_kv_heads=1, mrope_section=(2, 3, 3), remat_policy="full"),
}


def test_pack_unpack_round_trip():
    mask = jnp.asarray([[False, True, True], [True, False, False]])
    x = jnp.arange(6 * 2, dtype=jnp.float32).reshape(2, 3, 2) + 1
    index = packing.pack_index(mask, 5)
    np.testing.assert_array_equal(index, [[1, 2, 3, 6, 6]])  # 6 = B * T: empty slots
    packed = packing.pack(x, index)
    np.testing.assert_array_equal(packed, [[[3, 4], [5, 6], [7, 8], [0, 0], [0, 0]]])
    np.testing.assert_array_equal(packing.unpack(packed, index, 2, 3), jnp.where(mask[..., None], x, 0))
    assert not packing.overflows(mask, 3) and packing.overflows(mask, 2)


def test_groups_pack_their_own_rows():
    """4 rows in 2 groups of 2: each group's tokens in its own packed row, positions within the group."""
    mask = jnp.asarray([[False, True, True], [True, False, False], [True, True, True], [False, False, True]])
    x = jnp.arange(12, dtype=jnp.float32).reshape(4, 3) + 1
    index = packing.pack_index(mask, 4, groups=2)
    np.testing.assert_array_equal(index, [[1, 2, 3, 6], [0, 1, 2, 5]])  # 6 = 2 rows x 3: empty slot
    np.testing.assert_array_equal(packing.pack(x, index), [[2, 3, 4, 0], [7, 8, 9, 12]])
    np.testing.assert_array_equal(packing.unpack(packing.pack(x, index), index, 4, 3), jnp.where(mask, x, 0))
    np.testing.assert_array_equal(packing.flat_positions(index, 4, 3), [[1, 2, 3, 12], [6, 7, 8, 11]])
    assert not packing.overflows(mask, 4, groups=2) and packing.overflows(mask, 3, groups=2)


def test_unpack_and_pack_are_each_others_gradient():
    """Several empty slots share one out-of-range index: they read 0 and are dropped on write (the
    index is declared unique and sorted), in both directions and in the gradients."""
    mask = jnp.asarray([[True, False, True], [False, False, True]])
    index = packing.pack_index(mask, 6)
    np.testing.assert_array_equal(index, [[0, 2, 5, 6, 6, 6]])
    x = jnp.arange(6, dtype=jnp.float32).reshape(2, 3) + 1
    rows = jnp.arange(6, dtype=jnp.float32).reshape(1, 6) + 10
    pack_grad = jax.grad(lambda x: jnp.sum(packing.pack(x, index) * rows))(x)
    np.testing.assert_array_equal(pack_grad, packing.unpack(rows, index, 2, 3))
    np.testing.assert_array_equal(pack_grad, [[10, 0, 11], [0, 0, 12]])
    unpack_grad = jax.grad(lambda r: jnp.sum(packing.unpack(r, index, 2, 3) * x))(rows)
    np.testing.assert_array_equal(unpack_grad, packing.pack(x, index))
    np.testing.assert_array_equal(unpack_grad, [[1, 3, 6, 0, 0, 0]])


def test_token_bucket():
    assert [packing.token_bucket(n, 512) for n in (0, 1, 3, 100, 512)] == [1, 1, 4, 128, 512]
    # Above the chunk: multiples of max(chunk, 2 ** k / 4), at most 4 sizes per octave.
    assert [packing.token_bucket(n, 512) for n in (513, 1444, 2048, 2049, 30000)] == [1024, 1536, 2048, 2560,
                                                                                          32768]
    assert packing.token_bucket(1444, 64) == 1536


def _setup(name, seed=0):
    """Rows with left padding (prompts) and right padding (completions): T = 9."""
    config = CONFIGS[name]
    model = DecoderLM(config)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 9)), jnp.int32)
    mask = np.ones((3, 9), bool)
    mask[0, :2], mask[1, 6:], mask[2, :1], mask[2, 7:] = False, False, False, False
    mask = jnp.asarray(mask)
    positions = inference.text_positions(mask)
    if config.mrope_section:
        positions = jnp.broadcast_to(positions, (3, *positions.shape))
    params = model.init(jax.random.key(seed), tokens, positions, mask)["params"]
    params = jax.tree_util.tree_map(lambda p: p * 4.0, params)  # far from uniform: errors would show
    return config, model, params, tokens, mask, positions


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_forward_equals_padded(name):
    _, model, params, tokens, mask, positions = _setup(name)
    real = int(mask.sum())
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*mask.shape, 32)), jnp.float32) * mask[..., None]

    def hidden(p, pack_size):
        index = None if pack_size is None else packing.pack_index(mask, pack_size)
        return model.apply({"params": p}, tokens, positions, mask, return_hidden=True, pack_index=index)[0]

    run = jax.jit(hidden, static_argnums=1)
    padded = run(params, None)
    packed = run(params, real + 4)  # with empty slots
    diff = float(jnp.max(jnp.abs(packed - jnp.where(mask[..., None], padded, 0.0))))
    print(f"{name}: max |packed - padded| on real tokens = {diff:.2e} (0 on padding)")
    assert diff <= 1e-5
    grads = [jax.jit(jax.grad(lambda p, s=s: jnp.sum(weights * hidden(p, s))))(params) for s in (None, real + 4)]
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_packed_chunk_after_a_prefill_equals_padded(name):
    """A packed chunk attends to a cache (the train step's completions after the prompts)."""
    config, model, params, tokens, mask, positions = _setup(name)
    prompt = 4
    split = lambda x, a, b: x[..., a:b]  # noqa: E731 (positions may carry a leading mRoPE axis)

    pack_size = int(mask[:, prompt:].sum()) + 2  # with empty slots

    @functools.partial(jax.jit, static_argnums=1)
    def run(params, pack):
        cache = init_cache(config, batch=3, max_length=9)
        _, cache = model.apply({"params": params}, tokens[:, :prompt], split(positions, 0, prompt), mask[:, :prompt],
                               cache, return_hidden=True)
        chunk_mask = mask[:, prompt:]
        index = packing.pack_index(chunk_mask, pack_size) if pack else None
        return model.apply({"params": params}, tokens[:, prompt:], split(positions, prompt, 9), chunk_mask, cache,
                           return_hidden=True, pack_index=index)

    (padded, padded_cache), (packed, packed_cache) = run(params, False), run(params, True)
    chunk_mask = mask[:, prompt:, None]
    np.testing.assert_allclose(packed, jnp.where(chunk_mask, padded, 0.0), atol=1e-5)
    written = packed_cache.key_mask[:, None, :, None] | (jnp.arange(9) < prompt)[:, None]  # the prefill's slots
    for a, b in zip(packed_cache.keys + packed_cache.values, padded_cache.keys + padded_cache.values):
        np.testing.assert_allclose(a, jnp.where(written, b, 0.0), atol=1e-5)  # the chunk's padding slots: 0
