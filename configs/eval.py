"""python launch/eval.py --config=configs/eval.py:demo --workdir=/tmp/rwr_eval

Med-RwR evaluation: one greedy completion per record with up to 3 generation rounds and
real retrieval between them, scored by its answer's option letter; optionally CDIR
(METHOD.md): unsure multimodal answers are given again with the most similar case of
an image corpus.

Presets (comma separated after ':'):
  demo              tiny random model with a format prior on the synthetic demo set's
                    eval split and its knowledge base, sampled at temperature 1, CPU, a
                    minute (accuracy means nothing: the model is random; it runs the
                    code path).
  cdir              CDIR on (demo: a tiny RANDOM CLIP and the demo's solved training
                    cases as the image corpus; else clip=DIR and cases=FILE).
  text              text-only records (stage-1 style: MedQA / MedMCQA), no images.
  limit=N           the first N records only (0: all).
  checkpoint=DIR    the policy's local HF checkpoint (e.g. <train workdir>/hf_export).
  data=FILE         records to evaluate (jsonl).  corpus=FILE  knowledge base.
  encoder=DIR       retriever text encoder (the one the policy was trained with).
  cases=FILE        CDIR's case corpus (jsonl: id, image, caption / conversations).
  clip=DIR          CDIR's image encoder: a local transformers CLIP directory.
"""

import ml_collections

from configs import common
from rwr_jax import config_lib, sharding
from rwr_jax.data import chat_template


def cdir(*, enabled: bool, demo: bool, corpus_path: str, clip_checkpoint: str) -> ml_collections.ConfigDict:
    """CDIR: threshold 0.9 on the answer's first-token probability (METHOD.md); the think text is ours."""
    return ml_collections.ConfigDict(dict(
        enabled=enabled, demo=demo, threshold=0.9, corpus_path=corpus_path, index_dir="",
        clip_checkpoint=clip_checkpoint, max_case_tokens=1024,
        think="I need a consultation from a case with similar imaging findings before I answer.",
        query="consultation from similar medical imaging case"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = config_lib.parse_preset(arg, demo=False, cdir=False, text=False, limit=0, checkpoint="",
                                     data="/path/to/test.jsonl", corpus="/path/to/corpus.jsonl",
                                     encoder="/path/to/bge-m3", cases="", clip="")
    images = 0 if preset.text else 1
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.tokenizer_path = ""  # "" = the bundled Qwen2.5 tokenizer; else a local tokenizer directory.
    c.system_prompt = chat_template.DEFAULT_TEXT_SYSTEM_PROMPT if preset.text else chat_template.DEFAULT_SYSTEM_PROMPT
    c.compilation_cache_dir = "{workdir}/compilation_cache"
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.mesh_devices = 1 if preset.demo else 0  # the first N devices of the host (0: all)
    c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
    if preset.demo:
        c.model = common.demo_text_model(vision=not preset.text)
        c.data = common.data(demo=True, max_prompt_length=384 if preset.text else 512, images=images)
        c.data.batch_size = 4
        c.retrieval = common.retrieval()
        c.retrieval.max_retrieved_tokens = 160
        c.rollout = common.rollout(group_size=1, tokens_per_round=48, completion=512)
        c.rollout.extend_bucket = 32
    else:
        c.model = common.checkpoint_model(preset.checkpoint or "/path/to/Qwen2.5-VL-7B-Instruct")
        c.data = common.data(demo=False, path=preset.data, max_prompt_length=8192, images=images)
        c.retrieval = common.retrieval(preset.corpus, preset.encoder, query_instruction=common.PAPER_QUERY_INSTRUCTION)
        c.rollout = common.rollout(group_size=1, retrieved_tokens=c.retrieval.max_retrieved_tokens)
    if preset.checkpoint:
        c.model = common.checkpoint_model(preset.checkpoint)
    # Inference: no rematerialisation; bf16 on accelerators, float32 for the CPU demo (also of
    # a checkpoint, e.g. the training demo's export).
    c.model.remat_policy = "none"
    c.model.dtype = c.model.param_dtype = "float32" if preset.demo else "bfloat16"
    # Greedy; the demo samples (temperature 1, seeded): its random model's format prior is a
    # bigram walk, which loops when greedy and never reaches a query or an answer.
    c.rollout.temperature = 1.0 if preset.demo else 0.0
    # Every record is evaluated: one over the limits stops the run, naming it.
    c.data.skip_oversized = False
    c.data.limit = preset.limit
    c.data.path = "" if preset.demo else preset.data  # (training's train_path and curriculum do not apply)
    del c.data["train_path"], c.data["curriculum"]
    c.data.split = "test"  # when data.path is a dataset directory (launch/build_dataset.py)
    c.cdir = cdir(enabled=preset.cdir, demo=preset.demo, corpus_path=preset.cases, clip_checkpoint=preset.clip)
    return c
