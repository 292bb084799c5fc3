"""Retrieval-interleaved rollouts: decode, pause at `</query>`, retrieve, extend, resume.

    trajectory = rollout(model, params, prompts, tokenizer, retrieve, config, key)

Round r: every active row decodes until it stops (EOS, `</answer>`, `</query>`, the
round budget). Rows paused at `</query>` go back to the host together: their queries
are parsed from the tokens they wrote this round, searched in one call, and each
row's `<retrieve> (1) …\\n(2) …\\n(3) …\\n </retrieve>` block is tokenised once and
appended to the KV cache with one jitted chunked prefill ("extend"), at the positions
that continue the row's text. Sampled tokens are never re-tokenised (but a round's
text ends at its first `</query>`: a last token running past it is cut there, see
`_cut_after_query`); the loss mask and block kinds come from who wrote each token.
"""

import dataclasses
import functools
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.models.qwen2_vl.decoder import init_cache
from rwr_jax.rollout import sampler, stop_strings
from rwr_jax.rollout.trajectory import FINISH_REASONS, Passage, Trajectory

Retrieve = Callable[[list[str]], list[list[Passage]]]
_QUERY_OPEN, _QUERY_CLOSE = "<query>", "</query>"
FINISH_REASONS_INDEX = {name: i for i, name in enumerate(FINISH_REASONS)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """Rollout settings (Med-RwR defaults: 3 rounds, 4,096 new tokens per round).

    Attributes:
      max_rounds: generation rounds per completion (so max_rounds - 1 retrievals).
      max_new_tokens_per_round: model tokens a row may write per round.
      max_completion_length: completion slots per row, model + retrieved tokens.
      group_size: G completions per prompt, sharing one prefill.
      sampling: temperature / top-p / top-k.
      extend_bucket: retrieved-block chunks are padded to a multiple of this.
    """

    max_rounds: int = 3
    max_new_tokens_per_round: int = 4096
    max_completion_length: int = 8192
    group_size: int = 8
    sampling: sampler.SamplingConfig = sampler.SamplingConfig()
    extend_bucket: int = 64

    def __post_init__(self):
        for name in ("max_rounds", "max_new_tokens_per_round", "max_completion_length", "group_size",
                     "extend_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")


def parse_query(text: str) -> str:
    """The query of a round: text between the last `<query>` and the first `</query>`,
    surrounding quotes removed, whitespace collapsed ("" if there is none)."""
    end = text.find(_QUERY_CLOSE)
    if end < 0:
        return ""
    start = text.rfind(_QUERY_OPEN, 0, end)
    if start < 0:
        return ""
    return clean_query(text[start + len(_QUERY_OPEN):end])


def clean_query(text: str) -> str:
    """A query block's text as searched: whitespace collapsed, surrounding quotes removed."""
    return " ".join(text.split()).strip("\"'“”‘’ ").strip()


def format_retrieved(passages: Sequence[Passage]) -> str:
    """Med-RwR's retrieved block: `<retrieve> (1) p1\\n(2) p2\\n </retrieve>`, or None."""
    if not passages:
        return "<retrieve> None </retrieve>"
    return "<retrieve> " + "".join(f"({j}) {p.text}\n" for j, p in enumerate(passages, 1)) + " </retrieve>"


def _logits_at(model, params, hidden: jax.Array, index: jax.Array) -> jax.Array:
    """[B, V] float32 logits of position index[b] of each row of [B, T, D] hidden states
    (the LM head runs on B positions, not B x T)."""
    picked = jnp.take_along_axis(hidden, index[:, None, None], axis=1)
    return model.apply({"params": params}, picked, method=type(model).logits)[:, 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("state",))
def extend(model, params, state: sampler.DecodeState, chunk: jax.Array, chunk_mask: jax.Array,
           env_count: jax.Array) -> sampler.DecodeState:
    """Appends a chunk per row to the cache and the completions, then reactivates those rows.

    Args:
      model: the model (static).
      params: its params.
      state: decode state after a round (donated).
      chunk: [B, K] int32: a paused row's pending (sampled) token, then its block ids.
      chunk_mask: [B, K] bool, True on the real tokens of extended rows.
      env_count: [B] int32 block tokens per row (chunk length minus the pending token).

    Returns:
      The state with extended rows active and their next-token logits set.
    """
    count = chunk_mask.sum(axis=1).astype(jnp.int32)
    extended = count > 0
    positions = state.next_position[:, None] + jnp.arange(chunk.shape[1])[None]
    if model.config.mrope_section is not None:
        positions = jnp.broadcast_to(positions, (3, *positions.shape))
    hidden, cache = model.apply({"params": params}, chunk, positions, chunk_mask, state.cache, return_hidden=True)
    last = _logits_at(model, params, hidden, jnp.maximum(count - 1, 0))
    # Block ids go after the pending token, which the completion already holds.
    rows = jnp.arange(chunk.shape[0])[:, None]
    j = jnp.arange(chunk.shape[1] - 1)[None]
    slot = jnp.where(j < env_count[:, None], state.length[:, None] + j, state.tokens.shape[1])
    return state.replace(
        cache=cache,
        logits=jnp.where(extended[:, None], last, state.logits),
        tokens=state.tokens.at[rows, slot].set(chunk[:, 1:], mode="drop"),
        source=state.source.at[rows, slot].set(jnp.int8(sampler.SOURCE_ENV), mode="drop"),
        logprobs=state.logprobs.at[rows, slot].set(0.0, mode="drop"),
        length=state.length + env_count,
        next_position=state.next_position + count,
        active=extended,
        round_tokens=jnp.zeros_like(state.round_tokens), round_step=jnp.zeros_like(state.round_step),
        stop_reason=jnp.where(extended, sampler.RUNNING, state.stop_reason),
        stop_tail=jnp.where(extended[:, None], jnp.zeros_like(state.stop_tail), state.stop_tail)).constrained()


@functools.partial(jax.jit, static_argnames=("model", "group_size", "cache_length"))
def prefill_group(model, params, tokens, token_mask, positions, images, *, group_size: int, cache_length: int):
    """Prefills each prompt once and copies its cache to its G completions.

    Returns:
      (cache with P * G rows, [P * G, V] last-token logits).
    """
    cache = init_cache(model.config, batch=tokens.shape[0], max_length=cache_length)
    kwargs = {} if images is None else {"images": images}
    hidden, cache = model.apply({"params": params}, tokens, positions, token_mask, cache, return_hidden=True,
                                **kwargs)
    logits = _logits_at(model, params, hidden, jnp.full(tokens.shape[:1], tokens.shape[1] - 1))
    return cache.repeat_rows(group_size), jnp.repeat(logits, group_size, axis=0)


@dataclasses.dataclass(kw_only=True)
class PromptBatch:
    """P left-padded prompts (host arrays).

    Attributes:
      tokens: [P, T] int32.
      token_mask: [P, T] bool.
      positions: [P, T] int32 (text model) or [3, P, T] int32 (mRoPE, `positions.rope_index`).
      images: optional VisionInputs of the prompts' images.
    """

    tokens: np.ndarray
    token_mask: np.ndarray
    positions: np.ndarray
    images: object = None


def _round_text(tokenizer, tokens: np.ndarray, source: np.ndarray, start: int, end: int) -> str:
    ids = tokens[start:end][source[start:end] == sampler.SOURCE_MODEL]
    return tokenizer.decode(ids.tolist(), skip_special_tokens=False)


def _cut_after_query(state: sampler.DecodeState, tokens: np.ndarray, length: np.ndarray, texts: dict[int, str],
                     tokenizer, temperature: float) -> sampler.DecodeState:
    """Ends each paused row's text at its first `</query>` (METHOD.md, Rollout).

    The token that completes the tag may carry more text (Qwen writes `</query><retrieve>`
    as ' </', 'query', '><', ...): that last token is replaced, in the state and in
    `tokens` (host copy, updated in place), by the token of its text up to the tag's end,
    with that token's log-prob under the logits it was sampled from.

    Args:
      texts: paused row -> the model text it wrote this round (ending in that token).
    """
    cut = {}
    for b, text in texts.items():
        end = text.find(_QUERY_CLOSE)
        excess = len(text) - end - len(_QUERY_CLOSE)
        if end < 0 or excess <= 0:
            continue
        head = tokenizer.decode([int(tokens[b, length[b] - 1])], skip_special_tokens=False)[:-excess]
        ids = tokenizer.encode(head, add_special_tokens=False)
        if len(ids) == 1:
            cut[b] = ids[0]
        else:  # no such token in Qwen's vocabulary (every one that runs past the tag starts with '>')
            logging.warning("row %d: %r runs past %s and %r is %d tokens; its text is kept whole", b,
                            text[end:], _QUERY_CLOSE, head, len(ids))
    if not cut:
        return state
    rows = np.fromiter(cut, np.int32)
    ids, slots = np.fromiter(cut.values(), np.int32), length[rows] - 1
    tokens[rows, slots] = ids
    logits = state.logits[rows] / (temperature or 1.0)
    logprobs = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(rows)), ids]
    return state.replace(tokens=state.tokens.at[rows, slots].set(ids),
                         logprobs=state.logprobs.at[rows, slots].set(logprobs))


