"""The full Qwen2.5-VL model: vision tower + merger feeding the language model.

`VisionLanguageLM` is the decoder (`model`, `lm_head`) plus `visual`, so its param tree
mirrors the checkpoint (`visual.*`, `model.*`, `lm_head.*`). Image features replace the
embeddings of the `<|image_pad|>` tokens, in order; after the prompt, decode and extend
calls pass no images and use the cache like the text-only decoder.
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp

from rwr_jax.models.checkpoint_io import read_json
from rwr_jax.models.qwen2_vl.config import DecoderConfig, from_hf_config
from rwr_jax.models.qwen2_vl.decoder import DecoderLM
from rwr_jax.models.qwen2_vl.vision import VisionConfig, VisionInputs, VisionTower, merged_token_mask, \
    vision_config_from_hf

IMAGE_TOKEN_ID = 151655
VISION_START_TOKEN_ID = 151652


@dataclasses.dataclass(frozen=True, kw_only=True)
class VLConfig:
    """Hyperparameters of Qwen2.5-VL.

    Attributes:
      text: the language model.
      vision: the vision tower and merger.
      image_token_id: id of `<|image_pad|>`, whose embeddings images replace.
      vision_start_token_id: id of `<|vision_start|>` (mRoPE positions need it).
      freeze_vision: stop gradients at the merger output (the paper trains only the
        language model and lm_head).
    """

    text: DecoderConfig
    vision: VisionConfig
    image_token_id: int = IMAGE_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    freeze_vision: bool = True

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(f"vision.out_hidden_size ({self.vision.out_hidden_size}) must equal text.hidden_size "
                             f"({self.text.hidden_size})")
        if self.text.mrope_section is None:
            raise ValueError("a Qwen2.5-VL language model needs text.mrope_section")

    def replace(self, **changes) -> "VLConfig":
        return dataclasses.replace(self, **changes)


def vl_config_from_hf(hf: dict[str, Any], where: str = "config.json", **overrides: Any) -> VLConfig:
    """Builds a VLConfig from a Qwen2.5-VL `config.json` (transformers 4.x or 5.x layout).

    Args:
      hf: the parsed JSON.
      where: a name for error messages.
      **overrides: dtype / param_dtype / attention_kernel (both towers) and
        remat_policy (language model).
    """
    if hf.get("model_type") != "qwen2_5_vl" or "vision_config" not in hf:
        raise ValueError(f"{where}: expected a qwen2_5_vl config with a vision_config, got model_type "
                         f"{hf.get('model_type')!r}")
    vision_overrides = {k: v for k, v in overrides.items() if k in ("dtype", "param_dtype", "attention_kernel")}
    return VLConfig(
        text=from_hf_config(hf, where=where, **overrides),
        vision=vision_config_from_hf(hf["vision_config"], **vision_overrides),
        image_token_id=hf.get("image_token_id", IMAGE_TOKEN_ID),
        vision_start_token_id=hf.get("vision_start_token_id", VISION_START_TOKEN_ID))


def read_vl_config(checkpoint_dir: str, **overrides: Any) -> tuple[VLConfig, dict[str, Any]]:
    """Reads `<checkpoint_dir>/config.json` of a Qwen2.5-VL checkpoint."""
    path = os.path.join(checkpoint_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: model.checkpoint must be a Hugging Face checkpoint directory")
    hf = read_json(path)
    return vl_config_from_hf(hf, where=path, **overrides), hf


def scatter_image_features(tokens: jax.Array, embeds: jax.Array, features: jax.Array, feature_mask: jax.Array,
                           image_token_id: int) -> jax.Array:
    """Puts the k-th real image feature at the k-th `<|image_pad|>` token (row-major).

    Args:
      tokens: [B, T] int32.
      embeds: [B, T, D] token embeddings.
      features: [N, M, D] merged image tokens (padded).
      feature_mask: [N, M] bool, True on real tokens.
      image_token_id: id of `<|image_pad|>`.

    Returns:
      [B, T, D] embeddings. The caller guarantees the counts match (see
      `vision.pack_images` and the prompt builder); extra image tokens would reuse the
      last feature.
    """
    flat = features.reshape(-1, features.shape[-1])
    # Stable sort puts the real features first, in image order.
    order = jnp.argsort(~feature_mask.reshape(-1), stable=True)
    is_image = tokens == image_token_id
    k = jnp.cumsum(is_image.reshape(-1)) - 1
    picked = flat[order[jnp.clip(k, 0, flat.shape[0] - 1)]].reshape(embeds.shape)
    return jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)


class VisionLanguageLM(DecoderLM):
    """Qwen2.5-VL for generation: `visual` + the decoder (`model`, `lm_head`)."""

    vision: VisionConfig = None  # type: ignore[assignment]  (required; Linen fields follow `config`)
    image_token_id: int = IMAGE_TOKEN_ID
    freeze_vision: bool = True

    @classmethod
    def from_config(cls, config: VLConfig) -> "VisionLanguageLM":
        return cls(config.text, vision=config.vision, image_token_id=config.image_token_id,
                   freeze_vision=config.freeze_vision)

    def setup(self):
        super().setup()
        if self.vision is None:
            raise ValueError("VisionLanguageLM needs a VisionConfig (use VisionLanguageLM.from_config)")
        self.visual = VisionTower(self.vision)

    def encode_images(self, images: VisionInputs) -> jax.Array:
        """[N, P, ...] images -> [N, P / merge_unit, D] language-model tokens."""
        features = self.visual(images)
        return jax.lax.stop_gradient(features) if self.freeze_vision else features

    def __call__(self, tokens, positions, token_mask, cache=None, images: VisionInputs | None = None,
                 return_hidden=False, embeds=None, pack_index=None):
        """Forward over a chunk, with images scattered into its `<|image_pad|>` tokens.

        Args:
          tokens: [B, T] int32.
          positions: [3, B, T] int32 mRoPE positions (`positions.rope_index`).
          token_mask: [B, T] bool.
          cache: optional KVCache to append the chunk to.
          images: optional VisionInputs for the images of this chunk.
          return_hidden: return final hidden states instead of logits.
          embeds: optional [B, T, D] input embeddings with image features already in
            place (the train step scatters features it encoded once); replaces both
            the token lookup and `images`.
          pack_index: optional [G, N] int32 packed real tokens (`DecoderLM.__call__`).

        Returns:
          ([B, T, V] logits or [B, T, D] hidden states, updated cache or None).
        """
        if embeds is not None:
            return super().__call__(tokens, positions, token_mask, cache, embeds=embeds, return_hidden=return_hidden,
                                    pack_index=pack_index)
        embeds = self.embed(tokens)
        if images is not None:
            features = self.encode_images(images)
            embeds = scatter_image_features(tokens, embeds, features, merged_token_mask(images, self.vision),
                                            self.image_token_id)
        return super().__call__(tokens, positions, token_mask, cache, embeds=embeds, return_hidden=return_hidden,
                                pack_index=pack_index)
