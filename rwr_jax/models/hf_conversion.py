"""Model-agnostic Hugging Face checkpoint <-> param pytree conversion, one tensor at a time.

A model's conversion table is derived from its abstract param tree: every leaf path
maps to one HF tensor name (`layers_3` <-> `layers.3`; `kernel`, `embedding`, `scale`
<-> `weight`, `bias` <-> `bias`) and one transform:
  - kernel: HF Linear weight [out, in] -> transpose -> reshape to our einsum kernel
    (the model says how many leading axes of our kernel are its inputs; a conv weight
    [out, *in] is the linear map it is);
  - bias: reshape ([H * head_dim] -> [H, head_dim]);
  - embedding, scale: unchanged.
Each model's convert module supplies only what is specific to it: its abstract params,
the HF shape of its kernels, the aliases and skip rules of its checkpoint names, and
the dtype of each param (`rwr_jax.models.qwen2_vl.convert`,
`rwr_jax.models.text_encoder.convert`).
"""

import re
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

Path = tuple[str, ...]
Shape = tuple[int, ...]
# (pattern, replacement) pairs applied in order by `apply_aliases`.
Aliases = tuple[tuple[re.Pattern, str], ...]


class Entry(NamedTuple):
    """One row of a conversion table."""

    path: Path  # our param path
    shape: Shape  # our shape
    hf_shape: Shape  # the checkpoint's shape


def hf_name(path: Path) -> str:
    """Our param path -> HF tensor name, e.g. ('model', 'layers_0', 'mlp', 'up_proj', 'kernel').

    Args:
      path: keys from the root of the param tree to a leaf.

    Returns:
      The dotted HF name, e.g. 'model.layers.0.mlp.up_proj.weight'.
    """
    parts = [re.sub(r"^(\w+)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def apply_aliases(name: str, aliases: Aliases) -> str:
    """Rewrites a checkpoint tensor name with each (pattern, replacement) of `aliases`, in order."""
    for pattern, replacement in aliases:
        name = pattern.sub(replacement, name)
    return name


def flatten_params(tree: Any) -> dict[Path, Any]:
    """Param path -> leaf; boxed (`nn.Partitioned`) leaves are kept boxed."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def unflatten_params(flat: dict[Path, Any]) -> dict[str, Any]:
    """The nested dict of a {param path: leaf} mapping (inverse of `flatten_params`)."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def linear_hf_shape(shape: Shape, n_in: int) -> Shape:
    """HF Linear weight shape [out, in] of our kernel whose first `n_in` axes are its inputs."""
    return int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in]))


def unboxed(leaf):
    """A param leaf without its logical-axis box. Unlike `nn.unbox`, applies no sharding
    constraint under a mesh (these are host-side shape reads and copies)."""
    return leaf.unbox(apply_constraint=False) if isinstance(leaf, nn.Partitioned) else leaf


def build_table(abstract_params: Any, kernel_hf_shape: Callable[[Path, Shape], Shape]) -> dict[str, Entry]:
    """HF tensor name -> Entry, for every leaf of an abstract param tree.

    Args:
      abstract_params: param tree of shapes (e.g. from `jax.eval_shape`), boxed or not.
      kernel_hf_shape: (path, our shape) -> the checkpoint's shape, for `kernel` leaves;
        biases are flat and every other leaf keeps its shape.

    Returns:
      The conversion table, in param-tree order.
    """
    table = {}
    for path, leaf in flatten_params(abstract_params).items():
        shape = tuple(unboxed(leaf).shape)
        if path[-1] == "kernel":
            hf_shape = tuple(kernel_hf_shape(path, shape))
        elif path[-1] == "bias":
            hf_shape = (int(np.prod(shape)),)
        else:
            hf_shape = shape
        table[hf_name(path)] = Entry(path, shape, hf_shape)
    return table


def to_ours(array: np.ndarray, entry: Entry) -> np.ndarray:
    """A checkpoint tensor of shape `entry.hf_shape` -> our layout, shape `entry.shape`."""
    if entry.path[-1] == "kernel":
        return array.reshape(array.shape[0], -1).T.reshape(entry.shape)
    return array.reshape(entry.shape)


def to_hf(array: np.ndarray, entry: Entry) -> np.ndarray:
    """Our param of shape `entry.shape` -> the checkpoint layout, shape `entry.hf_shape`."""
    if entry.path[-1] == "kernel":
        fan_in = int(np.prod(entry.hf_shape[1:]))
        return array.reshape(fan_in, -1).T.reshape(entry.hf_shape)
    return array.reshape(entry.hf_shape)


