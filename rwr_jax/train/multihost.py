"""Training over several processes (hosts): rollouts per host, one update over all of them.

    hosts = Hosts.create(cfg.mesh)                     # after jax.distributed.initialize()
    policy = hosts.replicate(state.params)             # the policy on this host's devices
    ... roll out and score this host's prompts on hosts.local_mesh ...
    batch, prompt_length, masks = hosts.global_batch(local_batch, prompt_length)

Every process rolls out its own prompts on its own devices, with a replica of the policy
laid out on a host-local mesh of the same axes (the training mesh's axes, the `-1` one
shrunk to the host): rows pause for retrieval at different rounds on different hosts,
and no decode step waits for another host. The update then runs once over the global
mesh on the rows of every host: each process pads its rows to the widths all processes
agree on (prompts on the left, completions on the right, images and patches with masked
padding), its `<|image_pad|>` ranks moved past the image tokens of lower processes, and
`multihost_utils` assembles the global arrays, process p's rows on p's devices.

With one process every method is the identity (the local mesh is the mesh), so a
single-host run takes exactly the path it always took.
"""

import dataclasses
import sys
from typing import Any, Callable, Mapping

import jax
from jax.experimental import multihost_utils
import numpy as np

from rwr_jax import sharding
from rwr_jax.train.step import TrainBatch


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the run's other processes (`jax.distributed.initialize`; all None: detected, as
    on TPU VM pods and SLURM). CPU processes use JAX's gloo collectives. Call it before
    anything else touches JAX's devices."""
    named = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in named) and any(v is None for v in named):
        raise ValueError(f"coordinator_address, num_processes and process_id go together, got {named}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def define_flags(module_name: str) -> Callable[[], None]:
    """Defines a launch script's --distributed, --coordinator_address, --num_processes and
    --process_id (listed by its --help: `module_name` is the script's `__name__`); returns the
    function that joins the processes they name (a no-op without them)."""
    from absl import flags  # pylint: disable=g-import-not-at-top

    if module_name == "__main__":  # absl files a script's own flags under its path
        module_name = sys.argv[0]
    distributed = flags.DEFINE_bool("distributed", False, "Join the other processes of a multi-host run "
                                    "(jax.distributed.initialize(), auto-detected on TPU pods and SLURM).",
                                    module_name=module_name)
    coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process "
                                      "run JAX cannot detect (with --num_processes and --process_id).",
                                      module_name=module_name)
    num_processes = flags.DEFINE_integer("num_processes", None, "Processes of the run (with --coordinator_address).",
                                         module_name=module_name)
    process_id = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).",
                                      module_name=module_name)

    def join():
        if distributed.value or coordinator.value:
            initialize(coordinator.value, num_processes.value, process_id.value)
    return join


