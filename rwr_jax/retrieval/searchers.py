"""Top-k inner-product searchers over `[N, D] float32` embeddings: exact, and ScaNN.

Both return `([Q, k] float32 scores, descending; [Q, k] int64 rows)`. `BruteForceSearcher`
is exact (and the recall reference); `ScannSearcher` is a ScaNN tree + asymmetric hashing
+ exact reorder searcher whose parameters `scann_params` scales with the corpus size.
`index.py` builds, saves and loads them inside index directories.
"""

import os

import numpy as np
import scann

SCANN_DIR = "scann"


def exact_top_k(database: np.ndarray, queries: np.ndarray, k: int,
                block_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products, scanning `database` in blocks of rows.

    Args:
      database: [N, D] float32 (may be a memory map).
      queries: [Q, D] float32.
      k: 1 <= k <= N.
      block_rows: rows scored at once (default: a [Q, block] score matrix of ~64M floats).

    Returns:
      ([Q, k] float32 scores, descending, ties by lower row; [Q, k] int64 rows).
    """
    block_rows = block_rows or max(1024, (1 << 26) // max(len(queries), 1))
    scores, rows = [], []
    for start in range(0, len(database), block_rows):
        block = queries @ np.asarray(database[start:start + block_rows], np.float32).T
        kk = min(k, block.shape[1])
        top = np.argpartition(block, block.shape[1] - kk, axis=1)[:, -kk:]
        _lowest_rows_among_ties(block, top)
        scores.append(np.take_along_axis(block, top, axis=1))
        rows.append(top + start)
    scores, rows = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1).astype(np.int64)


def _lowest_rows_among_ties(block: np.ndarray, top: np.ndarray) -> None:
    """Where more rows of `block` [Q, n] tie with the k-th best score than `top` [Q, k]
    (argpartition's pick) holds, makes `top` hold the lowest-numbered of them (in place)."""
    picked = np.take_along_axis(block, top, axis=1)
    threshold = picked.min(axis=1, keepdims=True)
    ties = (block == threshold).sum(axis=1) > (picked == threshold).sum(axis=1)
    for q in np.flatnonzero(ties):  # degenerate data only (duplicate passages)
        above = np.flatnonzero(block[q] > threshold[q])
        top[q] = np.concatenate([above, np.flatnonzero(block[q] == threshold[q])[:top.shape[1] - len(above)]])


class BruteForceSearcher:
    """Exact search over `[N, D] float32` embeddings (the recall reference)."""

    def __init__(self, embeddings: np.ndarray):
        self.embeddings = embeddings

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_top_k(self.embeddings, queries, k)

    def save(self, index_dir: str) -> None:
        """Nothing beyond `embeddings.npy`."""


def scann_params(num_rows: int, normalized: bool) -> dict:
    """ScaNN tree + AH + reorder parameters scaled with the corpus size.

    At 1M rows: 2,000 leaves (2 sqrt(N), and at least 100 rows a leaf), 100 searched (5 %,
    at least 10), k-means on a 100k sample (at least 50 sample rows a leaf; on 250k the
    k-means took 2.6x as long for no recall gain) keeping leaves of as few as 10 sample
    rows (ScaNN's default of 50 merges leaves when the sample holds about 50 rows a leaf:
    recall@10 fell to 0.34), spherical k-means for normalised embeddings, AH with 1 dim
    per block (isotropic) and the best 100 re-scored exactly in float32.

    Measured on 1M x 384 clustered unit vectors (recall@10 searching 2 leaves): 1 dim per
    block reaches 0.998 re-scoring 30 and 1.000 re-scoring 50, where ScaNN's recommended 2
    dims per block reach 0.940 and 0.993 re-scoring 50 and 100, so 1 dim per block needs
    fewer re-scored rows, which is most of a one-query search after picking leaves.
    The anisotropic AH loss (threshold 0.2) doubled the build time for no recall gain,
    int8 re-scoring capped recall@10 at 0.973 and int8 leaf centres were no faster.
    """
    num_leaves = min(round(2 * num_rows ** 0.5), num_rows // 100)
    return {"num_leaves": num_leaves, "num_leaves_to_search": max(round(0.05 * num_leaves), min(num_leaves, 10)),
            "training_sample_size": min(num_rows, max(100_000, 50 * num_leaves)), "min_partition_size": 10,
            "spherical": normalized, "dims_per_block": 1, "anisotropic_quantization_threshold": None,
            "reorder": 100}


class ScannSearcher:
    """Approximate search with a ScaNN searcher built with `scann_params`.

    Calls the pybind searcher directly and converts results only when ScaNN padded them:
    ScaNN's Python wrapper, the NaN masking of every result and `os.cpu_count()` per call
    added ~45 us to a one-query search of ~90 us (50k rows, CPU time).
    """

    def __init__(self, searcher, params: dict):
        self.searcher, self.params = searcher, params
        self._native = searcher.searcher  # the pybind `ScannNumpy` under ScaNN's Python wrapper
        self._threads = os.cpu_count() or 1  # `os.cpu_count` reads /sys on each call (~10 us)

    @classmethod
    def build(cls, embeddings: np.ndarray, params: dict) -> "ScannSearcher":
        """Trains and fills a searcher over `[N, D] float32` embeddings."""
        threshold = params["anisotropic_quantization_threshold"]
        builder = scann.scann_ops_pybind.builder(np.ascontiguousarray(embeddings, np.float32), 10, "dot_product")
        if params["num_leaves"] >= 2:
            builder = builder.tree(num_leaves=params["num_leaves"],
                                   num_leaves_to_search=params["num_leaves_to_search"],
                                   training_sample_size=params["training_sample_size"],
                                   min_partition_size=params.get("min_partition_size", 50),
                                   spherical=params.get("spherical", False))
        builder = builder.score_ah(params["dims_per_block"], anisotropic_quantization_threshold=(
            float("nan") if threshold is None else threshold))
        return cls(builder.reorder(params["reorder"]).build(), params)

    def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
               reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Like `exact_top_k`, approximately.

        Args:
          queries: [Q, D] float32, C-contiguous.
          k: neighbours wanted.
          leaves_to_search: overrides the built-in number of leaves searched.
          reorder: overrides how many AH candidates are re-scored exactly (at least k).

        Returns:
          ([Q, k] float32 scores; [Q, k] int64 rows), row -1 with score -inf where fewer
          than k candidates were found.
        """
        leaves = -1 if leaves_to_search is None else leaves_to_search
        reorder = max(k, self.params["reorder"] if reorder is None else reorder)
        if len(queries) == 1:  # one query: no batch bookkeeping
            rows, scores = self._native.search(queries[0], k, reorder, leaves)
            if len(rows) == k:
                return scores[None], rows[None].astype(np.int64)
            return _pad(rows[None], scores[None], k)
        if len(queries) < 2 * self._threads:  # too few to split across threads: skip the thread pool
            rows, scores = self._native.search_batched(queries, k, reorder, leaves, False, 0)
        else:  # one slice of queries per thread
            rows, scores = self._native.search_batched(queries, k, reorder, leaves, True,
                                                       -(-len(queries) // self._threads))
        if np.isnan(scores[:, -1]).any():  # ScaNN pads with (row 0, nan) when it finds fewer than k
            return _pad(rows, scores, k)
        return scores, rows.astype(np.int64)

    def save(self, index_dir: str) -> None:
        os.makedirs(os.path.join(index_dir, SCANN_DIR), exist_ok=True)
        self.searcher.serialize(os.path.join(index_dir, SCANN_DIR), relative_path=True)

    @classmethod
    def load(cls, index_dir: str, params: dict) -> "ScannSearcher":
        path = os.path.join(index_dir, SCANN_DIR, "scann_assets.pbtxt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: the ScaNN searcher of {index_dir} is missing")
        return cls(scann.scann_ops_pybind.load_searcher(os.path.dirname(path)), params)


def _pad(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`[Q, k]` (scores, int64 rows) with -inf / -1 where ScaNN returned nan or fewer than k columns."""
    out_scores = np.full((len(rows), k), -np.inf, np.float32)
    out_rows = np.full((len(rows), k), -1, np.int64)
    found = np.isfinite(scores)
    out_scores[:, :scores.shape[1]] = np.where(found, scores, -np.inf)
    out_rows[:, :rows.shape[1]] = np.where(found, rows.astype(np.int64), -1)
    return out_scores, out_rows


Searcher = BruteForceSearcher | ScannSearcher
