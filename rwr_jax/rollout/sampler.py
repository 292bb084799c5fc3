"""The jitted decode loop: sample, record, stop per row, feed the token back.

One `lax.while_loop` generates for every active row until each has stopped: at EOS,
at `</answer>`, at `</query>` (a pause: the caller retrieves and extends), or at the
round's token budget. Rows write their tokens into a compact completion buffer; the
KV cache gets one slot per step for every row (inactive rows write masked slots), so
all shapes are static.
"""

import dataclasses
import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rwr_jax.models.kv_cache import KVCache
from rwr_jax.rollout import stop_strings

# Why a row stopped generating.
RUNNING, STOP_EOS, STOP_ANSWER, STOP_QUERY, STOP_ROUND_BUDGET, STOP_TOTAL_BUDGET = range(6)
# Who wrote a completion token.
SOURCE_PAD, SOURCE_MODEL, SOURCE_ENV = 0, 1, 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How tokens are drawn.

    Attributes:
      temperature: logits are divided by it; 0 means greedy.
      top_p: nucleus sampling threshold (1 = off).
      top_k: keep the k most likely tokens (0 = off).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k must be >= 0, got {self.top_k}")


def sample_tokens(logits: jax.Array, uniform: jax.Array, config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row.

    Args:
      logits: [B, V] float.
      uniform: [B] float32 uniform draws in [0, 1), one per row (unused when greedy).
      config: sampling settings (static).

    Returns:
      (tokens [B] int32, logprobs [B] float32): the log-probability of each token under
      softmax(logits / temperature) (the policy the trainer recomputes; top-p / top-k
      only restrict which tokens can be drawn). Greedy rows get log softmax(logits).
    """
    logits = logits.astype(jnp.float32)
    if config.temperature == 0:
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        logprobs = jax.nn.log_softmax(logits / config.temperature, axis=-1)
        if config.top_k or config.top_p < 1:
            probs = jax.nn.softmax(_restrict(logprobs, config), axis=-1)
        else:
            probs = jnp.exp(logprobs)
        tokens = draw(uniform, probs)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]


def draw(uniform: jax.Array, probs: jax.Array, block: int = 256) -> jax.Array:
    """Inverse-CDF sampling: [B] uniforms in [0, 1) and [B, V] probabilities -> [B] int32 tokens.

    Two levels (a block of `block` tokens, then a token inside it) keep both prefix sums
    short; compared with Gumbel-max (`jax.random.categorical`) this needs B random numbers
    instead of B x V, which was most of a decode step's sampling time on CPU. A token of
    probability 0 is never drawn, whatever the rounding of the prefix sums.
    """
    batch, vocab = probs.shape
    blocks = jnp.pad(probs, ((0, 0), (0, -vocab % block))).reshape(batch, -1, block)  # [B, V / block, block]
    block_mass = blocks.sum(axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    u = uniform.astype(probs.dtype)[:, None] * block_cdf[:, -1:]
    chosen = _first_above(block_cdf, block_mass, u)  # [B]
    in_block = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
    below = jnp.take_along_axis(block_cdf - block_mass, chosen[:, None], axis=1)
    inner = _first_above(below + jnp.cumsum(in_block, axis=-1), in_block, u)
    return (chosen * block + inner).astype(jnp.int32)


def _first_above(cdf: jax.Array, mass: jax.Array, u: jax.Array) -> jax.Array:
    """[B] index of the first positive-mass entry whose cdf exceeds u, else the last positive one."""
    positive = mass > 0
    hit = (cdf > u) & positive
    last = mass.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
    return jnp.where(hit.any(axis=-1), jnp.argmax(hit, axis=-1), last)


def _restrict(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    if config.top_k:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        keep = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) < config.top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


@flax.struct.dataclass(kw_only=True)
class DecodeState:
    """Everything the decode loop carries (B rows, C completion slots).

    Attributes:
      cache: the KV cache, one slot per step for every row.
      logits: [B, V] float32 next-token logits of each row.
      tokens: [B, C] int32 completion tokens (model and environment), compact.
      source: [B, C] int8 SOURCE_* of each completion token.
      logprobs: [B, C] float32 sampler log-probabilities (0 for environment tokens).
      length: [B] int32 tokens in each row's completion.
      next_position: [B] int32 text rotary position of each row's next token.
      active: [B] bool rows still generating in this round.
      round_tokens: [B] int32 tokens generated in this round.
      stop_reason: [B] int32 STOP_* of the last stop (RUNNING while active).
      stop_tail: [B, m - 1] uint8 recent bytes for stop-string matching.
      round_step: [] int32 decode steps taken in this round (0: the next
        `decode_round` starts a round).
      key: PRNG key.
      round_key: PRNG key of this round's uniforms (a round continued after the cache
        filled up draws the same ones).
    """

    cache: KVCache
    logits: jax.Array
    tokens: jax.Array
    source: jax.Array
    logprobs: jax.Array
    length: jax.Array
    next_position: jax.Array
    active: jax.Array
    round_tokens: jax.Array
    stop_reason: jax.Array
    stop_tail: jax.Array
    round_step: jax.Array
    key: jax.Array
    round_key: jax.Array

    @classmethod
    def start(cls, cache: KVCache, logits: jax.Array, next_position, capacity: int,
              tables: stop_strings.StopTables, key: jax.Array) -> "DecodeState":
        """The state after a prefill: every row active, empty completions of `capacity` slots.

        Args:
          cache: the prefilled cache.
          logits: [B, V] last-token logits of the prompts.
          next_position: [B] int, each row's next text position.
          capacity: C, completion slots per row.
          tables: stop-string tables (device arrays).
          key: PRNG key (donated with the state by `decode_round`).
        """
        batch = logits.shape[0]
        return cls(
            cache=cache, logits=logits, tokens=jnp.zeros((batch, capacity), jnp.int32),
            source=jnp.zeros((batch, capacity), jnp.int8), logprobs=jnp.zeros((batch, capacity), jnp.float32),
            length=jnp.zeros((batch,), jnp.int32), next_position=jnp.asarray(next_position, jnp.int32),
            active=jnp.ones((batch,), bool), round_tokens=jnp.zeros((batch,), jnp.int32),
            stop_reason=jnp.zeros((batch,), jnp.int32), stop_tail=stop_strings.initial_tail(batch, tables),
            round_step=jnp.zeros((), jnp.int32), key=key,
            round_key=jax.random.fold_in(key, 0))  # replaced when the first round starts; a buffer of its own

    def constrained(self) -> "DecodeState":
        """Rows over the batch axes, as the sharding rules say (no-op without rules): the
        decode loop's inputs and outputs keep one layout, so it compiles once and reuses
        its donated buffers."""
        rows = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name not in ("cache", "round_step", "key", "round_key")}
        rows = {name: nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1))
                for name, x in rows.items()}
        return self.replace(cache=self.cache.constrained(), **rows)


@functools.partial(jax.jit, static_argnames=("capacity",))
def start_decoding(cache: KVCache, logits: jax.Array, next_position, tables: stop_strings.StopTables,
                   key: jax.Array, *, capacity: int) -> DecodeState:
    """`DecodeState.start`, laid out as the sharding rules say (`DecodeState.constrained`), so
    the decode loop's first call sees the layout of its later ones."""
    return DecodeState.start(cache, logits, next_position, capacity, tables, key).constrained()


