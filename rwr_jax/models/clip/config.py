"""CLIP dual-encoder hyperparameters, from a Hugging Face or an open_clip checkpoint.

One frozen dataclass per tower (`ClipVisionConfig`, `ClipTextConfig`) and one for the
pair (`ClipConfig`: projection width, logit scale init, dtypes, attention kernel and
the image normalisation the checkpoint was trained with). `from_hf_config` reads a
transformers `CLIPModel` `config.json`; `read_clip_config` also reads the
`preprocessor_config.json` beside it (mean / std / crop size).

`open_clip_vision_config` reads the vision part of an open_clip `open_clip_config.json`
whose image tower is a timm ViT (BiomedCLIP: `vit_base_patch16_224`). timm ViTs differ
from OpenAI CLIP's in three switches, which are fields here: the patch convolution has
a bias (`patch_bias`), there is no LayerNorm before the blocks (`pre_layernorm`), and
LayerNorm eps is 1e-6 with erf GELU.
"""

import dataclasses
import os
from typing import Any

from rwr_jax.models.checkpoint_io import read_json
from rwr_jax.models.numerics import Numerics
from rwr_jax.models.text_encoder.config import EncoderConfig
from rwr_jax.models.text_encoder.config import from_hf_config as encoder_from_hf_config

# HF activation names we implement (ACT2FN): quick_gelu x*sigmoid(1.702x), erf GELU, tanh GELU.
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# timm ViT names (open_clip `timm_model_name`) -> the ClipVisionConfig fields they fix.
TIMM_VITS = {
    "vit_base_patch16_224": dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                                 patch_size=16, image_size=224),
    "vit_base_patch32_224": dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                                 patch_size=32, image_size=224),
    "vit_large_patch16_224": dict(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
                                  patch_size=16, image_size=224),
}


