"""Device memory of a run's update, planned before the run: the real train step compiled ahead of time.

    plan = plan_train_step(config, topology_devices("v5p:4x4x4"))   # on any host, TPU or not
    print(plan.report())

The train step is lowered on abstract arrays (no weights are read: the model comes from
the checkpoint's config.json) with the shardings a run would give them (the config's
mesh and logical-axis rules), for the largest batch the config allows (every prompt
`data.max_prompt_length` tokens, every completion `rollout.max_completion_length`, every
prompt `data.max_images_per_prompt` images of the most patches `max_pixels` allows), and
compiled for the target devices. XLA's memory analysis then gives each device's bytes:
arguments (train state, reference params, batch), outputs, the outputs that reuse donated
arguments, and temporaries; their sum less the reused part is the peak. For TPUs the
compile targets a topology through libtpu's ahead-of-time support, which needs no TPU
(MaxText's `train_compile.py` does the same); a TPU compiler that finds the program too
large refuses it, and the plan says so with the compiler's numbers.

Not planned: the rollout's memory (the policy replica and KV cache next to the state).
"""

import dataclasses
import math
import os
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rwr_jax import sharding
from rwr_jax.data import image_processing
from rwr_jax.models.qwen2_vl import convert, vision
from rwr_jax.models.qwen2_vl.model import VLConfig
from rwr_jax.train import optimizer as optimizer_lib, trainer
from rwr_jax.train.step import TrainBatch, TrainState, shared_prompt_group, train_step

GiB = 2**30
# HBM per chip by `device_kind` (abstract topology devices report no memory_stats).
HBM_BYTES = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}
_BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchShape:
    """The update batch planned: all processes' rows."""

    rows: int
    prompt_length: int
    completion_length: int
    images: int = 0  # padded images of the batch (0: text-only)
    patches: int = 0  # patches per image


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    """Bytes per device of one update (XLA's memory analysis), or the compiler's refusal.

    Attributes:
      devices: "8 x TPU v5".
      mesh: mesh axis -> size.
      batch: the batch compiled for.
      num_micro_batches: gradient-accumulation steps.
      state: per device: "params", "optimizer", "reference", "batch" -> bytes (from the shardings).
      memory: XLA's per-device "arguments", "outputs", "aliased", "temporaries", "code" bytes
        (None when the compiler refused the program).
      capacity: per-device memory in bytes (None if unknown).
      error: the compiler's out-of-memory message, or None.
    """

    devices: str
    mesh: dict[str, int]
    batch: BatchShape
    num_micro_batches: int
    state: dict[str, int]
    memory: dict[str, int] | None
    capacity: int | None
    error: str | None = None

    @property
    def peak(self) -> int | None:
        """Arguments + outputs - aliased + temporaries, bytes per device."""
        if self.memory is None:
            return None
        m = self.memory
        return m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]

    @property
    def fits(self) -> bool | None:
        if self.error is not None:
            return False
        return None if self.capacity is None else self.peak <= self.capacity

    def report(self) -> str:
        b = self.batch
        images = f", {b.images} images x {b.patches} patches" if b.images else ""
        lines = [f"memory plan of one update on {self.devices}, mesh {self.mesh}",
                 f"batch: {b.rows} rows of prompt {b.prompt_length} + completion {b.completion_length} tokens"
                 f"{images}, {self.num_micro_batches} micro-batches",
                 "per device: " + " | ".join(f"{name} {gib(n)}" for name, n in self.state.items())]
        if self.memory is None:
            lines.append(f"DOES NOT FIT: the compiler refused the program: {self.error}")
            return "\n".join(lines)
        m = self.memory
        capacity = "" if self.capacity is None else f" of {gib(self.capacity)}"
        verdict = {True: "fits", False: "DOES NOT FIT", None: "capacity unknown"}[self.fits]
        lines.append(f"XLA per device: arguments {gib(m['arguments'])} + outputs {gib(m['outputs'])} - aliased "
                     f"{gib(m['aliased'])} + temporaries {gib(m['temporaries'])} = peak {gib(self.peak)}{capacity}: "
                     f"{verdict} (code {gib(m['code'])})")
        return "\n".join(lines)


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


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


def abstract_params(model_config, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> dict:
    """The params as a run places them (`trainer.build_model`), without memory."""
    boxed = convert.abstract_params(model_config)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree_util.tree_map(lambda x, s: _abstract(x.shape, x.dtype, s), nn.unbox(boxed), shardings)


def abstract_optimizer_state(optimizer: optax.GradientTransformation, params: dict, mesh: jax.sharding.Mesh):
    """`optimizer.init(params)` without memory: a moment is sharded like its param (the
    state's path ends with the param's path), everything else (counts) replicated."""
    placement = {jax.tree_util.keystr(path): x.sharding for path, x in jax.tree_util.tree_leaves_with_path(params)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, x):
        suffixes = (jax.tree_util.keystr(path[i:]) for i in range(len(path)))
        found = next((placement[k] for k in suffixes if k in placement), replicated)
        return _abstract(x.shape, x.dtype, found)

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(optimizer.init, params))