def _positions_for(model, next_position: jax.Array) -> jax.Array:
    """[B] text positions -> the model's position layout ([B] or [3, B])."""
    if model.config.mrope_section is None:
        return next_position
    return jnp.broadcast_to(next_position, (3, *next_position.shape))


def _step(model, params, sampling: SamplingConfig, tables: stop_strings.StopTables, eos_ids: tuple[int, ...],
          round_budget: int, uniform: jax.Array, state: DecodeState) -> DecodeState:
    """Samples one token per row (with `uniform` [B]), records it, applies stop rules, and feeds it back."""
    token, logprob = sample_tokens(state.logits, uniform, sampling)
    rows = jnp.arange(token.shape[0])
    active = state.active
    capacity = state.tokens.shape[1]
    write = jnp.minimum(state.length, capacity - 1)
    tokens = state.tokens.at[rows, write].set(jnp.where(active, token, state.tokens[rows, write]))
    source = state.source.at[rows, write].set(jnp.where(active, SOURCE_MODEL, state.source[rows, write]))
    logprobs = state.logprobs.at[rows, write].set(jnp.where(active, logprob, state.logprobs[rows, write]))
    length = state.length + active
    round_tokens = state.round_tokens + active
    matched, tail = stop_strings.match_stop(tables, state.stop_tail, token)
    tail = jnp.where(active[:, None], tail, state.stop_tail)
    is_eos = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32))
    # First matching rule wins; order = priority.
    reason = jnp.select(
        [is_eos, matched[:, 1], matched[:, 0], round_tokens >= round_budget, length >= capacity],
        [STOP_EOS, STOP_ANSWER, STOP_QUERY, STOP_ROUND_BUDGET, STOP_TOTAL_BUDGET], RUNNING)
    stop = active & (reason != RUNNING)
    still_active = active & ~stop
    # Feed the token of rows that go on (a paused row's token enters the cache with its
    # retrieved block; see engine.extend).
    positions = _positions_for(model, state.next_position)[..., None]
    logits, cache = model.apply({"params": params}, token[:, None], positions, still_active[:, None], state.cache)
    return state.replace(
        cache=cache, logits=jnp.where(still_active[:, None], logits[:, 0].astype(jnp.float32), state.logits),
        tokens=tokens, source=source, logprobs=logprobs, length=length,
        next_position=state.next_position + still_active, active=still_active, round_tokens=round_tokens,
        stop_reason=jnp.where(stop, reason, state.stop_reason), stop_tail=tail)


