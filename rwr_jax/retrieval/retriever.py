"""Batched passage retrieval and Med-RwR's `<retrieve>` block.

All rows of a rollout batch that paused at `</query>` are answered by one
`Retriever.search` call: one `encode_queries` call and one index search for the batch.

Empty queries are the caller's bug: METHOD.md says an empty query is not searched (the
round ends the completion as it is), so the rollout filters them before calling, and
`search` raises a ValueError naming the query's position in the batch rather than
returning hits for nothing.
"""

import dataclasses
import os
from typing import Sequence

from rwr_jax.retrieval import document_store, index as index_lib

NO_RESULTS_BLOCK = "<retrieve> None </retrieve>"


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved passage: its corpus id and row, `Passage.contents` and inner-product score."""
    passage_id: str
    row: int
    text: str
    score: float


class Retriever:
    """Dense retrieval over one index, its corpus and the encoder it was built with."""

    def __init__(self, store: document_store.DocumentStore, index: index_lib.Index,
                 embedder: index_lib.Embedder):
        """Checks that `index` was built with `embedder` over `store` (ValueError listing what differs)."""
        index_lib.check_manifest(index.manifest, f"{index.index_dir}/{index_lib.MANIFEST_FILE}",
                                 embedder.fingerprint(), store.checksum, len(store))
        self.store, self.index, self.embedder = store, index, embedder

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        """Top-k passages for each query, best first.

        Args:
          queries: Q non-empty query strings (the text between `<query>` and `</query>`).
          k: passages per query (>= 1); a larger k than the corpus returns every passage.

        Returns:
          Q lists of min(k, N) hits (fewer only if an approximate searcher found fewer).

        Raises:
          ValueError: k < 1, or a query that is empty or only whitespace (its batch position named).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        for position, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"query {position} of {len(queries)} is empty ({query!r}); empty queries "
                                 f"must not be sent to the retriever of {self.index.index_dir}")
        if not queries:
            return []
        scores, rows = self.index.search(self.embedder.encode_queries(list(queries)), k)
        return [[self._hit(int(row), float(score)) for score, row in zip(q_scores, q_rows) if row >= 0]
                for q_scores, q_rows in zip(scores, rows)]

    def _hit(self, row: int, score: float) -> Hit:
        passage = self.store.passage(row)
        return Hit(passage.id, row, passage.contents, score)


def open_retriever(index_dir: str, embedder: index_lib.Embedder, corpus_path: str | None = None) -> Retriever:
    """Opens an index, the corpus it was built from (or `corpus_path`, e.g. after a move) and its retriever.

    Raises:
      FileNotFoundError / ValueError: as `index.load_index` (missing files, encoder or corpus mismatch).
    """
    corpus_path = corpus_path or index_lib.read_manifest(index_dir)["corpus"]["path"]
    store = document_store.DocumentStore(corpus_path, os.path.join(index_dir, index_lib.OFFSETS_FILE))
    return Retriever(store, index_lib.load_index(index_dir, embedder, store), embedder)


def format_retrieved(hits: Sequence[Hit]) -> str:
    """Med-RwR's retrieved block: `<retrieve> (1) p1\\n(2) p2\\n ... </retrieve>`.

    Passages are inserted verbatim (tags inside them included); no hits gives
    `<retrieve> None </retrieve>`.
    """
    if not hits:
        return NO_RESULTS_BLOCK
    return "<retrieve> " + "".join(f"({j}) {hit.text}\n" for j, hit in enumerate(hits, 1)) + " </retrieve>"