def check_params_match(params: Any, table: dict[str, Entry], where: str) -> None:
    """Raises ValueError naming the first param whose presence or shape differs from `table`.

    Args:
      params: a param tree (arrays, boxed or not, possibly sharded).
      table: the conversion table it must match.
      where: what the params are, to start the message with.
    """
    expected = {entry.path: entry.shape for entry in table.values()}
    found = {path: tuple(np.shape(unboxed(leaf))) for path, leaf in flatten_params(params).items()}
    for path in sorted(set(expected) | set(found)):
        name = hf_name(path)
        if path not in found:
            raise ValueError(f"{where}: parameter {name} is missing (expected shape {expected[path]})")
        if path not in expected:
            raise ValueError(f"{where}: unexpected parameter {name} {found[path]} for this config")
        if found[path] != expected[path]:
            raise ValueError(f"{where}: parameter {name} has shape {found[path]}, expected {expected[path]}")


def _place(value: np.ndarray, sharding: Any) -> jax.Array:
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def load_params(
    tensors: Iterable[tuple[str, np.ndarray]],
    table: dict[str, Entry],
    *,
    source: str,
    param_dtype: Callable[[Path], Any],
    canonical_name: Callable[[str], str] = lambda name: name,
    skip: Callable[[str], bool] = lambda name: False,
    config_summary: str = "",
    shardings: Any = None,
) -> dict[str, Any]:
    """Converts a stream of checkpoint tensors into the param tree, placing each as it comes.

    Args:
      tensors: (checkpoint name, array [hf_shape]) pairs, e.g. `checkpoint_io.iter_tensors`.
      table: the model's conversion table (keys are canonical names).
      source: the checkpoint, to start error messages with.
      param_dtype: param path -> dtype the param is stored in.
      canonical_name: checkpoint name -> table key (aliases, prefixes).
      skip: canonical name -> True for tensors that are no parameter of this config.
      config_summary: the config fields that decide which tensors exist, for the
        unexpected-tensor message, e.g. 'num_layers=2'.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params; each
        tensor is placed with it as it is read (works multi-host).

    Returns:
      The param tree, each leaf [entry.shape] in `param_dtype(path)`.

    Raises:
      ValueError: a tensor is unexpected, has the wrong shape, or is missing; the
        message names the tensor, the expected and the found shape.
    """
    flat_shardings = flatten_params(shardings) if shardings is not None else {}
    loaded: dict[Path, jax.Array] = {}
    skipped = []
    for raw_name, array in tensors:
        name = canonical_name(raw_name)
        if skip(name):
            skipped.append(raw_name)
            continue
        label = raw_name if name == raw_name else f"{raw_name} (read as {name})"
        if name not in table:
            raise ValueError(f"{source}: unexpected tensor {label} {tuple(array.shape)}: the config "
                             f"({config_summary}) has no such parameter")
        entry = table[name]
        if tuple(array.shape) != entry.hf_shape:
            raise ValueError(f"{source}: tensor {label} has shape {tuple(array.shape)}, "
                             f"expected {entry.hf_shape} for this config")
        value = np.asarray(to_ours(array, entry), dtype=param_dtype(entry.path))
        loaded[entry.path] = _place(value, flat_shardings.get(entry.path))
    missing = sorted(name for name, entry in table.items() if entry.path not in loaded)
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors missing from the checkpoint, e.g. "
                         f"{missing[:5]} (expected shape {table[missing[0]].hf_shape})")
    logging.info("loaded %d tensors from %s; skipped %d that are not parameters of this config%s",
                 len(loaded), source, len(skipped), f", e.g. {skipped[:5]}" if skipped else "")
    return unflatten_params(loaded)


def iter_hf_tensors(params: Any, table: dict[str, Entry], dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array [hf_shape]) for every param, gathering one tensor at a time.

    Args:
      params: param tree matching `table` (possibly sharded); checked first.
      table: its conversion table.
      dtype: optional output dtype (e.g. ml_dtypes.bfloat16); default keeps each dtype.

    Raises:
      ValueError: a param is missing, unexpected or has the wrong shape.
    """
    check_params_match(params, table, where="params")
    by_path = {entry.path: entry for entry in table.values()}
    for path, leaf in flatten_params(params).items():
        array = np.asarray(jax.device_get(unboxed(leaf)))
        if dtype is not None:
            array = array.astype(dtype)
        yield hf_name(path), to_hf(array, by_path[path])