def _decode_round(model, params, state: DecodeState, tables: stop_strings.StopTables, *, sampling: SamplingConfig,
                 eos_ids: tuple[int, ...], round_budget: int) -> DecodeState:
    """Generates until every active row has stopped, or the cache is full.

    A call that fills the cache leaves the rows that have not stopped active (and
    `round_step` > 0): free slots (`compact_cache`) and call again to continue the
    round, with the uniforms it would have drawn had the cache not filled up.

    Args:
      model: DecoderLM or VisionLanguageLM (static).
      params: its params.
      state: DecodeState with `active` rows to run (donated).
      tables: stop-string tables (device arrays).
      sampling: sampling settings.
      eos_ids: token ids that end a completion.
      round_budget: new tokens a row may write in this round.

    Returns:
      The state with every row inactive unless the cache is full; `stop_reason` says why
      each stopped.
    """
    # A round takes at most round_budget steps (active rows all start it at 0 tokens);
    # its uniforms are drawn up front, so the loop body holds no random-number kernels.
    key, round_key = jax.lax.cond(state.round_step == 0, lambda: tuple(jax.random.split(state.key)),
                                  lambda: (state.key, state.round_key))
    uniforms = jax.random.uniform(round_key, (round_budget, state.active.shape[0]), jnp.float32)
    step = functools.partial(_step, model, params, sampling, tables, eos_ids, round_budget)

    def keep_going(carry):
        _, state = carry
        return jnp.any(state.active) & (state.cache.end_index < state.cache.max_length)

    def body(carry):
        index, state = carry
        return index + 1, step(uniforms[index], state)

    state = state.replace(key=key, round_key=round_key)
    steps, state = jax.lax.while_loop(keep_going, body, (state.round_step, state))
    return state.replace(round_step=steps).constrained()


# XLA:CPU runs dots either as YNNPACK kernels (its default) or as Eigen matmuls. A decode
# step multiplies a few rows by every weight matrix: with megabyte weights Eigen streams
# them at about twice YNNPACK's bandwidth (8.6 vs 4.6 GB/s for [16, 512] x [512, 32000]
# on the 2-core development machine), while for tiny weights YNNPACK's lower per-call
# cost wins (0.45 vs 0.8 ms per step of the benchmarks' tiny model). Other backends
# ignore the option.
EIGEN_DOT_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
EIGEN_DOTS_MIN_WEIGHT_BYTES = 1 << 20
_DECODE_ROUND = {
    use_eigen: jax.jit(_decode_round, static_argnames=("model", "sampling", "eos_ids", "round_budget"),
                       donate_argnames=("state",), compiler_options=EIGEN_DOT_OPTIONS if use_eigen else None)
    for use_eigen in (False, True)}


def decode_with_eigen_dots(config) -> bool:
    """Whether a decode step of a model with this DecoderConfig compiles its dots for Eigen
    (MLP weight matrix >= EIGEN_DOTS_MIN_WEIGHT_BYTES) rather than for YNNPACK."""
    return config.hidden_size * config.intermediate_size * jnp.dtype(config.jnp_param_dtype).itemsize \
        >= EIGEN_DOTS_MIN_WEIGHT_BYTES


def decode_round_program(config):
    """The jitted `_decode_round` for a model with this DecoderConfig (its dot library,
    `decode_with_eigen_dots`): what `decode_round` runs, e.g. to compile it ahead of time."""
    return _DECODE_ROUND[decode_with_eigen_dots(config)]


def decode_round(model, params, state: DecodeState, tables: stop_strings.StopTables, *, sampling: SamplingConfig,
                 eos_ids: tuple[int, ...], round_budget: int) -> DecodeState:
    """Generates until every active row has stopped, or the cache is full: `_decode_round`,
    jitted with the dot library that suits the model's size (see `decode_with_eigen_dots`)."""
    return decode_round_program(model.config)(
        model, params, state, tables, sampling=sampling, eos_ids=eos_ids, round_budget=round_budget)


@functools.partial(jax.jit, donate_argnames=("state",))
def compact_cache(state: DecodeState) -> DecodeState:
    """The state with its cache compacted (`KVCache.compacted`): the slots that stopped or
    paused rows left empty become free, nothing else changes."""
    return state.replace(cache=state.cache.compacted())
