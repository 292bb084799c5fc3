"""Padding-free position-wise work: gather a chunk's real tokens, scatter them back.

Projections, MLPs and norms act on each position alone, so they can run on the N real
tokens of a padded [B, T] chunk packed into one [1, N] sequence; only attention needs
the [B, T] layout. A pack index lists the packed tokens' flat positions (row-major in
[B, T]) and is padded with B * T, an empty slot: packing reads 0 there and unpacking
drops it. N is static, so a bucketed count (`token_bucket`) keeps the number of
compilations small.
"""

import jax
import jax.numpy as jnp


def pack_index(token_mask: jax.Array, size: int) -> jax.Array:
    """[size] int32 flat positions of the first `size` True entries of a [B, T] mask, then B * T."""
    return jnp.nonzero(token_mask.reshape(-1), size=size, fill_value=token_mask.size)[0].astype(jnp.int32)


def pack(x: jax.Array, index: jax.Array) -> jax.Array:
    """[B, T, ...] -> [1, N, ...], the positions `index` ([N]) in order; 0 in empty slots."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat.at[index].get(mode="fill", fill_value=0)[None]


def unpack(x: jax.Array, index: jax.Array, batch: int, length: int) -> jax.Array:
    """[1, N, ...] -> [B, T, ...] with x's rows at `index` and 0 at every other position."""
    out = jnp.zeros((batch * length, *x.shape[2:]), x.dtype).at[index].set(x[0], mode="drop")
    return out.reshape(batch, length, *x.shape[2:])


def token_bucket(count: int, granule: int) -> int:
    """A static N >= count (a pack index's size), from few distinct values.

    Below `granule` (e.g. the LM-head chunk) the next power of two; above it a multiple
    of max(granule, 2 ** (k - 2)) for 2 ** k <= count: at most 4 sizes per octave, and
    never more padding than chunking by `granule` adds anyway.
    """
    count = max(int(count), 1)
    if count <= granule:
        return 1 << (count - 1).bit_length()
    step = max(granule, 1 << (count.bit_length() - 3))
    return -(-count // step) * step
