"""BERT / XLM-RoBERTa text encoder with sentence pooling, in Flax Linen.

Parameter paths mirror the Hugging Face names (`encoder.layer_3.attention.self.query`
<-> `encoder.layer.3.attention.self.query`), so conversion is a table. Layers are
post-LN: x = LN(x + attn(x)), then x = LN(x + ffn(x)). The model names logical axes
only; the position and token-type tables have no name for their rows (replicated).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwr_jax.models import attention
from rwr_jax.models.layers import DEFAULT_INIT, Projection, logical_init
from rwr_jax.models.text_encoder.config import ACTIVATIONS, EncoderConfig

_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
# torch.nn.functional.normalize's default epsilon.
_NORM_EPS = 1e-12
# sentence-transformers clamps the token count of mean pooling at this value.
_MEAN_EPS = 1e-9


def _layer_norm(c: EncoderConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=c.layer_norm_eps, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, use_fast_variance=False,
        scale_init=logical_init(nn.initializers.ones_init(), ("norm",)),
        bias_init=logical_init(nn.initializers.zeros_init(), ("norm",)), name=name)


def _dense(c: EncoderConfig, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(features, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                    kernel_init=logical_init(DEFAULT_INIT, axes),
                    bias_init=logical_init(nn.initializers.zeros_init(), axes[1:]),
                    name=name)


def position_ids(token_mask: jax.Array, config: EncoderConfig) -> jax.Array:
    """Position ids as transformers computes them for this family.

    Args:
      token_mask: [B, T] bool, False on padding.
      config: gives position_offset and positions_from_mask.

    Returns:
      [B, T] int32: BERT 0..T-1 on every slot; XLM-R pad_id + 1, pad_id + 2, ... over
      real tokens and pad_id (position_offset - 1) on padding.
    """
    if config.positions_from_mask:
        mask = token_mask.astype(jnp.int32)
        return jnp.cumsum(mask, axis=1) * mask + (config.position_offset - 1)
    length = token_mask.shape[1]
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32) + config.position_offset, token_mask.shape)


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm (HF `embeddings.*`)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """[B, T] int32 ids, positions and segment ids -> [B, T, D]."""
        c = self.config
        embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.jnp_dtype,
                                  param_dtype=c.jnp_param_dtype)
        x = embed(c.vocab_size, embedding_init=logical_init(DEFAULT_INIT, ("vocab", "embed")),
                  name="word_embeddings")(tokens)
        x = x + embed(c.max_position_embeddings, embedding_init=logical_init(DEFAULT_INIT, (None, "embed")),
                      name="position_embeddings")(positions)
        x = x + embed(c.type_vocab_size, embedding_init=logical_init(DEFAULT_INIT, (None, "embed")),
                      name="token_type_embeddings")(token_type_ids)
        return nn.with_logical_constraint(_layer_norm(c, "LayerNorm")(x), _ACTIVATION)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention over the real tokens (HF `attention.self`)."""

    config: EncoderConfig

    def _proj(self, name: str) -> Projection:
        c = self.config
        return Projection("btd,dnh->btnh", (c.hidden_size, c.num_heads, c.head_dim), ("embed", "heads", "head_dim"),
                          bias_axes=("heads", "head_dim"), dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                          name=name)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T, D] hidden, [B, T, T] bool mask -> [B, T, H, head_dim] attended values."""
        c = self.config
        q, k, v = self._proj("query")(x), self._proj("key")(x), self._proj("value")(x)
        out = attention.attend(q, k, v, mask, scale=c.head_dim ** -0.5, kernel=c.attention_kernel)
        return nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))


class AttentionOutput(nn.Module):
    """Output projection, residual and LayerNorm (HF `attention.output`)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, heads: jax.Array, residual: jax.Array) -> jax.Array:
        """[B, T, H, head_dim], [B, T, D] -> [B, T, D]."""
        c = self.config
        out = Projection("btnh,nhd->btd", (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"),
                         bias_axes=("embed",), dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype, name="dense")(heads)
        return _layer_norm(c, "LayerNorm")(out + residual)


class Attention(nn.Module):
    """HF `attention`: `self` (attention) then `output` (projection + residual + LN)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T, D], [B, T, T] bool -> [B, T, D]."""
        heads = SelfAttention(self.config, name="self")(x, mask)
        return AttentionOutput(self.config, name="output")(heads, x)


class Intermediate(nn.Module):
    """First feed-forward linear and GELU (HF `intermediate`)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, F]."""
        c = self.config
        hidden = _dense(c, c.intermediate_size, ("embed", "mlp"), "dense")(x)
        return nn.gelu(hidden, approximate=ACTIVATIONS[c.hidden_act])


class Output(nn.Module):
    """Second feed-forward linear, residual and LayerNorm (HF `output`)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, hidden: jax.Array, residual: jax.Array) -> jax.Array:
        """[B, T, F], [B, T, D] -> [B, T, D]."""
        c = self.config
        return _layer_norm(c, "LayerNorm")(_dense(c, c.hidden_size, ("mlp", "embed"), "dense")(hidden) + residual)


class EncoderLayer(nn.Module):
    """Post-LN block: LN(x + attn(x)), then LN(x + W2 gelu(W1 x))."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """[B, T, D], [B, T, T] bool -> [B, T, D]."""
        c = self.config
        x = Attention(c, name="attention")(x, mask)
        hidden = Intermediate(c, name="intermediate")(x)
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return nn.with_logical_constraint(Output(c, name="output")(hidden, x), _ACTIVATION)


class Encoder(nn.Module):
    """The stack of layers (HF `encoder.layer.*`)."""

    config: EncoderConfig

    def setup(self):
        self.layer = [EncoderLayer(self.config) for _ in range(self.config.num_layers)]  # layer_0, layer_1, ...

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x, mask)
        return x


def pool(hidden: jax.Array, token_mask: jax.Array, pooling: str, normalize: bool) -> jax.Array:
    """Sentence vectors from token states, as sentence-transformers computes them.

    Args:
      hidden: [B, T, D] final token states.
      token_mask: [B, T] bool, False on padding.
      pooling: "cls" (state of the first real token) or "mean" (masked mean).
      normalize: divide by max(||v||, 1e-12).

    Returns:
      [B, D] float32. Rows without real tokens are zero.
    """
    hidden = hidden.astype(jnp.float32)
    mask = token_mask.astype(jnp.float32)
    if pooling == "cls":
        first = jnp.argmax(token_mask, axis=1)
        pooled = jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0] * jnp.max(mask, 1, keepdims=True)
    elif pooling == "mean":
        pooled = jnp.einsum("btd,bt->bd", hidden, mask) / jnp.maximum(mask.sum(1, keepdims=True), _MEAN_EPS)
    else:
        raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    if normalize:
        pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), _NORM_EPS)
    return nn.with_logical_constraint(pooled, ("activation_batch", "activation_embed"))


class TextEncoderModel(nn.Module):
    """BERT / XLM-R encoder (HF `embeddings.*`, `encoder.*`) plus sentence pooling."""

    config: EncoderConfig

    def setup(self):
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)

    def hidden_states(self, tokens: jax.Array, token_mask: jax.Array,
                      token_type_ids: jax.Array | None = None) -> jax.Array:
        """Final token states (HF `last_hidden_state`).

        Args:
          tokens: [B, T] int32 token ids.
          token_mask: [B, T] bool, False on padding (right or left).
          token_type_ids: optional [B, T] int32 segment ids (default 0).

        Returns:
          [B, T, D] in the compute dtype.
        """
        token_mask = token_mask.astype(bool)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(tokens)
        x = self.embeddings(tokens, position_ids(token_mask, self.config), token_type_ids)
        mask = jnp.broadcast_to(token_mask[:, None, :], (tokens.shape[0], tokens.shape[1], tokens.shape[1]))
        return self.encoder(x, mask)

    def __call__(self, tokens: jax.Array, token_mask: jax.Array,
                 token_type_ids: jax.Array | None = None) -> jax.Array:
        """Sentence embeddings: [B, T] ids and mask (as in `hidden_states`) -> [B, D] float32."""
        hidden = self.hidden_states(tokens, token_mask, token_type_ids)
        return pool(hidden, token_mask, self.config.pooling, self.config.normalize)
