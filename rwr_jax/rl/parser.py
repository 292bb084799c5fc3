"""Host-side parsing of rollout trajectories into padded arrays for the rewards.

    tables = build_text_tables(tokenizer)                # once per run
    parsed = parse_batch(trajectory, answers, tables)    # once per batch

"Host does strings, device does math": this module reads each completion once and
returns a `ParsedBatch` of NumPy arrays; every reward (`rwr_jax.rl.rewards`) is a jnp
function of it. The structure comes from provenance: a run of environment tokens is a
`retrieve` block whatever it holds (tags or `<` inside a passage never count), and
tags are looked for in model-written text only. A tag is `<name>` or `</name>` with
`name` = a letter then letters, digits, `_` or `-`; only think/query/retrieve/answer
are legal. Model blocks: a legal opening tag opens a block, its own closing tag closes
it; a block holding another legal tag, an unclosed block, a model-written `<retrieve>`
block, a stray closing tag and non-whitespace text between blocks are `KIND_OTHER`
(they break the format grammar). EOS ids are not text.

Token ids for the textual query reward come from re-tokenising *canonical* text
(case-folded, punctuation split off, whitespace collapsed, one leading space), so a word
has the same ids wherever it occurs: the sampled ids cannot be compared directly
(`Pneumonia` at a sentence start is 4 Qwen tokens, ` pneumonia` is 1).
"""

import dataclasses
import re
import unicodedata
from typing import Any, Mapping, NamedTuple, Sequence

import flax.struct
import numpy as np

from rwr_jax.data import tokenizer as tokenizer_lib
from rwr_jax.rollout import engine, sampler, stop_strings

KIND_NONE, KIND_THINK, KIND_QUERY, KIND_RETRIEVE, KIND_ANSWER, KIND_OTHER = range(6)
LETTERS = "ABCDEFGHIJ"
_MODEL_KINDS = {"think": KIND_THINK, "query": KIND_QUERY, "answer": KIND_ANSWER, "retrieve": KIND_OTHER}
_TAG = re.compile(rb"<(/?)([A-Za-z][A-Za-z0-9_-]*)>")
_ENV_TAGS = re.compile(r"^\s*<retrieve>|</retrieve>\s*$")
# The text of each `</query>` / the first `</answer>` from the last opening tag before it,
# whatever the blocks around it (METHOD.md: the answer is the first <answer>...</answer>).
_QUERY_TEXT = re.compile(rb"<query>((?:(?!<query>).)*?)</query>", re.S)
_ANSWER_TEXT = re.compile(rb"<answer>((?:(?!<answer>).)*?)</answer>", re.S)
_GT_OPTION = re.compile(r"^\s*\(?([A-J])\)?(?:\s*[.:)]\s*(.*?))?\s*$", re.S)

# English function words (our own list, in the spirit of the classic IR stop lists):
# a token whose text, stripped and case-folded, is one of these is not a content token.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves s t d ll m o re ve y also may might must shall upon via
per whether yet etc e g ie eg vs
""".split())


def content_token_mask(tokenizer, vocab_size: int | None = None,
                       token_bytes: Sequence[bytes] | None = None) -> np.ndarray:
    """Which token ids carry content: not a stop word, not punctuation/whitespace only.

    A token is *not* content if it is an added/special token, if its text stripped and
    case-folded is in `STOP_WORDS` (so ` the`, `The` and a word piece `in` alike), or if
    every character of its text is punctuation, a symbol, whitespace or a control
    character (` ,`, `\\n`, ` (`). Digits and partial UTF-8 pieces are content.

    Args:
      tokenizer: a Hugging Face tokenizer (byte-level BPE, e.g. Qwen).
      vocab_size: V, table size (default: `len(tokenizer)`); ids past the tokenizer are False.
      token_bytes: precomputed `stop_strings.token_bytes_of(tokenizer, V)`.

    Returns:
      [V] bool, True = content token.
    """
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if token_bytes is None:
        token_bytes = stop_strings.token_bytes_of(tokenizer, vocab_size)
    mask = np.zeros((vocab_size,), bool)
    for i, data in enumerate(token_bytes[:vocab_size]):
        text = data.decode("utf-8", errors="ignore")
        if not data:
            continue
        if not text:  # a piece of a multi-byte character
            mask[i] = True
        elif text.strip().casefold() not in STOP_WORDS:
            mask[i] = any(unicodedata.category(c)[0] in "LN" for c in text)
    special = set(tokenizer.get_added_vocab().values()) | set(tokenizer.all_special_ids)
    mask[[i for i in special if i < vocab_size]] = False
    return mask


@dataclasses.dataclass(frozen=True)
class TextTables:
    """Host tables built once per run (`build_text_tables`).

    Attributes:
      tokenizer: re-tokenises canonical text.
      token_bytes: the bytes of each token id (len V).
      content_mask: [V] bool, `content_token_mask`.
      skip_ids: ids that are not text (EOS), dropped from model text.
    """

    tokenizer: Any
    token_bytes: Sequence[bytes]
    content_mask: np.ndarray
    skip_ids: frozenset[int]


def build_text_tables(tokenizer, vocab_size: int | None = None,
                      skip_ids: Sequence[int] = tokenizer_lib.EOS_IDS) -> TextTables:
    """Builds the per-run tables (about 0.6 s for the 151k Qwen vocabulary)."""
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    token_bytes = stop_strings.token_bytes_of(tokenizer, vocab_size)
    return TextTables(tokenizer=tokenizer, token_bytes=token_bytes,
                      content_mask=content_token_mask(tokenizer, vocab_size, token_bytes),
                      skip_ids=frozenset(int(i) for i in skip_ids))


class GroundTruth(NamedTuple):
    """A record's answer: `letter` 0..9 (-1 for free text), the option text, the raw text."""

    letter: int
    option_text: str
    free_text: bool
    text: str