def barrier(name: str) -> None:
    """Waits until every process gets here (nothing with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def run_on_main(fn: Callable[[], Any]) -> None:
    """Runs `fn` on process 0 while the others wait for it: files written once, then read by all."""
    if jax.process_index() == 0:
        fn()
    barrier("rwr_jax run_on_main")


@dataclasses.dataclass(frozen=True)
class Hosts:
    """The processes of a run and their meshes.

    Attributes:
      mesh: the global training mesh over every process's devices.
      local_mesh: this process's devices with the same axis names (rollouts, scoring).
      replica_mesh: ("hosts", *mesh axes): every process's local mesh stacked, the
        layout in which each process holds a whole replica (None with one process).
    """

    mesh: jax.sharding.Mesh
    local_mesh: jax.sharding.Mesh
    replica_mesh: jax.sharding.Mesh | None = None

    @classmethod
    def create(cls, shape: Mapping[str, int], devices=None) -> "Hosts":
        """Meshes for the config's `mesh` shape; several processes need all their devices.

        Args:
          shape: mesh axis -> size, one of them may be -1 (`sharding.make_mesh`).
          devices: with one process, the devices of the mesh (default: all).
        """
        if jax.process_count() == 1:
            mesh = sharding.make_mesh(shape, devices)
            return cls(mesh=mesh, local_mesh=mesh)
        if devices is not None and len(devices) != jax.device_count():
            raise ValueError(f"{jax.process_count()} processes train on all {jax.device_count()} devices "
                             f"(mesh_devices = 0), got {len(devices)}")
        mesh = sharding.make_mesh(shape)
        batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_shards % jax.process_count():
            raise ValueError(f"mesh {dict(mesh.shape)}: data x fsdp = {batch_shards} must be a multiple of the "
                             f"{jax.process_count()} processes (each holds its own rows); a -1 data or fsdp axis "
                             "does it")
        try:
            per_process = [sharding.make_mesh(shape, [d for d in jax.devices() if d.process_index == p])
                           for p in range(jax.process_count())]
        except ValueError as error:
            raise ValueError(f"mesh {dict(shape)}: with {jax.process_count()} processes the axes other than the -1 "
                             f"one must fit on the {jax.local_device_count()} devices of one process ({error})"
                             ) from None
        replica_mesh = jax.sharding.Mesh(np.stack([m.devices for m in per_process]),
                                         ("hosts", *sharding.MESH_AXES))
        return cls(mesh=mesh, local_mesh=per_process[jax.process_index()], replica_mesh=replica_mesh)

    @property
    def multi(self) -> bool:
        return self.replica_mesh is not None

    @property
    def is_main(self) -> bool:
        return jax.process_index() == 0

    def replicate(self, tree: Any) -> Any:
        """A pytree of arrays on the global mesh -> the same values on `local_mesh` (every
        process a whole copy, sharded over its own devices as the specs say)."""
        if not self.multi:
            return tree
        shardings = jax.tree_util.tree_map(lambda x: jax.sharding.NamedSharding(self.replica_mesh, x.sharding.spec),
                                           tree)
        with jax.set_mesh(self.replica_mesh):  # an all-gather over the hosts, one program for the whole tree
            replicas = jax.jit(_identity, out_shardings=shardings)(tree)

        def local(x):
            target = jax.sharding.NamedSharding(self.local_mesh, x.sharding.spec)
            return jax.make_array_from_single_device_arrays(x.shape, target, [s.data for s in x.addressable_shards])
        return jax.tree_util.tree_map(local, replicas)

    def maximum(self, values: dict[str, int]) -> dict[str, int]:
        """Each value's maximum over the processes."""
        if not self.multi:
            return values
        gathered = multihost_utils.process_allgather(np.asarray(list(values.values()), np.int64))
        return dict(zip(values, (int(v) for v in gathered.max(axis=0))))

    def mean(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over the processes (every process has as many rows)."""
        if not self.multi:
            return metrics
        names = sorted(metrics)
        gathered = multihost_utils.process_allgather(np.asarray([metrics[n] for n in names], np.float64))
        return dict(zip(names, (float(v) for v in gathered.mean(axis=0))))

    def all_rows(self, x: np.ndarray) -> np.ndarray:
        """[B, ...] rows of this process -> [processes * B, ...] rows of all, in process order."""
        if not self.multi:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))

    def global_batch(self, batch: TrainBatch, prompt_length: int
                     ) -> tuple[TrainBatch, int, tuple[np.ndarray, np.ndarray]]:
        """This process's update rows -> the global batch, its prompt length and host masks.

        Args:
          batch: B rows of this process (`scoring.make_train_batch`), prompts P wide.
          prompt_length: P.

        Returns:
          (TrainBatch of processes * B rows on `mesh`, the agreed prompt length, the
          (loss_mask, token_mask) of all those rows as host arrays, for `step.packed_sizes`).
        """
        if not self.multi:
            return batch, prompt_length, (np.asarray(batch.loss_mask), np.asarray(batch.token_mask))
        completion = batch.loss_mask.shape[1]
        widths = {"prompt": prompt_length, "completion": completion}
        images = batch.images
        if images is not None:
            widths.update(images=images.patch_mask.shape[0], patches=images.patch_mask.shape[1])
        agreed, image_tokens = self.maximum(widths), 0
        if images is not None:
            # Each process's images divide over its devices of the batch axes.
            shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"] // jax.process_count()
            agreed["images"] = -(-agreed["images"] // shards) * shards
            # Its image tokens have ranks 0 ... K - 1; they follow those of the processes before it.
            counts = self.all_rows(np.asarray([np.asarray(batch.image_feature_index).max() + 1]))
            image_tokens = int(counts[:jax.process_index()].sum())
        padded = pad_batch(batch, prompt_length, agreed["prompt"], agreed["completion"],
                           feature_offset=image_tokens,
                           images=(agreed["images"], agreed["patches"]) if images is not None else None)
        specs = jax.tree_util.tree_map(lambda x: jax.sharding.PartitionSpec(sharding.BATCH_AXES), padded)
        if padded.positions.ndim == 3:
            specs = specs.replace(positions=jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
        masks = (self.all_rows(padded.loss_mask), self.all_rows(padded.token_mask))
        return multihost_utils.host_local_array_to_global_array(padded, self.mesh, specs), agreed["prompt"], masks


def _identity(tree):
    return tree


def _pad(x: np.ndarray, axis: int, before: int, after: int, value=0) -> np.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return np.pad(x, widths, constant_values=value)


def pad_batch(batch: TrainBatch, prompt_length: int, to_prompt: int, to_completion: int, *, feature_offset: int = 0,
              images: tuple[int, int] | None = None) -> TrainBatch:
    """A batch widened to `to_prompt` prompt and `to_completion` completion positions (host arrays).

    Prompts get left padding, completions right padding, both masked (positions 0, no
    loss); `<|image_pad|>` ranks move up by `feature_offset`; images (N, P) grow to
    `images` = (N', P') with masked patches and masked images.
    """
    grow_prompt, grow_completion = to_prompt - prompt_length, to_completion - batch.loss_mask.shape[1]
    if grow_prompt < 0 or grow_completion < 0:
        raise ValueError(f"cannot narrow a batch of prompt {prompt_length} / completion {batch.loss_mask.shape[1]} "
                         f"to {to_prompt} / {to_completion}")

    def sequence(x, value=0):  # [..., P + C]
        x = np.asarray(x)
        prompt, completion = x[..., :prompt_length], x[..., prompt_length:]
        return np.concatenate([_pad(prompt, -1, grow_prompt, 0, value), _pad(completion, -1, 0, grow_completion,
                                                                             value)], axis=-1)

    index = None
    if batch.image_feature_index is not None:
        index = np.asarray(batch.image_feature_index)
        index = sequence(np.where(index >= 0, index + feature_offset, -1), value=-1)
    vision = batch.images
    if vision is not None and images is not None:
        grow_images, grow_patches = images[0] - vision.patch_mask.shape[0], images[1] - vision.patch_mask.shape[1]
        vision = jax.tree_util.tree_map(lambda x: _pad(_pad(np.asarray(x), 0, 0, grow_images), 1, 0, grow_patches),
                                        vision)
    return TrainBatch(tokens=sequence(batch.tokens), token_mask=sequence(batch.token_mask),
                      positions=sequence(batch.positions), loss_mask=_pad(np.asarray(batch.loss_mask), 1, 0,
                                                                           grow_completion),
                      advantages=np.asarray(batch.advantages),
                      sampler_logprobs=_pad(np.asarray(batch.sampler_logprobs), 1, 0, grow_completion),
                      images=vision, image_feature_index=index)
