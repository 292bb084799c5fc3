"""Shared pieces of the training configs (not a config itself: no get_config)."""

import ml_collections

from rwr_jax import sharding


def optimizer() -> ml_collections.ConfigDict:
    """Med-RwR release settings: AdamW, lr 1e-6, cosine with 5 % warm-up, wd 0.1, clip 1.0; a
    non-finite update is skipped, the 10th in a row stops the run."""
    return ml_collections.ConfigDict(dict(learning_rate=1e-6, warmup_ratio=0.05, b1=0.9, b2=0.999, eps=1e-8,
                                          weight_decay=0.1, max_grad_norm=1.0, max_consecutive_nonfinite=10))


def rollout(group_size: int = 8, max_rounds: int = 3, tokens_per_round: int = 4096, retrieved_tokens: int = 1024,
            completion: int = 0) -> ml_collections.ConfigDict:
    """Rollout settings: G = 8, up to 3 rounds of 4,096 new tokens, temperature 1; the
    completion holds every round's budget and the retrieved blocks unless `completion`."""
    completion = completion or max_rounds * tokens_per_round + (max_rounds - 1) * retrieved_tokens
    return ml_collections.ConfigDict(dict(
        group_size=group_size, max_rounds=max_rounds, max_new_tokens_per_round=tokens_per_round,
        max_completion_length=completion, temperature=1.0, top_p=1.0, top_k=0, extend_bucket=64))


def loss() -> ml_collections.ConfigDict:
    """k3 KL with beta 0.001, clip 0.2; "dapo" = the token mean over the optimiser batch
    ("bnpo", the release's per-micro-batch token mean, depends on the micro-batch split)."""
    return ml_collections.ConfigDict(dict(loss_type="dapo", beta=0.001, epsilon_low=0.2, epsilon_high=0.2))


# DESIGN.md: the paper's retriever (BGE-M3, CLS pooling, L2-normalised) prefixes queries with this.
PAPER_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


def retrieval(corpus_path: str = "", encoder_path: str = "",
              query_instruction: str | None = None) -> ml_collections.ConfigDict:
    """Top-3 passages from a local corpus, embedded with a local encoder checkpoint;
    query_instruction / pooling None = the checkpoint's own (sentence-transformers files)."""
    return ml_collections.ConfigDict(dict(corpus_path=corpus_path, index_dir="", encoder_path=encoder_path, top_k=3,
                                          max_retrieved_tokens=1024, searcher="auto",
                                          query_instruction=query_instruction, pooling=None))


def base(seed: int = 0) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = seed
    c.num_epochs = 1  # passes over the data when total_steps is 0 (METHOD.md: 1 per stage)
    c.tokenizer_path = ""  # "" = the bundled Qwen2.5 tokenizer; else a local tokenizer directory.
    c.optimizer = optimizer()
    c.loss = loss()
    c.advantage = ml_collections.ConfigDict(dict(estimator="grpo", eps=1e-4))
    # completion_bucket: the update's completion width = the longest completion rounded up
    # to a bucket of >= this many tokens (few widths), not the rollout's whole capacity.
    c.train = ml_collections.ConfigDict(dict(num_micro_batches=2, logprob_chunk=512, completion_bucket=512))
    c.checkpoint = ml_collections.ConfigDict(dict(save_every=100, keep=3, async_save=True))
    c.log_every = 1
    c.sample_every = 10
    # A jax.profiler trace of steps first_step + 1 ... first_step + num_steps (0: none) in
    # {workdir}/tensorboard, where TensorBoard's profile tab finds it; process 0 only.
    c.profile = ml_collections.ConfigDict(dict(first_step=2, num_steps=0))
    c.export_hf = True
    # Persistent XLA compilation cache: a resumed run (crash, preemption) loads its compiled
    # programs instead of compiling them again. "" = off; JAX_COMPILATION_CACHE_DIR, if set, wins.
    c.compilation_cache_dir = "{workdir}/compilation_cache"
    # The device mesh (sizes of data, fsdp, tensor; one may be -1: the remaining devices)
    # and the logical-axis rules placing params and activations on it (rwr_jax/sharding.py).
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.mesh_devices = 0  # the mesh spans the first N devices of the host (0: all)
    c.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
    return c