def parse_ground_truth(answer: str, options: Mapping[str, str] | None = None) -> GroundTruth:
    """Reads "B. option text" (or "B", "(B)", "B) text") as option-style, else free text.

    With `options` ({"A": text, …}) a bare letter gets its option text, and a free-text
    answer equal (case-insensitively) to one option's text becomes that option.
    """
    if not isinstance(answer, str):
        raise TypeError(f"answer must be str, got {type(answer).__name__}")
    options = {k.strip().upper(): v for k, v in (options or {}).items()}
    match = _GT_OPTION.match(answer)
    if match:
        letter = match.group(1)
        text = (match.group(2) or "").strip() or options.get(letter, "")
        return GroundTruth(LETTERS.index(letter), text, False, answer)
    for letter, text in options.items():
        if letter in LETTERS and _norm(text) == _norm(answer):
            return GroundTruth(LETTERS.index(letter), text, False, answer)
    return GroundTruth(-1, answer.strip(), True, answer)


def record_ground_truth(letter: str | None, text: str, answer: str) -> GroundTruth:
    """The GroundTruth of a record as `data.records` classified its answer: `letter` A-J
    with `text` the option's text, or None / "" for a free-text answer `text`."""
    if not letter:
        return GroundTruth(-1, text, True, answer)
    if letter not in LETTERS:
        raise ValueError(f"option letter {letter!r} of answer {answer!r} is not one of {LETTERS}")
    return GroundTruth(LETTERS.index(letter), text, False, answer)


def _norm(text: str) -> str:
    """Case-folded words, punctuation dropped, for option-text comparison."""
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def canonical_text(text: str) -> str:
    """Case-folded, punctuation split into its own words, whitespace collapsed, leading space."""
    words = re.sub(r"([^\w\s]|_)", r" \1 ", text.casefold()).split()
    return " " + " ".join(words) if words else ""


