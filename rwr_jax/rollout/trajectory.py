"""What a rollout returns: token ids with provenance, logprobs, and block structure.

Block structure is read from provenance first: a run of environment tokens is a
`retrieve` block, whatever text it holds. Tags written by the model (`<think>`,
`<query>`, `<answer>`, …) are found in the model's own text only, so a `<query>` or
`</answer>` inside a retrieved passage never creates or closes a block.
"""

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from rwr_jax.models import packing
from rwr_jax.rollout import sampler

FINISH_REASONS = ("running", "eos", "answer", "query_pause", "round_budget", "total_budget", "max_rounds",
                  "empty_query")
_MODEL_TAGS = ("think", "query", "answer")
_TAG = re.compile(rb"<(/?)(think|query|answer|retrieve)>")


class Passage(NamedTuple):
    """One retrieved passage."""

    id: str
    text: str
    score: float = 0.0


class Span(NamedTuple):
    """A block of the completion: kind in think/query/retrieve/answer, token range [start, end)."""

    kind: str
    start: int
    end: int


def finish_reasons(codes: np.ndarray) -> list[str]:
    """[B] int codes -> names from FINISH_REASONS."""
    return [FINISH_REASONS[int(c)] for c in codes]


@dataclasses.dataclass(kw_only=True)
class Trajectory:
    """A batch of B = P * G completions (host NumPy arrays; row b belongs to prompt b // G).

    Attributes:
      prompt_tokens: [B, T] int32 left-padded prompts.
      prompt_mask: [B, T] bool.
      prompt_positions: [B, T] or [3, B, T] int32 rotary positions of the prompts.
      tokens: [B, C] int32 completion tokens (model and environment), compact.
      source: [B, C] int8 SOURCE_PAD / SOURCE_MODEL / SOURCE_ENV per token.
      logprobs: [B, C] float32 sampler log-probabilities of model tokens (0 elsewhere).
      length: [B] int32 completion lengths.
      rounds: [B] int32 generation rounds used.
      finish_reason: [B] int32 index into FINISH_REASONS.
      queries: per row, the searched queries in order.
      passages: per row, per query, the passages its retrieved block holds (as trimmed
        to the token limit).
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    prompt_positions: np.ndarray
    tokens: np.ndarray
    source: np.ndarray
    logprobs: np.ndarray
    length: np.ndarray
    rounds: np.ndarray
    finish_reason: np.ndarray
    queries: list[list[str]]
    passages: list[list[list[Passage]]]

    @property
    def loss_mask(self) -> np.ndarray:
        """[B, C] bool: 1 only on model-written completion tokens."""
        return self.source == sampler.SOURCE_MODEL

    def trimmed(self, granule: int) -> "Trajectory":
        """The same rows with C cut to the longest completion, bucketed
        (`packing.token_bucket` with at least `granule` slots; at most C): the update then
        works on the tokens written, not on the rollout's whole capacity, and sees few
        distinct widths (few compilations)."""
        width = min(self.tokens.shape[1], packing.token_bucket(max(int(self.length.max()), granule), granule))
        return dataclasses.replace(self, tokens=self.tokens[:, :width], source=self.source[:, :width],
                                   logprobs=self.logprobs[:, :width])

    def finish_reason_names(self) -> list[str]:
        return finish_reasons(self.finish_reason)

    def completion_positions(self) -> np.ndarray:
        """[B, C] int32 text positions of completion tokens (continuing each prompt)."""
        prompt = self.prompt_positions if self.prompt_positions.ndim == 2 else self.prompt_positions.max(axis=0)
        start = np.where(self.prompt_mask, prompt, -1).max(axis=1) + 1
        return (start[:, None] + np.arange(self.tokens.shape[1])[None]).astype(np.int32)

    def full_sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Prompt + completion for teacher forcing: (tokens [B, T + C], mask, positions)."""
        tokens = np.concatenate([self.prompt_tokens, self.tokens], axis=1)
        mask = np.concatenate([self.prompt_mask, self.source != sampler.SOURCE_PAD], axis=1)
        completion = self.completion_positions()
        if self.prompt_positions.ndim == 3:
            completion = np.broadcast_to(completion, (3, *completion.shape))
        positions = np.concatenate([self.prompt_positions, completion], axis=-1)
        return tokens, mask, positions


def block_spans(tokens: np.ndarray, source: np.ndarray, token_bytes: list[bytes]) -> list[Span]:
    """The think / query / retrieve / answer blocks of one completion.

    Args:
      tokens: [C] int32 completion tokens of one row.
      source: [C] int8 provenance of each token.
      token_bytes: bytes of every token id (`stop_strings.token_bytes_of`).

    Returns:
      Spans in order. Model blocks run from the token holding their opening tag to the
      token holding their closing tag (to the end if unclosed); retrieve blocks are the
      environment's token runs.
    """
    spans = []
    n = int(np.sum(source != sampler.SOURCE_PAD))
    start = 0
    while start < n:
        env = source[start] == sampler.SOURCE_ENV
        end = start
        while end < n and (source[end] == sampler.SOURCE_ENV) == env:
            end += 1
        if env:
            spans.append(Span("retrieve", start, end))
        else:
            spans.extend(_model_spans(tokens[start:end], token_bytes, offset=start))
        start = end
    return spans


def _model_spans(tokens: np.ndarray, token_bytes: list[bytes], offset: int) -> list[Span]:
    pieces = [token_bytes[t] for t in tokens]
    ends = np.cumsum([len(p) for p in pieces])
    text = b"".join(pieces)
    spans, open_kind, open_token = [], None, 0
    for match in _TAG.finditer(text):
        closing, kind = match.group(1) == b"/", match.group(2).decode()
        token = int(np.searchsorted(ends, match.start(), side="right"))
        if not closing and kind in _MODEL_TAGS and open_kind is None:
            open_kind, open_token = kind, token
        elif closing and kind == open_kind:
            close_token = int(np.searchsorted(ends, match.end() - 1, side="right"))
            spans.append(Span(kind, offset + open_token, offset + close_token + 1))
            open_kind = None
    if open_kind is not None:
        spans.append(Span(open_kind, offset + open_token, offset + len(tokens)))
    return spans
