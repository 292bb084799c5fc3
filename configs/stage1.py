"""python launch/train.py --config=configs/stage1.py:demo --workdir=/tmp/rwr_stage1

Med-RwR stage 1: text-only medical MCQ (MedQA-USMLE / MedMCQA style) with retrieval,
rewards accuracy + format, GRPO on Qwen2.5-VL-7B.

Presets (comma separated after ':'):
  demo              tiny random model with a format prior + the synthetic text-only set.
  steps=N           optimiser steps (default: one pass over the data, num_epochs=1;
                    the demo: 6).
  checkpoint=DIR    the policy's local HF checkpoint.
  data=FILE         training jsonl.  corpus=FILE  knowledge base.  encoder=DIR  retriever.
"""

import ml_collections

from configs import common
from rwr_jax import config_lib
from rwr_jax.data import chat_template


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = config_lib.parse_preset(arg, demo=False, steps=0, checkpoint="/path/to/Qwen2.5-VL-7B-Instruct",
                                     data="/path/to/medqa_train.jsonl", corpus="/path/to/corpus.jsonl",
                                     encoder="/path/to/bge-m3")
    c = common.base()
    c.system_prompt = chat_template.DEFAULT_TEXT_SYSTEM_PROMPT
    c.rewards = ml_collections.ConfigDict(dict(names=["accuracy", "format"], weights=[1.0, 1.0],
                                               clip_checkpoint=""))
    if preset.demo:
        common.apply_demo(c, vision=False, steps=preset.steps)
    else:
        common.apply_checkpoint_run(c, preset, images=0)
    return c
