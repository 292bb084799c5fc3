"""Tiny random Hugging Face reference models (PyTorch, CPU, float32), built offline."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 160

# name -> keyword arguments of the HF config; each exercises a different code path.
CONFIGS = {
    # Qwen2: q/k/v bias, untied head, GQA 4:2.
    "qwen2_bias": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False)),
    # Llama: no bias, tied embeddings, head_dim != hidden / heads, MHA.
    "llama_tied": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=24, rope_theta=500_000.0,
        rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True)),
    # Llama with attention bias on every projection (q/k/v and o).
    "llama_bias": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, rope_theta=10_000.0, attention_bias=True,
        tie_word_embeddings=False)),
}


def _random_(model, seed: int):
    """Re-initialises every parameter (biases and norms included) so none is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(value + 1.0 if name.endswith("norm.weight") else value)
    return model.eval()


def make_causal_lm(name: str, seed: int = 0):
    """A tiny random HF causal LM from CONFIGS."""
    arch, config_cls, kwargs = CONFIGS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    return _random_(getattr(transformers, arch)(config), seed)


# Special ids of the tiny Qwen2.5-VL models (inside the tiny vocabulary).
IMAGE_TOKEN_ID = 150
VISION_START_TOKEN_ID = 151
VISION_END_TOKEN_ID = 152


def make_qwen2_5_vl(seed: int = 0, tie: bool = False):
    """A tiny random Qwen2_5_VLForConditionalGeneration: text width 64, 4 heads, mRoPE
    [2, 3, 3]; vision 2 blocks x 32 wide (block 1 full attention, block 0 windowed)."""
    config = transformers.Qwen2_5_VLConfig(
        image_token_id=IMAGE_TOKEN_ID, vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID, video_token_id=153,
        text_config=dict(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None, eos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        tie_word_embeddings=tie)
    return _random_(transformers.Qwen2_5_VLForConditionalGeneration(config), seed)


def left_padded_batch(lengths, total: int, seed: int = 1):
    """Random token ids, left padded.

    Returns:
      (tokens [B, T] int64, mask [B, T] int64, text positions [B, T] int64).
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(len(lengths), total))
    mask = np.zeros_like(tokens)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return tokens, mask, positions


def image_like_positions(mask: np.ndarray, grid=(1, 2, 3), start: int = 2) -> np.ndarray:
    """mRoPE positions [3, B, T]: text, then a t*h*w "image" block at `start`, then text.

    Mirrors `get_rope_index` for one image whose grid (after merging) is `grid`, placed
    `start` real tokens into each row.
    """
    t, h, w = grid
    n_image = t * h * w
    batch, total = mask.shape
    positions = np.zeros((3, batch, total), np.int64)
    for row in range(batch):
        idx = np.nonzero(mask[row])[0]
        ids = []
        for i in range(start):
            ids.append([i, i, i])
        for ti in range(t):
            for hi in range(h):
                for wi in range(w):
                    ids.append([start + ti, start + hi, start + wi])
        nxt = start + max(t, h, w)
        for i in range(len(idx) - start - n_image):
            ids.append([nxt + i] * 3)
        positions[:, row, idx] = np.asarray(ids[:len(idx)]).T
    return positions
