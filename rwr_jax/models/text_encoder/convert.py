"""Hugging Face BERT / XLM-R checkpoint -> text-encoder params, one tensor at a time.

The conversion table is derived from the abstract param tree: every leaf path maps to
one HF tensor name (`layer_3` <-> `layer.3`; `kernel`, `embedding`, `scale` <->
`weight`) and one transform:
  - kernel: HF Linear weight [out, in] -> transpose -> reshape (`[D, H, head_dim]`
    for query/key/value, `[H, head_dim, D]` for attention.output.dense);
  - bias: reshape (query/key/value bias [H * head_dim] -> [H, head_dim]);
  - embedding, scale: unchanged.
Checkpoints of task models carry the encoder under `bert.` / `roberta.` and heads we
do not use (`pooler.*`, `cls.*`, `lm_head.*`); the prefix is stripped and the heads are
skipped (logged). Old checkpoints name LayerNorm params `gamma` / `beta`.

Weights are read from safetensors (`rwr_jax.models.safetensors_io`) or, without torch,
from a `pytorch_model.bin` zip archive holding a plain state dict: its pickle is read
by an unpickler that only accepts tensors and storages, and each tensor's bytes are
read from the archive when it is converted.
"""

import collections
import io
import json
import os
import pickle
import re
import zipfile
from typing import Any, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from rwr_jax.models import safetensors_io
from rwr_jax.models.text_encoder.config import EncoderConfig
from rwr_jax.models.text_encoder.model import TextEncoderModel

Path = tuple[str, ...]

