"""Med-RwR rewards: vectorised jnp functions of a ParsedBatch, chosen by name.

    parsed = parser.parse_batch(trajectory, answers, tables)       # host, once
    total, per_reward = combine_rewards(("accuracy", "format"), (1.0, 1.0), parsed, inputs)

Every reward is registered in the "reward" registry and has the signature
`reward(parsed: ParsedBatch, inputs: Mapping[str, Array]) -> [B] float32`; `inputs`
carries the arrays a reward needs beyond the parse (similarities, log-probs) and each
reward names the keys it reads. Rules, scales and decisions: METHOD.md, "Rewards".
All functions jit (ParsedBatch and `inputs` are pytrees).
"""

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rwr_jax import registry
from rwr_jax.rl import parser as parser_lib
from rwr_jax.rl.parser import KIND_ANSWER, KIND_QUERY, KIND_RETRIEVE, KIND_THINK, ParsedBatch

LENGTH_MIN, LENGTH_MAX = 512, 3072
MAX_QUERY_TERMS = 5
VISUAL_SCALE = 0.1
CONFIDENCE_CORRECT_SCALE, CONFIDENCE_WRONG_SCALE = 0.1, 0.05
NUM_LETTERS = len(parser_lib.LETTERS)

# DFA for `(think (query retrieve)?)+ answer`: rows = state (0 start, 1 after think,
# 2 after query, 3 after retrieve, 4 accepted, 5 dead), columns = KIND_* (NONE keeps
# the state: padding only follows the last block).
_GRAMMAR = np.asarray([
    # NONE THINK QUERY RETRIEVE ANSWER OTHER
    [0, 1, 5, 5, 5, 5],
    [1, 1, 2, 5, 4, 5],
    [2, 5, 5, 3, 5, 5],
    [3, 1, 5, 5, 4, 5],
    [4, 5, 5, 5, 5, 5],
    [5, 5, 5, 5, 5, 5],
], np.int32)
_ACCEPT = 4


def _input(inputs: Mapping[str, jax.Array] | None, reward: str, key: str, spec: str) -> jax.Array:
    if inputs is None or key not in inputs:
        raise ValueError(f"reward {reward!r} needs inputs[{key!r}] ({spec}); got keys {sorted(inputs or {})}")
    return jnp.asarray(inputs[key])


def answer_correct(parsed: ParsedBatch) -> jax.Array:
    """[B] bool: letter and option text right (option-style), or exact match (free text)."""
    letter_ok = (parsed.answer_letter == parsed.gt_letter) & (parsed.gt_letter >= 0)
    option_ok = parsed.answer_present & letter_ok & parsed.answer_has_option_text
    return jnp.where(parsed.free_text, parsed.answer_present & parsed.free_text_match, option_ok)