def demo_text_model(vision: bool) -> ml_collections.ConfigDict:
    """A tiny random model over the real Qwen vocabulary (CPU demo): Qwen2.5-VL-shaped
    (mRoPE + vision tower) for stage 2, a plain Qwen2 decoder for text-only stage 1."""
    model = dict(checkpoint="", vocab_size=151_680, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, mrope_section=[4, 2, 2] if vision else None, rope_theta=1_000_000.0,
                 tie_word_embeddings=False,
                 dtype="float32", param_dtype="float32", attention_kernel="xla", attention_query_chunk=0,
                 remat_policy="none", format_prior=True, freeze_vision=True)
    if vision:
        model["vision"] = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               fullatt_block_indexes=[1])
    return ml_collections.ConfigDict(model)


def checkpoint_model(path: str) -> ml_collections.ConfigDict:
    """A local Hugging Face checkpoint; its config.json decides the architecture. Attention
    runs on 256 queries at a time (7B, prompt 1024 + completion 2048 on v5p:2x2x2: update
    peak 43.46 instead of 67.74 GiB per chip, rollout 30.37 instead of 42.90, README)."""
    return ml_collections.ConfigDict(dict(checkpoint=path, dtype="bfloat16", param_dtype="float32",
                                          attention_kernel="xla", attention_query_chunk=256,
                                          remat_policy="dots_saveable", format_prior=False))


def data(*, demo: bool, path: str = "", max_prompt_length: int, images: int) -> ml_collections.ConfigDict:
    """The prompt pipeline: the synthetic demo set (batch 2) or a local jsonl, or the `split` of a
    dataset directory that launch/build_dataset.py wrote (batch 8). batch_size counts the prompts
    of one process (each reads its own shard of the records; the update sees all processes').

    Records over max_prompt_length or max_images_per_prompt are left out, each logged with
    its file:line (skip_oversized, ms-swift's default "delete"); malformed rows raise.
    """
    return ml_collections.ConfigDict(dict(
        demo=demo, demo_size=64 if demo else 0, train_path=path, split="train", batch_size=2 if demo else 8,
        max_prompt_length=max_prompt_length, length_bucket=0 if demo else 512, max_images_per_prompt=images,
        skip_oversized=True, skip_malformed=False, curriculum=False))


def apply_demo(c: ml_collections.ConfigDict, *, vision: bool, steps: int) -> None:
    """CPU-demo sizes: tiny model, 2 prompts x 4 completions, 48 tokens per round."""
    c.model = demo_text_model(vision=vision)
    c.mesh_devices = 1  # a tiny model: one device, also on a host with many
    c.data = data(demo=True, max_prompt_length=512 if vision else 384, images=1 if vision else 0)
    c.retrieval = retrieval()
    c.retrieval.max_retrieved_tokens = 160
    c.rollout = rollout(group_size=4, tokens_per_round=48, completion=512)
    c.rollout.extend_bucket = 32
    c.train.logprob_chunk = 256
    c.total_steps = steps or 6
    c.optimizer.learning_rate = 1e-3
    c.checkpoint.save_every = 3
    c.sample_every = 3


def apply_checkpoint_run(c: ml_collections.ConfigDict, preset, *, images: int) -> None:
    """A real run: the paper's sizes, local checkpoint / data / corpus / encoder paths."""
    c.model = checkpoint_model(preset.checkpoint)
    c.data = data(demo=False, path=preset.data, max_prompt_length=8192, images=images)
    c.retrieval = retrieval(preset.corpus, preset.encoder, query_instruction=PAPER_QUERY_INSTRUCTION)
    c.rollout = rollout(retrieved_tokens=c.retrieval.max_retrieved_tokens)
    c.total_steps = preset.steps  # 0: num_epochs passes over the data
    # Params, reference and AdamW state sharded over every device (ZeRO-3 style, as the
    # release's DeepSpeed): replicated, a 7B policy's ~150 GB would fill each device.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
