"""Device memory of a run, planned before it runs: its real programs compiled ahead of time.

    plan = plan_memory(config, topology_devices("v5p:4x4x4"))   # on any host, TPU or not
    print(plan.report())

The programs of a training step are lowered on abstract arrays (no weights are read: the
model comes from the checkpoint's config.json) with the shardings a run gives them (the
config's mesh and logical-axis rules) and compiled for the target devices; XLA's memory
analysis then gives each program's bytes per device: arguments, outputs, the outputs
written over donated arguments, temporaries; peak = arguments + outputs - aliased +
temporaries. For TPUs the compile targets a topology through libtpu's ahead-of-time
support, which needs no TPU (as MaxText's `train_compile.py`); a TPU compiler that finds
a program too large refuses it, and the plan says so with the compiler's numbers.

Two phases, each at the largest size the config allows:
- the update (`step.train_step`) on the global mesh: every process's `data.batch_size`
  prompts x G completions, every prompt `data.max_prompt_length` tokens, every completion
  `rollout.max_completion_length`, every prompt `data.max_images_per_prompt` images of the
  most patches `max_pixels` allows;
- the rollout of one process on its own devices: `engine.prefill_group`, then
  `sampler.decode_round`, `engine.extend` and `sampler.compact_cache` over a KV cache of
  the rollout's length (`engine.cache_sizes`), while the train state the rollout does not use (AdamW moments, the reference
  model and, with several processes, the sharded params next to the host's replica)
  stays in memory.
Not counted: the retriever's text encoder and the visual reward's CLIP.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwr_jax import sharding
from rwr_jax.data import image_processing, tokenizer as tokenizer_lib
from rwr_jax.models.qwen2_vl import convert, vision
from rwr_jax.models.qwen2_vl.model import VLConfig
from rwr_jax.rollout import engine, sampler, stop_strings
from rwr_jax.train import optimizer as optimizer_lib, trainer
from rwr_jax.train.step import TrainBatch, TrainState, batch_shard_groups, shared_prompt_group, train_step

GiB = 2**30
# HBM per chip by `device_kind` (abstract topology devices report no memory_stats).
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchShape:
    """The update batch planned: all processes' rows."""

    rows: int
    prompt_length: int
    completion_length: int
    images: int = 0  # padded images of the batch (0: text-only)
    patches: int = 0  # patches per image


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProgramMemory:
    """One compiled program's bytes per device (XLA's memory analysis)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written over donated arguments
    temporaries: int
    code: int

    @classmethod
    def of(cls, compiled) -> "ProgramMemory":
        stats = compiled.memory_analysis()
        return cls(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                   aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                   code=stats.generated_code_size_in_bytes)

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries

    def describe(self) -> str:
        return (f"arguments {gib(self.arguments)} + outputs {gib(self.outputs)} - aliased {gib(self.aliased)} + "
                f"temporaries {gib(self.temporaries)} = {gib(self.peak)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Per-device memory of a training step's two phases.

    Attributes:
      devices: "8 x TPU v5".
      num_processes: hosts of the run (each rolls out on its own devices).
      mesh: mesh axis -> size of the update; rollout_mesh: of one process's rollout.
      batch: the update's batch; num_micro_batches: its gradient-accumulation steps.
      state: bytes per device of "params", "optimizer", "reference", "batch" (their shardings).
      programs: "update", "prefill", "decode", "extend", "compact" -> ProgramMemory, or the compiler's
        out-of-memory message for a program it refused.
      rollout_rows: one process's rollout rows; cache_length: their KV cache's length.
      resident: bytes per device of the train state kept during the rollout, outside its programs.
      capacity: bytes per device (None if unknown).
    """

    devices: str
    num_processes: int
    mesh: dict[str, int]
    rollout_mesh: dict[str, int]
    batch: BatchShape
    num_micro_batches: int
    state: dict[str, int]
    programs: dict[str, ProgramMemory | str]
    rollout_rows: int
    cache_length: int
    resident: int
    capacity: int | None

    @property
    def refused(self) -> dict[str, str]:
        return {name: p for name, p in self.programs.items() if isinstance(p, str)}

    @property
    def update_peak(self) -> int | None:
        update = self.programs["update"]
        return None if isinstance(update, str) else update.peak

    @property
    def rollout_peak(self) -> int | None:
        """The resident train state plus the largest rollout program."""
        peaks = [p.peak for name, p in self.programs.items() if name != "update" and not isinstance(p, str)]
        return None if len(peaks) < len(self.programs) - 1 else self.resident + max(peaks)

    @property
    def fits(self) -> bool | None:
        """False if a program was refused or a phase exceeds the capacity; None if the capacity is unknown."""
        if self.refused:
            return False
        if self.capacity is None:
            return None
        return max(self.update_peak, self.rollout_peak) <= self.capacity

    def report(self) -> str:
        b = self.batch
        images = f", {b.images} images x {b.patches} patches" if b.images else ""
        capacity = "unknown" if self.capacity is None else gib(self.capacity)
        lines = [f"memory plan of a training step on {self.devices} ({self.num_processes} process"
                 f"{'es' if self.num_processes > 1 else ''}), {capacity} per device",
                 f"update: mesh {self.mesh}; {b.rows} rows of prompt {b.prompt_length} + completion "
                 f"{b.completion_length} tokens{images}, {self.num_micro_batches} micro-batches",
                 "  state per device: " + " | ".join(f"{name} {gib(n)}" for name, n in self.state.items()),
                 f"  update: {self._program('update')}",
                 f"rollout of one process: mesh {self.rollout_mesh}; {self.rollout_rows} rows, KV cache of "
                 f"{self.cache_length} tokens; train state kept outside it {gib(self.resident)} per device"]
        lines += [f"  {name}: {self._program(name)}" for name in ("prefill", "decode", "extend", "compact")]
        peaks = {"update": self.update_peak, "rollout": self.rollout_peak}
        verdict = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[self.fits]
        lines.append(f"{verdict}: peak per device " + ", ".join(
            f"{name} {'refused' if peak is None else gib(peak)}" for name, peak in peaks.items()))
        return "\n".join(lines)

    def _program(self, name: str) -> str:
        program = self.programs[name]
        return f"REFUSED by the compiler: {program}" if isinstance(program, str) else program.describe()


