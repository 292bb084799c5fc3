"""Hugging Face checkpoint <-> param pytree, one tensor at a time.

The conversion table is derived from the abstract param tree: every leaf path maps to
one HF tensor name (`layers_3` <-> `layers.3`, `mlp_0` <-> `mlp.0`; `kernel`,
`embedding`, `scale` <-> `weight`) and one transform:
  - kernel: HF Linear weight [out, in] -> transpose -> reshape to our einsum kernel
    (`[D, H, head_dim]` for q/k/v, `[H, head_dim, D]` for output projections,
    `[D, 3, H, head_dim]` for the vision qkv); the vision patch Conv3d weight
    [D, C, T, p, p] is flattened to the linear map it is;
  - bias: reshape (q/k/v bias [H * head_dim] -> [H, head_dim]);
  - embedding, scale: unchanged.
Names written by transformers 5 in memory (`model.language_model.*`,
`model.visual.*`) are accepted as aliases of the on-disk layout (`model.*`,
`visual.*`), which is what we write back.
"""

import json
import os
import re
from typing import Any, Iterator, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from rwr_jax.models import safetensors_io
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, VLConfig
from rwr_jax.models.qwen2_vl.vision import VisionInputs

Path = tuple[str, ...]
ModelConfig = DecoderConfig | VLConfig

# transformers 5 in-memory prefixes -> the on-disk layout of released checkpoints.
_ALIASES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))
# Tensors that carry no parameters (old checkpoints saved rotary buffers).
_NON_PARAMETERS = re.compile(r"\.rotary_emb\.inv_freq$")
# Tensors of the vision tower; a text-only DecoderConfig skips them.
VISION_PREFIX = "visual."


class Entry(NamedTuple):
    """One row of the conversion table."""

    path: Path  # our param path
    shape: tuple[int, ...]  # our shape
    hf_shape: tuple[int, ...]  # the checkpoint's shape


def hf_name(path: Path) -> str:
    """Our param path -> HF tensor name, e.g. ('model', 'layers_0', 'mlp', 'up_proj', 'kernel')."""
    parts = [re.sub(r"^(\w+)_(\d+)$", r"\1.\2", p) for p in path[:-1]]
    leaf = "bias" if path[-1] == "bias" else "weight"
    return ".".join(parts + [leaf])


def canonical_hf_name(name: str) -> str:
    """Maps transformers-5 in-memory names onto the on-disk checkpoint layout."""
    for pattern, replacement in _ALIASES:
        name = pattern.sub(replacement, name)
    return name


def build_model(config: ModelConfig) -> DecoderLM:
    """The Linen model of a config: DecoderLM, or VisionLanguageLM for a VLConfig."""
    return VisionLanguageLM.from_config(config) if isinstance(config, VLConfig) else DecoderLM(config)


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Shapes/dtypes of the params (no memory), boxed with logical axis names."""
    model = build_model(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    kwargs = {}
    if isinstance(config, VLConfig):
        unit = config.vision.merge_unit
        kwargs["images"] = VisionInputs(
            patches=jnp.zeros((1, unit, config.vision.patch_dim)), positions=jnp.zeros((1, unit, 2), jnp.int32),
            window_ids=jnp.zeros((1, unit), jnp.int32), patch_mask=jnp.ones((1, unit), bool))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens, tokens >= 0, **kwargs))["params"]


def _flatten(tree) -> dict[Path, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _hf_shape(path: Path, shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
    if path[-1] == "bias":
        return (int(np.prod(shape)),)
    if path[-1] != "kernel":
        return shape
    if path[-3:-1] == ("patch_embed", "proj"):
        v = config.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    # Output projections of attention read [heads, head_dim]; everything else one axis.
    n_in = 2 if path[-2] == "o_proj" or path[-3:-1] == ("attn", "proj") else 1
    return (int(np.prod(shape[n_in:])), int(np.prod(shape[:n_in])))


def conversion_table(config: ModelConfig) -> dict[str, Entry]:
    """HF tensor name -> Entry, for every parameter of the model."""
    table = {}
    for path, leaf in _flatten(abstract_params(config)).items():
        shape = tuple(nn.unbox(leaf).shape)
        table[hf_name(path)] = Entry(path, shape, _hf_shape(path, shape, config))
    return table


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape it must have in a checkpoint of this config."""
    return {name: entry.hf_shape for name, entry in conversion_table(config).items()}


def _to_ours(array: np.ndarray, entry: Entry) -> np.ndarray:
    if entry.path[-1] == "kernel":
        return array.reshape(array.shape[0], -1).T.reshape(entry.shape)
    return array.reshape(entry.shape)


def _to_hf(array: np.ndarray, entry: Entry) -> np.ndarray:
    if entry.path[-1] == "kernel":
        fan_in = entry.hf_shape[1] if len(entry.hf_shape) == 2 else int(np.prod(entry.hf_shape[1:]))
        return array.reshape(fan_in, -1).T.reshape(entry.hf_shape)
    return array.reshape(entry.hf_shape)


def check_params_match(params: dict[str, Any], config: ModelConfig, where: str) -> None:
    """Raises ValueError naming the first param whose presence or shape differs from `config`."""
    expected = {entry.path: entry.shape for entry in conversion_table(config).values()}
    found = {path: tuple(np.shape(nn.unbox(leaf))) for path, leaf in _flatten(params).items()}
    for path in sorted(set(expected) | set(found)):
        name = hf_name(path)
        if path not in found:
            raise ValueError(f"{where}: parameter {name} is missing (expected shape {expected[path]})")
        if path not in expected:
            raise ValueError(f"{where}: unexpected parameter {name} {found[path]} for this config")
        if found[path] != expected[path]:
            raise ValueError(f"{where}: parameter {name} has shape {found[path]}, expected {expected[path]}")


