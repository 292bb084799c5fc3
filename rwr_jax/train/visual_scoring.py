"""Inputs of the visual query-semantic reward: CLIP cosine of queries and prompt images.

    scorer = load_scorer(cfg.rewards.clip_checkpoint)       # a local transformers CLIP directory
    PipelineConfig(..., clip_image=scorer.image_config)     # batches then carry `clip_pixels`
    rows = parser.parse_rows(trajectory, tables)
    inputs = scorer.reward_inputs([parser.visual_query_texts(r) for r in rows],
                                  batch.clip_pixels, batch.num_images, group_size=G)
    # {"image_query_similarity": [B] float32, "has_image": [B] bool} -> rewards.query_visual

For completion b of prompt p = b // G (rows of a group are consecutive), with texts
`visual_query_texts` (its queries, else its first sentence) and the prompt's images:

    similarity[b] = mean over b's texts t of mean over p's images i of cos(text_t, image_i)

(METHOD.md averages over queries; with several images we also average over images).
The images are the raw record images, CLIP-preprocessed in the data pipeline, and are
embedded once per prompt (the batch's [P * images per prompt] slots), never per group
member. Texts are tokenised by the checkpoint's CLIP tokenizer, truncated to the text
tower's `max_position_embeddings` (EOS kept) and padded to it; the number of texts is
padded to a power of two, so the jitted forward compiles once per count bucket. A
completion of a text-only prompt has `has_image` False and similarity 0; one with no
text at all has similarity 0. Text-only batches run no CLIP forward.
"""

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from rwr_jax.data.image_processing import ClipImageConfig
from rwr_jax.models.clip import convert
from rwr_jax.models.clip.config import ClipConfig, read_clip_config
from rwr_jax.models.clip.model import ClipModel

_MIN_TEXT_BUCKET = 8


@functools.partial(jax.jit, static_argnames=("model",))
def _similarity(model: ClipModel, params, pixels, tokens, token_mask, text_row, image_prompt, row_prompt):
    """[B] float32 mean over each row's texts of the mean cosine with its prompt's images.

    Args:
      pixels: [N, S, S, 3] float32 CLIP pixels; tokens, token_mask: [Tn, L] texts.
      text_row: [Tn] int32 completion row of each text, -1 on padding.
      image_prompt: [N] int32 prompt of each image, -1 on empty slots.
      row_prompt: [B] int32 prompt of each completion row.
    """
    images = model.apply({"params": params}, pixels, method=ClipModel.image_embeds)  # [N, P], unit norm
    texts = model.apply({"params": params}, tokens, token_mask, method=ClipModel.text_embeds)  # [Tn, P]
    cosine = jnp.einsum("tp,np->tn", texts, images, precision=jax.lax.Precision.HIGHEST)
    text_prompt = jnp.where(text_row >= 0, row_prompt[jnp.maximum(text_row, 0)], -2)
    pair = (image_prompt[None, :] == text_prompt[:, None]) & (image_prompt >= 0)[None, :]  # [Tn, N]
    per_text = jnp.sum(jnp.where(pair, cosine, 0.0), 1) / jnp.maximum(jnp.sum(pair, 1), 1)
    own = (text_row[None, :] == jnp.arange(row_prompt.shape[0])[:, None]) & jnp.any(pair, 1)[None, :]  # [B, Tn]
    return jnp.sum(jnp.where(own, per_text[None, :], 0.0), 1) / jnp.maximum(jnp.sum(own, 1), 1)