def _compacted(state: sampler.DecodeState, room: int) -> sampler.DecodeState:
    """The state with `room` free cache slots, compacting the cache if it has fewer
    (`cache_sizes` makes sure that compaction frees enough)."""
    free = state.cache.max_length - int(state.cache.end_index)
    if free >= room:
        return state
    state = sampler.compact_cache(state)
    free = state.cache.max_length - int(state.cache.end_index)
    if free < room:
        raise RuntimeError(f"the rollout's KV cache of {state.cache.max_length} slots has {free} free after "
                           f"compaction, {room} needed: it is smaller than `engine.cache_sizes` makes it")
    return state


def retrieved_block_ids(tokenizer, passages: list[list[Passage]],
                        limit: int) -> tuple[list[list[int]], list[list[Passage]]]:
    """Tokenises each row's retrieved block once, trimming passages to fit `limit` tokens.

    Returns:
      (block ids, the passages each block holds: trimmed, the emptied ones left out).
    """
    blocks, kept = [], []
    for row in passages:
        ids = tokenizer.encode(format_retrieved(row), add_special_tokens=False)
        keep = list(row)
        while len(ids) > limit and keep:
            # Shorten the longest passage by a quarter until the block fits.
            longest = max(range(len(keep)), key=lambda i: len(keep[i].text))
            text = keep[longest].text
            keep[longest] = keep[longest]._replace(text=text[:max(0, len(text) * 3 // 4 - 1)])
            if not keep[longest].text:
                keep.pop(longest)
            ids = tokenizer.encode(format_retrieved(keep), add_special_tokens=False)
        blocks.append(ids)
        kept.append(keep)
    return blocks, kept


def cache_sizes(config: RolloutConfig, prompt_length: int, max_retrieved_tokens: int) -> tuple[int, int]:
    """(K, cache length) of a rollout: K = the width of an `extend` chunk (a pending token and
    a retrieved block, rounded up to `extend_bucket`).

    Rows share the cache's slots (`KVCache`), so a round takes as many as its longest
    row writes: the prompt, every round's budget and a chunk between rounds always fit.
    A row itself holds at most P + C - 1 real slots (C = `max_completion_length`), so a
    cache of P + C + K slots is enough when that is less: when it fills up, the rollout
    compacts it (`sampler.compact_cache`) to at most P + C - 1 slots, which leaves room
    for a chunk and at least K + 1 decode steps before the next compaction.
    """
    chunk = -(-(max_retrieved_tokens + 1) // config.extend_bucket) * config.extend_bucket
    every_round = config.max_rounds * config.max_new_tokens_per_round + (config.max_rounds - 1) * chunk
    return chunk, prompt_length + min(every_round, config.max_completion_length + chunk)


def rollout(model, params, prompts: PromptBatch, tokenizer, retrieve: Retrieve, config: RolloutConfig,
            key: jax.Array, *, stop_tables: stop_strings.StopTables, eos_ids: tuple[int, ...],
            max_retrieved_tokens: int = 1024) -> Trajectory:
    """Samples G completions per prompt with retrieval rounds.

    Args:
      model: DecoderLM or VisionLanguageLM.
      params: its params.
      prompts: P prompts.
      tokenizer: decodes model text (queries) and encodes retrieved blocks.
      retrieve: queries -> passages per query (one call per round).
      config: rollout settings.
      key: PRNG key.
      stop_tables: from `stop_strings.build_stop_tables` for ("</query>", "</answer>").
      eos_ids: ids that end a completion.
      max_retrieved_tokens: a retrieved block is trimmed to this many tokens.

    Returns:
      Trajectory of P * G rows.
    """
    num_prompts, prompt_length = prompts.tokens.shape
    g, capacity = config.group_size, config.max_completion_length
    smallest = 0 if config.max_rounds == 1 else len(tokenizer.encode(format_retrieved([]), add_special_tokens=False))
    if max_retrieved_tokens < smallest:  # (one round: no block, the tokenizer is never used)
        raise ValueError(f"max_retrieved_tokens must be >= {smallest} (the block {format_retrieved([])!r}), "
                         f"got {max_retrieved_tokens}")
    chunk, cache_length = cache_sizes(config, prompt_length, max_retrieved_tokens)
    cache, logits = prefill_group(model, params, jnp.asarray(prompts.tokens), jnp.asarray(prompts.token_mask, bool),
                                  jnp.asarray(prompts.positions), prompts.images, group_size=g,
                                  cache_length=cache_length)
    text_positions = prompts.positions if prompts.positions.ndim == 2 else prompts.positions.max(axis=0)
    next_position = np.repeat(np.where(prompts.token_mask, text_positions, -1).max(axis=1) + 1, g)
    batch = num_prompts * g
    tables = jax.tree_util.tree_map(jnp.asarray, stop_tables)
    state = sampler.start_decoding(cache, logits, next_position, tables, key, capacity=capacity)
    finish = np.zeros((batch,), np.int32)
    rounds = np.zeros((batch,), np.int32)
    queries: list[list[str]] = [[] for _ in range(batch)]
    passages: list[list[list[Passage]]] = [[] for _ in range(batch)]
    round_start = np.zeros((batch,), np.int64)
    decode = functools.partial(sampler.decode_round, model, params, tables=tables, sampling=config.sampling,
                               eos_ids=eos_ids, round_budget=config.max_new_tokens_per_round)
    for round_index in range(config.max_rounds):
        ran = np.asarray(state.active)
        rounds += ran
        state = decode(state)
        while np.asarray(state.active).any():  # the cache filled up: free the slots of stopped rows, go on
            state = _compacted(state, room=1)
            state = decode(state)
        reason, length = np.asarray(state.stop_reason), np.asarray(state.length)
        paused = np.flatnonzero(ran & (reason == sampler.STOP_QUERY))
        finish = np.where(ran, reason, finish)
        if not len(paused):
            break
        tokens, source = np.array(state.tokens), np.asarray(state.source)  # tokens: a writable copy
        texts = {b: _round_text(tokenizer, tokens[b], source[b], round_start[b], length[b]) for b in paused}
        round_queries = {b: parse_query(text) for b, text in texts.items()}
        state = _cut_after_query(state, tokens, length, texts, tokenizer, config.sampling.temperature)
        if round_index == config.max_rounds - 1:
            finish[paused] = FINISH_REASONS_INDEX["max_rounds"]
            break
        searchable = [b for b in paused if round_queries[b]]
        finish[[b for b in paused if not round_queries[b]]] = FINISH_REASONS_INDEX["empty_query"]
        results = retrieve([round_queries[b] for b in searchable]) if searchable else []
        blocks, results = retrieved_block_ids(tokenizer, results, max_retrieved_tokens)
        chunk_ids = np.zeros((batch, chunk), np.int32)
        chunk_mask = np.zeros((batch, chunk), bool)
        env_count = np.zeros((batch,), np.int32)
        for b, ids, found in zip(searchable, blocks, results):
            if length[b] + len(ids) >= capacity:  # no slot left for the model after the block
                finish[b] = FINISH_REASONS_INDEX["total_budget"]
                continue
            queries[b].append(round_queries[b])
            passages[b].append(list(found))
            chunk_ids[b, :1 + len(ids)] = [tokens[b, length[b] - 1]] + ids
            chunk_mask[b, :1 + len(ids)] = True
            env_count[b] = len(ids)
            round_start[b] = length[b] + len(ids)
            finish[b] = FINISH_REASONS_INDEX["running"]
        if not env_count.any():
            break
        state = _compacted(state, room=chunk)
        state = extend(model, params, state, jnp.asarray(chunk_ids), jnp.asarray(chunk_mask), jnp.asarray(env_count))
    repeat = functools.partial(np.repeat, repeats=g, axis=0)
    return Trajectory(
        prompt_tokens=repeat(prompts.tokens), prompt_mask=repeat(prompts.token_mask).astype(bool),
        prompt_positions=np.repeat(prompts.positions, g, axis=prompts.positions.ndim - 2),
        tokens=np.asarray(state.tokens), source=np.asarray(state.source), logprobs=np.asarray(state.logprobs),
        length=np.asarray(state.length), rounds=rounds, finish_reason=finish, queries=queries, passages=passages)
