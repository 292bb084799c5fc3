"""Qwen2.5-VL (vision tower + merger + decoder) parity with transformers, float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models.qwen2_vl import convert, inference, vision
from rwr_jax.models.qwen2_vl.decoder import init_cache
from rwr_jax.models.qwen2_vl.positions import next_text_positions, rope_index
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, read_vl_config
from tests.models import hf_models

torch = hf_models.torch
ATOL = 1e-4
PATCH_BUCKET = 256


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = hf_models.make_qwen2_5_vl()
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(path)
    config, _ = read_vl_config(str(path))
    params = convert.load_hf_params(str(path), config, progress=False)
    return model, config, params


def _prompt(rng, grids, merge=2, text=5):
    """Text, then per image <vision_start> + image tokens + <vision_end> + text."""
    ids = list(rng.integers(0, 140, text))
    for _, h, w in grids:
        ids += [hf_models.VISION_START_TOKEN_ID] + [hf_models.IMAGE_TOKEN_ID] * (h * w // merge ** 2)
        ids += [hf_models.VISION_END_TOKEN_ID] + list(rng.integers(0, 140, text))
    return ids


def _batch(row_grids, seed=0):
    """Left-padded batch; returns tokens, mask, pixel values, grid_thw (all images, row order)."""
    rng = np.random.default_rng(seed)
    rows = [_prompt(rng, grids) for grids in row_grids]
    total = max(map(len, rows))
    tokens = np.zeros((len(rows), total), np.int64)
    mask = np.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, total - len(row):] = row
        mask[i, total - len(row):] = 1
    grids = np.asarray([g for grids in row_grids for g in grids], np.int64).reshape(-1, 3)
    pixels = rng.normal(size=(int(grids.prod(1).sum()), 3 * 2 * 14 * 14)).astype(np.float32)
    return tokens, mask, pixels, grids


def _our_positions(tokens, mask, grids):
    positions, _ = rope_index(tokens, mask, grids if len(grids) else None,
                              image_token_id=hf_models.IMAGE_TOKEN_ID)
    return positions


def _hf_positions(model, tokens, mask, grids):
    if not len(grids):
        return np.broadcast_to(np.maximum(np.cumsum(mask, 1) - 1, 0), (3, *mask.shape)).copy()
    positions, _ = model.model.get_rope_index(
        torch.tensor(tokens), mm_token_type_ids=torch.tensor((tokens == hf_models.IMAGE_TOKEN_ID).astype(np.int32)),
        image_grid_thw=torch.tensor(grids), attention_mask=torch.tensor(mask))
    return positions.numpy()


CASES = {
    "one_image": [[(1, 12, 20)]],
    "two_images_one_prompt": [[(1, 8, 8), (1, 12, 20)]],
    "batch_of_different_image_counts": [[(1, 8, 12)], [(1, 4, 4), (1, 12, 8)]],
    "text_only": [[], []],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(reference, case):
    model, config, params = reference
    tokens, mask, pixels, grids = _batch(CASES[case])
    positions = _our_positions(tokens, mask, grids)
    np.testing.assert_array_equal(positions[:, mask.astype(bool)],
                                  _hf_positions(model, tokens, mask, grids)[:, mask.astype(bool)])
    kwargs = dict(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(positions))
    if len(grids):
        kwargs.update(pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids))
    with torch.no_grad():
        ref = model(**kwargs).logits.numpy()
    images = None
    if len(grids):
        images = vision.pack_images(pixels, grids, config.vision, num_images=4, num_patches=PATCH_BUCKET)
    ours, _ = jax.jit(VisionLanguageLM.from_config(config).apply)(
        {"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask, bool), images=images)
    valid = mask.astype(bool)
    diff = float(np.abs(np.asarray(ours)[valid] - ref[valid]).max())
    print(f"{case}: max |dlogit| = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= ATOL


def test_vision_tower_matches_transformers(reference):
    model, config, params = reference
    _, _, pixels, grids = _batch([[(1, 8, 8), (1, 12, 20), (1, 16, 16)]], seed=3)
    with torch.no_grad():
        ref = model.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids)).pooler_output.numpy()
    images = vision.pack_images(pixels, grids, config.vision, num_images=3, num_patches=PATCH_BUCKET)
    out = jax.jit(vision.VisionTower(config.vision).apply)({"params": params["visual"]}, images)
    keep = np.asarray(vision.merged_token_mask(images, config.vision))
    ours = np.asarray(out)[keep]
    diff = float(np.abs(ours - ref).max())
    print(f"vision tower: max |d| = {diff:.2e} over {len(ref)} merged tokens")
    assert ours.shape == ref.shape
    assert diff <= ATOL


def test_pack_images_rejects_bad_buckets(reference):
    _, config, _ = reference
    _, _, pixels, grids = _batch([[(1, 8, 8), (1, 4, 4)]])
    with pytest.raises(ValueError, match="do not fit the image bucket"):
        vision.pack_images(pixels, grids, config.vision, num_images=1, num_patches=64)
    with pytest.raises(ValueError, match="more than the patch bucket"):
        vision.pack_images(pixels, grids, config.vision, num_images=2, num_patches=32)
    with pytest.raises(ValueError, match="covers 80 patches but pixel_values has 79"):
        vision.pack_images(pixels[:-1], grids, config.vision, num_images=2, num_patches=64)


def test_prefill_with_images_then_decode_matches_full_forward(reference):
    """Images encoded once at prefill; decoded tokens continue the mRoPE positions."""
    _, config, params = reference
    tokens, mask, pixels, grids = _batch(CASES["batch_of_different_image_counts"])
    positions = _our_positions(tokens, mask, grids)
    images = vision.pack_images(pixels, grids, config.vision, num_images=4, num_patches=PATCH_BUCKET)
    model = VisionLanguageLM.from_config(config)
    steps = 3
    new_tokens = np.random.default_rng(5).integers(0, 140, (len(tokens), steps))
    new_positions = next_text_positions(positions, mask, steps)  # [3, B, steps]
    full_tokens = np.concatenate([tokens, new_tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(new_tokens)], axis=1).astype(bool)
    full_positions = np.concatenate([positions, new_positions], axis=2)
    full, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(full_tokens), jnp.asarray(full_positions),
                                   jnp.asarray(full_mask), images=images)

    prefill = jax.jit(lambda p, t, pos, m, c, im: model.apply({"params": p}, t, pos, m, c, images=im))
    cache = init_cache(config.text, batch=len(tokens), max_length=full_tokens.shape[1])
    logits, cache = prefill(params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask, bool), cache,
                            images)
    cached = [np.asarray(logits)]
    for t in range(steps):
        step, cache = inference.decode(model, params, jnp.asarray(new_tokens[:, t]),
                                       jnp.asarray(new_positions[:, :, t]), cache)
        cached.append(np.asarray(step)[:, None])
    cached = np.concatenate(cached, axis=1)
    diff = float(np.abs(cached - np.asarray(full))[full_mask].max())
    print(f"prefill(images) + decode vs full forward: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_vision_stops_gradients(reference, freeze):
    _, config, params = reference
    tokens, mask, pixels, grids = _batch(CASES["one_image"])
    images = vision.pack_images(pixels, grids, config.vision, num_images=1, num_patches=PATCH_BUCKET)
    model = VisionLanguageLM.from_config(config.replace(freeze_vision=freeze))
    positions = _our_positions(tokens, mask, grids)

    def loss(p):
        logits, _ = model.apply({"params": p}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(mask, bool),
                                images=images)
        return jnp.mean(logits ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    vision_norm = float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(grads["visual"])))
    text_norm = float(sum(jnp.abs(g).sum() for g in jax.tree_util.tree_leaves(grads["model"])))
    assert text_norm > 0
    assert (vision_norm == 0) == freeze


def test_one_compile_per_bucket(reference):
    _, config, params = reference
    tower = jax.jit(vision.VisionTower(config.vision).apply)
    for grids in ([(1, 8, 8)], [(1, 12, 20)], [(1, 4, 4), (1, 12, 16)]):
        grids = np.asarray(grids)
        pixels = np.zeros((int(grids.prod(1).sum()), config.vision.patch_dim), np.float32)
        num_patches = vision.patch_bucket(int(grids.prod(1).max()), config.vision)
        tower({"params": params["visual"]}, vision.pack_images(pixels, grids, config.vision, 2, num_patches))
    assert [vision.patch_bucket(n, config.vision) for n in (1, 64, 65, 240)] == [64, 64, 128, 256]
    assert tower._cache_size() == 2  # buckets 64 and 256: different image sizes share a compile
