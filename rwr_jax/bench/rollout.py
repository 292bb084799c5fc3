r"""Rollout benchmarks: our sampler vs `transformers` generate, and retrieval rounds (BENCHMARKS.md).

    python launch/bench.py rollout rollout_retrieval --shapes=tiny,small --repeats=3

rollout: `engine.rollout` (one round, no stop strings or EOS, so every row writes exactly
`new_tokens`) vs `generate(do_sample=True, top_k=0, top_p=1, min_new_tokens=max_new_tokens)`
of the same random `Qwen2ForCausalLM` (saved to a temp dir, loaded with
`convert.load_hf_params`); plus the roofline fraction of our decode against the
bandwidth of a decode-shaped matmul measured in the same run, and a phase breakdown.
rollout_retrieval: three rounds with two retrieved blocks (3 passages of ~100 token
ids each) appended by `engine.extend`, against (a) one round writing the same number of
model tokens in a cache of the same length, (a2) the same tokens with both blocks in
the prompt (equal total length, one prefill), and (b) re-encoding the whole
conversation with a fresh prefill every round (the release's approach); all on our model.
Each benchmark warms every side up first (first-call time reported apart), interleaves
the timed repeats and reports medians, ending with one summary line per pair.
"""

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax.bench.common import (SHAPES, Phases, emit, full_precision_on_gpu, random_qwen2, summary,
                                  time_interleaved, torch_reference_runs)
from rwr_jax.models.qwen2_vl import convert
from rwr_jax.rollout import engine, sampler, stop_strings

BATCH, PROMPT_LENGTH, NEW_TOKENS = 16, 64, 128
ROUND_BUDGETS = (43, 43, 42)  # retrieval benchmark: model tokens per round (sum = NEW_TOKENS)
PASSAGES, PASSAGE_TOKENS, BLOCK_MARKUP_TOKENS, EXTEND_BUCKET = 3, (94, 104), 8, 64


@dataclasses.dataclass(kw_only=True)
class Setup:
    """The same random weights on both sides, and the benchmark's prompts."""

    shape: str
    hf_model: object
    model: object
    params: dict
    prompts: engine.PromptBatch
    tables: stop_strings.StopTables
    key: jax.Array

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size


def build_setup(shape: str, seed: int = 0) -> Setup:
    """A random HF Qwen2ForCausalLM of `shape` and the same weights in our DecoderLM; [16, 64] prompts."""
    hf_model, config, params = random_qwen2(shape, seed)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (BATCH, PROMPT_LENGTH)).astype(np.int32)
    prompts = engine.PromptBatch(tokens=tokens, token_mask=np.ones_like(tokens, bool),
                                 positions=np.broadcast_to(np.arange(PROMPT_LENGTH, dtype=np.int32), tokens.shape))
    tables = stop_strings.build_stop_tables([b""] * config.vocab_size, stop_strings.StopStrings().strings)
    return Setup(shape=shape, hf_model=hf_model, model=convert.build_model(config), params=params, prompts=prompts,
                 tables=jax.tree_util.tree_map(jnp.asarray, tables), key=jax.random.key(seed))


def param_bytes(params: dict) -> tuple[int, int]:
    """(all parameter bytes, bytes a decode step streams: all but the embedding table)."""
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    return total, total - params["model"]["embed_tokens"]["embedding"].nbytes


def logits_max_diff(s: Setup) -> float:
    """max |ours - HF| of the prompts' last-token logits (checks both sides hold the same model)."""
    import torch  # pylint: disable=g-import-not-at-top
    with torch.inference_mode():
        tokens = torch.from_numpy(s.prompts.tokens.astype(np.int64)).to(s.hf_model.device)
        ref = s.hf_model(input_ids=tokens).logits[:, -1].cpu().numpy()
    _, ours = engine.prefill_group(s.model, s.params, jnp.asarray(s.prompts.tokens), jnp.asarray(s.prompts.token_mask),
                                   jnp.asarray(s.prompts.positions), None, group_size=1, cache_length=PROMPT_LENGTH)
    return float(np.abs(np.asarray(ours) - ref).max())