TORCH_SINGLE_FILE = "pytorch_model.bin"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
# Prefixes of the encoder inside task models (BertForMaskedLM, XLMRobertaForMaskedLM, ...).
_ENCODER_PREFIXES = re.compile(r"^(bert|roberta)\.")
# Heads and buffers that are no part of the encoder.
_SKIPPED = re.compile(r"^(pooler\.|cls\.|lm_head\.|embeddings\.(position_ids|token_type_ids)$)")
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def hf_name(path: Path) -> str:
    """Our param path -> HF tensor name, e.g. ('encoder', 'layer_0', 'output', 'dense', 'kernel')."""
    parts = [re.sub(r"^(\w+)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    return ".".join(parts + ["bias" if path[-1] == "bias" else "weight"])


def canonical_hf_name(name: str) -> str:
    """Strips a `bert.` / `roberta.` prefix and renames LayerNorm `gamma` / `beta`."""
    name = _ENCODER_PREFIXES.sub("", name)
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def abstract_params(config: EncoderConfig) -> dict[str, Any]:
    """Shapes/dtypes of the encoder params (no memory), boxed with logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: TextEncoderModel(config).init(jax.random.key(0), tokens, tokens == 0))["params"]


def _flatten(tree) -> dict[Path, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: dict[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _hf_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel":
        n_in = 2 if path[-3:-1] == ("output", "dense") and len(shape) == 3 else 1
        return int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in]))
    if path[-1] == "bias":
        return (int(np.prod(shape)),)
    return shape


def conversion_table(config: EncoderConfig) -> dict[str, tuple[Path, tuple[int, ...], tuple[int, ...]]]:
    """HF tensor name -> (our param path, our shape, HF shape), for every encoder parameter."""
    table = {}
    for path, leaf in _flatten(abstract_params(config)).items():
        shape = tuple(nn.unbox(leaf).shape)
        table[hf_name(path)] = (path, shape, _hf_shape(path, shape))
    return table


def load_hf_params(checkpoint_dir: str, config: EncoderConfig, *, shardings: Any = None) -> dict[str, Any]:
    """Streams a HF BERT / XLM-R checkpoint into the encoder param pytree.

    Args:
      checkpoint_dir: directory with `model.safetensors` (or shards + index), else
        `pytorch_model.bin` (or shards + index).
      config: the encoder config the checkpoint must match.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params.

    Returns:
      The param pytree in `config.param_dtype`.

    Raises:
      FileNotFoundError: the directory has no weights.
      ValueError: a tensor is missing, unexpected, or has the wrong shape; the message
        names the tensor, the expected and the found shape.
    """
    table = conversion_table(config)
    flat_shardings = _flatten(shardings) if shardings is not None else {}
    loaded: dict[Path, jax.Array] = {}
    skipped = []
    for raw_name, array in iter_checkpoint_tensors(checkpoint_dir):
        name = canonical_hf_name(raw_name)
        if _SKIPPED.search(name):
            skipped.append(raw_name)
            continue
        if name not in table:
            raise ValueError(f"{checkpoint_dir}: unexpected tensor {raw_name} {tuple(array.shape)}: the config "
                             f"(num_layers={config.num_layers}) has no such parameter")
        path, shape, hf_shape = table[name]
        if tuple(array.shape) != hf_shape:
            raise ValueError(f"{checkpoint_dir}: tensor {raw_name} has shape {tuple(array.shape)}, "
                             f"expected {hf_shape} for this config")
        value = array.T.reshape(shape) if path[-1] == "kernel" else array.reshape(shape)
        value = np.asarray(value, dtype=config.jnp_param_dtype)
        sharding = flat_shardings.get(path)
        loaded[path] = jnp.asarray(value) if sharding is None else jax.make_array_from_callback(
            value.shape, sharding, lambda index, value=value: value[index])
    missing = sorted(name for name, (path, _, _) in table.items() if path not in loaded)
    if missing:
        raise ValueError(f"{checkpoint_dir}: {len(missing)} tensors missing from the checkpoint, e.g. "
                         f"{missing[:5]} (expected shape {table[missing[0]][2]})")
    if skipped:
        logging.info("skipped %d tensors that are not encoder parameters: %s", len(skipped), skipped)
    logging.info("loaded %d tensors from %s", len(loaded), checkpoint_dir)
    return _unflatten(loaded)


def weight_files(checkpoint_dir: str) -> list[str]:
    """The weight files of a checkpoint, in order: safetensors if present, else torch `.bin`.

    Raises:
      FileNotFoundError: the directory, or any weights in it, do not exist.
    """
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"text encoder directory {checkpoint_dir!r} does not exist")

    def has(name: str) -> bool:
        return os.path.isfile(os.path.join(checkpoint_dir, name))

    if has(safetensors_io.SINGLE_FILE) or has(safetensors_io.INDEX_FILE):
        return safetensors_io.checkpoint_files(checkpoint_dir)
    if has(TORCH_INDEX_FILE):
        with open(os.path.join(checkpoint_dir, TORCH_INDEX_FILE)) as f:
            files = [os.path.join(checkpoint_dir, name) for name in dict.fromkeys(json.load(f)["weight_map"].values())]
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is listed in {TORCH_INDEX_FILE} but does not exist")
        return files
    if has(TORCH_SINGLE_FILE):
        return [os.path.join(checkpoint_dir, TORCH_SINGLE_FILE)]
    raise FileNotFoundError(
        f"{checkpoint_dir}: no {safetensors_io.SINGLE_FILE}, {safetensors_io.INDEX_FILE}, "
        f"{TORCH_SINGLE_FILE} or {TORCH_INDEX_FILE}")


def iter_checkpoint_tensors(checkpoint_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every tensor of `weight_files(checkpoint_dir)`."""
    for path in weight_files(checkpoint_dir):
        if path.endswith(".safetensors"):
            yield from safetensors_io.iter_file_tensors(path)
        else:
            yield from iter_torch_file(path)


class _LazyTensor(NamedTuple):
    dtype: np.dtype
    storage_key: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage, offset, shape, stride, *unused) -> _LazyTensor:
    dtype, key = storage
    return _LazyTensor(dtype, key, int(offset), tuple(shape), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Reads torch.save's pickle of a state dict, allowing nothing but tensors and storages."""

    def find_class(self, module: str, name: str):
        allowed = {("collections", "OrderedDict"): collections.OrderedDict,
                   ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
                   ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and name in _TORCH_STORAGES:
            return np.dtype(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"{module}.{name} is not a tensor or storage")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return pid[1], str(pid[2])


def _read_state_dict(archive: zipfile.ZipFile, path: str) -> tuple[str, dict[str, _LazyTensor]]:
    pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
    if len(pickles) != 1:
        raise ValueError(f"{path}: expected one data.pkl in the torch archive, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder") != b"little":
        raise ValueError(f"{path}: big-endian torch archives are not supported; convert to safetensors")
    try:
        state = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0]))).load()
    except (pickle.UnpicklingError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot read this file without torch ({e}); convert the checkpoint to "
                         "safetensors (e.g. save_pretrained(..., safe_serialization=True))") from None
    if not isinstance(state, dict) or not all(isinstance(t, _LazyTensor) for t in state.values()):
        raise ValueError(f"{path}: not a plain state dict of tensors; convert the checkpoint to safetensors")
    return prefix, state


def iter_torch_file(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from a `torch.save` zip archive of a state dict, without torch.

    Raises:
      ValueError: a legacy (pre-zip) file, or a pickle holding anything but tensors;
        the message says to convert the checkpoint to safetensors.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: legacy (non-zip) torch.save format cannot be read without torch; convert "
                         "the checkpoint to safetensors")
    with zipfile.ZipFile(path) as archive:
        prefix, state = _read_state_dict(archive, path)
        cached_key, storage = None, None
        for name, tensor in state.items():
            if tensor.storage_key != cached_key:
                cached_key = tensor.storage_key
                storage = np.frombuffer(archive.read(f"{prefix}data/{cached_key}"), dtype=tensor.dtype)
            strides = tuple(s * storage.itemsize for s in tensor.stride)
            view = np.lib.stride_tricks.as_strided(storage[tensor.offset:], tensor.shape, strides, writeable=False)
            yield name, np.array(view)
