"""Hugging Face BERT / XLM-R checkpoint -> text-encoder params, one tensor at a time.

The model-agnostic machinery (table, transforms, streaming load) is
`rwr_jax.models.hf_conversion`; this module supplies what is specific to the encoder:
  - kernel shapes: HF Linear weight [out, in] <-> `[D, H, head_dim]` for
    query/key/value, `[H, head_dim, D]` for attention.output.dense;
  - names: checkpoints of task models carry the encoder under `bert.` / `roberta.` and
    heads we do not use (`pooler.*`, `cls.*`, `lm_head.*`); the prefix is stripped and
    the heads are skipped (logged). Old checkpoints name LayerNorm params `gamma` / `beta`.
Weights are read from safetensors or, without torch, from `pytorch_model.bin`
(`rwr_jax.models.checkpoint_io`).
"""

import re
from typing import Any

import jax
import jax.numpy as jnp

from rwr_jax.models import checkpoint_io, hf_conversion
from rwr_jax.models.hf_conversion import Entry, Path, Shape
from rwr_jax.models.text_encoder.config import EncoderConfig
from rwr_jax.models.text_encoder.model import TextEncoderModel

# Prefixes of the encoder inside task models (BertForMaskedLM, XLMRobertaForMaskedLM, ...)
# and the LayerNorm param names of old checkpoints.
_ALIASES = ((re.compile(r"^(bert|roberta)\."), ""), (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"),
            (re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"))
# Heads and buffers that are no part of the encoder.
_SKIPPED = re.compile(r"^(pooler\.|cls\.|lm_head\.|embeddings\.(position_ids|token_type_ids)$)")


def canonical_hf_name(name: str) -> str:
    """Strips a `bert.` / `roberta.` prefix and renames LayerNorm `gamma` / `beta`."""
    return hf_conversion.apply_aliases(name, _ALIASES)


def abstract_params(config: EncoderConfig) -> dict[str, Any]:
    """Shapes/dtypes of the encoder params (no memory), boxed with logical axis names."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: TextEncoderModel(config).init(jax.random.key(0), tokens, tokens == 0))["params"]


def _kernel_hf_shape(path: Path, shape: Shape) -> Shape:
    # attention.output.dense reads [heads, head_dim]; output.dense of the MLP one axis.
    n_in = 2 if path[-3:-1] == ("output", "dense") and len(shape) == 3 else 1
    return hf_conversion.linear_hf_shape(shape, n_in)


def conversion_table(config: EncoderConfig) -> dict[str, Entry]:
    """HF tensor name -> Entry (our param path, our shape, HF shape), for every encoder parameter."""
    return hf_conversion.build_table(abstract_params(config), _kernel_hf_shape)


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
    return hf_conversion.load_params(
        checkpoint_io.iter_tensors(checkpoint_io.weight_files(checkpoint_dir)), conversion_table(config),
        source=checkpoint_dir, param_dtype=lambda path: config.jnp_param_dtype, canonical_name=canonical_hf_name,
        skip=lambda name: bool(_SKIPPED.search(name)), config_summary=f"num_layers={config.num_layers}",
        shardings=shardings)
