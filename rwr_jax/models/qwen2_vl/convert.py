"""Qwen2 / Qwen2.5-VL Hugging Face checkpoint <-> param pytree, one tensor at a time.

The model-agnostic machinery (table, transforms, streaming load) is
`rwr_jax.models.hf_conversion`; this module supplies what is specific to these models:
  - kernel shapes: HF Linear weight [out, in] <-> our einsum kernel (`[D, H, head_dim]`
    for q/k/v, `[H, head_dim, D]` for output projections, `[D, 3, H, head_dim]` for
    the vision qkv); the vision patch Conv3d weight [D, C, T, p, p] is flattened to
    the linear map it is;
  - names: those written by transformers 5 in memory (`model.language_model.*`,
    `model.visual.*`) are accepted as aliases of the on-disk layout (`model.*`,
    `visual.*`), which is what we write back; rotary buffers, a tied `lm_head` and,
    for a text-only config, the vision tower are skipped;
  - export: `save_hf_checkpoint` and `to_hf_config`.
"""

import functools
import json
import os
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from rwr_jax.models import checkpoint_io, hf_conversion
from rwr_jax.models.hf_conversion import Entry, Path, Shape
from rwr_jax.models.qwen2_vl.config import DecoderConfig
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.models.qwen2_vl.model import VisionLanguageLM, VLConfig
from rwr_jax.models.qwen2_vl.vision import VisionInputs

ModelConfig = DecoderConfig | VLConfig

# transformers 5 in-memory prefixes -> the on-disk layout of released checkpoints.
_ALIASES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))
# Tensors that carry no parameters (old checkpoints saved rotary buffers).
_NON_PARAMETERS = re.compile(r"\.rotary_emb\.inv_freq$")
# Tensors of the vision tower; a text-only DecoderConfig skips them.
VISION_PREFIX = "visual."


def canonical_hf_name(name: str) -> str:
    """Maps transformers-5 in-memory names onto the on-disk checkpoint layout."""
    return hf_conversion.apply_aliases(name, _ALIASES)


def build_model(config: ModelConfig) -> DecoderLM:
    """The Linen model of a config: DecoderLM, or VisionLanguageLM for a VLConfig."""
    return VisionLanguageLM.from_config(config) if isinstance(config, VLConfig) else DecoderLM(config)


def _init_fn(config: ModelConfig):
    """key -> boxed params, with the smallest inputs that touch every parameter."""
    model = build_model(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    kwargs = {}
    if isinstance(config, VLConfig):
        unit = config.vision.merge_unit
        kwargs["images"] = VisionInputs(
            patches=jnp.zeros((1, unit, config.vision.patch_dim)), positions=jnp.zeros((1, unit, 2), jnp.int32),
            window_ids=jnp.zeros((1, unit), jnp.int32), patch_mask=jnp.ones((1, unit), bool))
    return lambda key: model.init(key, tokens, tokens, tokens >= 0, **kwargs)["params"]


def abstract_params(config: ModelConfig) -> dict[str, Any]:
    """Shapes/dtypes of the params (no memory), boxed with logical axis names."""
    return jax.eval_shape(_init_fn(config), jax.random.key(0))


def init_params(config: ModelConfig, seed: int, shardings: Any = None) -> dict[str, Any]:
    """Random params (the models' initialisers), unboxed, optionally created sharded."""
    init = _init_fn(config)
    return jax.jit(lambda key: nn.unbox(init(key)), out_shardings=shardings)(jax.random.key(seed))


def _kernel_hf_shape(path: Path, shape: Shape, config: ModelConfig) -> Shape:
    if path[-3:-1] == ("patch_embed", "proj"):
        v = config.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    # Output projections of attention read [heads, head_dim]; everything else one axis.
    n_in = 2 if path[-2] == "o_proj" or path[-3:-1] == ("attn", "proj") else 1
    return hf_conversion.linear_hf_shape(shape, n_in)


def conversion_table(config: ModelConfig) -> dict[str, Entry]:
    """HF tensor name -> Entry, for every parameter of the model."""
    return hf_conversion.build_table(abstract_params(config), functools.partial(_kernel_hf_shape, config=config))


def expected_hf_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> the shape it must have in a checkpoint of this config."""
    return {name: entry.hf_shape for name, entry in conversion_table(config).items()}


def check_params_match(params: dict[str, Any], config: ModelConfig, where: str) -> None:
    """Raises ValueError naming the first param whose presence or shape differs from `config`."""
    hf_conversion.check_params_match(params, conversion_table(config), where)


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
      FileNotFoundError: the directory has no safetensors weights.
      ValueError: a tensor is missing, unexpected, or has the wrong shape; the message
        names the tensor, the expected and the found shape.
    """
    text = config.text if isinstance(config, VLConfig) else config
    skip_prefixes = () if isinstance(config, VLConfig) else (VISION_PREFIX,)

    def skip(name: str) -> bool:
        return bool(name.startswith(skip_prefixes) or _NON_PARAMETERS.search(name) or (
            name == "lm_head.weight" and text.tie_word_embeddings))  # some tied checkpoints store it twice

    tensors = tqdm(checkpoint_io.iter_tensors(checkpoint_io.checkpoint_files(checkpoint_dir)),
                   desc=f"loading {checkpoint_dir}", unit="tensor", disable=not progress,
                   total=len(checkpoint_io.tensor_shapes(checkpoint_dir)))
    return hf_conversion.load_params(
        tensors, conversion_table(config), source=checkpoint_dir, param_dtype=functools.partial(_param_dtype, config),
        canonical_name=canonical_hf_name, skip=skip, shardings=shardings,
        config_summary=f"num_layers={text.num_layers}, tie_word_embeddings={text.tie_word_embeddings}")


def iter_hf_tensors(params: dict[str, Any], config: ModelConfig,
                    dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every param, gathering one tensor at a time.

    Args:
      params: param pytree of `config` (possibly sharded).
      config: its config.
      dtype: optional output dtype (e.g. ml_dtypes.bfloat16); default keeps each dtype.
    """
    return hf_conversion.iter_hf_tensors(params, conversion_table(config), dtype)


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
    count = len(hf_conversion.flatten_params(params))
    files = checkpoint_io.write_checkpoint(
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


def vl_to_hf_config(config: VLConfig) -> dict[str, Any]:
    """A Qwen2.5-VL `config.json` (transformers 5 layout) for these hyperparameters."""
    text, vision = config.text, config.vision
    text_config = dict(
        to_hf_config(text.replace(mrope_section=None)), model_type="qwen2_5_vl_text",
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta,
                         "mrope_section": list(text.mrope_section)})
    for key in ("architectures", "tie_word_embeddings", "dtype"):
        text_config.pop(key)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "text_config": text_config, "tie_word_embeddings": text.tie_word_embeddings, "dtype": text.param_dtype,
        "image_token_id": config.image_token_id, "vision_start_token_id": config.vision_start_token_id,
        "vision_end_token_id": 151653, "video_token_id": 151656,
        "vision_config": {
            "model_type": "qwen2_5_vl_vision", "depth": vision.depth, "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size, "num_heads": vision.num_heads,
            "out_hidden_size": vision.out_hidden_size, "patch_size": vision.patch_size,
            "temporal_patch_size": vision.temporal_patch_size, "spatial_merge_size": vision.spatial_merge_size,
            "window_size": vision.window_size, "fullatt_block_indexes": list(vision.fullatt_block_indexes),
            "in_channels": vision.in_channels, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta}},
    }
