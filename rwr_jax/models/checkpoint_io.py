"""Streaming reads of Hugging Face checkpoints (safetensors, torch `.bin`) and sharded writes.

Reading memory-maps each safetensors file and yields one tensor at a time as a NumPy
view, so a 7B checkpoint never has to fit in host memory at once. bfloat16 and float8
tensors come back as `ml_dtypes` arrays (NumPy has no bfloat16, which is why we do not
use `safetensors.safe_open(framework="numpy")`). Writing uses `safetensors.numpy` and
the `model.safetensors.index.json` layout that `transformers` reads.

A `pytorch_model.bin` is read without torch: it is a zip archive holding the pickle of
a plain state dict, which an unpickler that only accepts tensors and storages reads;
each storage's bytes are read from the archive when its tensors are yielded.
"""

import collections
import io
import json
import os
import pickle
import zipfile
from typing import Any, Iterable, Iterator, NamedTuple

import ml_dtypes
import numpy as np
import safetensors.numpy

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TORCH_INDEX_FILE = "pytorch_model.bin.index.json"
TORCH_SINGLE_FILE = "pytorch_model.bin"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# torch.save's storage classes -> element dtype.
_TORCH_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def read_json(path: str) -> Any:
    """A checkpoint directory's JSON file (config.json, an index, a preprocessor config).

    Raises:
      ValueError: not valid JSON, naming the file.
    """
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def _indexed_files(checkpoint_dir: str, index_file: str, single_file: str) -> list[str] | None:
    """The files an index names (in index order), else the single file; None if neither exists.

    Raises:
      FileNotFoundError: a file the index names is missing.
      ValueError: an index that is not JSON or has no "weight_map".
    """
    index_path = os.path.join(checkpoint_dir, index_file)
    if os.path.isfile(index_path):
        index = read_json(index_path)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f'{index_path}: no "weight_map" (tensor name -> file) object')
        paths = [os.path.join(checkpoint_dir, name) for name in dict.fromkeys(index["weight_map"].values())]
    elif os.path.isfile(os.path.join(checkpoint_dir, single_file)):
        return [os.path.join(checkpoint_dir, single_file)]
    else:
        return None
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {index_path} but does not exist")
    return paths


def checkpoint_files(checkpoint_dir: str) -> list[str]:
    """The safetensors files of a checkpoint directory, in index order.

    Raises:
      FileNotFoundError: no safetensors weights, or a file the index names is missing.
    """
    paths = _indexed_files(checkpoint_dir, INDEX_FILE, SINGLE_FILE)
    if paths is None:
        raise FileNotFoundError(
            f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")
    return paths


def weight_files(checkpoint_dir: str) -> list[str]:
    """The weight files of a checkpoint, in order: safetensors if present, else torch `.bin`.

    Raises:
      FileNotFoundError: the directory, or any weights in it, do not exist.
    """
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    paths = _indexed_files(checkpoint_dir, INDEX_FILE, SINGLE_FILE)
    if paths is None:
        paths = _indexed_files(checkpoint_dir, TORCH_INDEX_FILE, TORCH_SINGLE_FILE)
    if paths is None:
        raise FileNotFoundError(
            f"{checkpoint_dir}: no {SINGLE_FILE}, {INDEX_FILE}, {TORCH_SINGLE_FILE} or {TORCH_INDEX_FILE}")
    return paths


def iter_tensors(paths: Iterable[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for every tensor of these weight files, in file order.

    Args:
      paths: `.safetensors` files (read-only memory-mapped views come back) or torch
        `.bin` archives (copies), e.g. `weight_files(checkpoint_dir)`.
    """
    for path in paths:
        if path.endswith(".safetensors"):
            yield from iter_file_tensors(path)
        else:
            yield from iter_torch_file(path)


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + header_size


def iter_file_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, read-only array view) for each tensor of one safetensors file."""
    header, data_start = _read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        if data_start + end > data.size:
            raise ValueError(f"{path}: tensor {name} lies past the end of the file (truncated download?)")
        raw = data[data_start + begin:data_start + end]
        yield name, raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def tensor_shapes(checkpoint_dir: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a checkpoint, read from the headers only."""
    shapes = {}
    for path in checkpoint_files(checkpoint_dir):
        header, _ = _read_header(path)
        shapes.update({name: tuple(info["shape"]) for name, info in header.items()})
    return shapes


def write_checkpoint(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]],
                     max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes tensors as safetensors shards plus an index, as `save_pretrained` does.

    Args:
      out_dir: target directory (created if needed).
      tensors: (HF name, array) pairs, consumed lazily.
      max_shard_bytes: a shard is closed once it would exceed this size.

    Returns:
      The written file names.
    """
    os.makedirs(out_dir, exist_ok=True)
    written: list[tuple[str, list[str]]] = []  # (temporary file, tensor names)
    shard: dict[str, np.ndarray] = {}
    total = 0

    def flush():
        path = os.path.join(out_dir, f".shard-{len(written):05d}.tmp")
        safetensors.numpy.save_file(shard, path, metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, array in tensors:
        if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
            flush()
        shard[name] = np.asarray(array, order="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
        total += array.nbytes
    flush()
    # Shard names carry the shard count, known only now.
    if len(written) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    weight_map = {}
    for file_name, (tmp_path, tensor_names) in zip(names, written):
        os.replace(tmp_path, os.path.join(out_dir, file_name))
        weight_map.update({k: file_name for k in tensor_names})
    if len(written) > 1:
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
    return names


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
