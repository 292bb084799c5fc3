"""CLIP-style dual encoder in Flax Linen: ViT image tower, causal text tower, projections.

Parameter paths mirror transformers' `CLIPModel` names (`vision_model.encoder.layers_3.
self_attn.q_proj` <-> `vision_model.encoder.layers.3.self_attn.q_proj`), so conversion
is a table (`rwr_jax.models.clip.convert`). Both towers are pre-LN transformers:
x + attn(LN1(x)), then x + mlp(LN2(x)).

Inputs:
  - pixel_values: `[N, H, W, C] float32`, channels last (the layout of
    `np.asarray(PIL image)`), already resized to `image_size` and normalised with the
    config's mean/std (`rwr_jax.retrieval.image_index.preprocess_images` does this).
    The patch convolution (kernel = stride = patch) is the linear map of each flattened
    `[C, p, p]` patch; patches run in raster order, after the class token.
  - tokens `[B, T] int32` and token_mask `[B, T] bool` (False on padding). The text
    tower is causal and also masks padding; the pooled state is the one at the first
    EOS token (legacy `eos_token_id == 2`: at the largest id), exactly as transformers
    picks it, so each row must contain its EOS token.

`ClipImageModel` is the image tower plus its projection alone (same param paths), for
image-only uses such as CDIR's image index. `OpenClipTextTower` is open_clip's BERT text
tower (BiomedCLIP), built on `rwr_jax.models.text_encoder`.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwr_jax.models import attention
from rwr_jax.models.clip.config import ClipConfig, ClipTextConfig, ClipVisionConfig
from rwr_jax.models.layers import DEFAULT_INIT, Projection, logical_init
from rwr_jax.models.text_encoder.config import EncoderConfig
from rwr_jax.models.text_encoder.model import TextEncoderModel

_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
# torch.linalg.norm-based normalisation as transformers does it has no epsilon; this
# one only guards all-zero rows.
_NORM_EPS = 1e-12
TowerConfig = ClipVisionConfig | ClipTextConfig


def activation(name: str, x: jax.Array) -> jax.Array:
    """transformers' ACT2FN[name] for the names in config.ACTIVATIONS."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return nn.gelu(x, approximate=name != "gelu")


def l2_normalize(x: jax.Array) -> jax.Array:
    """[..., P] -> [..., P] float32 rows of unit norm (zero rows stay zero)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """[A, P], [B, P] -> [A, B] float32 cosine similarities."""
    return l2_normalize(a) @ l2_normalize(b).T


def patchify(pixel_values: jax.Array, patch_size: int) -> jax.Array:
    """[N, H, W, C] -> [N, (H/p) * (W/p), C * p * p], patches in raster order, (c, row, col) inside."""
    n, h, w, c = pixel_values.shape
    x = pixel_values.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(n, (h // patch_size) * (w // patch_size), c * patch_size ** 2)


def _layer_norm(config: ClipConfig, eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype, use_fast_variance=False,
        scale_init=logical_init(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical_init(nn.initializers.zeros_init(), ("norm",)), name=name)


class Attention(nn.Module):
    """Bidirectional or causal multi-head attention (HF `self_attn`: q/k/v/out_proj, with biases)."""

    tower: TowerConfig
    config: ClipConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T, D] hidden, [B, T, T] bool mask -> [B, T, D]."""
        t, c = self.tower, self.config
        proj = functools.partial(Projection, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
        qkv_shape, qkv_axes = (t.hidden_size, t.num_heads, t.head_dim), ("embed", "heads", "head_dim")
        q, k, v = (proj("btd,dnh->btnh", qkv_shape, qkv_axes, bias_axes=("heads", "head_dim"), name=name)(x)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = attention.attend(q, k, v, mask, scale=t.head_dim ** -0.5, kernel=c.attention_kernel)
        out = nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        return proj("btnh,nhd->btd", (t.num_heads, t.head_dim, t.hidden_size), ("heads", "head_dim", "embed"),
                    bias_axes=("embed",), name="out_proj")(out)


class Mlp(nn.Module):
    """fc2(act(fc1(x))) (HF `mlp`)."""

    tower: TowerConfig
    config: ClipConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        t, c = self.tower, self.config
        proj = functools.partial(Projection, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
        hidden = proj("btd,df->btf", (t.hidden_size, t.intermediate_size), ("embed", "mlp"), bias_axes=("mlp",),
                      name="fc1")(x)
        hidden = nn.with_logical_constraint(activation(t.hidden_act, hidden),
                                            ("activation_batch", "activation_length", "activation_mlp"))
        return proj("btf,fd->btd", (t.intermediate_size, t.hidden_size), ("mlp", "embed"), bias_axes=("embed",),
                    name="fc2")(hidden)


class EncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    tower: TowerConfig
    config: ClipConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T, D], [B, T, T] bool -> [B, T, D]."""
        t, c = self.tower, self.config
        x = x + Attention(t, c, name="self_attn")(_layer_norm(c, t.layer_norm_eps, "layer_norm1")(x), mask)
        x = x + Mlp(t, c, name="mlp")(_layer_norm(c, t.layer_norm_eps, "layer_norm2")(x))
        return nn.with_logical_constraint(x, _ACTIVATION)


class Encoder(nn.Module):
    """The stack of layers (HF `encoder.layers.*`)."""

    tower: TowerConfig
    config: ClipConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.tower.num_layers):
            x = EncoderLayer(self.tower, self.config, name=f"layers_{i}")(x, mask)
        return x


class VisionEmbeddings(nn.Module):
    """Patch projection, class token and learned positions (HF `vision_model.embeddings`)."""

    config: ClipConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[N, H, W, C] -> [N, 1 + L, D], L = (image_size / patch_size)**2."""
        c, v = self.config, self.config.vision
        patches = patchify(pixel_values, v.patch_size)
        x = Projection("nlk,kd->nld", (v.patch_dim, v.hidden_size), ("patch", "embed"),
                       bias_axes=("embed",) if v.patch_bias else None, dtype=c.jnp_dtype,
                       param_dtype=c.jnp_param_dtype, name="patch_embedding")(patches)
        cls = self.param("class_embedding", logical_init(DEFAULT_INIT, ("embed",)), (v.hidden_size,),
                         c.jnp_param_dtype).astype(c.jnp_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, v.hidden_size)), x], axis=1)
        positions = nn.Embed(v.num_positions, v.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                             embedding_init=logical_init(DEFAULT_INIT, (None, "embed")), name="position_embedding")
        return x + positions(jnp.arange(v.num_positions))[None]


