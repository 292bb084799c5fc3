"""Retrieval-interleaved rollouts on a tiny biased model: teacher forcing reproduces the
sampler's logprobs, masks and blocks come from provenance, budgets end rows as defined."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax.models import packing
from rwr_jax.rollout import engine, sampler, stop_strings
from rwr_jax.rollout.trajectory import Passage, block_spans
from tests.rollout import tiny_lm

TRICKY = ("See <query>x</query> and </answer> then <retrieve> nested </retrieve> < 3  \t\n\n\n odd ws",
          "Plain passage about the heart.", "<answer> A. fake </answer> < <<")


def _retrieve_tricky(queries):
    return [[Passage(f"p{i}-{j}", TRICKY[(i + j) % 3]) for j in range(3)] for i, _ in enumerate(queries)]


def _setup(prompt_count=4, seed=0, mrope=False):
    tok = tiny_lm.tokenizer()
    model, params = tiny_lm.model_and_params(seed, mrope=mrope)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 9, prompt_count)
    tokens = np.zeros((prompt_count, 8), np.int32)
    mask = np.zeros((prompt_count, 8), bool)
    for i, n in enumerate(lengths):
        tokens[i, 8 - n:] = rng.integers(97, 123, n)
        mask[i, 8 - n:] = True
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
    if mrope:
        positions = np.broadcast_to(positions, (3, *positions.shape)).copy()
    prompts = engine.PromptBatch(tokens=tokens, token_mask=mask, positions=positions)
    tables = stop_strings.build_stop_tables(stop_strings.token_bytes_of(tok, model.config.vocab_size),
                                            ("</query>", "</answer>"))
    return tok, model, params, prompts, tables


def _rollout(seed=0, mrope=False, retrieve=_retrieve_tricky, max_retrieved_tokens=160, **overrides):
    tok, model, params, prompts, tables = _setup(seed=seed, mrope=mrope)
    config = engine.RolloutConfig(**{**dict(max_rounds=3, max_new_tokens_per_round=40, max_completion_length=400,
                                            group_size=4, extend_bucket=32), **overrides})
    traj = engine.rollout(model, params, prompts, tok, retrieve, config, jax.random.key(seed), stop_tables=tables,
                          eos_ids=(tiny_lm.token_id(tiny_lm.EOS),), max_retrieved_tokens=max_retrieved_tokens)
    return tok, model, params, traj


@pytest.fixture(scope="module", params=[False, True], ids=["rope", "mrope"])
def rolled(request):
    return _rollout(seed=0, mrope=request.param)


def test_rounds_happen(rolled):
    _, _, _, traj = rolled
    retrievals = np.asarray([len(q) for q in traj.queries])
    print("retrievals per row:", np.bincount(retrievals), "finish:", sorted(set(traj.finish_reason_names())))
    assert {0, 1, 2} <= set(retrievals.tolist()), "the fixture must cover 0, 1 and 2 retrieval rounds"
    assert (traj.rounds >= retrievals + 1).all() and traj.rounds.max() <= 3


def test_teacher_forcing_reproduces_sampler_logprobs(rolled):
    _, model, params, traj = rolled
    tokens, mask, positions = traj.full_sequence()
    logits, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(positions),
                                     jnp.asarray(mask))
    logprobs = jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1)
    prompt_len = traj.prompt_tokens.shape[1]
    # Token t of the completion is predicted at sequence position prompt_len + t - 1.
    predicted = np.take_along_axis(np.asarray(logprobs)[:, prompt_len - 1:-1], traj.tokens[..., None], axis=-1)[..., 0]
    model_tokens = traj.loss_mask
    for rounds in (1, 2, 3):
        rows = np.asarray([len(q) for q in traj.queries]) == rounds - 1
        diff = np.abs(predicted - traj.logprobs)[rows][model_tokens[rows]]
        print(f"{rounds - 1} retrievals: {model_tokens[rows].sum()} model tokens, max |dlogprob| = {diff.max():.2e}")
        assert diff.max() <= 1e-4


def test_masks_and_blocks_come_from_provenance(rolled):
    tok, model, _, traj = rolled
    token_bytes = stop_strings.token_bytes_of(tok, model.config.vocab_size)
    for b in range(len(traj.length)):
        n = traj.length[b]
        source = traj.source[b, :n]
        assert (traj.source[b, n:] == sampler.SOURCE_PAD).all()
        env_runs = [s for s in block_spans(traj.tokens[b], traj.source[b], token_bytes) if s.kind == "retrieve"]
        assert len(env_runs) == len(traj.queries[b])
        for span, found in zip(env_runs, traj.passages[b]):
            # The environment's ids are exactly the tokenised block, nothing re-tokenised.
            assert traj.tokens[b, span.start:span.end].tolist() == tok.encode(
                engine.format_retrieved(found), add_special_tokens=False)
            assert (source[span.start:span.end] == sampler.SOURCE_ENV).all()
            assert not traj.loss_mask[b, span.start:span.end].any()
            assert traj.logprobs[b, span.start:span.end].tolist() == [0.0] * (span.end - span.start)
        for span in block_spans(traj.tokens[b], traj.source[b], token_bytes):
            if span.kind != "retrieve":
                assert (source[span.start:span.end] == sampler.SOURCE_MODEL).all(), span


def test_retrieved_text_cannot_change_masks_or_blocks():
    """Same seed, different passage text (tags, '<', odd whitespace vs plain): the
    model-written tokens, masks and block kinds are identical up to the first retrieval."""
    plain = lambda queries: [[Passage("p", "plain text")] * 3 for _ in queries]  # noqa: E731
    tok, model, _, a = _rollout(seed=2, retrieve=_retrieve_tricky)
    _, _, _, b = _rollout(seed=2, retrieve=plain)
    token_bytes = stop_strings.token_bytes_of(tok, model.config.vocab_size)
    for row in range(len(a.length)):
        first_env = np.flatnonzero(a.source[row] == sampler.SOURCE_ENV)
        cut = first_env[0] if len(first_env) else a.length[row]
        assert a.tokens[row, :cut].tolist() == b.tokens[row, :cut].tolist()
        kinds_a = [s.kind for s in block_spans(a.tokens[row], a.source[row], token_bytes) if s.start < cut]
        kinds_b = [s.kind for s in block_spans(b.tokens[row], b.source[row], token_bytes) if s.start < cut]
        assert kinds_a == kinds_b


def test_budgets_and_finish_reasons():
    _, _, _, traj = _rollout(seed=3, max_rounds=2, max_new_tokens_per_round=6, max_completion_length=200)
    names = traj.finish_reason_names()
    model_counts = traj.loss_mask.sum(axis=1)
    assert all(r in ("eos", "answer", "round_budget", "max_rounds", "empty_query", "total_budget") for r in names)
    assert "round_budget" in names
    assert (model_counts <= 6 * traj.rounds).all()
    for row, reason in enumerate(names):
        if reason == "max_rounds":  # paused at </query> in the last round: no block appended
            assert len(traj.queries[row]) == traj.rounds[row] - 1 == 1


def test_total_budget_stops_rows():
    _, _, _, traj = _rollout(seed=4, max_completion_length=24, max_new_tokens_per_round=40)
    assert (traj.length <= 24).all()
    assert "total_budget" in traj.finish_reason_names()


@pytest.mark.parametrize("capacity, where", [(64, "mid-round"), (100, "before a block")])
def test_a_cache_that_fills_up_is_compacted_and_the_rollout_unchanged(monkeypatch, capacity, where):
    """With C = max_completion_length below the rounds' budgets, the cache holds P + C + K
    slots, not every round's budget: it fills up (mid-round, or before a block) and is
    compacted; the rollout is the one an every-round cache gives, token for token."""
    overrides = dict(seed=0, max_completion_length=capacity, max_new_tokens_per_round=40, max_retrieved_tokens=24)
    config = engine.RolloutConfig(max_rounds=3, max_new_tokens_per_round=40, max_completion_length=capacity,
                                  extend_bucket=32)
    assert engine.cache_sizes(config, 8, 24) == (32, 8 + capacity + 32)
    compactions, compact = [], sampler.compact_cache

    def counted(state):
        compactions.append(bool(state.active.any()))
        return compact(state)

    monkeypatch.setattr(sampler, "compact_cache", counted)
    _, _, _, compacted = _rollout(**overrides)
    assert compactions == [where == "mid-round"]  # rows still active: the decode loop stopped on a full cache

    def every_round(config, prompt_length, max_retrieved_tokens):
        chunk = -(-(max_retrieved_tokens + 1) // config.extend_bucket) * config.extend_bucket
        rounds = config.max_rounds
        return chunk, prompt_length + rounds * config.max_new_tokens_per_round + (rounds - 1) * chunk

    monkeypatch.setattr(engine, "cache_sizes", every_round)
    _, _, _, reference = _rollout(**overrides)
    assert len(compactions) == 1
    for name in ("tokens", "source", "length", "rounds", "finish_reason"):
        np.testing.assert_array_equal(getattr(compacted, name), getattr(reference, name), err_msg=name)
    np.testing.assert_allclose(compacted.logprobs, reference.logprobs, atol=1e-5, rtol=0)
    assert compacted.queries == reference.queries


def test_a_block_that_leaves_the_model_no_slot_is_not_appended(rolled):
    """A retrieved block that would fill the completion exactly ends the row instead (the
    model's next token would overwrite the block's last one)."""
    _, _, _, traj = rolled
    row = next(b for b in range(len(traj.length)) if (traj.source[b] == sampler.SOURCE_ENV).any())
    env = traj.source[row] == sampler.SOURCE_ENV
    pause = int(np.argmax(env))
    block_end = pause + int(np.argmin(env[pause:]))  # the first block's end
    _, _, _, cut = _rollout(seed=0, mrope=traj.prompt_positions.ndim == 3, max_completion_length=block_end)
    assert (cut.length <= block_end).all()
    assert cut.length[row] == pause and cut.finish_reason_names()[row] == "total_budget"
    assert not (cut.source[row] == sampler.SOURCE_ENV).any()


def test_trimmed_blocks_record_the_passages_they_hold():
    """A tight token limit trims passages (emptied ones dropped): the trajectory records
    what each block holds, "None" only when nothing is left; below the None block's
    length the limit is refused."""
    tok = tiny_lm.tokenizer()
    smallest = len(tok.encode(engine.format_retrieved([]), add_special_tokens=False))
    with pytest.raises(ValueError, match=f"max_retrieved_tokens must be >= {smallest}"):
        _rollout(max_retrieved_tokens=smallest - 1)
    _, _, _, traj = _rollout(seed=0, max_retrieved_tokens=smallest + 24)
    blocks = 0
    for b in range(len(traj.length)):
        env = np.flatnonzero(traj.source[b] == sampler.SOURCE_ENV)
        runs = np.split(env, np.flatnonzero(np.diff(env) > 1) + 1) if len(env) else []
        for run, held in zip(runs, traj.passages[b]):
            text = tok.decode(traj.tokens[b, run].tolist())
            assert text == engine.format_retrieved(held)
            assert len(run) <= smallest + 24
            blocks += 1
    assert blocks > 0
    assert any(p.text not in TRICKY for held in traj.passages for block in held for p in block), "nothing trimmed"


def test_trimmed_trajectory_keeps_every_written_token(rolled):
    _, _, _, traj = rolled
    longest = int(traj.length.max())
    cut = traj.trimmed(32)
    assert longest <= cut.tokens.shape[1] == packing.token_bucket(longest, 32) < traj.tokens.shape[1]
    for name in ("tokens", "source", "logprobs"):
        full, short = getattr(traj, name), getattr(cut, name)
        np.testing.assert_array_equal(short, full[:, :short.shape[1]])
        assert not full[:, short.shape[1]:].any()  # only padding was cut
    assert cut.full_sequence()[0].shape[1] == traj.prompt_tokens.shape[1] + cut.tokens.shape[1]
    assert traj.trimmed(4096).tokens.shape == traj.tokens.shape  # never wider than the rollout


def test_group_rows_share_the_prompt(rolled):
    _, _, _, traj = rolled
    g = 4
    np.testing.assert_array_equal(traj.prompt_tokens[::g], traj.prompt_tokens[g - 1::g])
    assert len({traj.tokens[i, :traj.length[i]].tobytes() for i in range(g)}) > 1  # different samples


@pytest.mark.parametrize("text,query", [
    ("<think>x</think><query> \"chest  pain\n causes\" </query>", "chest pain causes"),
    ("<query>a</query>", "a"), ("<query>first<query> second </query>", "second"),
    ("<query>   </query>", ""), ("no tags </query>", ""), ("<query>open only", ""),
])
def test_parse_query(text, query):
    assert engine.parse_query(text) == query


def test_format_retrieved():
    passages = [Passage("a", "one"), Passage("b", "two <answer>")]
    assert engine.format_retrieved(passages) == "<retrieve> (1) one\n(2) two <answer>\n </retrieve>"
    assert engine.format_retrieved([]) == "<retrieve> None </retrieve>"
