"""The Qwen2 / Qwen2.5-VL language model (also Llama-family decoders) in Flax Linen.

Parameter paths mirror the Hugging Face checkpoint names (`model.layers_3.self_attn.
q_proj` <-> `model.layers.3.self_attn.q_proj`), so weight conversion is a table. The
model names logical axes only; `rwr_jax.sharding` maps them to a mesh. The KV cache is
an argument and a return value (`KVCache`), never module state.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from rwr_jax.models import attention, kv_cache, packing, rope, swiglu
from rwr_jax.models.layers import DEFAULT_INIT, Kernel, Projection, RMSNorm, dense_dot_general, logical_init
from rwr_jax.models.qwen2_vl.config import DecoderConfig

_ACTIVATION = ("activation_batch", "activation_length", "activation_embed")
# The LM head's product returns float32 logits (accumulated in float32 whatever the compute dtype).
_FLOAT32_LOGITS = functools.partial(dense_dot_general, preferred_element_type=jnp.float32)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache."""

    config: DecoderConfig

    def _proj(self, heads: int, head_axis: str, name: str) -> Projection:
        c = self.config
        return Projection(
            "btd,dnh->btnh", (c.hidden_size, heads, c.head_dim), ("embed", head_axis, "head_dim"),
            bias_axes=(head_axis, "head_dim") if c.qkv_bias else None, dtype=c.jnp_dtype,
            param_dtype=c.jnp_param_dtype, name=name)

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, end_index=None, pack_index=None):
        """Attends a chunk of tokens to itself, or to the cache it is written into.

        Args:
          x: [B, T, D] normed hidden states, or [G, N, D] packed ones (with pack_index).
          cos, sin: [B, T, head_dim] rotary tables (packed like x).
          mask: [B, T, S] bool; S = T without a cache, else the cache length.
          kv: optional (keys, values) of this layer's cache, each [B, K, S, head_dim];
            the chunk's T slots are written in place (a decode step does not copy it).
          end_index: [] int32, slot where this chunk is written (with kv).
          pack_index: optional [G, N] int32 positions of x's tokens in their group's
            rows (`models.packing`): projections run packed, attention unpacked.

        Returns:
          (output shaped like x, updated (keys, values) or None).
        """
        c = self.config
        q = rope.apply_rope(self._proj(c.num_heads, "heads", "q_proj")(x), cos, sin)
        k = rope.apply_rope(self._proj(c.num_kv_heads, "kv_heads", "k_proj")(x), cos, sin)
        v = self._proj(c.num_kv_heads, "kv_heads", "v_proj")(x)
        if pack_index is not None:
            q, k, v = (packing.unpack(t, pack_index, *mask.shape[:2]) for t in (q, k, v))
        if kv is not None:
            kv = tuple(jax.lax.dynamic_update_slice(c, new.transpose(0, 2, 1, 3).astype(c.dtype), (0, 0, end_index, 0))
                       for c, new in zip(kv, (k, v)))
            # [B, K, S, hd] -> the kernels' [B, S, K, hd] (the "xla" kernel transposes back: no copy).
            k, v = (c.transpose(0, 2, 1, 3).astype(q.dtype) for c in kv)
        out = attention.attend(q, k, v, mask, scale=c.head_dim ** -0.5, kernel=c.attention_kernel,
                               query_chunk=c.attention_query_chunk)
        if pack_index is not None:
            out = packing.pack(out, pack_index)
        out = nn.with_logical_constraint(
            out, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        out = Projection(
            "btnh,nhd->btd", (c.num_heads, c.head_dim, c.hidden_size), ("heads", "head_dim", "embed"),
            bias_axes=("embed",) if c.o_bias else None, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
            name="o_proj")(out)
        return out, kv


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (`models.swiglu`)."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, T, D] -> [B, T, D]."""
        c = self.config

        def kernel(shape: tuple[int, int], axes: tuple[str, str], name: str) -> jax.Array:
            return Kernel(shape, axes, c.jnp_param_dtype, name=name)().astype(c.jnp_dtype)

        width, features = c.hidden_size, c.intermediate_size
        return swiglu.swiglu(x.astype(c.jnp_dtype), kernel((width, features), ("embed", "mlp"), "gate_proj"),
                             kernel((width, features), ("embed", "mlp"), "up_proj"),
                             kernel((features, width), ("mlp", "embed"), "down_proj"))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: DecoderConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, kv=None, end_index=None, pack_index=None):
        """[B, T, D] (or packed [G, N, D]) -> (the same shape, updated kv); arguments as in `Attention`."""
        c = self.config
        norm = functools.partial(RMSNorm, eps=c.rms_norm_eps, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype)
        x = nn.with_logical_constraint(x, _ACTIVATION)
        attn_out, kv = Attention(c, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask, kv, end_index,
                                                      pack_index)
        x = x + attn_out
        x = x + MLP(c, name="mlp")(norm(name="post_attention_layernorm")(x))
        return nn.with_logical_constraint(x, _ACTIVATION), kv


def _layer_class(policy: str):
    if policy == "none":
        return DecoderLayer
    jax_policy = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return nn.remat(DecoderLayer, policy=jax_policy, prevent_cse=True)


