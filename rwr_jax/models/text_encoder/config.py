"""Text-encoder hyperparameters, read from a Hugging Face / sentence-transformers directory.

One frozen dataclass carries the encoder (BERT or XLM-RoBERTa layout) and how its
token states become one vector: pooling ("cls" or "mean"), optional L2 normalisation,
the instruction prepended to queries and the token budget. `from_hf_config` reads a
`config.json`; `read_encoder_config` also reads sentence-transformers' `modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json` and the `prompts` of
`config_sentence_transformers.json` when present (e.g. all-MiniLM-L6-v2: mean pooling,
then Normalize, 256 tokens).

Position ids differ by family, following transformers: BERT numbers every slot
0, 1, 2, ...; (XLM-)RoBERTa numbers only real tokens, starting at pad_token_id + 1,
and gives padding the id pad_token_id.
"""

import dataclasses
import os
from typing import Any

from rwr_jax.models.checkpoint_io import read_json
from rwr_jax.models.numerics import Numerics

BERT_TYPES = ("bert",)
ROBERTA_TYPES = ("xlm-roberta", "roberta")
SUPPORTED_MODEL_TYPES = BERT_TYPES + ROBERTA_TYPES
POOLINGS = ("cls", "mean")
# HF activation name -> use the tanh approximation of GELU.
ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


@dataclasses.dataclass(frozen=True, kw_only=True)
class EncoderConfig(Numerics):
    """Hyperparameters of a BERT / XLM-R encoder and its sentence embedding.

    Attributes:
      vocab_size: V, rows of the word embedding table.
      hidden_size: D, the residual-stream width (and the embedding dimension).
      intermediate_size: F, the feed-forward width.
      num_layers: number of transformer layers.
      num_heads: H, attention heads (D % H == 0).
      max_position_embeddings: rows of the position embedding table.
      type_vocab_size: rows of the token-type (segment) table.
      layer_norm_eps: epsilon of every LayerNorm.
      hidden_act: "gelu" (erf) or "gelu_new" / "gelu_pytorch_tanh" (tanh approximation).
      pad_token_id: id of the padding token.
      position_offset: position id of the first token (XLM-R: pad_token_id + 1).
      positions_from_mask: count positions over real tokens only, padding gets
        position_offset - 1 (XLM-R); False numbers every slot (BERT).
      pooling: "cls" (first real token) or "mean" (masked mean over real tokens).
      normalize: L2-normalise the pooled vector.
      query_instruction: text prepended to every query (BGE: "Represent this sentence
        for searching relevant passages: "); passages get none.
      max_length: token budget per text, special tokens included; defaults to
        max_position_embeddings - position_offset.
      dtype: compute dtype of activations.
      param_dtype: storage dtype of parameters.
      attention_kernel: name in the "attention" registry (see models/attention.py).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    position_offset: int = 0
    positions_from_mask: bool = False
    pooling: str = "cls"
    normalize: bool = True
    query_instruction: str = ""
    max_length: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_kernel: str = "xla"

    def __post_init__(self):
        if self.max_length is None:
            object.__setattr__(self, "max_length", self.max_position_embeddings - self.position_offset)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "max_position_embeddings", "type_vocab_size", "max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EncoderConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"EncoderConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                             f"num_heads ({self.num_heads})")
        if self.max_length + self.position_offset > self.max_position_embeddings:
            raise ValueError(
                f"EncoderConfig.max_length must be <= max_position_embeddings - position_offset = "
                f"{self.max_position_embeddings - self.position_offset}, got {self.max_length}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"EncoderConfig.hidden_act must be one of {sorted(ACTIVATIONS)}, "
                             f"got {self.hidden_act!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EncoderConfig.pooling must be one of {POOLINGS}, got {self.pooling!r}")
        self.check_dtypes()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> EncoderConfig:
    """Builds an EncoderConfig from a parsed Hugging Face `config.json`.

    Args:
      hf: the parsed JSON of a BERT (`model_type` "bert") or XLM-RoBERTa
        ("xlm-roberta"; also "roberta") checkpoint.
      where: a name for error messages (usually the file path).
      **overrides: EncoderConfig fields not in `config.json` (pooling, normalize,
        query_instruction, max_length, dtype, ...). Without them the embedding is
        the L2-normalised CLS state (BGE's recipe).

    Returns:
      The encoder config.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"{where}: position_embedding_type must be 'absolute', got {position_type!r}")
    if hf.get("is_decoder", False):
        raise ValueError(f"{where}: is_decoder=true (a causal model) is not a text encoder")
    pad_token_id = int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0)
    roberta = model_type in ROBERTA_TYPES
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        hidden_act=hf.get("hidden_act", "gelu"),
        pad_token_id=pad_token_id,
        position_offset=pad_token_id + 1 if roberta else 0,
        positions_from_mask=roberta,
    )
    fields.update(overrides)
    return EncoderConfig(**fields)


def _pooling_mode(pooling: dict[str, Any], where: str) -> str:
    """The single pooling mode of a sentence-transformers Pooling config (new or legacy keys)."""
    if pooling.get("include_prompt", True) is False:
        raise ValueError(f"{where}: include_prompt=false (prompt tokens left out of pooling) is not supported")
    if "pooling_mode" in pooling:
        modes = pooling["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [key[len("pooling_mode_"):] for key, on in pooling.items() if key.startswith("pooling_mode_") and on]
    modes = [{"cls_token": "cls", "mean_tokens": "mean"}.get(m, m) for m in modes]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(f"{where}: pooling modes {modes} are not supported; expected exactly one of {POOLINGS}")
    return modes[0]


def sentence_transformers_settings(checkpoint_dir: str) -> dict[str, Any]:
    """EncoderConfig fields set by sentence-transformers files, if the directory has them.

    Returns:
      A dict with some of pooling, normalize, max_length, query_instruction; empty
      when `modules.json` is absent.
    """
    modules_path = os.path.join(checkpoint_dir, "modules.json")
    if not os.path.isfile(modules_path):
        return {}
    modules = read_json(modules_path)
    settings: dict[str, Any] = {"normalize": any(m.get("type", "").endswith("Normalize") for m in modules)}
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            path = os.path.join(checkpoint_dir, module.get("path", ""), "config.json")
            settings["pooling"] = _pooling_mode(read_json(path), path)
    bert_config = os.path.join(checkpoint_dir, "sentence_bert_config.json")
    max_length = read_json(bert_config).get("max_seq_length") if os.path.isfile(bert_config) else None
    if max_length:
        settings["max_length"] = int(max_length)
    st_config = os.path.join(checkpoint_dir, "config_sentence_transformers.json")
    if os.path.isfile(st_config):
        query_prompt = (read_json(st_config).get("prompts") or {}).get("query")
        if query_prompt:
            settings["query_instruction"] = query_prompt
    return settings


def read_encoder_config(checkpoint_dir: str, **overrides: Any) -> EncoderConfig:
    """Reads `<checkpoint_dir>/config.json` plus the sentence-transformers files beside it.

    Args:
      checkpoint_dir: a Hugging Face (or sentence-transformers) model directory.
      **overrides: EncoderConfig fields; they win over both files.

    Returns:
      The encoder config.

    Raises:
      FileNotFoundError: the directory or its `config.json` does not exist.
    """
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"text encoder directory {checkpoint_dir!r} does not exist")
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the text encoder must be a Hugging Face checkpoint directory")
    settings = {**sentence_transformers_settings(checkpoint_dir), **overrides}
    return from_hf_config(read_json(path), where=path, **settings)
