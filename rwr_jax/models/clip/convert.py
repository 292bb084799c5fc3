"""CLIP checkpoints -> params, one tensor at a time: transformers `CLIPModel` and open_clip.

transformers `CLIPModel` (safetensors, or `pytorch_model.bin` read without torch): the
table comes from `rwr_jax.models.hf_conversion`, with what is CLIP-specific here: the
patch Conv2d weight `[D, C, p, p]` is the linear map of a flattened patch (our kernel
`[C * p * p, D]`), `self_attn.out_proj` reads `[heads, head_dim]`, and two params carry
no `.weight` suffix (`vision_model.embeddings.class_embedding`, `logit_scale`). An
image-only config (text=None) skips `text_model.*`, `text_projection.*` and `logit_scale`.

open_clip BiomedCLIP (`open_clip_pytorch_model.bin` / `open_clip_model.safetensors`):
  image tower = timm ViT-B/16 (`visual.trunk.*`) + linear head, loaded into
  `ClipImageModel` with `config.open_clip_vision_config` (patch bias, no pre-LN,
  eps 1e-6, erf GELU) through OPEN_CLIP_VISION_RENAMES plus one split:

    visual.trunk.cls_token [1, 1, D]           -> vision_model.embeddings.class_embedding [D]
    visual.trunk.pos_embed [1, 1 + L, D]       -> vision_model.embeddings.position_embedding.weight
    visual.trunk.patch_embed.proj.{weight,bias} -> vision_model.embeddings.patch_embedding.*
    visual.trunk.blocks.i.norm1 / norm2        -> vision_model.encoder.layers.i.layer_norm1 / 2
    visual.trunk.blocks.i.attn.qkv [3D, D]     -> rows [0:D] q_proj, [D:2D] k_proj, [2D:3D] v_proj
                                                  (weight and bias; timm reshapes qkv to (3, H, hd))
    visual.trunk.blocks.i.attn.proj            -> ...layers.i.self_attn.out_proj
    visual.trunk.blocks.i.mlp.fc1 / fc2        -> ...layers.i.mlp.fc1 / fc2
    visual.trunk.norm (LN over all tokens; only the class token is used)
                                               -> vision_model.post_layernorm
    visual.head.proj.weight [P, D]             -> visual_projection.weight

  text tower = PubMedBERT (`text.transformer.*`, HF BERT names) + MLP head
  (`text.proj.0.weight`, `text.proj.2.weight`), loaded into `OpenClipTextTower` by
  dropping the `text.` prefix: its params are our BERT port's names under
  `transformer.` and `proj_0` / `proj_2`. Skipped: `text.transformer.pooler.*` (BERT's
  pooler, unused by open_clip's CLS pooler) and position-id buffers. The BERT
  hyperparameters are not in the open_clip checkpoint: they come from the
  `config.json` of its `hf_model_name` (BiomedBERT base uncased: 12 layers, 768 wide,
  vocab 30522), supplied locally (`config.open_clip_text_encoder_config`), and so does
  its WordPiece tokenizer (uncased, context 256, attention mask = ids != pad id 0).
  Not checked against open_clip itself (not installed here): the tests check this
  mapping against hand-written open_clip names/shapes and against re-implementations
  of timm's ViT forward and transformers' BertModel + the MLP head.
"""

import functools
import json
import os
import re
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.models import checkpoint_io, hf_conversion
from rwr_jax.models.clip.config import ClipConfig
from rwr_jax.models.clip.model import ClipImageModel, ClipModel, OpenClipTextTower
from rwr_jax.models.hf_conversion import Entry, Path, Shape
from rwr_jax.models.text_encoder.config import EncoderConfig

# Params whose HF name is their full path, without a `.weight` suffix.
_UNSUFFIXED = ("class_embedding", "logit_scale")
# Buffers some checkpoints store; never parameters.
_BUFFERS = re.compile(r"(^|\.)position_ids$")
_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")