class TextModel(nn.Module):
    """Token embedding, decoder blocks and final norm (HF `model.*`)."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
            embedding_init=logical_init(DEFAULT_INIT, ("vocab", "embed")))
        layer = _layer_class(c.remat_policy)
        self.layers = [layer(c) for _ in range(c.num_layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c.rms_norm_eps, c.jnp_dtype, c.jnp_param_dtype)

    def __call__(self, embeds, positions, mask, cache=None, pack_index=None):
        """Runs the blocks over input embeddings.

        Args:
          embeds: [B, T, D] input embeddings.
          positions: [B, T] int32, or [3, B, T] int32 for mRoPE.
          mask: [B, T, S] bool attention mask.
          cache: optional KVCache; the chunk is written at cache.end_index.
          pack_index: optional [G, N] int32 positions (`models.packing`): the
            position-wise work runs on those tokens only; the others (padding) get
            hidden states 0 and zero keys / values.

        Returns:
          ([B, T, D] final-normed hidden states, updated cache or None).
        """
        c = self.config
        cos, sin = rope.rope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section)
        x = embeds
        if pack_index is not None:
            x, cos, sin = (packing.pack(t, pack_index) for t in (x, cos, sin))
        layer_caches = [None] * len(self.layers) if cache is None else zip(cache.keys, cache.values)
        updated = []
        for layer, kv in zip(self.layers, layer_caches):
            x, kv = layer(x, cos, sin, mask, kv, None if cache is None else cache.end_index, pack_index)
            updated.append(kv)
        if cache is not None:
            cache = cache.replace(keys=tuple(k for k, _ in updated), values=tuple(v for _, v in updated))
        x = self.norm(x)
        return (x if pack_index is None else packing.unpack(x, pack_index, *embeds.shape[:2])), cache


class DecoderLM(nn.Module):
    """The causal language model: `model` (TextModel) + `lm_head` (or tied embeddings).

    Call with tokens, or with precomputed input embeddings (e.g. with image features
    scattered in); with a KVCache the chunk is appended to it (prefill, decode and
    extend are the same call with different chunk lengths).
    """

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.model = TextModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size, use_bias=False, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                kernel_init=logical_init(DEFAULT_INIT, ("embed", "vocab")), dot_general=_FLOAT32_LOGITS)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """[B, T] int32 -> [B, T, D] token embeddings: `nn.Embed`'s rows, cast after the lookup (it
        casts the whole [V, D] table first, for the lookup and again for its gradient)."""
        return jnp.take(self.model.embed_tokens.embedding, tokens, axis=0).astype(self.config.jnp_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """[B, T, D] final hidden states -> [B, T, V] float32 logits."""
        if self.config.tie_word_embeddings:
            logits = self.model.embed_tokens.attend(hidden).astype(jnp.float32)
        else:
            logits = self.lm_head(hidden)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def head_kernel(self) -> jax.Array:
        """[D, V] the LM head's weight in the compute dtype (the embedding's transpose when
        tied): `logits(h)` is `h @ head_kernel()`, for code that runs the head itself."""
        if self.config.tie_word_embeddings:
            kernel = self.model.embed_tokens.embedding.T
        else:
            kernel = self.lm_head.variables["params"]["kernel"]
        return nn.meta.unbox(kernel).astype(self.config.jnp_dtype)

    def __call__(self, tokens, positions, token_mask, cache=None, embeds=None, return_hidden=False, pack_index=None):
        """Forward over a chunk.

        Args:
          tokens: [B, T] int32 (ignored where `embeds` is given).
          positions: [B, T] or [3, B, T] int32 rotary positions.
          token_mask: [B, T] bool, False on padding.
          cache: optional KVCache to append the chunk to.
          embeds: optional [B, T, D] input embeddings replacing the token lookup.
          return_hidden: return final hidden states instead of logits.
          pack_index: optional [G, N] int32, `packing.pack_index(token_mask, N, G)` with N
            >= the real tokens of each group of B / G rows: projections and MLPs run on
            the real tokens only.

        Returns:
          ([B, T, V] logits or [B, T, D] hidden states, updated cache or None).
        """
        if embeds is None:
            embeds = self.embed(tokens)
        token_mask = token_mask.astype(bool)
        if cache is None:
            length = token_mask.shape[1]
            causal = jnp.tril(jnp.ones((length, length), bool))
            mask = causal[None] & token_mask[:, None, :]
        else:
            key_mask = cache.write_mask(token_mask)
            mask = cache.attention_mask(key_mask, token_mask.shape[1])
        hidden, new_cache = self.model(embeds, positions, mask, cache, pack_index)
        if cache is not None:
            new_cache = new_cache.replace(key_mask=key_mask,
                                          end_index=cache.end_index + token_mask.shape[1]).constrained()
        if return_hidden:
            return hidden, new_cache
        return self.logits(hidden), new_cache


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype=None) -> kv_cache.KVCache:
    """An empty KVCache sized for `config` (dtype defaults to the compute dtype)."""
    return kv_cache.KVCache.init(
        num_layers=config.num_layers, batch=batch, max_length=max_length, num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim, dtype=dtype or config.jnp_dtype)
