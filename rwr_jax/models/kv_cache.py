"""The explicit key/value cache: a value passed into and returned from the model.

Slots are written left to right and shared by all rows of the batch (`end_index` is
one scalar), so prefill, decode and extend are static-shape dynamic-update-slices.
Rows differ only in which slots hold real tokens (`key_mask`): left padding of a
prompt, or padding inside an appended chunk, are slots with key_mask False that no
query ever attends to. Rotary positions are not derived from slots; the caller passes
them, so a row's positions stay contiguous across padded slots. A row that has stopped
(or waits for a retrieved block) still takes a slot at every step; `compacted` gives
those slots back.
"""

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

# Logical axis names of each layer's keys / values and of the key mask, for the sharding rules.
CACHE_AXES = ("activation_batch", "activation_kv_heads", "activation_length", "activation_head_dim")
KEY_MASK_AXES = ("activation_batch", "activation_length")


@flax.struct.dataclass(kw_only=True)
class KVCache:
    """Attention keys and values of every layer.

    Attributes:
      keys: L arrays [B, K, S, head_dim], one per layer, rotated keys (heads before
        slots: each head's slots are contiguous, so attention reads them as one matrix).
        One buffer per layer, not one stacked [L, ...] array: a layer updates its own
        buffer in place and attention reads it directly (a slice of a stacked cache
        is a copy of the layer's whole cache on every decode step).
      values: L arrays [B, K, S, head_dim].
      key_mask: [B, S] bool, True where a slot holds a real token.
      end_index: [] int32, the next slot to write (equal for all rows).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    end_index: jax.Array

    @classmethod
    def init(cls, *, num_layers: int, batch: int, max_length: int, num_kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
        """An empty cache with room for `max_length` tokens per row."""
        shape = (batch, num_kv_heads, max_length, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            key_mask=jnp.zeros((batch, max_length), bool),
            end_index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.key_mask.shape[1]

    def repeat_rows(self, repeats: int) -> "KVCache":
        """Each row's cache `repeats` times in a row ([B, ...] -> [B * repeats, ...]): G
        completions continuing one prompt. Differentiable; the gradient sums over the copies."""
        repeat = functools.partial(jnp.repeat, repeats=repeats, axis=0)
        return self.replace(keys=tuple(map(repeat, self.keys)), values=tuple(map(repeat, self.values)),
                            key_mask=repeat(self.key_mask)).constrained()

    def constrained(self) -> "KVCache":
        """The cache laid out as the sharding rules say (`CACHE_AXES`; rows over the batch axes).
        Without it XLA may keep a whole copy on every device (it did, for a prefill's output)."""
        def layout(x):
            return nn.with_logical_constraint(x, CACHE_AXES)
        return self.replace(keys=tuple(map(layout, self.keys)), values=tuple(map(layout, self.values)),
                            key_mask=nn.with_logical_constraint(self.key_mask, KEY_MASK_AXES))

    def compacted(self) -> "KVCache":
        """Every row's real slots moved to the front, in order; end_index = the most any row holds.

        The slots rows left empty (padding, steps taken while a row was stopped) become
        free, and attention is unchanged: each query sees the same keys in the same order
        (causality is by slot order, positions are not derived from slots). One gather of
        the whole cache.
        """
        order = jnp.argsort(~self.key_mask, axis=1, stable=True)  # [B, S]: real slots first
        count = self.key_mask.sum(axis=1, dtype=jnp.int32)

        def gather(x):  # [B, K, S, head_dim]
            return jnp.take_along_axis(x, order[:, None, :, None], axis=2)

        return self.replace(keys=tuple(map(gather, self.keys)), values=tuple(map(gather, self.values)),
                            key_mask=jnp.arange(self.max_length)[None, :] < count[:, None],
                            end_index=jnp.max(count)).constrained()

    def write_mask(self, token_mask: jax.Array) -> jax.Array:
        """key_mask after writing a chunk whose valid tokens are `token_mask` [B, T]."""
        return jax.lax.dynamic_update_slice(self.key_mask, token_mask.astype(bool), (0, self.end_index))

    def attention_mask(self, key_mask: jax.Array, chunk_length: int) -> jax.Array:
        """Causal mask of a chunk written at end_index against all slots.

        Args:
          key_mask: [B, S] bool, from `write_mask`.
          chunk_length: T, tokens in the chunk.

        Returns:
          [B, T, S] bool.
        """
        query_slot = self.end_index + jnp.arange(chunk_length)
        causal = jnp.arange(self.max_length)[None, :] <= query_slot[:, None]  # [T, S]
        return key_mask[:, None, :] & causal[None]
