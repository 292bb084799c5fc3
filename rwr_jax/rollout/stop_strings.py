"""Stop strings matched on the sampled token stream, on device, whatever the tokenisation.

`</query>` may be one token, three (`</`, `query`, `>`), or end inside a token such as
`>\\n\\n`. We match on bytes: each row keeps the last m - 1 bytes it wrote (m = the
longest stop string), and a stop string is found when it occurs in those bytes
followed by the first m - 1 bytes of the new token, or entirely inside the new token
(precomputed per token). Tables are [V, m - 1] bytes, built once from the tokenizer.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass(kw_only=True)
class StopTables:
    """Per-token byte tables for matching stop strings.

    Attributes:
      head: [V, m - 1] uint8, the first m - 1 bytes of each token (zero padded).
      tail: [V, m - 1] uint8, the last m - 1 bytes of each token (zero padded, right aligned).
      length: [V] int32, byte length of each token.
      contains: [V, S] bool, token text contains stop string s entirely.
      strings: [S, m] int32 stop strings as bytes, padded with -1.
      string_length: [S] int32.
    """

    head: jax.Array
    tail: jax.Array
    length: jax.Array
    contains: jax.Array
    strings: jax.Array
    string_length: jax.Array

    @property
    def width(self) -> int:
        return self.head.shape[1]


def build_stop_tables(token_bytes: list[bytes], stop_strings: tuple[str, ...]) -> StopTables:
    """Builds the tables from every token's bytes.

    Args:
      token_bytes: the byte string of each token id (len = model vocab; ids the
        tokenizer does not know get b"").
      stop_strings: e.g. ("</query>", "</answer>").

    Returns:
      StopTables with NumPy arrays.
    """
    if not stop_strings or any(not s for s in stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
    encoded = [s.encode() for s in stop_strings]
    width = max(len(s) for s in encoded) - 1
    vocab = len(token_bytes)
    head = np.zeros((vocab, max(width, 1)), np.uint8)
    tail = np.zeros((vocab, max(width, 1)), np.uint8)
    length = np.zeros((vocab,), np.int32)
    contains = np.zeros((vocab, len(encoded)), bool)
    for i, data in enumerate(token_bytes):
        length[i] = len(data)
        first, last = data[:width], data[-width:] if width else b""
        head[i, :len(first)] = np.frombuffer(first, np.uint8)
        tail[i, width - len(last):] = np.frombuffer(last, np.uint8)
        contains[i] = [s in data for s in encoded]
    strings = np.full((len(encoded), width + 1), -1, np.int32)
    for i, s in enumerate(encoded):
        strings[i, :len(s)] = np.frombuffer(s, np.uint8)
    return StopTables(head=head, tail=tail, length=length, contains=contains, strings=strings,
                      string_length=np.asarray([len(s) for s in encoded], np.int32))


def token_bytes_of(tokenizer, vocab_size: int) -> list[bytes]:
    """Byte strings of ids 0..vocab_size-1 for a byte-level BPE tokenizer (Qwen, GPT-2)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # host-only helper

    unicode_to_byte = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_tokens)
    out = []
    for token in tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer))))):
        if token is None:
            out.append(b"")
        elif token in special or any(c not in unicode_to_byte for c in token):
            out.append(token.encode())  # added tokens are stored as plain text
        else:
            out.append(bytes(unicode_to_byte[c] for c in token))
    return out + [b""] * (vocab_size - len(out))


def initial_tail(batch: int, tables: StopTables) -> jax.Array:
    """[B, m - 1] uint8 empty byte history."""
    return jnp.zeros((batch, tables.width), jnp.uint8)


def match_stop(tables: StopTables, tail: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Checks each row's new token against the stop strings and updates its byte tail.

    Args:
      tables: StopTables (device arrays).
      tail: [B, m - 1] uint8, last bytes written by each row (zero = nothing).
      tokens: [B] int32 new tokens.

    Returns:
      (matched [B, S] bool, new tail [B, m - 1] uint8).
    """
    width = tables.width
    head = tables.head[tokens]  # [B, w]
    length = tables.length[tokens]  # [B]
    # Window: previous tail then the new token's first bytes; bytes past the token's
    # length are invalid (-1 never matches a byte).
    head = jnp.where(jnp.arange(width)[None] < length[:, None], head.astype(jnp.int32), -1)
    window = jnp.concatenate([tail.astype(jnp.int32), head], axis=1)  # [B, 2w]
    num_strings, max_len = tables.strings.shape
    starts = jnp.arange(2 * width - max_len + 2)  # every start where a string could fit
    idx = starts[:, None] + jnp.arange(max_len)[None]  # [P, m]
    segments = window[:, jnp.clip(idx, 0, 2 * width - 1)]  # [B, P, m]
    in_range = idx < 2 * width
    pattern = tables.strings  # [S, m]
    used = jnp.arange(max_len)[None] < tables.string_length[:, None]  # [S, m]
    equal = (segments[:, None] == pattern[None, :, None]) & in_range[None, None]  # [B, S, P, m]
    found = jnp.any(jnp.all(equal | ~used[None, :, None], axis=-1), axis=-1)  # [B, S]
    matched = found | tables.contains[tokens]
    # New tail: the last w bytes of (old tail + token bytes). With the token's last
    # bytes right aligned after the old tail, keep old[s:] then the token's s bytes.
    combined = jnp.concatenate([tail, tables.tail[tokens]], axis=1)  # [B, 2w]
    shift = jnp.minimum(length, width)[:, None]
    j = jnp.arange(width)[None]
    new_tail = jnp.take_along_axis(combined, jnp.where(j < width - shift, shift + j, width + j), axis=1)
    return matched, new_tail


@dataclasses.dataclass(frozen=True)
class StopStrings:
    """The rollout's stop strings and the ids that end a completion outright."""

    query_end: str = "</query>"
    answer_end: str = "</answer>"

    @property
    def strings(self) -> tuple[str, str]:
        return (self.query_end, self.answer_end)
