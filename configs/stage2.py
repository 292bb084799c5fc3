"""python launch/train.py --config=configs/stage2.py:demo --workdir=/tmp/rwr_stage2

Med-RwR stage 2: multimodal medical MCQ with retrieval, all rewards (accuracy, format,
length, query-semantic textual + visual, confidence gain), GRPO on Qwen2.5-VL-7B.

Presets (comma separated after ':'):
  demo              tiny random model with a format prior + the synthetic demo set and
                    its knowledge base, real retrieval rounds, CPU, a few minutes.
  steps=N           optimiser steps.
  checkpoint=DIR    the policy's local HF checkpoint (e.g. the stage-1 export).
  data=FILE         training jsonl.  corpus=FILE  knowledge base (.jsonl / .tsv).
  encoder=DIR       retriever text encoder (e.g. a local BGE-M3).
  clip=DIR          image-text model for the visual query reward (e.g. BiomedCLIP).
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
        weights=[1.0] * 6, clip_checkpoint=preset.clip))
    if preset.demo:
        c.model = common.demo_text_model(vision=True)
        c.data = ml_collections.ConfigDict(dict(demo=True, demo_size=64, train_path="", batch_size=2,
                                                max_prompt_length=512, length_bucket=0, max_images_per_prompt=1,
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
        # No image-text checkpoint ships offline: the demo leaves the visual reward out.
        c.rewards.names = ["accuracy", "format", "length", "query_textual", "confidence_gain"]
        c.rewards.weights = [1.0] * 5
    else:
        c.model = common.checkpoint_model(preset.checkpoint)
        c.data = ml_collections.ConfigDict(dict(demo=False, demo_size=0, train_path=preset.data, batch_size=8,
                                                max_prompt_length=8192, length_bucket=512, max_images_per_prompt=1,
                                                skip_malformed=False, curriculum=False))
        c.retrieval = common.retrieval(preset.corpus, preset.encoder)
        c.rollout = common.rollout()
        c.total_steps = preset.steps or 1000
    return c
