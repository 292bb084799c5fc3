"""Logit parity of the Flax decoder with Hugging Face transformers (PyTorch CPU, float32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models.qwen2_vl import convert
from rwr_jax.models.qwen2_vl.config import read_hf_config
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from tests.models import hf_models

torch = hf_models.torch

FP32_ATOL = 1e-4
# bf16 compute keeps ~3 significant digits; logits here are O(1-10).
BF16_REL_TOL = 5e-2


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def _our_logits(checkpoint_dir, tokens, mask, positions, **overrides):
    config, _ = read_hf_config(checkpoint_dir, **overrides)
    params = convert.load_hf_params(checkpoint_dir, config, progress=False)
    logits, _ = jax.jit(DecoderLM(config).apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                        jnp.asarray(mask, bool))
    assert logits.dtype == jnp.float32  # whatever the compute dtype, tied embeddings or not
    return np.asarray(logits)


def _max_diff(ours, ref, mask):
    valid = mask.astype(bool)
    return float(np.max(np.abs(ours[valid] - ref[valid])))


@pytest.fixture(scope="module", params=["qwen2_bias", "llama_tied", "llama_bias", "qwen2_5_vl_mrope"])
def reference(request, tmp_path_factory):
    """(name, HF model, its saved directory); saved as several shards to test the index path."""
    name = request.param
    model = hf_models.make_qwen2_5_vl() if name == "qwen2_5_vl_mrope" else hf_models.make_causal_lm(name)
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path, max_shard_size="40KB")
    return name, model, str(path)


def _inputs(name):
    tokens, mask, positions = hf_models.left_padded_batch([11, 7, 9], total=11)
    if name == "qwen2_5_vl_mrope":
        positions = hf_models.image_like_positions(mask, grid=(1, 2, 3), start=2)
    return tokens, mask, positions


def test_fp32_logits_match_transformers(reference):
    name, model, path = reference
    tokens, mask, positions = _inputs(name)
    ref = _hf_logits(model, tokens, mask, positions)
    ours = _our_logits(path, tokens, mask, positions)
    assert ours.shape == ref.shape
    diff = _max_diff(ours, ref, mask)
    print(f"{name}: fp32 max |dlogit| = {diff:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert diff <= FP32_ATOL


def test_bf16_logits_close_to_transformers(reference):
    name, model, path = reference
    tokens, mask, positions = _inputs(name)
    ref = _hf_logits(model, tokens, mask, positions)
    ours = _our_logits(path, tokens, mask, positions, dtype="bfloat16", param_dtype="bfloat16")
    rel = _max_diff(ours, ref, mask) / float(np.abs(ref).max())
    print(f"{name}: bf16 max |dlogit| / max |logit| = {rel:.2e}")
    assert np.isfinite(ours).all()
    assert rel <= BF16_REL_TOL


def test_mrope_with_text_positions_equals_plain_rope(tmp_path):
    """For text, the three mRoPE axes coincide, so [B, T] and [3, B, T] positions agree."""
    hf_models.make_qwen2_5_vl().save_pretrained(tmp_path)
    path = str(tmp_path)
    tokens, mask, positions = hf_models.left_padded_batch([6, 4], total=6)
    flat = _our_logits(path, tokens, mask, positions)
    stacked = _our_logits(path, tokens, mask, np.broadcast_to(positions, (3, *positions.shape)))
    np.testing.assert_array_equal(flat, stacked)