@dataclasses.dataclass(frozen=True)
class VisualScorer:
    """A transformers CLIP model (both towers) and its tokenizer, scoring queries against images."""

    config: ClipConfig
    params: Any
    tokenizer: Any

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str) -> "VisualScorer":
        """Config, preprocessor settings, weights and tokenizer of a local `CLIPModel` directory."""
        config = read_clip_config(checkpoint_dir)
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(config, convert.load_hf_params(checkpoint_dir, config), tokenizer)

    @property
    def image_config(self) -> ClipImageConfig:
        """The image preprocessing this model expects (for `PipelineConfig.clip_image`)."""
        c = self.config
        return ClipImageConfig(image_size=c.vision.image_size, image_mean=c.image_mean, image_std=c.image_std)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """[n, L] int32 ids and [n, L] bool mask, L = max_position_embeddings, each row ending in EOS."""
        length = self.config.text.max_position_embeddings
        encoded = self.tokenizer(list(texts), truncation=True, max_length=length, padding="max_length",
                                 return_tensors="np")
        return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(bool)

    def reward_inputs(self, texts: Sequence[Sequence[str]], clip_pixels: np.ndarray | None, num_images: np.ndarray,
                      group_size: int) -> dict[str, jax.Array]:
        """The `query_visual` reward's inputs.

        Args:
          texts: B lists of texts (`parser.visual_query_texts` of each completion).
          clip_pixels: [N, S, S, 3] float32 the batch's CLIP pixels (`HostPromptBatch.clip_pixels`),
            images in prompt order then zero slots; None for text-only data.
          num_images: [P] int32 images of each prompt, P = B / group_size.
          group_size: G, consecutive completions per prompt.

        Returns:
          {"image_query_similarity": [B] float32, "has_image": [B] bool}.
        """
        num_images = np.asarray(num_images, np.int64)
        if len(texts) != len(num_images) * group_size:
            raise ValueError(f"texts must have B = {len(num_images)} prompts x {group_size} = "
                             f"{len(num_images) * group_size} rows, got {len(texts)}")
        row_prompt = np.arange(len(texts), dtype=np.int32) // group_size
        has_image = num_images[row_prompt] > 0
        if clip_pixels is None or not has_image.any():
            return {"image_query_similarity": jnp.zeros(len(texts), jnp.float32), "has_image": jnp.asarray(has_image)}
        if len(clip_pixels) < num_images.sum():
            raise ValueError(f"clip_pixels holds {len(clip_pixels)} images, fewer than the prompts' {num_images.sum()}")
        flat = [(b, t) for b, row in enumerate(texts) for t in row]
        bucket = max(_MIN_TEXT_BUCKET, 1 << max(len(flat) - 1, 0).bit_length())
        tokens, token_mask = self.tokenize([t for _, t in flat] + [""] * (bucket - len(flat)))
        text_row = np.full(bucket, -1, np.int32)
        text_row[:len(flat)] = [b for b, _ in flat]
        image_prompt = np.full(len(clip_pixels), -1, np.int32)
        image_prompt[:num_images.sum()] = np.repeat(np.arange(len(num_images)), num_images)
        similarity = _similarity(ClipModel(self.config), self.params, jnp.asarray(clip_pixels), jnp.asarray(tokens),
                                 jnp.asarray(token_mask), jnp.asarray(text_row), jnp.asarray(image_prompt),
                                 jnp.asarray(row_prompt))
        return {"image_query_similarity": similarity, "has_image": jnp.asarray(has_image)}


def load_scorer(checkpoint_dir: str, field: str = "rewards.clip_checkpoint") -> VisualScorer:
    """`VisualScorer.from_pretrained`, with errors that name the config field."""
    hint = "the 'query_visual' reward needs a local transformers CLIP directory (config.json, weights, tokenizer)"
    if not checkpoint_dir:
        raise ValueError(f"{field} is empty: {hint}; set it, or remove 'query_visual' from rewards.names")
    if not os.path.isdir(checkpoint_dir):
        raise ValueError(f"{field}={checkpoint_dir!r} is not a directory: {hint}")
    if os.path.isfile(os.path.join(checkpoint_dir, "open_clip_config.json")):
        raise ValueError(f"{field}={checkpoint_dir!r} is an open_clip checkpoint; the visual reward reads "
                         f"transformers CLIP directories only")
    if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        raise ValueError(f"{field}={checkpoint_dir!r} has no config.json: {hint}")
    return VisualScorer.from_pretrained(checkpoint_dir)