@dataclasses.dataclass(kw_only=True)
class RowParse:
    """One completion, parsed on the host.

    Attributes:
      kinds: KIND_* of each block, in order.
      empty: per block, True if a closed legal block holds only whitespace.
      illegal_tag: a tag other than think/query/retrieve/answer in model text.
      triple_newline: three or more consecutive newlines in one model-written run.
      answer: text of the first `<answer>...</answer>` (from the last `<answer>` before
        the first `</answer>`) in model text, inside a well-formed block or not; None if none.
      answer_token_index: completion index of the token holding the answer's first
        non-whitespace byte, -1 if none.
      queries: text of each `<query>...</query>` in model text (wherever written), as
        searched: whitespace collapsed, surrounding quotes removed (`engine.clean_query`).
      passages: text of each retrieve block, its own tags removed.
      model_text: all model-written text (no environment text, no EOS).
    """

    kinds: list[int]
    empty: list[bool]
    illegal_tag: bool
    triple_newline: bool
    answer: str | None
    answer_token_index: int
    queries: list[str]
    passages: list[str]
    model_text: str

    @property
    def has_retrieval(self) -> bool:
        return KIND_RETRIEVE in self.kinds


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _model_blocks(data: bytes) -> tuple[list[tuple[int, int, int]], bool]:
    """Blocks of one model-written run: [(kind, content_start, content_end)], illegal flag."""
    blocks, illegal, pos, opened = [], False, 0, None  # opened = [kind, content_start, nested]
    for match in _TAG.finditer(data):
        closing, name = match.group(1) == b"/", match.group(2).decode()
        if name not in _MODEL_KINDS:
            illegal = True
            continue
        if opened is None:
            if data[pos:match.start()].strip():
                blocks.append((KIND_OTHER, pos, match.start()))
            if closing:
                blocks.append((KIND_OTHER, match.start(), match.end()))
                pos = match.end()
            else:
                opened = [name, match.end(), False]
        elif closing and name == opened[0]:
            kind = KIND_OTHER if opened[2] else _MODEL_KINDS[name]
            blocks.append((kind, opened[1], match.start()))
            opened, pos = None, match.end()
        else:
            opened[2] = True
    if opened is not None:
        blocks.append((KIND_OTHER, opened[1], len(data)))
    elif data[pos:].strip():
        blocks.append((KIND_OTHER, pos, len(data)))
    return blocks, illegal


def parse_row(tokens: np.ndarray, source: np.ndarray, length: int, tables: TextTables) -> RowParse:
    """Parses one completion.

    Args:
      tokens: [C] int32 completion tokens.
      source: [C] int8 SOURCE_* provenance.
      length: number of completion tokens (the rest is padding).
      tables: from `build_text_tables`.

    Returns:
      RowParse.
    """
    row = RowParse(kinds=[], empty=[], illegal_tag=False, triple_newline=False, answer=None,
                   answer_token_index=-1, queries=[], passages=[], model_text="")
    length = min(int(length), int(np.sum(source != sampler.SOURCE_PAD)))
    start = 0
    while start < length:
        env = source[start] == sampler.SOURCE_ENV
        end = start
        while end < length and (source[end] == sampler.SOURCE_ENV) == env:
            end += 1
        if env:
            text = _ENV_TAGS.sub("", _decode(b"".join(tables.token_bytes[t] for t in tokens[start:end])))
            row.kinds.append(KIND_RETRIEVE)
            row.empty.append(not text.strip())
            row.passages.append(text)
        else:
            _parse_model_run(row, tokens, start, end, tables)
        start = end
    return row


def _parse_model_run(row: RowParse, tokens: np.ndarray, start: int, end: int, tables: TextTables) -> None:
    """Adds the blocks of model-written tokens[start:end] to `row`."""
    index = np.asarray([i for i in range(start, end) if int(tokens[i]) not in tables.skip_ids], np.int64)
    pieces = [tables.token_bytes[int(tokens[i])] for i in index]
    ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
    data = b"".join(pieces)
    row.model_text += _decode(data)
    row.triple_newline |= b"\n\n\n" in data
    blocks, illegal = _model_blocks(data)
    row.illegal_tag |= illegal
    for kind, lo, hi in blocks:
        row.kinds.append(kind)
        row.empty.append(kind != KIND_OTHER and not _decode(data[lo:hi]).strip())
    # Query and answer texts come from their tags alone: a broken structure costs format
    # points only (the engine searched every closed query, wherever it was written).
    row.queries += [engine.clean_query(_decode(m.group(1))) for m in _QUERY_TEXT.finditer(data)]
    answer = _ANSWER_TEXT.search(data) if row.answer is None else None
    if answer is not None:
        lo, hi = answer.span(1)
        row.answer = _decode(data[lo:hi])
        first = lo + len(data[lo:hi]) - len(data[lo:hi].lstrip())
        if first < hi:
            row.answer_token_index = int(index[np.searchsorted(ends, first, side="right")])


