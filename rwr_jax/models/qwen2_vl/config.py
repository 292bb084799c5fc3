"""Decoder hyperparameters, and reading them from a Hugging Face `config.json`.

One frozen dataclass carries everything the language model needs. It can be built
from keyword arguments (tests, presets) or from the `config.json` of a Qwen2,
Qwen2-VL / Qwen2.5-VL (text part) or Llama-family checkpoint, in both the
transformers 4.x layout (flat keys, `rope_theta`, `rope_scaling`) and the 5.x layout
(`text_config`, `rope_parameters`).
"""

import dataclasses
import os
from typing import Any

from rwr_jax.models.checkpoint_io import read_json
from rwr_jax.models.numerics import Numerics

# model_type -> (q/k/v bias, o bias) for families whose bias layout is fixed.
_FIXED_BIAS = {
    "qwen2": (True, False),
    "qwen2_vl": (True, False),
    "qwen2_vl_text": (True, False),
    "qwen2_5_vl": (True, False),
    "qwen2_5_vl_text": (True, False),
}
_LLAMA_FAMILY = ("llama", "mistral")
SUPPORTED_MODEL_TYPES = tuple(_FIXED_BIAS) + _LLAMA_FAMILY


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig(Numerics):
    """Hyperparameters of a Qwen2 / Llama-style decoder-only language model.

    Attributes:
      vocab_size: V, rows of the embedding table and of the LM head.
      hidden_size: D, the residual-stream width.
      intermediate_size: F, the SwiGLU MLP width.
      num_layers: number of decoder blocks.
      num_heads: H, query heads.
      num_kv_heads: K, key/value heads (grouped-query attention, H % K == 0).
      head_dim: per-head width; defaults to D // H.
      rms_norm_eps: epsilon of every RMSNorm.
      rope_theta: rotary base frequency.
      mrope_section: Qwen2-VL multimodal RoPE: how many of the head_dim // 2 rotary
        frequencies follow the (temporal, height, width) position axes. None for
        plain 1-D RoPE.
      qkv_bias: whether q/k/v projections carry a bias (Qwen2: yes).
      o_bias: whether the output projection carries a bias (Llama attention_bias).
      tie_word_embeddings: LM head shares the token embedding matrix.
      dtype: compute dtype of activations ("float32" or "bfloat16").
      param_dtype: storage dtype of parameters.
      attention_kernel: name in the "attention" registry (see models/attention.py).
      attention_query_chunk: queries per attention call (`attention.attend`): a
        prefill, a retrieved block or an update's sequences of T tokens form [chunk, S]
        scores at a time, not [T, S], in the forward pass and in the gradient; 0 = all
        at once.
      remat_policy: rematerialisation of decoder blocks: "none", "full" or
        "dots_saveable" (a `jax.checkpoint_policies` name).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] | None = None
    qkv_bias: bool = True
    o_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_kernel: str = "xla"
    attention_query_chunk: int = 0
    remat_policy: str = "none"

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.mrope_section is not None:
            object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"DecoderConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")
        if not isinstance(self.attention_query_chunk, int) or self.attention_query_chunk < 0:
            raise ValueError(f"DecoderConfig.attention_query_chunk must be an int >= 0 (0 = off), got "
                             f"{self.attention_query_chunk!r}")
        if self.head_dim % 2:
            raise ValueError(f"DecoderConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"DecoderConfig.mrope_section must sum to head_dim // 2 = {self.head_dim // 2}, "
                f"got {self.mrope_section} (sum {sum(self.mrope_section)})")
        self.check_dtypes()
        if self.remat_policy not in ("none", "full", "dots_saveable", "nothing_saveable"):
            raise ValueError(
                "DecoderConfig.remat_policy must be one of 'none', 'full', 'dots_saveable', "
                f"'nothing_saveable', got {self.remat_policy!r}")


def _rope_settings(text: dict[str, Any], where: str) -> tuple[float, tuple[int, ...] | None]:
    """Reads rope theta and mRoPE sections from either transformers layout."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{where}: rope type {rope_type!r} is not supported (only default RoPE / mRoPE)")
    theta = rope.get("rope_theta", text.get("rope_theta", 10_000.0))
    section = rope.get("mrope_section")
    return float(theta), tuple(section) if section is not None else None


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> DecoderConfig:
    """Builds a DecoderConfig from a parsed Hugging Face `config.json`.

    Args:
      hf: the parsed JSON.
      where: a name for error messages (usually the file path).
      **overrides: DecoderConfig fields that are not in the checkpoint (dtype,
        param_dtype, attention_kernel, remat_policy).

    Returns:
      The decoder config of the (text part of the) checkpoint.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    # transformers 5 nests the language model under text_config; 4.x kept it flat.
    text = {**hf, **hf.get("text_config", {})}
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act must be 'silu', got {text['hidden_act']!r}")
    if text.get("mlp_bias", False):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if text.get("use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported (sliding-window attention)")
    if model_type in _FIXED_BIAS:
        qkv_bias, o_bias = _FIXED_BIAS[model_type]
    else:
        qkv_bias = o_bias = bool(text.get("attention_bias", False))
    theta, section = _rope_settings(text, where)
    if model_type.startswith("qwen2_") and section is None:
        section = (16, 24, 24)  # transformers' default for Qwen2-VL models.
    num_heads = text["num_attention_heads"]
    return DecoderConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // num_heads,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        mrope_section=section,
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        **overrides,
    )


def read_hf_config(checkpoint_dir: str, **overrides: Any) -> tuple[DecoderConfig, dict[str, Any]]:
    """Reads `<checkpoint_dir>/config.json`.

    Returns:
      (decoder config, the raw JSON dict), the latter kept for export.
    """
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: model.checkpoint must be a Hugging Face checkpoint directory")
    hf = read_json(path)
    return from_hf_config(hf, where=path, **overrides), hf