@registry.register("reward", "accuracy")
def accuracy_reward(parsed: ParsedBatch, inputs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """[B] float32: 5 letter + option text, 4 letter only, 0 else; free text: 5 on match.

    Args:
      parsed: the batch; `inputs` is not read.
    """
    del inputs
    letter_ok = parsed.answer_present & (parsed.answer_letter == parsed.gt_letter) & (parsed.gt_letter >= 0)
    option = jnp.where(letter_ok, jnp.where(parsed.answer_has_option_text, 5.0, 4.0), 0.0)
    free = jnp.where(parsed.answer_present & parsed.free_text_match, 5.0, 0.0)
    return jnp.where(parsed.free_text, free, option).astype(jnp.float32)


def _grammar_accepts(kinds: jax.Array) -> jax.Array:
    """[B, K] int8 kinds -> [B] bool, the sequence matches `(think (query retrieve)?)+ answer`."""
    table = jnp.asarray(_GRAMMAR)

    def step(state, kind):
        return table[state, kind.astype(jnp.int32)], None

    state, _ = jax.lax.scan(step, jnp.zeros(kinds.shape[:1], jnp.int32), kinds.T)
    return state == _ACCEPT


@registry.register("reward", "format")
def format_reward(parsed: ParsedBatch, inputs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """[B] float32 in [-2, 3], METHOD.md's format rule on model-written structure.

    Base: an illegal tag, or a retrieve block not directly after a query block -> 0;
    no query and no retrieve -> 1 if the blocks are exactly (think, answer), else 0;
    otherwise 3 if the blocks match `(think (query retrieve)?)+ answer` and the answer
    is correct (`answer_correct`), 1 if they match and it is not, 0 if they do not.
    Then, always (so the range is -2..3, as METHOD.md states): -1 if any closed tag
    block is empty/whitespace, -1 if model text has three or more consecutive newlines.
    """
    del inputs
    kinds = parsed.kinds.astype(jnp.int32)
    previous = jnp.pad(kinds[:, :-1], ((0, 0), (1, 0)))
    bad_retrieve = jnp.any((kinds == KIND_RETRIEVE) & (previous != KIND_QUERY), axis=1)
    searched = jnp.any((kinds == KIND_QUERY) | (kinds == KIND_RETRIEVE), axis=1)
    num_blocks = jnp.sum(kinds != parser_lib.KIND_NONE, axis=1)
    think_answer = (num_blocks == 2) & (kinds[:, 0] == KIND_THINK) & (kinds[:, 1] == KIND_ANSWER)
    cycles = jnp.where(_grammar_accepts(kinds), jnp.where(answer_correct(parsed), 3.0, 1.0), 0.0)
    base = jnp.where(searched, cycles, jnp.where(think_answer, 1.0, 0.0))
    base = jnp.where(parsed.illegal_tag | bad_retrieve, 0.0, base)
    penalty = jnp.any(parsed.empty, axis=1).astype(jnp.float32) + parsed.triple_newline.astype(jnp.float32)
    return (base - penalty).astype(jnp.float32)


@registry.register("reward", "length")
def length_reward(parsed: ParsedBatch, inputs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """[B] float32: 0 if 512 <= characters (retrieve blocks removed) <= 3072, else -1."""
    del inputs
    n = parsed.char_count
    return jnp.where((n >= LENGTH_MIN) & (n <= LENGTH_MAX), 0.0, -1.0).astype(jnp.float32)


def _coverage(ids: jax.Array, mask: jax.Array, option_ids: jax.Array, option_mask: jax.Array) -> jax.Array:
    """Share of the option's distinct content ids found in `ids`.

    Args:
      ids, mask: [..., L] int32 / bool token ids and validity, leading dims [B, ...].
      option_ids, option_mask: [B, Lo] int32 / bool distinct answer content ids.

    Returns:
      [...] float32 in [0, 1]; 0 where the option has no content tokens.
    """
    extra = ids.ndim - 2
    opt = option_ids.reshape(option_ids.shape[:1] + (1,) * extra + option_ids.shape[1:])
    opt_mask = option_mask.reshape(opt.shape)
    hit = jnp.any((ids[..., None, :] == opt[..., :, None]) & mask[..., None, :], axis=-1)  # [..., Lo]
    found = jnp.sum(hit & opt_mask, axis=-1)
    return found / jnp.maximum(jnp.sum(opt_mask, axis=-1), 1)


@registry.register("reward", "query_textual")
def query_textual_reward(parsed: ParsedBatch, inputs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """[B] float32, paper Eq. 1 on canonical token ids; 0 for rows without a query.

    score = coverage(all retrieved passages) + mean over the row's queries of
    [coverage(query) + density(query) - 1[terms(query) > 5]] (+ an optional similarity),
    where coverage = share of the correct option's distinct content ids present,
    density = content tokens / tokens of the query (0 for an empty query), and
    terms = runs of consecutive content tokens. Range [-1, 3] without the similarity.

    Args:
      parsed: the batch.
      inputs: optional "query_option_similarity" [B] float32 (e.g. an embedding cosine
        of query and option text), added where a query exists.
    """
    cov_passages = _coverage(parsed.passage_ids, parsed.passage_mask, parsed.option_ids, parsed.option_mask)
    cov_query = _coverage(parsed.query_ids, parsed.query_mask, parsed.option_ids, parsed.option_mask)  # [B, Q]
    content = parsed.query_content_mask
    density = jnp.sum(content, -1) / jnp.maximum(jnp.sum(parsed.query_mask, -1), 1)
    starts = content & ~jnp.pad(content[..., :-1], ((0, 0), (0, 0), (1, 0)))
    too_many = (jnp.sum(starts, -1) > MAX_QUERY_TERMS).astype(jnp.float32)
    valid = jnp.arange(content.shape[1])[None] < parsed.num_queries[:, None]
    per_query = jnp.where(valid, cov_query + density - too_many, 0.0)
    score = cov_passages + jnp.sum(per_query, -1) / jnp.maximum(parsed.num_queries, 1)
    if inputs is not None and "query_option_similarity" in inputs:
        score = score + jnp.asarray(inputs["query_option_similarity"], jnp.float32)
    return jnp.where(parsed.num_queries > 0, score, 0.0).astype(jnp.float32)


@registry.register("reward", "query_visual")
def query_visual_reward(parsed: ParsedBatch, inputs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """[B] float32: 0.1 x image/query cosine similarity, 0 for text-only rows.

    Args:
      parsed: the batch (only its batch size is used).
      inputs: "image_query_similarity" [B] float32 (mean over the row's queries, or the
        first sentence without one: `parser.visual_query_texts`; any value, even NaN,
        on text-only rows), "has_image" [B] bool.
    """
    similarity = _input(inputs, "query_visual", "image_query_similarity", "[B] float32")
    has_image = _input(inputs, "query_visual", "has_image", "[B] bool").astype(bool)
    if similarity.shape != parsed.char_count.shape or has_image.shape != parsed.char_count.shape:
        raise ValueError(f"query_visual inputs must be [B]={parsed.char_count.shape}, got "
                         f"{similarity.shape} and {has_image.shape}")
    return jnp.where(has_image, VISUAL_SCALE * jnp.where(has_image, similarity, 0.0), 0.0).astype(jnp.float32)


def _rank(letter_logprobs: jax.Array, sampled_logprob: jax.Array, gt_logprob: jax.Array) -> jax.Array:
    """[B] int32, 1-based rank of gt among {sampled token, A..J} (ties favour gt)."""
    higher = jnp.sum(letter_logprobs > gt_logprob[:, None], axis=-1) + (sampled_logprob > gt_logprob)
    return 1 + higher.astype(jnp.int32)


@registry.register("reward", "confidence_gain")
def confidence_gain_reward(parsed: ParsedBatch, inputs: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """[B] float32, how much the retrieved context raised the correct letter.

    Correct letter (`answer_letter == gt_letter`): 0.1 x (log p_with(gt) - log p_without(gt)).
    Wrong: 0.05 x (rank_without(gt) - rank_with(gt)), ranks among {sampled token, A..J}.
    0 with no answer, no answer token, no retrieval, or free-text ground truth.

    Args:
      parsed: the batch.
      inputs: "letter_logprobs_with" / "letter_logprobs_without" [B, 10] float32
        (`letter_logprobs` at `answer_token_index` with / without the retrieve blocks),
        "sampled_logprob_with" / "sampled_logprob_without" [B] float32 (log-prob of the
        sampled token at that position in each context).
    """
    spec = f"[B, {NUM_LETTERS}] float32"
    with_, without = (_input(inputs, "confidence_gain", f"letter_logprobs_{k}", spec) for k in ("with", "without"))
    s_with, s_without = (_input(inputs, "confidence_gain", f"sampled_logprob_{k}", "[B] float32")
                         for k in ("with", "without"))
    if with_.shape != (parsed.gt_letter.shape[0], NUM_LETTERS) or without.shape != with_.shape:
        raise ValueError(f"confidence_gain letter log-probs must be {spec}, got {with_.shape} and {without.shape}")
    gt = jnp.clip(parsed.gt_letter, 0, NUM_LETTERS - 1)[:, None]
    gt_with = jnp.take_along_axis(with_, gt, axis=1)[:, 0]
    gt_without = jnp.take_along_axis(without, gt, axis=1)[:, 0]
    correct = CONFIDENCE_CORRECT_SCALE * (gt_with - gt_without)
    wrong = CONFIDENCE_WRONG_SCALE * (_rank(without, s_without, gt_without) - _rank(with_, s_with, gt_with))
    active = (parsed.answer_present & parsed.has_retrieval & (parsed.gt_letter >= 0)
              & (parsed.answer_token_index >= 0))
    gain = jnp.where(parsed.answer_letter == parsed.gt_letter, correct, wrong)
    return jnp.where(active, gain, 0.0).astype(jnp.float32)


def combine_rewards(names: Sequence[str], weights: Sequence[float], parsed: ParsedBatch,
                    inputs: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of registered rewards.

    Args:
      names: reward names in the "reward" registry.
      weights: one float per name.
      parsed: the batch.
      inputs: extra arrays the rewards read.

    Returns:
      (total [B] float32, {name: [B] float32 unweighted reward}).
    """
    if len(names) != len(weights):
        raise ValueError(f"reward weights must have one entry per name ({len(names)}), got {len(weights)}")
    if len(set(names)) != len(names):
        raise ValueError(f"reward names must be distinct, got {list(names)}")
    per_reward = {name: registry.lookup("reward", name)(parsed, inputs) for name in names}
    total = jnp.zeros(parsed.char_count.shape, jnp.float32)
    for name, weight in zip(names, weights):
        total = total + jnp.float32(weight) * per_reward[name]
    return total, per_reward


def option_letter_token_ids(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids that spell each option letter A..J, case- and leading-space-insensitive.

    Variants per letter X: "X", " X", "x", " x", and ">X", ">x" (Qwen merges a tag's
    closing '>' with a following letter: "<answer>B" ends in the token ">B"); only
    variants that are a single token are kept. Note " a" is also the English article.

    Returns:
      (ids [10, M] int32, mask [10, M] bool).
    """
    rows = []
    for letter in parser_lib.LETTERS:
        ids = []
        for text in (letter, " " + letter, letter.lower(), " " + letter.lower(), ">" + letter, ">" + letter.lower()):
            encoded = tokenizer.encode(text, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        rows.append(ids)
    width = max(len(r) for r in rows)
    ids = np.zeros((NUM_LETTERS, width), np.int32)
    mask = np.zeros((NUM_LETTERS, width), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


def letter_logprobs(logprobs: jax.Array, letter_ids: jax.Array, letter_mask: jax.Array) -> jax.Array:
    """Log-probability of each option letter: logsumexp over its token variants.

    p(letter) is the total probability of the tokens that spell it, so the variants'
    log-probs are combined with logsumexp.

    Args:
      logprobs: [..., V] float32 log-softmax over the vocabulary at the answer position.
      letter_ids, letter_mask: [10, M] from `option_letter_token_ids`.

    Returns:
      [..., 10] float32.
    """
    gathered = jnp.take(logprobs, letter_ids, axis=-1)  # [..., 10, M]
    return jax.nn.logsumexp(jnp.where(letter_mask, gathered, -jnp.inf), axis=-1)