def _check_positive(owner: str, obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _TowerConfig:
    """Fields shared by both towers: a pre-LN transformer stack."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def _check(self, owner: str, extra: tuple[str, ...]) -> None:
        _check_positive(owner, self, ("hidden_size", "intermediate_size", "num_layers", "num_heads") + extra)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{owner}.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{owner}.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipVisionConfig(_TowerConfig):
    """The ViT image tower (HF `vision_model`).

    Attributes:
      hidden_size, intermediate_size, num_layers, num_heads: width, MLP width, blocks, heads.
      layer_norm_eps: epsilon of every LayerNorm.
      hidden_act: MLP activation (one of ACTIVATIONS).
      image_size: side of the square input in pixels (a multiple of patch_size).
      patch_size: side of a patch; the tower sees (image_size / patch_size)**2 + 1 tokens.
      num_channels: input channels (3).
      patch_bias: the patch convolution has a bias (timm: yes; OpenAI CLIP: no).
      pre_layernorm: LayerNorm on the embeddings before the blocks (OpenAI CLIP:
        `pre_layrnorm`; timm ViT: none).
    """

    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    patch_bias: bool = False
    pre_layernorm: bool = True

    def __post_init__(self):
        self._check("ClipVisionConfig", ("image_size", "patch_size", "num_channels"))
        if self.image_size % self.patch_size:
            raise ValueError(f"ClipVisionConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return self.grid_size ** 2 + 1

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size ** 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipTextConfig(_TowerConfig):
    """The causal text tower (HF `text_model`).

    Attributes:
      vocab_size: rows of the token embedding table.
      max_position_embeddings: rows of the position table (the longest text, 77).
      eos_token_id: the pooled state is the first position holding this id; the
        legacy value 2 means "position of the largest id" (transformers keeps both).
      pad_token_id: id used to pad batches (host side only).
    """

    vocab_size: int
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    pad_token_id: int = 1

    def __post_init__(self):
        self._check("ClipTextConfig", ("vocab_size", "max_position_embeddings"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipConfig(Numerics):
    """A CLIP dual encoder: both towers, the shared embedding space and numerics.

    Attributes:
      vision: the image tower.
      text: the text tower, or None for an image-only model (CDIR's image index).
      projection_dim: P, width of the shared embedding space.
      logit_scale_init: initial log of the logit temperature (2.6592 = log(1 / 0.07)).
      image_mean, image_std: per-channel (R, G, B) normalisation of pixels in [0, 1].
      dtype: compute dtype of activations.
      param_dtype: storage dtype of parameters.
      attention_kernel: name in the "attention" registry (see models/attention.py).
    """

    vision: ClipVisionConfig
    text: ClipTextConfig | None = None
    projection_dim: int = 512
    logit_scale_init: float = 2.6592
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_kernel: str = "xla"

    def __post_init__(self):
        _check_positive("ClipConfig", self, ("projection_dim",))
        for name in ("image_mean", "image_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != self.vision.num_channels:
                raise ValueError(f"ClipConfig.{name} must hold {self.vision.num_channels} values, got {value}")
            object.__setattr__(self, name, value)
        self.check_dtypes()


def _tower_fields(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    get = lambda key: hf.get(key, defaults[key])  # noqa: E731
    return dict(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                layer_norm_eps=float(get("layer_norm_eps")), hidden_act=get("hidden_act"))


# transformers' CLIPVisionConfig / CLIPTextConfig defaults, for keys a config.json leaves out.
_HF_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           layer_norm_eps=1e-5, hidden_act="quick_gelu", image_size=224, patch_size=32,
                           num_channels=3)
_HF_TEXT_DEFAULTS = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                         layer_norm_eps=1e-5, hidden_act="quick_gelu", vocab_size=49408,
                         max_position_embeddings=77, eos_token_id=49407, pad_token_id=1)


def from_hf_config(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> ClipConfig:
    """Builds a ClipConfig from a parsed transformers `CLIPModel` `config.json`.

    Args:
      hf: the parsed JSON (`model_type` "clip", with `vision_config` / `text_config`).
      where: a name for error messages (usually the file path).
      **overrides: ClipConfig fields (dtype, image_mean, text=None, ...).

    Returns:
      The config.
    """
    if hf.get("model_type") != "clip":
        raise ValueError(f"{where}: model_type must be 'clip', got {hf.get('model_type')!r}")
    vision = hf.get("vision_config") or hf.get("vision_config_dict") or {}
    text = hf.get("text_config") or hf.get("text_config_dict") or {}
    for key in ("image_size", "patch_size"):
        if not isinstance(vision.get(key, 1), int):
            raise ValueError(f"{where}: vision_config.{key} must be an int (square images), got {vision[key]!r}")
    vd, td = _HF_VISION_DEFAULTS, _HF_TEXT_DEFAULTS
    fields = dict(
        vision=ClipVisionConfig(**_tower_fields(vision, vd), image_size=vision.get("image_size", vd["image_size"]),
                                patch_size=vision.get("patch_size", vd["patch_size"]),
                                num_channels=vision.get("num_channels", vd["num_channels"])),
        text=ClipTextConfig(**_tower_fields(text, td), vocab_size=text.get("vocab_size", td["vocab_size"]),
                            max_position_embeddings=text.get("max_position_embeddings",
                                                             td["max_position_embeddings"]),
                            eos_token_id=int(text.get("eos_token_id", td["eos_token_id"])),
                            pad_token_id=int(text.get("pad_token_id", td["pad_token_id"]))),
        projection_dim=hf.get("projection_dim", 512),
        logit_scale_init=float(hf.get("logit_scale_init_value", 2.6592)))
    fields.update(overrides)
    return ClipConfig(**fields)


def read_clip_config(checkpoint_dir: str, **overrides: Any) -> ClipConfig:
    """Reads `<checkpoint_dir>/config.json` and, if present, `preprocessor_config.json`.

    The preprocessor's `image_mean` / `image_std` become the config's; its crop size
    must equal the vision tower's image size.

    Raises:
      FileNotFoundError: the directory or its `config.json` does not exist.
      ValueError: a malformed file, or a crop size the tower cannot take.
    """
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the CLIP model must be a Hugging Face checkpoint directory")
    pre_path = os.path.join(checkpoint_dir, "preprocessor_config.json")
    pre = read_json(pre_path) if os.path.isfile(pre_path) else {}
    settings = {k: tuple(pre[k]) for k in ("image_mean", "image_std") if k in pre}
    config = from_hf_config(read_json(path), where=path, **{**settings, **overrides})
    crop = pre.get("crop_size")
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if crop is not None and crop != config.vision.image_size:
        raise ValueError(f"{pre_path}: crop_size {crop} differs from vision_config.image_size "
                         f"{config.vision.image_size}; position embeddings are not interpolated")
    return config


def open_clip_vision_config(open_clip_config: dict[str, Any], where: str = "open_clip_config.json",
                            **overrides: Any) -> ClipConfig:
    """An image-only ClipConfig for an open_clip model whose image tower is a timm ViT.

    Args:
      open_clip_config: parsed `open_clip_config.json` (`model_cfg.embed_dim`,
        `model_cfg.vision_cfg.timm_model_name` in TIMM_VITS, `timm_pool` "" or "token",
        `timm_proj` "linear"; `preprocess_cfg.mean` / `std`).
      where: a name for error messages.
      **overrides: ClipConfig fields.

    Returns:
      ClipConfig(text=None) with timm's switches: patch bias, no pre-LN, eps 1e-6, erf GELU.
    """
    model_cfg = open_clip_config.get("model_cfg", open_clip_config)
    vision = model_cfg.get("vision_cfg", {})
    name = vision.get("timm_model_name")
    if name not in TIMM_VITS:
        raise ValueError(f"{where}: vision_cfg.timm_model_name must be one of {sorted(TIMM_VITS)}, got {name!r}")
    if vision.get("timm_pool", "") not in ("", "token") or vision.get("timm_proj", "linear") != "linear":
        raise ValueError(f"{where}: only timm_pool '' / 'token' (class token) with timm_proj 'linear' is "
                         f"supported, got {vision.get('timm_pool')!r} / {vision.get('timm_proj')!r}")
    if vision.get("timm_proj_bias", False):
        raise ValueError(f"{where}: vision_cfg.timm_proj_bias=true is not supported (CLIP projections have no bias)")
    fields = dict(TIMM_VITS[name], image_size=vision.get("image_size", TIMM_VITS[name]["image_size"]))
    preprocess = open_clip_config.get("preprocess_cfg", {})
    settings = dict(
        vision=ClipVisionConfig(**fields, layer_norm_eps=1e-6, hidden_act="gelu", patch_bias=True,
                                pre_layernorm=False),
        text=None, projection_dim=model_cfg["embed_dim"],
        image_mean=tuple(preprocess.get("mean", OPENAI_CLIP_MEAN)),
        image_std=tuple(preprocess.get("std", OPENAI_CLIP_STD)))
    settings.update(overrides)
    return ClipConfig(**settings)


def open_clip_text_encoder_config(bert_config: dict[str, Any], open_clip_config: dict[str, Any] | None = None,
                                  where: str = "config.json", **overrides: Any) -> EncoderConfig:
    """The BERT config of an open_clip HF text tower (BiomedCLIP: PubMedBERT, CLS, no normalisation).

    Args:
      bert_config: parsed `config.json` of the tower's `hf_model_name` (the open_clip
        checkpoint does not carry it).
      open_clip_config: parsed `open_clip_config.json`; its `text_cfg` must use
        `hf_pooler_type` "cls_last_hidden_state_pooler" and `hf_proj_type` "mlp", and
        its `context_length` becomes max_length.
      where: a name for error messages.
      **overrides: EncoderConfig fields.
    """
    text_cfg = ((open_clip_config or {}).get("model_cfg", open_clip_config or {})).get("text_cfg", {})
    pooler = text_cfg.get("hf_pooler_type", "cls_last_hidden_state_pooler")
    proj = text_cfg.get("hf_proj_type", "mlp")
    if pooler != "cls_last_hidden_state_pooler" or proj != "mlp":
        raise ValueError(f"{where}: text_cfg hf_pooler_type / hf_proj_type must be 'cls_last_hidden_state_pooler' / "
                         f"'mlp', got {pooler!r} / {proj!r}")
    settings = dict(pooling="cls", normalize=False)
    if "context_length" in text_cfg:
        settings["max_length"] = int(text_cfg["context_length"])
    return encoder_from_hf_config(bert_config, where=where, **{**settings, **overrides})