def topology_devices(name: str) -> list:
    """The devices of a TPU topology such as "v5p:2x2x2" or "v6e:4x4" (libtpu, no TPU needed)."""
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    # Planning uses no TPU: let it run next to another process holding libtpu (a training run, a test).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu").devices)
    except Exception as error:  # libtpu missing, or a name it does not know
        raise ValueError(f"TPU topology {name!r}: {error} (names look like v5p:2x2x2, v6e:4x4; planning for TPUs "
                         "needs libtpu: pip install -e '.[tpu]')") from error


def worst_case_batch(cfg, model_config, num_processes: int, batch_shards: int) -> BatchShape:
    """The largest update batch `cfg` allows: `data.batch_size` prompts per process, G
    completions each, every length at its limit; images rounded up to the batch shards."""
    prompts = cfg.data.batch_size * num_processes
    shape = BatchShape(rows=prompts * cfg.rollout.group_size, prompt_length=cfg.data.max_prompt_length,
                       completion_length=cfg.rollout.max_completion_length)
    if not isinstance(model_config, VLConfig) or not cfg.data.max_images_per_prompt:
        return shape
    images = -(-prompts * cfg.data.max_images_per_prompt // batch_shards) * batch_shards
    pixels = image_processing.ImageProcessingConfig()  # the pipeline's
    patches = vision.patch_bucket(pixels.max_pixels // pixels.patch_size**2, model_config.vision)
    return dataclasses.replace(shape, images=images, patches=patches)


def _abstract(shape, dtype, sharding_) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def _replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_params(model_config, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> dict:
    """The params as a run places them (`trainer.build_model`), without memory."""
    boxed = convert.abstract_params(model_config)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(lambda x, s: _abstract(x.shape, x.dtype, s), nn.unbox(boxed), shardings)


def abstract_optimizer_state(optimizer: optax.GradientTransformation, params: dict, mesh: jax.sharding.Mesh):
    """`optimizer.init(params)` without memory: a moment is sharded like its param (the
    state's path ends with the param's path), everything else (counts) replicated."""
    placement = {jax.tree_util.keystr(path): x.sharding for path, x in jax.tree_util.tree_leaves_with_path(params)}

    def place(path, x):
        suffixes = (jax.tree_util.keystr(path[i:]) for i in range(len(path)))
        found = next((placement[k] for k in suffixes if k in placement), _replicated(mesh))
        return _abstract(x.shape, x.dtype, found)

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(optimizer.init, params))


def _positions(model_config, rows: int, length: int, sharding_: jax.sharding.NamedSharding) -> jax.ShapeDtypeStruct:
    """[B, L] positions, or [3, B, L] for mRoPE (rows on the middle axis)."""
    text = model_config.text if isinstance(model_config, VLConfig) else model_config
    if text.mrope_section is None:
        return _abstract((rows, length), jnp.int32, sharding_)
    spec = jax.sharding.PartitionSpec(None, *sharding_.spec)
    return _abstract((3, rows, length), jnp.int32, jax.sharding.NamedSharding(sharding_.mesh, spec))


def _images(model_config, count: int, patches: int, sharding_: jax.sharding.NamedSharding) -> vision.VisionInputs:
    return vision.VisionInputs(
        patches=_abstract((count, patches, model_config.vision.patch_dim), jnp.float32, sharding_),
        positions=_abstract((count, patches, 2), jnp.int32, sharding_),
        window_ids=_abstract((count, patches), jnp.int32, sharding_),
        patch_mask=_abstract((count, patches), jnp.bool_, sharding_))


def abstract_batch(shape: BatchShape, model_config, mesh: jax.sharding.Mesh) -> TrainBatch:
    """A TrainBatch of `shape` without memory, rows (and images) over the data x fsdp axes."""
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
    b, c, length = shape.rows, shape.completion_length, shape.prompt_length + shape.completion_length
    images = _images(model_config, shape.images, shape.patches, rows) if shape.images else None
    return TrainBatch(tokens=_abstract((b, length), jnp.int32, rows),
                      token_mask=_abstract((b, length), jnp.bool_, rows),
                      positions=_positions(model_config, b, length, rows),
                      loss_mask=_abstract((b, c), jnp.bool_, rows), advantages=_abstract((b,), jnp.float32, rows),
                      sampler_logprobs=_abstract((b, c), jnp.float32, rows), images=images,
                      image_feature_index=_abstract((b, length), jnp.int32, rows) if shape.images else None)


def bytes_per_device(tree: Any) -> int:
    """Bytes of one device's shards of a pytree of sharded abstract arrays (the largest shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def device_capacity(device) -> int | None:
    """Bytes of memory of one device: its memory_stats, else `HBM_BYTES` by kind, else None."""
    try:
        stats = device.memory_stats()
    except Exception:  # abstract topology devices, CPU
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return HBM_BYTES.get(device.device_kind)


def _compile(name: str, lowered) -> tuple[Any, ProgramMemory | str]:
    """(compiled or None, its memory or the compiler's out-of-memory message)."""
    logging.info("Compiling %s (minutes for a 7B model).", name)
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as failure:
        if "RESOURCE_EXHAUSTED" not in str(failure):
            raise
        return None, str(failure).strip()
    return compiled, ProgramMemory.of(compiled)


def _with_shardings(shapes, shardings):
    return jax.tree_util.tree_map(lambda x, s: _abstract(x.shape, x.dtype, s), shapes, shardings)


def _plan_rollout(cfg, model, model_config, mesh: jax.sharding.Mesh, params: dict,
                  batch: BatchShape) -> tuple[int, int, dict[str, ProgramMemory | str]]:
    """One process's rollout programs: (rows, cache length, program -> memory or refusal)."""
    rollout_config = trainer.rollout_config(cfg)
    prompts, prompt_length = cfg.data.batch_size, batch.prompt_length
    chunk, cache_length = engine.cache_sizes(rollout_config, prompt_length, cfg.retrieval.max_retrieved_tokens)
    rows = prompts * rollout_config.group_size
    replicated = _replicated(mesh)
    images = None  # the pipeline's N = batch_size * max_images_per_prompt
    if batch.images:
        images = _images(model_config, prompts * cfg.data.max_images_per_prompt, batch.patches, replicated)
    prefill_args = (model, params, _abstract((prompts, prompt_length), jnp.int32, replicated),
                    _abstract((prompts, prompt_length), jnp.bool_, replicated),
                    _positions(model_config, prompts, prompt_length, replicated), images)
    programs = {}
    prefill, programs["prefill"] = _compile("the rollout's prefill", engine.prefill_group.lower(
        *prefill_args, group_size=rollout_config.group_size, cache_length=cache_length))
    if prefill is None:  # the decode state holds its outputs: no shardings for them
        refused = "not compiled: the prefill was refused"
        return rows, cache_length, {**programs, "decode": refused, "extend": refused, "compact": refused}
    text = model_config.text if isinstance(model_config, VLConfig) else model_config
    tables = jax.tree_util.tree_map(lambda x: _abstract(np.shape(x), np.asarray(x).dtype, replicated),
                                    stop_strings.build_stop_tables([b""] * text.vocab_size, trainer.STOP_STRINGS))
    cache, logits = _with_shardings(jax.eval_shape(engine.prefill_group, *prefill_args,
                                                   group_size=rollout_config.group_size, cache_length=cache_length),
                                    prefill.output_shardings)
    # The decode state as `sampler.start_decoding` lays it out (its rows over the batch axes).
    start_args = (cache, logits, _abstract((rows,), jnp.int32, replicated), tables,
                  jax.eval_shape(lambda: jax.random.key(0)))
    capacity = rollout_config.max_completion_length
    state = _with_shardings(jax.eval_shape(functools.partial(sampler.start_decoding, capacity=capacity), *start_args),
                            sampler.start_decoding.lower(*start_args, capacity=capacity).compile().output_shardings)
    _, programs["decode"] = _compile("the rollout's decode loop", sampler.decode_round_program(text).lower(
        model, params, state, tables, sampling=rollout_config.sampling, eos_ids=tokenizer_lib.EOS_IDS,
        round_budget=rollout_config.max_new_tokens_per_round))
    _, programs["extend"] = _compile("the rollout's extend", engine.extend.lower(
        model, params, state, _abstract((rows, chunk), jnp.int32, replicated),
        _abstract((rows, chunk), jnp.bool_, replicated), _abstract((rows,), jnp.int32, replicated)))
    _, programs["compact"] = _compile("the rollout's cache compaction", sampler.compact_cache.lower(state))
    return rows, cache_length, programs


def plan_memory(cfg, devices: Sequence[Any], batch: BatchShape | None = None) -> MemoryPlan:
    """Compiles the config's update and rollout programs for `devices`; reads their memory.

    Args:
      cfg: a training config (configs/stage1.py, stage2.py); `mesh` and `sharding_rules`
        place the arrays, `model.checkpoint`'s config.json (or the demo model) gives the model.
      devices: the run's devices, e.g. `topology_devices("v5p:4x4x4")` or `jax.devices()`;
        their process indices say how many processes the run has.
      batch: the update batch to plan for (default: `worst_case_batch`); the rollout
        uses its prompt length and images.

    Returns:
      The plan (a program the compiler refused holds its message).
    """
    devices = list(devices)
    rules = sharding.rules_from_config(cfg.sharding_rules)
    mesh = sharding.make_mesh(dict(cfg.mesh), devices)
    processes = sorted({d.process_index for d in devices})
    local_mesh = sharding.make_mesh(dict(cfg.mesh), [d for d in devices if d.process_index == processes[0]])
    model_config, _ = trainer.read_model_config(cfg)
    model = convert.build_model(model_config)
    batch = batch or worst_case_batch(cfg, model_config, len(processes), mesh.shape["data"] * mesh.shape["fsdp"])
    m = cfg.train.num_micro_batches
    if batch.rows % m:
        raise ValueError(f"train.num_micro_batches={m} must divide the batch's {batch.rows} rows")
    params = abstract_params(model_config, mesh, rules)
    optimizer = optimizer_lib.make_optimizer(
        trainer.make_optimizer_config(cfg, model_config, max(cfg.total_steps, 1)), params)
    state = TrainState(step=_abstract((), jnp.int32, _replicated(mesh)), params=params,
                       opt_state=abstract_optimizer_state(optimizer, params, mesh))
    train_batch = abstract_batch(batch, model_config, mesh)
    groups = batch_shard_groups(mesh, batch.rows, m)
    tokens = batch.rows // (m * groups) * batch.completion_length  # every completion token real and scored
    sizes = {"params": bytes_per_device(params), "optimizer": bytes_per_device(state.opt_state),
             "reference": bytes_per_device(params), "batch": bytes_per_device(train_batch)}
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        _, update = _compile("one update", train_step.lower(
            model, optimizer, state, train_batch, params, loss_config=trainer.make_loss_config(cfg),
            num_micro_batches=m, chunk_size=cfg.train.logprob_chunk, prompt_length=batch.prompt_length,
            prompt_group=shared_prompt_group(cfg.rollout.group_size, batch.rows, m), loss_tokens=tokens,
            completion_tokens=tokens, row_groups=groups))
    multi = len(processes) > 1  # the rollout's params: the host's replica, the sharded ones stay
    policy = abstract_params(model_config, local_mesh, rules) if multi else params
    with jax.set_mesh(local_mesh), sharding.axis_rules(rules):
        rows, cache_length, rollout = _plan_rollout(cfg, model, model_config, local_mesh, policy, batch)
    return MemoryPlan(
        devices=f"{len(devices)} x {devices[0].device_kind}", num_processes=len(processes), mesh=dict(mesh.shape),
        rollout_mesh=dict(local_mesh.shape), batch=batch, num_micro_batches=m, state=sizes,
        programs={"update": update, **rollout}, rollout_rows=rows, cache_length=cache_length,
        resident=sizes["optimizer"] + sizes["reference"] + (sizes["params"] if multi else 0),
        capacity=device_capacity(devices[0]))
