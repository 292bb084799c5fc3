"""Streaming reads and sharded writes of Hugging Face safetensors checkpoints.

Reading memory-maps each file and yields one tensor at a time as a NumPy view, so a
7B checkpoint never has to fit in host memory at once. bfloat16 and float8 tensors
come back as `ml_dtypes` arrays (NumPy has no bfloat16, which is why we do not use
`safetensors.safe_open(framework="numpy")`). Writing uses `safetensors.numpy` and the
`model.safetensors.index.json` layout that `transformers` reads.
"""

import json
import os
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np
import safetensors.numpy

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def checkpoint_files(checkpoint_dir: str) -> list[str]:
    """The safetensors files of a checkpoint directory, in index order.

    Raises:
      FileNotFoundError: no safetensors weights, or a file the index names is missing.
    """
    index_path = os.path.join(checkpoint_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    elif os.path.isfile(os.path.join(checkpoint_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(
            f"{checkpoint_dir}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are supported)")
    paths = [os.path.join(checkpoint_dir, f) for f in files]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in {index_path} but does not exist")
    return paths


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
        shard[name] = np.ascontiguousarray(array)
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