class VisionTransformer(nn.Module):
    """The ViT image tower (HF `vision_model`): pooled = post-LN of the class token."""

    config: ClipConfig

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """[N, image_size, image_size, C] pixels -> [N, D_v] pooled states."""
        c, v = self.config, self.config.vision
        expected = (v.image_size, v.image_size, v.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"pixel_values must be [N, {', '.join(map(str, expected))}] (channels last), "
                             f"got {tuple(pixel_values.shape)}")
        x = VisionEmbeddings(c, name="embeddings")(pixel_values)
        if v.pre_layernorm:
            x = _layer_norm(c, v.layer_norm_eps, "pre_layrnorm")(x)  # sic: the HF name
        x = nn.with_logical_constraint(x, _ACTIVATION)
        mask = jnp.ones((x.shape[0], x.shape[1], x.shape[1]), bool)
        x = Encoder(v, c, name="encoder")(x, mask)
        return _layer_norm(c, v.layer_norm_eps, "post_layernorm")(x[:, 0])


def eos_positions(tokens: jax.Array, eos_token_id: int) -> jax.Array:
    """[B, T] ids -> [B] int32 pooling positions, as transformers' CLIPTextModel picks them."""
    if eos_token_id == 2:  # legacy configs: the EOS token has the largest id
        return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
    return jnp.argmax(tokens == eos_token_id, axis=-1).astype(jnp.int32)


class TextEmbeddings(nn.Module):
    """Token + learned position embeddings (HF `text_model.embeddings`)."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int32 ids -> [B, T, D_t]; positions are 0..T-1."""
        c, t = self.config, self.config.text
        embed = functools.partial(nn.Embed, features=t.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
        x = embed(t.vocab_size, embedding_init=logical_init(DEFAULT_INIT, ("vocab", "embed")),
                  name="token_embedding")(tokens)
        return x + embed(t.max_position_embeddings, embedding_init=logical_init(DEFAULT_INIT, (None, "embed")),
                         name="position_embedding")(jnp.arange(tokens.shape[1]))[None]


class TextTransformer(nn.Module):
    """The causal text tower (HF `text_model`): pooled = final-LN state at the EOS token."""

    config: ClipConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
        """[B, T] int32 ids, [B, T] bool mask -> [B, D_t] pooled states."""
        c, t = self.config, self.config.text
        length = tokens.shape[1]
        if length > t.max_position_embeddings:
            raise ValueError(f"tokens have length {length}, more than max_position_embeddings "
                             f"{t.max_position_embeddings}")
        x = TextEmbeddings(c, name="embeddings")(tokens)
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None] & token_mask.astype(bool)[:, None, :]
        x = Encoder(t, c, name="encoder")(nn.with_logical_constraint(x, _ACTIVATION), mask)
        x = _layer_norm(c, t.layer_norm_eps, "final_layer_norm")(x)
        return jnp.take_along_axis(x, eos_positions(tokens, t.eos_token_id)[:, None, None], axis=1)[:, 0]