def matmul_bandwidth(width: int, vocab: int, repeats: int = 50) -> tuple[float, float]:
    """(GB/s of weights, GFLOP/s) of a jitted fp32 [16, width] x [width, vocab] matmul, median of `repeats`;
    the faster of XLA:CPU's two dot libraries (YNNPACK, Eigen: see `sampler.EIGEN_DOT_OPTIONS`)."""
    x = jax.random.normal(jax.random.key(1), (BATCH, width), jnp.float32)
    w = jax.random.normal(jax.random.key(2), (width, vocab), jnp.float32)
    best = np.inf
    for options in (None, sampler.EIGEN_DOT_OPTIONS):
        matmul = jax.jit(jnp.matmul, compiler_options=options)
        matmul(x, w).block_until_ready()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(x, w).block_until_ready()
            times.append(time.perf_counter() - start)
        best = min(best, float(np.median(times)))
    return w.nbytes / best / 1e9, 2 * BATCH * width * vocab / best / 1e9


def prefill_and_decode(s: Setup, tokens: np.ndarray, token_mask: np.ndarray, budget: int, cache_length: int,
                       capacity: int, key, clock: Phases) -> sampler.DecodeState:
    """Prefills left-padded rows into a `cache_length` cache, then decodes one round of `budget` tokens."""
    positions = np.maximum(np.cumsum(token_mask, axis=1) - 1, 0).astype(np.int32)
    clock.mark("host")
    cache, logits = engine.prefill_group(s.model, s.params, jnp.asarray(tokens), jnp.asarray(token_mask),
                                         jnp.asarray(positions), None, group_size=1, cache_length=cache_length)
    clock.mark("prefill", logits)
    # A copy of the key: decode_round donates the state, key included.
    state = sampler.DecodeState.start(cache, logits, token_mask.sum(axis=1), capacity, s.tables,
                                      jax.random.fold_in(key, 0))
    clock.mark("host")
    state = sampler.decode_round(s.model, s.params, state, s.tables, sampling=sampler.SamplingConfig(), eos_ids=(),
                                 round_budget=budget)
    clock.mark("decode", state.length)
    return state


