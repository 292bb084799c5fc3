"""Padding-free position-wise work: gather a chunk's real tokens, scatter them back.

Projections, MLPs and norms act on each position alone, so they can run on the real
tokens of a padded [B, T] chunk packed into dense sequences; only attention needs the
[B, T] layout. The rows are split into G groups of B / G consecutive rows, and each
group's real tokens are packed into one row of a [G, N] layout: with G = the batch
shards of the mesh, each device packs (and computes) its own rows' tokens, as in the
padded layout; G = 1 packs the whole batch into one sequence (on several devices every
device would then compute every token). A pack index lists, per group, the packed
tokens' flat positions in the group's rows (row-major) and is padded with B / G * T, an
empty slot: packing reads 0 there and unpacking drops it. N is static, so a bucketed
count (`token_bucket`) keeps the number of compilations small.
"""

import jax
import jax.numpy as jnp

# A pack index's entries are distinct and ascending, then padded with an out-of-range slot
# (read as 0, dropped on write): XLA need not order colliding writes (XLA:CPU otherwise
# scatters a u32 winner index and gathers it back, per element).
_UNIQUE_SORTED = dict(unique_indices=True, indices_are_sorted=True)


def pack_index(token_mask: jax.Array, size: int, groups: int = 1) -> jax.Array:
    """[G, size] int32: per group of B / G rows of a [B, T] mask, the flat positions of its first
    `size` True entries, then B / G * T."""
    rows = token_mask.reshape(groups, -1)
    return jax.vmap(lambda m: jnp.nonzero(m, size=size, fill_value=m.size)[0])(rows).astype(jnp.int32)


def overflows(token_mask: jax.Array, size: int, groups: int = 1) -> jax.Array:
    """[] bool: a group of the [B, T] mask has more than `size` True entries (some would not be packed)."""
    return jnp.any(jnp.sum(token_mask.reshape(groups, -1), axis=1) > size)


def pack(x: jax.Array, index: jax.Array) -> jax.Array:
    """[B, T, ...] -> [G, N, ...], each group's positions `index` ([G, N]) in order; 0 in empty slots."""
    flat = x.reshape(index.shape[0], -1, *x.shape[2:])
    return jax.vmap(lambda rows, i: rows.at[i].get(mode="fill", fill_value=0, **_UNIQUE_SORTED))(flat, index)


def unpack(x: jax.Array, index: jax.Array, batch: int, length: int) -> jax.Array:
    """[G, N, ...] -> [B, T, ...] with x's rows at `index` and 0 at every other position."""
    per_group = batch * length // index.shape[0]

    def scatter(rows, i):
        return jnp.zeros((per_group, *x.shape[2:]), x.dtype).at[i].set(rows, mode="drop", **_UNIQUE_SORTED)

    out = jax.vmap(scatter)(x, index)
    return out.reshape(batch, length, *x.shape[2:])


def flat_positions(index: jax.Array, batch: int, length: int) -> jax.Array:
    """[G, N] pack index -> the same tokens' flat positions in [B, T] (B * T for empty slots)."""
    groups = index.shape[0]
    per_group = batch * length // groups
    return jnp.where(index < per_group, index + jnp.arange(groups)[:, None] * per_group, batch * length)


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