def score_answer(answer: str | None, truth: GroundTruth) -> tuple[int, bool, bool]:
    """(answer letter 0..9 or -1, option text follows the letter, free-text match).

    pred = the answer's first word with every '.' removed, case-insensitive. The option
    text "follows" when the rest of the answer contains the correct option's text (words
    compared case-insensitively, punctuation ignored), or, if the ground truth has no
    option text, when anything follows. Free text matches on case-folded, whitespace-
    collapsed equality.
    """
    if answer is None:
        return -1, False, False
    words = answer.split()
    pred = words[0].replace(".", "").upper() if words else ""
    letter = LETTERS.index(pred) if len(pred) == 1 and pred in LETTERS else -1
    rest = _norm(answer.strip()[len(words[0]):]) if words else ""
    truth_text = _norm(truth.option_text)
    follows = bool(rest) and (not truth_text or f" {truth_text} " in f" {rest} ")
    free_match = truth.free_text and " ".join(answer.casefold().split()) == " ".join(truth.text.casefold().split())
    return letter, follows, free_match


@flax.struct.dataclass(frozen=True, kw_only=True)
class ParsedBatch:
    """A batch of parsed completions (NumPy on the host; jnp inside jit).

    K blocks, Q queries and the L* lengths are padded up to a multiple of `bucket`
    (K to a multiple of 4, at least 2) so that jitted rewards compile once per bucket.

    Attributes:
      kinds: [B, K] int8 KIND_* of each block in order, KIND_NONE past the last.
      empty: [B, K] bool, closed legal block holding only whitespace.
      illegal_tag: [B] bool, a non-think/query/retrieve/answer tag in model text.
      triple_newline: [B] bool, 3+ consecutive newlines in model text.
      answer_present: [B] bool, a closed answer block exists.
      answer_letter: [B] int32, 0..9 for A..J from the first answer, -1 none.
      answer_has_option_text: [B] bool, the correct option's text follows the letter.
      gt_letter: [B] int32, 0..9, -1 for free-text ground truth.
      free_text: [B] bool, the ground truth is not option-style.
      free_text_match: [B] bool, answer == ground truth, case-insensitive.
      char_count: [B] int32, characters of model text (retrieve blocks and EOS removed).
      num_queries: [B] int32, model-written query blocks.
      query_ids: [B, Q, Lq] int32, canonical token ids of each query (0 = padding).
      query_mask: [B, Q, Lq] bool, valid query tokens.
      query_content_mask: [B, Q, Lq] bool, valid content tokens.
      passage_ids: [B, Lp] int32, distinct canonical token ids of all retrieve blocks.
      passage_mask: [B, Lp] bool.
      option_ids: [B, Lo] int32, distinct content token ids of the correct option's text
        (the ground-truth text itself for free text).
      option_mask: [B, Lo] bool.
      answer_token_index: [B] int32, completion index of the first answer token, -1 none.
      has_retrieval: [B] bool, at least one retrieve block.
    """

    kinds: Any
    empty: Any
    illegal_tag: Any
    triple_newline: Any
    answer_present: Any
    answer_letter: Any
    answer_has_option_text: Any
    gt_letter: Any
    free_text: Any
    free_text_match: Any
    char_count: Any
    num_queries: Any
    query_ids: Any
    query_mask: Any
    query_content_mask: Any
    passage_ids: Any
    passage_mask: Any
    option_ids: Any
    option_mask: Any
    answer_token_index: Any
    has_retrieval: Any


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _pad(rows: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, True
    return ids, mask


def _encode(tables: TextTables, texts: list[str]) -> list[list[int]]:
    texts = [canonical_text(t) for t in texts]
    if not texts:
        return []
    encoded = tables.tokenizer([t or " " for t in texts], add_special_tokens=False)["input_ids"]
    return [list(ids) if t else [] for t, ids in zip(texts, encoded)]


def _distinct(ids: list[int], keep: np.ndarray | None = None) -> list[int]:
    return list(dict.fromkeys(i for i in ids if keep is None or keep[i]))


def _query_arrays(rows: list[RowParse], tables: TextTables, bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, Q, Lq] int32 canonical ids of every row's queries, and their [B, Q, Lq] bool mask."""
    encoded = iter(_encode(tables, [q for r in rows for q in r.queries]))
    per_row = [[next(encoded) for _ in r.queries] for r in rows]
    num = max(1, max(len(r) for r in per_row))
    width = _round_up(max([len(q) for r in per_row for q in r] + [1]), bucket)
    ids, mask = np.zeros((len(rows), num, width), np.int32), np.zeros((len(rows), num, width), bool)
    for b, row in enumerate(per_row):
        for q, query in enumerate(row):
            ids[b, q, :len(query)], mask[b, q, :len(query)] = query, True
    return ids, mask


def parse_rows(trajectory, tables: TextTables) -> list[RowParse]:
    """`parse_row` of every completion of a trajectory batch (`tokens`, `source`, `length`)."""
    tokens, source, lengths = (np.asarray(x) for x in (trajectory.tokens, trajectory.source, trajectory.length))
    return [parse_row(tokens[b], source[b], lengths[b], tables) for b in range(tokens.shape[0])]


def parse_batch(trajectory, answers: Sequence[str], tables: TextTables, *,
                options: Sequence[Mapping[str, str] | None] | None = None, bucket: int = 16,
                rows: Sequence[RowParse] | None = None) -> ParsedBatch:
    """Parses every completion of a batch into a ParsedBatch.

    Args:
      trajectory: has `tokens` [B, C] int32, `source` [B, C] int8, `length` [B] int32.
      answers: B ground truths: `GroundTruth`s (e.g. `record_ground_truth` of each row's
        record, as the trainer passes them) or answer strings ("B. option text" or free
        text) read by `parse_ground_truth`.
      tables: from `build_text_tables`.
      options: optional per-row {letter: option text} mappings.
      bucket: lengths are padded up to a multiple of this (>= 1).
      rows: the rows already parsed (`parse_rows`), so callers that also read them
        (e.g. `visual_query_texts`) parse once.

    Returns:
      ParsedBatch of NumPy arrays.
    """
    batch = np.shape(trajectory.tokens)[0]
    if len(answers) != batch or (options is not None and len(options) != batch):
        raise ValueError(f"answers/options must have B={batch} entries, got {len(answers)}/"
                         f"{None if options is None else len(options)}")
    if bucket < 1:
        raise ValueError(f"bucket must be >= 1, got {bucket}")
    rows = parse_rows(trajectory, tables) if rows is None else list(rows)
    if len(rows) != batch:
        raise ValueError(f"rows must have B={batch} entries, got {len(rows)}")
    truths = [a if isinstance(a, GroundTruth) else parse_ground_truth(a, None if options is None else options[b])
              for b, a in enumerate(answers)]
    scores = [score_answer(r.answer, t) for r, t in zip(rows, truths)]
    k = _round_up(max(len(r.kinds) for r in rows), 4)
    kinds, _ = _pad([r.kinds for r in rows], k)
    empty, _ = _pad([r.empty for r in rows], k)
    query_ids, query_mask = _query_arrays(rows, tables, bucket)
    passages = [_distinct(ids) for ids in _encode(tables, ["\n".join(r.passages) for r in rows])]
    opts = [_distinct(ids, tables.content_mask) for ids in _encode(tables, [t.option_text for t in truths])]
    passage_ids, passage_mask = _pad(passages, _round_up(max(len(p) for p in passages), bucket))
    option_ids, option_mask = _pad(opts, _round_up(max(len(o) for o in opts), bucket))
    return ParsedBatch(
        kinds=kinds.astype(np.int8), empty=empty.astype(bool),
        illegal_tag=np.asarray([r.illegal_tag for r in rows]),
        triple_newline=np.asarray([r.triple_newline for r in rows]),
        answer_present=np.asarray([r.answer is not None for r in rows]),
        answer_letter=np.asarray([s[0] for s in scores], np.int32),
        answer_has_option_text=np.asarray([s[1] for s in scores]),
        gt_letter=np.asarray([t.letter for t in truths], np.int32), free_text=np.asarray([t.free_text for t in truths]),
        free_text_match=np.asarray([s[2] for s in scores]),
        char_count=np.asarray([len(r.model_text) for r in rows], np.int32),
        num_queries=np.asarray([len(r.queries) for r in rows], np.int32),
        query_ids=query_ids, query_mask=query_mask, query_content_mask=query_mask & tables.content_mask[query_ids],
        passage_ids=passage_ids, passage_mask=passage_mask, option_ids=option_ids, option_mask=option_mask,
        answer_token_index=np.asarray([r.answer_token_index for r in rows], np.int32),
        has_retrieval=np.asarray([r.has_retrieval for r in rows]))


def visual_query_texts(row: RowParse) -> list[str]:
    """Texts the visual reward compares with the image: the non-empty queries, else the
    first sentence of the model text (tags removed), as METHOD.md decides."""
    queries = [q for q in row.queries if q]
    if queries:
        return queries
    text = " ".join(_TAG.sub(b" ", row.model_text.encode()).decode("utf-8", errors="replace").split())
    return [re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]] if text else []
