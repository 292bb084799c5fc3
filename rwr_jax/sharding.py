"""Device mesh and the logical-axis rules table.

Models name logical axes only (`embed`, `heads`, `activation_batch`, ...). The rules
table maps each logical name to a mesh axis, a tuple of mesh axes (sharded over their
product) or None (replicated). A name may appear more than once: later entries are
fallbacks, used when an earlier entry's mesh axis is already taken by another
dimension of the same array (Flax's `logical_axis_rules` semantics, as in MaxText).
Going from one CPU to a pod changes the mesh shape and, if needed, this table (config
`sharding_rules`), not model code.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the axes rows are split over (the rules' "activation_batch")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Parameters: FSDP over the model width, tensor parallelism over heads / MLP / vocab.
# Activations: batch over data x fsdp, features like their parameters.
DEFAULT_RULES: Rules = (
    ("embed", "fsdp"),
    ("norm", None),  # [embed] norm scales / biases: replicated (sharded, each norm regathered its activations)
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("qkv", None),
    ("patch", None),
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
)


def first_devices(num_devices: int, devices: Sequence[jax.Device] | None = None) -> list[jax.Device]:
    """The first `num_devices` of `devices` (default `jax.devices()`; 0: all): a run smaller than
    its host (config `mesh_devices`; the demos' tiny models use one device whatever the host has)."""
    devices = list(jax.devices() if devices is None else devices)
    if not 0 <= num_devices <= len(devices):
        raise ValueError(f"mesh_devices must be in [0, {len(devices)}] (0: all {len(devices)} devices), "
                         f"got {num_devices}")
    return devices[:num_devices or None]


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds a mesh over all devices.

    Args:
      shape: mesh axis -> size, over MESH_AXES; one size may be -1 (the remaining
        devices), e.g. {"data": -1, "fsdp": 1, "tensor": 1}.
      devices: defaults to `jax.devices()`.

    Returns:
      A `Mesh` with axes MESH_AXES (missing ones have size 1).
    """
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are not known; expected a subset of {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(shape)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"found {len(devices)}")
    return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> Rules:
    """Normalises a rules table from config data ([name, axis | [axes] | None] rows)."""
    if rules is None:
        return DEFAULT_RULES
    normalised = []
    for row in rules:
        if len(row) != 2 or not isinstance(row[0], str):
            raise ValueError(f"sharding rule must be [logical_name, mesh_axes], got {row!r}")
        name, axes = row
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"sharding rule {name!r}: mesh axis {axis!r} is not one of {MESH_AXES}")
        normalised.append((name, axes))
    return tuple(normalised)


def logical_names(abstract_tree) -> set[str]:
    """Every logical axis name used by a boxed (logically partitioned) pytree."""
    specs = nn.get_partition_spec(abstract_tree)
    names = set()
    for spec in jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        names.update(n for n in spec if n is not None)
    return names


def check_rules_cover(abstract_tree, rules=DEFAULT_RULES) -> None:
    """Raises ValueError if the tree uses a logical name the rules do not mention."""
    missing = logical_names(abstract_tree) - {name for name, _ in rules}
    if missing:
        raise ValueError(f"sharding rules have no entry for logical axes {sorted(missing)}")


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a boxed pytree (e.g. `jax.eval_shape(model.init, ...)`).

    Returns:
      A pytree of `NamedSharding`, one per (unboxed) leaf.
    """
    check_rules_cover(abstract_tree, rules)
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def axis_rules(rules=DEFAULT_RULES):
    """Context manager activating the rules for `nn.with_logical_constraint`."""
    return nn.logical_axis_rules(rules)