OPEN_CLIP_VISION_RENAMES = (
    (re.compile(r"^visual\.trunk\.cls_token$"), "vision_model.embeddings.class_embedding"),
    (re.compile(r"^visual\.trunk\.pos_embed$"), "vision_model.embeddings.position_embedding.weight"),
    (re.compile(r"^visual\.trunk\.patch_embed\.proj\.(weight|bias)$"), r"vision_model.embeddings.patch_embedding.\1"),
    (re.compile(r"^visual\.trunk\.blocks\.(\d+)\.norm([12])\.(weight|bias)$"),
     r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (re.compile(r"^visual\.trunk\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$"),
     r"vision_model.encoder.layers.\1.self_attn.out_proj.\2"),
    (re.compile(r"^visual\.trunk\.blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"),
     r"vision_model.encoder.layers.\1.mlp.\2.\3"),
    (re.compile(r"^visual\.trunk\.norm\.(weight|bias)$"), r"vision_model.post_layernorm.\1"),
    (re.compile(r"^visual\.head\.proj\.weight$"), "visual_projection.weight"),
)
_OPEN_CLIP_QKV = re.compile(r"^visual\.trunk\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_OPEN_CLIP_TEXT_SKIPPED = re.compile(r"^text\.transformer\.(pooler\.|embeddings\.(position_ids|token_type_ids)$)")


def _hf_name(path: Path) -> str:
    if path[-1] in _UNSUFFIXED:
        return hf_conversion.hf_name(path + ("kernel",))[:-len(".weight")]
    return hf_conversion.hf_name(path)


def _keyed(table: dict[str, Entry]) -> dict[str, Entry]:
    return {_hf_name(entry.path): entry for entry in table.values()}


def abstract_params(config: ClipConfig) -> dict[str, Any]:
    """Shapes/dtypes of the params (no memory), boxed: ClipModel's, or ClipImageModel's if config.text is None."""
    v = config.vision
    pixels = jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
    if config.text is None:
        return jax.eval_shape(lambda: ClipImageModel(config).init(jax.random.key(0), pixels))["params"]
    tokens = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(lambda: ClipModel(config).init(jax.random.key(0), pixels, tokens, tokens == 0))["params"]


def _kernel_hf_shape(path: Path, shape: Shape, config: ClipConfig) -> Shape:
    if path[-2] == "patch_embedding":
        v = config.vision
        return shape[-1], v.num_channels, v.patch_size, v.patch_size
    # Attention output projections (CLIP out_proj, BERT attention.output.dense) read [heads, head_dim].
    return hf_conversion.linear_hf_shape(shape, 2 if len(shape) == 3 and path[-2] in ("out_proj", "dense") else 1)


def conversion_table(config: ClipConfig) -> dict[str, Entry]:
    """HF `CLIPModel` tensor name -> Entry, for every param of `config`'s model."""
    return _keyed(hf_conversion.build_table(abstract_params(config),
                                            functools.partial(_kernel_hf_shape, config=config)))


def load_hf_params(checkpoint_dir: str, config: ClipConfig, *, shardings: Any = None) -> dict[str, Any]:
    """Streams a transformers `CLIPModel` checkpoint into the param pytree.

    Args:
      checkpoint_dir: directory with `model.safetensors` (or shards + index), else
        `pytorch_model.bin`.
      config: the config it must match; text=None loads the image side only.
      shardings: optional pytree of `jax.sharding.Sharding` matching the params.

    Returns:
      The param pytree in `config.param_dtype`.

    Raises:
      FileNotFoundError: the directory has no weights.
      ValueError: a tensor is missing, unexpected or has the wrong shape (named).
    """
    image_only = config.text is None
    return hf_conversion.load_params(
        checkpoint_io.iter_tensors(checkpoint_io.weight_files(checkpoint_dir)), conversion_table(config),
        source=checkpoint_dir, param_dtype=lambda path: config.jnp_param_dtype,
        skip=lambda name: bool(_BUFFERS.search(name)) or (image_only and name.startswith(_TEXT_PREFIXES)),
        config_summary=f"vision layers={config.vision.num_layers}, image_only={image_only}", shardings=shardings)


def to_hf_config(config: ClipConfig) -> dict[str, Any]:
    """The transformers `CLIPModel` `config.json` of a ClipConfig with a text tower."""
    v, t = config.vision, config.text
    if t is None:
        raise ValueError("to_hf_config needs config.text (a CLIPModel has both towers)")
    tower = lambda c: dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,  # noqa: E731
                           num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                           layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act)
    return dict(model_type="clip", architectures=["CLIPModel"], projection_dim=config.projection_dim,
                logit_scale_init_value=config.logit_scale_init, torch_dtype=config.param_dtype,
                vision_config=dict(tower(v), image_size=v.image_size, patch_size=v.patch_size,
                                   num_channels=v.num_channels),
                text_config=dict(tower(t), vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
                                 eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id))


def save_hf_checkpoint(params: Any, config: ClipConfig, out_dir: str,
                       hf_config: dict[str, Any] | None = None) -> None:
    """Writes ClipModel params as a transformers `CLIPModel` directory: `model.safetensors`,
    `config.json` (`hf_config`, default `to_hf_config(config)`) and a CLIPImageProcessor
    `preprocessor_config.json` (no tokenizer).

    Only OpenAI-style towers (no patch bias, pre-LN) have a transformers CLIPModel layout.
    """
    if config.text is None or config.vision.patch_bias or not config.vision.pre_layernorm:
        raise ValueError("save_hf_checkpoint needs a CLIPModel-style config (text tower, no patch bias, pre-LN)")
    table = conversion_table(config)
    hf_conversion.check_params_match(params, table, where="params")
    flat = hf_conversion.flatten_params(params)
    tensors = ((name, hf_conversion.to_hf(np.asarray(jax.device_get(hf_conversion.unboxed(flat[entry.path]))), entry))
               for name, entry in table.items())
    checkpoint_io.write_checkpoint(out_dir, tensors)
    size = config.vision.image_size
    preprocessor = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size={"shortest_edge": size},
                        resample=3, do_center_crop=True, crop_size={"height": size, "width": size}, do_rescale=True,
                        rescale_factor=1 / 255, do_normalize=True, image_mean=list(config.image_mean),
                        image_std=list(config.image_std), do_convert_rgb=True)
    files = (("config.json", hf_config or to_hf_config(config)), ("preprocessor_config.json", preprocessor))
    for name, content in files:
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)