def fetch(state: sampler.DecodeState, clock: Phases) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Completion (tokens, source, length) on the host."""
    out = np.asarray(state.tokens), np.asarray(state.source), np.asarray(state.length)
    clock.mark("host")
    return out


def left_pad(rows: list[list[int]], bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ([B, T] int32, [B, T] bool) left padded, T a multiple of `bucket`."""
    total = -(-max(map(len, rows)) // bucket) * bucket
    tokens, mask = np.zeros((len(rows), total), np.int32), np.zeros((len(rows), total), bool)
    for b, row in enumerate(rows):
        tokens[b, total - len(row):], mask[b, total - len(row):] = row, True
    return tokens, mask


# --- rollout: ours vs transformers generate ---------------------------------------------------------------


def ours_rollout(s: Setup, clock: Phases):
    """The public `engine.rollout`: one round of NEW_TOKENS model tokens per row."""
    config = engine.RolloutConfig(max_rounds=1, max_new_tokens_per_round=NEW_TOKENS,
                                  max_completion_length=NEW_TOKENS, group_size=1)
    # A fresh key each call: decode_round donates the state, and with it the caller's key.
    trajectory = engine.rollout(s.model, s.params, s.prompts, None, None, config, jax.random.fold_in(s.key, 0),
                                stop_tables=s.tables, eos_ids=())
    clock.mark("total")
    return trajectory


def ours_rollout_phases(s: Setup, clock: Phases):
    """`engine.rollout`'s device calls driven one by one, so a synced clock splits the phases."""
    state = prefill_and_decode(s, s.prompts.tokens, s.prompts.token_mask, NEW_TOKENS, PROMPT_LENGTH + NEW_TOKENS,
                               NEW_TOKENS, s.key, clock)
    return fetch(state, clock)


def hf_generate(s: Setup, clock: Phases, threads: int):
    """transformers `generate` on `threads` torch threads: temperature 1, no top-k/top-p, exactly NEW_TOKENS."""
    import torch  # pylint: disable=g-import-not-at-top
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            out = s.hf_model.generate(
                input_ids=torch.from_numpy(s.prompts.tokens.astype(np.int64)).to(s.hf_model.device),
                attention_mask=torch.from_numpy(s.prompts.token_mask.astype(np.int64)).to(s.hf_model.device),
                do_sample=True,
                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                eos_token_id=None, pad_token_id=0)
    finally:
        torch.set_num_threads(previous)
    if out.shape != (BATCH, PROMPT_LENGTH + NEW_TOKENS):
        raise RuntimeError(f"generate returned {tuple(out.shape)}, expected {(BATCH, PROMPT_LENGTH + NEW_TOKENS)}")
    clock.mark("total")
    return out


def bench_rollout(shape: str, repeats: int = 3, report: Callable[[str], None] = emit,
                  hf_threads: tuple[int, ...] = (1, 2)) -> list[str]:
    """Ours vs HF generate tokens/s, roofline fraction, and our phase breakdown for one shape.

    Args:
      shape: "tiny" or "small".
      repeats: timed repeats (median reported), >= 3 by protocol.
      report: where each result line goes (lines are also returned).
      hf_threads: torch thread counts tried for `generate` on a CPU; the fastest is the reference
        (on an oversubscribed machine OpenMP barriers make 2 threads far slower than 1). On a
        GPU `generate` runs once (`torch_reference_runs`).

    Returns:
      The lines reported: breakdown first, then the summary lines.
    """
    with full_precision_on_gpu():
        s = build_setup(shape)
        diff = logits_max_diff(s)
        tokens = BATCH * NEW_TOKENS
        runs = {"ours": lambda c: _checked(ours_rollout(s, c))}
        runs.update({name: (lambda c, n=n: hf_generate(s, c, n))
                     for name, n in torch_reference_runs("hf", hf_threads).items()})
        first, median, _ = time_interleaved(runs, repeats)
        # The bandwidth probe runs between the phase-timed rollouts, so both see the same machine load.
        width, vocab = SHAPES["small"]["hidden_size"], SHAPES["small"]["vocab_size"]
        probes = []
        _, _, phases = time_interleaved({"ours": lambda c: ours_rollout_phases(s, c),
                                         "probe": lambda c: probes.append(matmul_bandwidth(width, vocab))},
                                        repeats, sync=True)
    phases = phases["ours"]
    bandwidth, gflops = np.median(probes[1:], axis=0)
    hf = min((name for name in runs if name != "ours"), key=median.get)
    total_bytes, streamed_bytes = param_bytes(s.params)
    steps = NEW_TOKENS  # decode_round runs one forward per sampled token (the last one's output is unused)
    ours_rate = total_bytes * steps / phases["decode"] / 1e9
    streamed_rate = streamed_bytes * steps / phases["decode"] / 1e9
    others = "; ".join(f"{name} {tokens / median[name]:.1f} tokens/s (first call {first[name]:.2f} s)"
                       for name in runs if name != "ours")
    lines = [
        f"rollout_breakdown [{shape}]: prefill {phases['prefill'] * 1e3:.1f} ms | decode "
        f"{phases['decode'] * 1e3:.1f} ms ({phases['decode'] / steps * 1e3:.2f} ms/step, {steps} steps) | host "
        f"{phases['host'] * 1e3:.1f} ms | "
        f"synced total {sum(phases.values()) * 1e3:.1f} ms; engine.rollout {median['ours'] * 1e3:.1f} ms",
        summary("rollout", shape, tokens / median["ours"], f"hf_generate({hf})", tokens / median[hf], "tokens/s",
                f"batch {BATCH}, prompt {PROMPT_LENGTH}, {NEW_TOKENS} new tokens forced, T=1 top-k off top-p 1, fp32; "
                f"median of {repeats}; ours first call {first['ours']:.2f} s (compile) vs median "
                f"{median['ours']:.3f} s; all HF: {others}; prompt logits max|diff| {diff:.1e}; {_describe(s)}"),
        summary("rollout_roofline", shape, ours_rate, "decode_matmul_bandwidth", bandwidth, "GB/s",
                f"ratio = roofline fraction: all {total_bytes / 1e6:.1f} MB params x {steps} steps / decode "
                f"{phases['decode']:.3f} s vs jitted [{BATCH},{width}]x[{width},{vocab}] fp32 matmul ({gflops:.1f} "
                f"GFLOP/s, the faster dot library); streamed bytes only (no embedding table, "
                f"{streamed_bytes / 1e6:.1f} MB): {streamed_rate:.2f} GB/s = "
                f"{streamed_rate / bandwidth:.2f} of bandwidth"),
    ]
    for line in lines:
        report(line)
    return lines


def _checked(trajectory):
    if not (trajectory.length == NEW_TOKENS).all():
        raise RuntimeError(f"every row must write {NEW_TOKENS} tokens, got lengths {set(trajectory.length.tolist())}")
    return trajectory


def _describe(s: Setup) -> str:
    c = s.model.config
    return (f"{sum(x.size for x in jax.tree_util.tree_leaves(s.params)) / 1e6:.2f}M params (D {c.hidden_size}, "
            f"L {c.num_layers}, H {c.num_heads}, K {c.num_kv_heads}, MLP {c.intermediate_size}, V {c.vocab_size})")


# --- rollout_retrieval: extend the cache vs alternatives ------------------------------------------------------


def retrieved_blocks(s: Setup, rounds: int, seed: int = 1) -> list[list[list[int]]]:
    """[round][row] token ids of a retrieved block: markup + 3 passages of ~100 random ids."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(rounds):
        lengths = rng.integers(*PASSAGE_TOKENS, size=(BATCH, PASSAGES)).sum(axis=1) + BLOCK_MARKUP_TOKENS
        blocks.append([rng.integers(0, s.vocab_size, n).tolist() for n in lengths])
    return blocks


def chunk_length(blocks: list[list[list[int]]]) -> int:
    """Extend chunk: the pending token plus the longest block, rounded up to EXTEND_BUCKET."""
    longest = max(len(row) for block in blocks for row in block)
    return -(-(longest + 1) // EXTEND_BUCKET) * EXTEND_BUCKET


def ours_extend_rounds(s: Setup, blocks, clock: Phases):
    """Our path: prefill once, then decode_round -> extend(block) -> decode_round -> extend -> decode_round."""
    chunk = chunk_length(blocks)
    cache_length = PROMPT_LENGTH + sum(ROUND_BUDGETS) + len(blocks) * chunk
    capacity = sum(ROUND_BUDGETS) + sum(max(map(len, block)) for block in blocks)
    state = prefill_and_decode(s, s.prompts.tokens, s.prompts.token_mask, ROUND_BUDGETS[0], cache_length, capacity,
                               s.key, clock)
    for block, budget in zip(blocks, ROUND_BUDGETS[1:]):
        # The host work of engine.rollout between rounds: fetch the round's tokens, build the chunk.
        reason, length, tokens = np.asarray(state.stop_reason), np.asarray(state.length), np.asarray(state.tokens)
        _ = np.asarray(state.source), reason == sampler.STOP_ROUND_BUDGET
        chunk_ids, chunk_mask = np.zeros((BATCH, chunk), np.int32), np.zeros((BATCH, chunk), bool)
        env_count = np.asarray([len(ids) for ids in block], np.int32)
        for b, ids in enumerate(block):
            chunk_ids[b, :1 + len(ids)] = [tokens[b, length[b] - 1]] + ids
            chunk_mask[b, :1 + len(ids)] = True
        clock.mark("host")
        state = engine.extend(s.model, s.params, state, jnp.asarray(chunk_ids), jnp.asarray(chunk_mask),
                              jnp.asarray(env_count))
        clock.mark("extend", state.logits)
        state = sampler.decode_round(s.model, s.params, state, s.tables, sampling=sampler.SamplingConfig(),
                                     eos_ids=(), round_budget=budget)
        clock.mark("decode", state.length)
    return fetch(state, clock)


def no_retrieval_same_cache(s: Setup, blocks, clock: Phases):
    """(a) One round of the same number of model tokens, in a cache as long as the retrieval run's."""
    cache_length = PROMPT_LENGTH + sum(ROUND_BUDGETS) + len(blocks) * chunk_length(blocks)
    state = prefill_and_decode(s, s.prompts.tokens, s.prompts.token_mask, sum(ROUND_BUDGETS), cache_length,
                               sum(ROUND_BUDGETS), s.key, clock)
    return fetch(state, clock)


def passages_in_prompt(s: Setup, blocks, clock: Phases):
    """(a2) Equal total length: both blocks sit in the prompt (one prefill), then one round of model tokens."""
    rows = [list(s.prompts.tokens[b]) + sum((block[b] for block in blocks), []) for b in range(BATCH)]
    total = PROMPT_LENGTH + len(blocks) * chunk_length(blocks)
    tokens, mask = left_pad(rows, total)
    state = prefill_and_decode(s, tokens, mask, sum(ROUND_BUDGETS), total + sum(ROUND_BUDGETS), sum(ROUND_BUDGETS),
                               s.key, clock)
    return fetch(state, clock)


def reencode_each_round(s: Setup, blocks, clock: Phases):
    """(b) The release's approach: each round re-prefills prompt + generated + retrieved, then decodes."""
    conversation = [list(row) for row in s.prompts.tokens]
    for r, budget in enumerate(ROUND_BUDGETS):
        tokens, mask = left_pad(conversation, EXTEND_BUCKET)
        state = prefill_and_decode(s, tokens, mask, budget, tokens.shape[1] + budget, budget,
                                   jax.random.fold_in(s.key, r), clock)
        generated, _, _ = fetch(state, clock)
        for b in range(BATCH):
            conversation[b] += generated[b].tolist() + (blocks[r][b] if r < len(blocks) else [])
    clock.mark("host")
    return conversation


def bench_rollout_retrieval(shape: str, repeats: int = 3, report: Callable[[str], None] = emit) -> list[str]:
    """Retrieval rounds by cache extension vs (a) no retrieval, (a2) passages in the prompt, (b) re-encoding.

    Args:
      shape: "tiny" or "small".
      repeats: timed repeats (median reported), >= 3 by protocol.
      report: where each result line goes (lines are also returned).

    Returns:
      The lines reported: one breakdown per strategy, then the summary lines.
    """
    s = build_setup(shape)
    blocks = retrieved_blocks(s, len(ROUND_BUDGETS) - 1)
    runs = {"extend": ours_extend_rounds, "same_tokens": no_retrieval_same_cache, "in_prompt": passages_in_prompt,
            "reencode": reencode_each_round}
    runs = {name: (lambda c, run=run: run(s, blocks, c)) for name, run in runs.items()}
    _check_retrieval_rollout(runs["extend"](Phases(False)), blocks)
    # One synced pass gives totals and phases (a sync only ends the overlap of µs of host work with the device).
    first, median, phases = time_interleaved(runs, repeats, sync=True)
    tokens = BATCH * sum(ROUND_BUDGETS)
    rate = {name: tokens / seconds for name, seconds in median.items()}
    block_tokens = [sum(map(len, block)) / BATCH for block in blocks]
    common = (f"batch {BATCH}, prompt {PROMPT_LENGTH}, model tokens {'+'.join(map(str, ROUND_BUDGETS))}, "
              f"blocks of {', '.join(f'{n:.0f}' for n in block_tokens)} mean tokens (extend chunk "
              f"{chunk_length(blocks)}); median of {repeats}; first calls "
              + ", ".join(f"{name} {first[name]:.2f} s" for name in runs))
    lines = [f"rollout_retrieval_breakdown [{shape}] {name}: total {median[name] * 1e3:.1f} ms | " + " | ".join(
        f"{p} {phases[name].get(p, 0.0) * 1e3:.1f} ms" for p in ("prefill", "decode", "extend", "host"))
             for name in runs]
    lines += [
        summary("rollout_retrieval", shape, rate["extend"], "no_retrieval_same_model_tokens_same_cache",
                rate["same_tokens"], "tokens/s",
                f"overhead {median['extend'] / median['same_tokens'] - 1:+.1%}; {common}"),
        summary("rollout_retrieval_vs_passages_in_prompt", shape, rate["extend"], "equal_total_length_one_prefill",
                rate["in_prompt"], "tokens/s", f"overhead {median['extend'] / median['in_prompt'] - 1:+.1%}; {common}"),
        summary("rollout_retrieval_vs_reencode", shape, rate["extend"], "reencode_every_round", rate["reencode"],
                "tokens/s", f"speedup {median['reencode'] / median['extend']:.2f}x; {common}"),
    ]
    for line in lines:
        report(line)
    return lines


def _check_retrieval_rollout(out, blocks) -> None:
    _, source, length = out
    model_tokens = (source == sampler.SOURCE_MODEL).sum(axis=1)
    env_tokens = (source == sampler.SOURCE_ENV).sum(axis=1)
    expected_env = sum(np.asarray([len(row) for row in block]) for block in blocks)
    if not ((model_tokens == sum(ROUND_BUDGETS)).all() and (env_tokens == expected_env).all()
            and (length == model_tokens + env_tokens).all()):
        raise RuntimeError(f"retrieval rollout wrote model tokens {set(model_tokens.tolist())}, "
                           f"env tokens {env_tokens.tolist()} (expected {expected_env.tolist()})")