def _unflatten(flat: dict[Path, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _param_dtype(config: ModelConfig, path: Path):
    if isinstance(config, VLConfig):
        return jnp.dtype(config.vision.param_dtype) if path[0] == "visual" else config.text.jnp_param_dtype
    return config.jnp_param_dtype


def load_hf_params(
    checkpoint_dir: str,
    config: ModelConfig,
    *,
    shardings: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Streams a HF safetensors checkpoint into the param pytree.

    Args:
      checkpoint_dir: directory with `model.safetensors` or sharded files + index.
      config: the config the checkpoint must match: a VLConfig loads everything; a
        DecoderConfig loads the language model and skips `visual.*` tensors.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params; each
        tensor is placed with it as it is read (works multi-host).
      progress: show a progress bar.

    Returns:
      The param pytree in the config's param dtype(s).

    Raises:
      ValueError: a tensor is missing, unexpected, or has the wrong shape; the message
        names the tensor, the expected and the found shape.
    """
    table = conversion_table(config)
    text = config.text if isinstance(config, VLConfig) else config
    skip_prefixes = () if isinstance(config, VLConfig) else (VISION_PREFIX,)
    flat_shardings = _flatten(shardings) if shardings is not None else {}
    loaded: dict[Path, jax.Array] = {}
    skipped = 0
    for name, array in tqdm(_iter_checkpoint(checkpoint_dir), desc=f"loading {checkpoint_dir}", unit="tensor",
                            disable=not progress, total=len(safetensors_io.tensor_shapes(checkpoint_dir))):
        name = canonical_hf_name(name)
        if name.startswith(skip_prefixes) or _NON_PARAMETERS.search(name) or (
                name == "lm_head.weight" and text.tie_word_embeddings):  # some tied checkpoints store it twice
            skipped += 1
            continue
        if name not in table:
            raise ValueError(f"{checkpoint_dir}: unexpected tensor {name} {tuple(array.shape)}: the config "
                             f"(num_layers={text.num_layers}, tie_word_embeddings={text.tie_word_embeddings}) "
                             "has no such parameter")
        entry = table[name]
        if tuple(array.shape) != entry.hf_shape:
            raise ValueError(f"{checkpoint_dir}: tensor {name} has shape {tuple(array.shape)}, "
                             f"expected {entry.hf_shape} for this config")
        value = np.asarray(_to_ours(array, entry), dtype=_param_dtype(config, entry.path))
        loaded[entry.path] = _place(value, flat_shardings.get(entry.path))
    missing = sorted(name for name, entry in table.items() if entry.path not in loaded)
    if missing:
        raise ValueError(f"{checkpoint_dir}: {len(missing)} tensors missing from the checkpoint, e.g. "
                         f"{missing[:5]}")
    logging.info("loaded %d tensors from %s (%d skipped)", len(loaded), checkpoint_dir, skipped)
    return _unflatten(loaded)


def _iter_checkpoint(checkpoint_dir: str) -> Iterator[tuple[str, np.ndarray]]:
    for path in safetensors_io.checkpoint_files(checkpoint_dir):
        yield from safetensors_io.iter_file_tensors(path)


def _place(value: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def iter_hf_tensors(params: dict[str, Any], config: ModelConfig,
                    dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every param, gathering one tensor at a time.

    Args:
      params: param pytree of `config` (possibly sharded).
      config: its config.
      dtype: optional output dtype (e.g. ml_dtypes.bfloat16); default keeps each dtype.
    """
    check_params_match(params, config, where="params")
    table = {entry.path: entry for entry in conversion_table(config).values()}
    for path, leaf in _flatten(params).items():
        array = np.asarray(jax.device_get(nn.unbox(leaf)))
        if dtype is not None:
            array = array.astype(dtype)
        yield hf_name(path), _to_hf(array, table[path])


def save_hf_checkpoint(
    params: dict[str, Any],
    config: ModelConfig,
    hf_config: dict[str, Any],
    out_dir: str,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes params as a HF checkpoint directory that `from_pretrained` loads.

    Args:
      params: param pytree of `config`.
      config: its config.
      hf_config: the `config.json` to write (e.g. the source checkpoint's, or
        `to_hf_config(config)`).
      out_dir: target directory.
      dtype: optional output dtype of every tensor.
      max_shard_bytes: shard size limit.
    """
    tensors = iter_hf_tensors(params, config, dtype)
    count = len(_flatten(params))
    files = safetensors_io.write_checkpoint(
        out_dir, tqdm(tensors, desc=f"writing {out_dir}", unit="tensor", total=count), max_shard_bytes)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    logging.info("wrote %s (%d files)", out_dir, len(files))


def to_hf_config(config: DecoderConfig) -> dict[str, Any]:
    """A `config.json` for a plain causal LM (Qwen2 or Llama) with these hyperparameters.

    Raises:
      ValueError: for mRoPE (Qwen2.5-VL) decoders, whose checkpoint also needs the
        vision tower: export those with the source checkpoint's config.json.
    """
    if config.mrope_section is not None:
        raise ValueError("a Qwen2.5-VL decoder (mrope_section set) is exported with the source config.json "
                         "and the vision tower, not as a standalone causal LM")
    common = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, max_position_embeddings=32768,
        dtype=config.param_dtype)
    if config.qkv_bias and not config.o_bias:
        return dict(common, architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    if config.qkv_bias != config.o_bias:
        raise ValueError("qkv_bias without o_bias is the Qwen2 layout, o_bias without qkv_bias has no HF family")
    return dict(common, architectures=["LlamaForCausalLM"], model_type="llama",
                attention_bias=config.qkv_bias, mlp_bias=False)
