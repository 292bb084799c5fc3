r"""Converts between Hugging Face safetensors checkpoints and rwr_jax param pytrees.

    # HF -> rwr_jax (an orbax param checkpoint + the source config.json)
    python launch/convert_checkpoint.py --direction=hf_to_jax \
        --src=/models/Qwen2.5-7B-Instruct --dst=/ckpt/qwen2_5_7b

    # rwr_jax -> HF (a directory that transformers' from_pretrained loads)
    python launch/convert_checkpoint.py --direction=jax_to_hf \
        --src=/ckpt/qwen2_5_7b --dst=/models/exported --dtype=bfloat16

Tensors are streamed one at a time (a progress bar shows them); a tensor whose name
or shape does not match the checkpoint's config.json stops the conversion with an
error naming it.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from rwr_jax.models.qwen2_vl import convert  # noqa: E402
from rwr_jax.models.qwen2_vl.config import from_hf_config, read_hf_config  # noqa: E402

_DIRECTION = flags.DEFINE_enum("direction", None, ["hf_to_jax", "jax_to_hf"], "Conversion direction.")
_SRC = flags.DEFINE_string("src", None, "Source directory.")
_DST = flags.DEFINE_string("dst", None, "Destination directory (must not exist, or be empty).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                           "Output dtype (default: keep the source dtype).")
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest safetensors shard written (jax_to_hf).")

HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"


def hf_to_jax(src: str, dst: str, dtype: str | None) -> None:
    """Streams an HF checkpoint into an orbax param checkpoint at `dst`."""
    overrides = {"param_dtype": dtype} if dtype else {}
    config, hf_config = read_hf_config(src, **overrides)
    params = convert.load_hf_params(src, config)
    os.makedirs(dst, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(os.path.join(dst, PARAMS_DIR)), params)
    with open(os.path.join(dst, HF_CONFIG_FILE), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    logging.info("wrote %s (%s)", dst, config)


def jax_to_hf(src: str, dst: str, dtype: str | None, max_shard_gb: float) -> None:
    """Writes an orbax param checkpoint made by `hf_to_jax` (or training) as an HF checkpoint."""
    config_path = os.path.join(src, HF_CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: --src must be a directory written by hf_to_jax")
    with open(config_path) as f:
        hf_config = json.load(f)
    config = from_hf_config(hf_config, where=config_path)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(os.path.abspath(os.path.join(src, PARAMS_DIR)))
    convert.check_params_match(params, config, where=src)
    out_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}.get(dtype)
    if dtype:
        hf_config = dict(hf_config, torch_dtype=dtype, dtype=dtype)
    convert.save_hf_checkpoint(params, config, hf_config, dst, dtype=out_dtype,
                               max_shard_bytes=int(max_shard_gb * 2**30))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if os.path.isdir(_DST.value) and os.listdir(_DST.value):
        raise ValueError(f"--dst={_DST.value} exists and is not empty")
    if _DIRECTION.value == "hf_to_jax":
        hf_to_jax(_SRC.value, _DST.value, _DTYPE.value)
    else:
        jax_to_hf(_SRC.value, _DST.value, _DTYPE.value, _MAX_SHARD_GB.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["direction", "src", "dst"])
    app.run(main)
