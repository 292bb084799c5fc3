"""A tiny RANDOM CLIP checkpoint for the CPU demo's visual query reward.

    path = write_demo_clip("/tmp/rwr_stage2/demo_data/clip", seed=0)
    scorer = visual_scoring.VisualScorer.from_pretrained(path)

No image-text model ships offline, so the stage-2 demo writes one: a transformers
`CLIPModel` directory (`model.safetensors`, `config.json`, `preprocessor_config.json`,
tokenizer files) whose weights are drawn at random from a seed by our own Flax init.
Nothing is downloaded. Its image-query similarities carry no meaning; it exists so the
demo runs the visual reward's whole path (CLIP preprocessing in the pipeline, the text
and image towers, the reward) in seconds. Real runs point `rewards.clip_checkpoint` at
a trained CLIP directory.

The tokenizer is a real transformers `CLIPTokenizer` (CLIP's normalisation and
pre-tokenisation) over a character-level vocabulary: the 256 byte-level symbols, each
also with CLIP's end-of-word suffix `</w>`, then `<|startoftext|>` and `<|endoftext|>`,
and no merges.
"""

import math
import os

import numpy as np
from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

from rwr_jax.models import hf_conversion
from rwr_jax.models.clip import convert
from rwr_jax.models.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def demo_tokenizer() -> CLIPTokenizer:
    """The character-level CLIP tokenizer (514 ids: symbols, symbols + `</w>`, BOS 512, EOS 513)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + [BOS, EOS])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def demo_config(vocab_size: int, eos_token_id: int) -> ClipConfig:
    """Two-layer towers 32 wide, 32 x 32 images in 8 x 8 patches, 16-dim embeddings."""
    tower = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)
    return ClipConfig(vision=ClipVisionConfig(**tower, image_size=32, patch_size=8),
                      text=ClipTextConfig(**tower, vocab_size=vocab_size, max_position_embeddings=77,
                                          eos_token_id=eos_token_id, pad_token_id=eos_token_id),
                      projection_dim=16)


def random_params(config: ClipConfig, seed: int) -> dict:
    """ClipModel params as a fresh CLIP starts: N(0, 0.02) weights, LayerNorm 1 / 0,
    zero biases, logit scale log(1 / 0.07); drawn with NumPy (no compile)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, leaf in hf_conversion.flatten_params(convert.abstract_params(config)).items():
        shape = hf_conversion.unboxed(leaf).shape
        if path[-1] == "logit_scale":
            value = np.full(shape, math.log(1 / 0.07))
        elif path[-1] in ("scale", "bias"):
            value = np.full(shape, 1.0 if path[-1] == "scale" else 0.0)
        else:
            value = 0.02 * rng.standard_normal(shape)
        flat[path] = value.astype(np.float32)
    return hf_conversion.unflatten_params(flat)


def write_demo_clip(out_dir: str, seed: int = 0) -> str:
    """Writes the random demo CLIP into `out_dir` (same seed, same bytes) and returns `out_dir`."""
    tokenizer = demo_tokenizer()
    config = demo_config(len(tokenizer), tokenizer.eos_token_id)
    params = random_params(config, seed)
    os.makedirs(out_dir, exist_ok=True)
    hf_config = convert.to_hf_config(config)
    hf_config["text_config"]["bos_token_id"] = tokenizer.bos_token_id
    convert.save_hf_checkpoint(params, config, out_dir, hf_config)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(f"RANDOM CLIP weights (seed {seed}) for the rwr_jax CPU demo; not a trained model.\n")
    return out_dir
