"""python launch/train.py --config=configs/stage2.py:demo --workdir=/tmp/rwr_stage2

Med-RwR stage 2: multimodal medical MCQ with retrieval, all rewards (accuracy, format,
length, query-semantic textual + visual, confidence gain), GRPO on Qwen2.5-VL-7B.

Presets (comma separated after ':'):
  demo              tiny random model with a format prior + the synthetic demo set and
                    its knowledge base, real retrieval rounds, CPU, a few minutes; the
                    visual reward uses a tiny RANDOM CLIP written into the demo data
                    directory (meaningless scores; it runs the code path).
  steps=N           optimiser steps (default: one pass over the data, num_epochs=1;
                    the demo: 6).
  checkpoint=DIR    the policy's local HF checkpoint (e.g. the stage-1 export).
  data=FILE         training jsonl.  corpus=FILE  knowledge base (.jsonl / .tsv).
  encoder=DIR       retriever text encoder (e.g. a local BGE-M3).
  clip=DIR          image-text model for the visual query reward: a local transformers
                    CLIP directory (config.json, weights, preprocessor, tokenizer).
"""

import ml_collections

from configs import common
from rwr_jax import config_lib
from rwr_jax.data import chat_template


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = config_lib.parse_preset(arg, demo=False, steps=0, checkpoint="/path/to/Qwen2.5-VL-7B-Instruct",
                                     data="/path/to/train.jsonl", corpus="/path/to/corpus.jsonl",
                                     encoder="/path/to/bge-m3", clip="")
    c = common.base()
    c.system_prompt = chat_template.DEFAULT_SYSTEM_PROMPT
    c.rewards = ml_collections.ConfigDict(dict(
        names=["accuracy", "format", "length", "query_textual", "query_visual", "confidence_gain"],
        weights=[1.0] * 6, clip_checkpoint=preset.clip, demo_clip=False))
    if preset.demo:
        common.apply_demo(c, vision=True, steps=preset.steps)
        # No image-text checkpoint ships offline: the trainer writes a random one
        # (rwr_jax/models/clip/demo.py) unless clip=DIR names a real one.
        c.rewards.demo_clip = not preset.clip
    else:
        common.apply_checkpoint_run(c, preset, images=1)
    return c