def abstract_batch(shape: BatchShape, model_config, mesh: jax.sharding.Mesh) -> TrainBatch:
    """A TrainBatch of `shape` without memory, rows (and images) over the data x fsdp axes."""
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(_BATCH_AXES))
    b, c, length = shape.rows, shape.completion_length, shape.prompt_length + shape.completion_length
    text = model_config.text if isinstance(model_config, VLConfig) else model_config
    positions = (_abstract((3, b, length), jnp.int32,
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, _BATCH_AXES)))
                 if text.mrope_section is not None else _abstract((b, length), jnp.int32, rows))
    images = feature_index = None
    if shape.images:
        n, p = shape.images, shape.patches
        images = vision.VisionInputs(
            patches=_abstract((n, p, model_config.vision.patch_dim), jnp.float32, rows),
            positions=_abstract((n, p, 2), jnp.int32, rows), window_ids=_abstract((n, p), jnp.int32, rows),
            patch_mask=_abstract((n, p), jnp.bool_, rows))
        feature_index = _abstract((b, length), jnp.int32, rows)
    return TrainBatch(tokens=_abstract((b, length), jnp.int32, rows),
                      token_mask=_abstract((b, length), jnp.bool_, rows), positions=positions,
                      loss_mask=_abstract((b, c), jnp.bool_, rows), advantages=_abstract((b,), jnp.float32, rows),
                      sampler_logprobs=_abstract((b, c), jnp.float32, rows), images=images,
                      image_feature_index=feature_index)


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


def plan_train_step(cfg, devices: Sequence[Any], batch: BatchShape | None = None) -> MemoryPlan:
    """Compiles the config's train step for `devices` and reads its per-device memory.

    Args:
      cfg: a training config (configs/stage1.py, stage2.py); `mesh` and `sharding_rules`
        place the arrays, `model.checkpoint`'s config.json (or the demo model) gives the model.
      devices: the run's devices, e.g. `topology_devices("v5p:4x4x4")` or `jax.devices()`.
      batch: the batch to plan for (default: `worst_case_batch`).

    Returns:
      The plan; `plan.memory` is None (and `plan.error` the compiler's message) if the
      compiler found the program too large for the devices.
    """
    devices = list(devices)
    mesh, rules = sharding.make_mesh(dict(cfg.mesh), devices), sharding.rules_from_config(cfg.sharding_rules)
    model_config, _ = trainer.read_model_config(cfg)
    num_processes = len({d.process_index for d in devices})
    batch = batch or worst_case_batch(cfg, model_config, num_processes, mesh.shape["data"] * mesh.shape["fsdp"])
    params = abstract_params(model_config, mesh, rules)
    optimizer = optimizer_lib.make_optimizer(trainer.make_optimizer_config(cfg, model_config, max(cfg.total_steps, 1)),
                                             params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = TrainState(step=_abstract((), jnp.int32, replicated), params=params,
                       opt_state=abstract_optimizer_state(optimizer, params, mesh))
    train_batch = abstract_batch(batch, model_config, mesh)
    m = cfg.train.num_micro_batches
    if batch.rows % m:
        raise ValueError(f"train.num_micro_batches={m} must divide the batch's {batch.rows} rows")
    tokens = batch.rows // m * batch.completion_length  # every completion token real and scored
    label = f"{len(devices)} x {devices[0].device_kind}"
    logging.info("Compiling one update (%d rows of %d + %d tokens) for %s: minutes for a 7B model.", batch.rows,
                 batch.prompt_length, batch.completion_length, label)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        lowered = train_step.lower(
            convert.build_model(model_config), optimizer, state, train_batch, params,
            loss_config=trainer.make_loss_config(cfg), num_micro_batches=m, chunk_size=cfg.train.logprob_chunk,
            prompt_length=batch.prompt_length,
            prompt_group=shared_prompt_group(cfg.rollout.group_size, batch.rows, m),
            loss_tokens=tokens, completion_tokens=tokens)
        try:
            compiled, error = lowered.compile(), None
        except jax.errors.JaxRuntimeError as failure:
            if "RESOURCE_EXHAUSTED" not in str(failure):
                raise
            compiled, error = None, str(failure).strip()
    plan = dict(devices=label, mesh=dict(mesh.shape), batch=batch, num_micro_batches=m,
                state={"params": bytes_per_device(params), "optimizer": bytes_per_device(state.opt_state),
                       "reference": bytes_per_device(params), "batch": bytes_per_device(train_batch)},
                capacity=device_capacity(devices[0]), error=error)
    if compiled is None:
        return MemoryPlan(memory=None, **plan)
    stats = compiled.memory_analysis()
    return MemoryPlan(memory={"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
                              "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
                              "code": stats.generated_code_size_in_bytes}, **plan)