def _projection(config: ClipConfig, width: int, name: str) -> Projection:
    return Projection("nd,dp->np", (width, config.projection_dim), ("embed", None), dtype=config.jnp_dtype,
                      param_dtype=config.jnp_param_dtype, name=name)


class ClipImageModel(nn.Module):
    """Image tower + visual projection (the `vision_model.*` / `visual_projection.*` params of ClipModel)."""

    config: ClipConfig

    def setup(self):
        self.vision_model = VisionTransformer(self.config)
        self.visual_projection = _projection(self.config, self.config.vision.hidden_size, "visual_projection")

    def __call__(self, pixel_values: jax.Array, normalize: bool = True) -> jax.Array:
        """[N, H, W, C] normalised pixels -> [N, P] float32 image embeddings (L2-normalised if `normalize`)."""
        features = self.visual_projection(self.vision_model(pixel_values))
        return l2_normalize(features) if normalize else features.astype(jnp.float32)


class ClipModel(nn.Module):
    """transformers' `CLIPModel`: both towers, projections and the logit scale."""

    config: ClipConfig

    def setup(self):
        c = self.config
        if c.text is None:
            raise ValueError("ClipModel needs config.text; use ClipImageModel for an image-only config")
        self.vision_model = VisionTransformer(c)
        self.visual_projection = _projection(c, c.vision.hidden_size, "visual_projection")
        self.text_model = TextTransformer(c)
        self.text_projection = _projection(c, c.text.hidden_size, "text_projection")
        self.logit_scale = self.param("logit_scale", logical_init(nn.initializers.constant(c.logit_scale_init), ()),
                                      (), c.jnp_param_dtype)

    def image_embeds(self, pixel_values: jax.Array, normalize: bool = True) -> jax.Array:
        """[N, H, W, C] normalised pixels -> [N, P] float32 (HF `get_image_features`, then L2-normalised)."""
        features = self.visual_projection(self.vision_model(pixel_values))
        return l2_normalize(features) if normalize else features.astype(jnp.float32)

    def text_embeds(self, tokens: jax.Array, token_mask: jax.Array, normalize: bool = True) -> jax.Array:
        """[B, T] int32 ids, [B, T] bool mask -> [B, P] float32 (HF `get_text_features`, then L2-normalised)."""
        features = self.text_projection(self.text_model(tokens, token_mask))
        return l2_normalize(features) if normalize else features.astype(jnp.float32)

    def __call__(self, pixel_values: jax.Array, tokens: jax.Array,
                 token_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """CLIP logits: cosine similarity times exp(logit_scale).

        Args:
          pixel_values: [N, H, W, C] float32 normalised pixels.
          tokens: [B, T] int32 token ids, each row holding its EOS token.
          token_mask: [B, T] bool, False on padding.

        Returns:
          (logits_per_image [N, B] float32, logits_per_text [B, N] float32).
        """
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        logits_per_text = scale * (self.text_embeds(tokens, token_mask) @ self.image_embeds(pixel_values).T)
        return logits_per_text.T, logits_per_text


class OpenClipTextTower(nn.Module):
    """open_clip's HF text tower as BiomedCLIP uses it: BERT, CLS state, MLP projection.

    Param paths `transformer.*` (our BERT port, HF BERT names) and `proj_0` / `proj_2`
    mirror open_clip's `text.transformer.*` and `text.proj.0` / `text.proj.2`. The MLP
    is Linear(D, (D + P) // 2, no bias), erf GELU, Linear(., P, no bias).

    Attributes:
      encoder: the BERT config; must pool "cls" without normalisation.
      projection_dim: P.
    """

    encoder: EncoderConfig
    projection_dim: int

    @nn.compact
    def __call__(self, tokens: jax.Array, token_mask: jax.Array, normalize: bool = True) -> jax.Array:
        """[B, T] int32 ids, [B, T] bool mask (False on padding) -> [B, P] float32 text embeddings."""
        e = self.encoder
        if e.pooling != "cls" or e.normalize:
            raise ValueError(f"OpenClipTextTower.encoder must pool 'cls' without normalisation, got pooling="
                             f"{e.pooling!r}, normalize={e.normalize}")
        pooled = TextEncoderModel(e, name="transformer")(tokens, token_mask)
        hidden = (e.hidden_size + self.projection_dim) // 2
        proj = functools.partial(Projection, dtype=e.jnp_dtype, param_dtype=e.jnp_param_dtype)
        x = proj("nd,df->nf", (e.hidden_size, hidden), ("embed", "mlp"), name="proj_0")(pooled)
        x = proj("nf,fp->np", (hidden, self.projection_dim), ("mlp", None), name="proj_2")(nn.gelu(x, False))
        return l2_normalize(x) if normalize else x.astype(jnp.float32)
