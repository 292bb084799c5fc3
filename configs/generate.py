"""python launch/generate.py --config=configs/generate.py:demo --workdir=/tmp/rwr_demo

Greedy generation with the Qwen2.5(-VL) language model and the Med-RwR chat prompt,
through the explicit-KV-cache prefill/decode path, with a parity check against a
full forward pass (and, when PyTorch is installed, against `transformers`).

Presets (comma separated after ':'):
  demo               tiny random model, real Qwen tokenizer, CPU, seconds.
  max_new_tokens=N   tokens to generate (default 32).
  checkpoint=DIR     a local Hugging Face checkpoint directory (overrides demo).
"""

import ml_collections

from rwr_jax import config_lib, sharding
from rwr_jax.data import chat_template

DEMO_QUESTION = (
    "A 45-year-old man has crushing chest pain radiating to the left arm and ST elevation in leads "
    "II, III and aVF. Which coronary artery is most likely occluded?\n"
    "A. Left anterior descending\nB. Right coronary artery\nC. Left circumflex\nD. Left main")


def tiny_model() -> ml_collections.ConfigDict:
    """A random decoder small enough for CPU that still covers the real Qwen vocabulary."""
    return ml_collections.ConfigDict(dict(
        checkpoint="", vocab_size=151_680, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, mrope_section=None, rope_theta=1_000_000.0,
        tie_word_embeddings=False, dtype="float32", param_dtype="float32", attention_kernel="xla",
        remat_policy="none"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = config_lib.parse_preset(arg, demo=False, max_new_tokens=32, checkpoint="")
    c = ml_collections.ConfigDict()
    c.seed = 0
    if preset.demo and not preset.checkpoint:
        c.model = tiny_model()
    else:
        # A local HF checkpoint directory (e.g. Qwen2.5-VL-7B-Instruct); its config.json
        # decides the architecture, the fields below only the numerics.
        c.model = ml_collections.ConfigDict(dict(
            checkpoint=preset.checkpoint or "/path/to/Qwen2.5-VL-7B-Instruct", dtype="bfloat16",
            param_dtype="bfloat16", attention_kernel="xla", remat_policy="none"))
    c.tokenizer_path = ""  # "" = the bundled Qwen2.5 tokenizer; else a local tokenizer directory.
    c.system_prompt = chat_template.DEFAULT_TEXT_SYSTEM_PROMPT
    c.question = DEMO_QUESTION
    c.max_new_tokens = preset.max_new_tokens
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
    return c
