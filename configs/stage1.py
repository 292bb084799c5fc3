"""python launch/train.py --config=configs/stage1.py:demo --workdir=/tmp/rwr_stage1

Med-RwR stage 1: text-only medical MCQ (MedQA-USMLE / MedMCQA style) with retrieval,
rewards accuracy + format, GRPO on Qwen2.5-VL-7B.

Presets (comma separated after ':'):
  demo              tiny random model with a format prior + the synthetic text-only set.
  steps=N           optimiser steps.
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
        c.model = common.demo_text_model(vision=False)
        c.data = ml_collections.ConfigDict(dict(demo=True, demo_size=64, train_path="", batch_size=2,
                                                max_prompt_length=384, length_bucket=0, max_images_per_prompt=0,
                                                skip_malformed=False, curriculum=False))
        c.retrieval = common.retrieval()
        c.rollout = common.rollout(group_size=4, tokens_per_round=48, completion=512)
        c.rollout.extend_bucket = 32
        c.retrieval.max_retrieved_tokens = 160
        c.train.logprob_chunk = 256
        c.total_steps = preset.steps or 6
        c.optimizer.learning_rate = 1e-3
        c.checkpoint.save_every = 3
        c.sample_every = 3
    else:
        c.model = common.checkpoint_model(preset.checkpoint)
        c.data = ml_collections.ConfigDict(dict(demo=False, demo_size=0, train_path=preset.data, batch_size=8,
                                                max_prompt_length=8192, length_bucket=512, max_images_per_prompt=0,
                                                skip_malformed=False, curriculum=False))
        c.retrieval = common.retrieval(preset.corpus, preset.encoder)
        c.rollout = common.rollout()
        c.total_steps = preset.steps or 1000
    return c