def open_clip_vision_tensors(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Renames open_clip timm-ViT image-tower tensors to HF `CLIPModel` names (see the module docstring).

    Fused `attn.qkv` tensors come out as three (q, k, v); class token and positions lose
    their leading size-1 axes. Other tensors (the text tower, `logit_scale`, unknown
    names) pass through unchanged.
    """
    for name, array in tensors:
        qkv = _OPEN_CLIP_QKV.match(name)
        if qkv:
            layer, kind = qkv.groups()
            for part, value in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(array), 3, axis=0)):
                yield f"vision_model.encoder.layers.{layer}.self_attn.{part}.{kind}", value
            continue
        renamed = hf_conversion.apply_aliases(name, OPEN_CLIP_VISION_RENAMES)
        if renamed.endswith("class_embedding"):
            array = array.reshape(array.shape[-1])
        elif renamed.endswith("position_embedding.weight"):
            array = array.reshape(array.shape[-2:])
        yield renamed, array


def load_open_clip_image_params(weights_path: str, config: ClipConfig, *, shardings: Any = None) -> dict[str, Any]:
    """Loads the image tower of an open_clip timm-ViT checkpoint (BiomedCLIP) into ClipImageModel params.

    Args:
      weights_path: `open_clip_pytorch_model.bin` or a `.safetensors` file.
      config: an image-only config, e.g. `open_clip_vision_config(json)`.
      shardings: optional param shardings.

    Raises:
      ValueError: config.text is set, or a `visual.*` tensor is unknown, missing or
        mis-shaped (named as in the checkpoint).
    """
    if config.text is not None:
        raise ValueError("config.text must be None: open_clip's text tower loads with load_open_clip_text_params")
    return hf_conversion.load_params(
        open_clip_vision_tensors(checkpoint_io.iter_tensors([weights_path])), conversion_table(config),
        source=weights_path, param_dtype=lambda path: config.jnp_param_dtype,
        skip=lambda name: not name.startswith(("visual", "vision_model.")),
        config_summary=f"timm ViT, layers={config.vision.num_layers}", shardings=shardings)


def open_clip_text_abstract_params(encoder: EncoderConfig, projection_dim: int) -> dict[str, Any]:
    """Shapes/dtypes of OpenClipTextTower's params, boxed."""
    tokens = jnp.zeros((1, 2), jnp.int32)
    tower = OpenClipTextTower(encoder, projection_dim)
    return jax.eval_shape(lambda: tower.init(jax.random.key(0), tokens, tokens == 0))["params"]


def open_clip_text_table(encoder: EncoderConfig, projection_dim: int) -> dict[str, Entry]:
    """open_clip name (`text.` prefix included) -> Entry, for every OpenClipTextTower param."""
    table = hf_conversion.build_table(open_clip_text_abstract_params(encoder, projection_dim),
                                      functools.partial(_kernel_hf_shape, config=None))
    return {f"text.{name}": entry for name, entry in table.items()}


def load_open_clip_text_params(weights_path: str, encoder: EncoderConfig, projection_dim: int, *,
                               shardings: Any = None) -> dict[str, Any]:
    """Loads open_clip's BERT text tower + MLP head (BiomedCLIP `text.*`) into OpenClipTextTower params.

    Args:
      weights_path: `open_clip_pytorch_model.bin` or a `.safetensors` file.
      encoder: the BERT config (`open_clip_text_encoder_config`).
      projection_dim: P, open_clip's `embed_dim`.
      shardings: optional param shardings.

    Raises:
      ValueError: a `text.*` tensor is unknown, missing or mis-shaped (named).
    """
    return hf_conversion.load_params(
        checkpoint_io.iter_tensors([weights_path]), open_clip_text_table(encoder, projection_dim),
        source=weights_path, param_dtype=lambda path: encoder.jnp_param_dtype,
        canonical_name=lambda name: re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                                           re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)),
        skip=lambda name: not name.startswith("text.") or bool(_OPEN_CLIP_TEXT_SKIPPED.search(name)),
        config_summary=f"BERT layers={encoder.num_layers}, projection_dim={projection_dim}", shardings=shardings)
