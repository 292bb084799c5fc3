"""Embedding index directories: resumable build, checked loading (searchers in `searchers`).

An index directory holds

- `embeddings.npy`: `[N, D] float32` passage embeddings, row i = corpus row i; exact
  (brute-force) search reads them directly;
- `scann/`: the serialized ScaNN searcher (tree + asymmetric hashing + exact reorder),
  only for searcher type "scann";
- `corpus_offsets.npy`: the document store's row offsets (see `document_store`);
- `manifest.json`: format version, the encoder fingerprint, dim, whether the embeddings
  are L2-normalised (measured), the corpus path / sha256 / row count, and the searcher
  type with its parameters. It is written last, so its presence marks a finished build.

Scores are inner products (cosine similarity when the encoder normalises). Building
embeds the corpus in chunks of `chunk_rows` rows, each saved under `embedding_chunks/`
as soon as it is done, so a killed build continues from the last finished chunk; a
restart with another encoder or corpus discards the chunks (logged) and starts over.
"""

import dataclasses
import json
import os
import shutil
import time
from typing import Protocol, runtime_checkable

import numpy as np
from absl import logging
from tqdm import tqdm

from rwr_jax.retrieval import document_store, searchers

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
EMBEDDINGS_FILE = "embeddings.npy"
OFFSETS_FILE = "corpus_offsets.npy"
CHUNKS_DIR = "embedding_chunks"
BUILD_STATE_FILE = "build_state.json"
NORM_TOLERANCE = 1e-3
SEARCHER_TYPES = ("auto", "brute_force", "scann")


@runtime_checkable
class Embedder(Protocol):
    """What the index and retriever need from a text encoder."""

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """Returns `[N, D] float32` query embeddings (query instruction applied by the encoder)."""

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        """Returns `[N, D] float32` passage embeddings."""

    def fingerprint(self) -> dict:
        """JSON-serialisable identity: name/path, dim, pooling, normalisation, weights checksum."""


def _load_embeddings(index_dir: str, shape: list[int] | None = None) -> np.ndarray:
    path = os.path.join(index_dir, EMBEDDINGS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the embeddings of {index_dir} are missing")
    embeddings = np.load(path, mmap_mode="r")
    if shape is not None and (list(embeddings.shape) != shape or embeddings.dtype != np.float32):
        raise ValueError(f"{path}: {embeddings.dtype} {list(embeddings.shape)}, but the manifest says float32 {shape}")
    return embeddings


def _json_roundtrip(value):
    return json.loads(json.dumps(value, sort_keys=True))


def _write_json(path: str, value: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path + ".tmp", "wb") as f:
        np.save(f, array)
    os.replace(path + ".tmp", path)


def _diff(prefix: str, ours, theirs, out: list[str]) -> None:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            _diff(f"{prefix}.{key}", ours.get(key, "<missing>"), theirs.get(key, "<missing>"), out)
    elif ours != theirs:
        out.append(f"{prefix}: index has {ours!r}, given {theirs!r}")


def check_manifest(manifest: dict, where: str, fingerprint: dict | None = None,
                   corpus_sha256: str | None = None, num_rows: int | None = None) -> None:
    """Raises ValueError listing every field where `manifest` and the given encoder/corpus differ."""
    diffs: list[str] = []
    if manifest.get("format_version") != FORMAT_VERSION:
        diffs.append(f"format_version: index has {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    if fingerprint is not None:
        _diff("encoder", manifest.get("encoder"), _json_roundtrip(fingerprint), diffs)
    corpus = manifest.get("corpus", {})
    if corpus_sha256 is not None and corpus.get("sha256") != corpus_sha256:
        diffs.append(f"corpus.sha256: index has {corpus.get('sha256')!r} (built from {corpus.get('path')}), "
                     f"given corpus has {corpus_sha256!r}")
    if num_rows is not None and corpus.get("num_rows") != num_rows:
        diffs.append(f"corpus.num_rows: index has {corpus.get('num_rows')!r}, given corpus has {num_rows}")
    if diffs:
        raise ValueError(f"{where} does not match: " + "; ".join(diffs))


@dataclasses.dataclass(frozen=True)
class Index:
    """A loaded index: its manifest and searcher."""
    index_dir: str
    manifest: dict
    searcher: searchers.Searcher

    @property
    def num_rows(self) -> int:
        return self.manifest["corpus"]["num_rows"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product.

        Args:
          query_embeddings: [Q, D] float32.
          k: neighbours wanted (>= 1); more than the corpus holds returns all rows.

        Returns:
          ([Q, min(k, N)] float32 scores, descending; [Q, min(k, N)] int64 rows, -1 where an
          approximate searcher found fewer candidates, with score -inf).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.asarray(query_embeddings, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"{self.index_dir}: query embeddings must be [Q, {self.dim}], got {queries.shape}")
        return self.searcher.search(queries, min(k, self.num_rows))


def _reset_if_stale(index_dir: str, state: dict) -> None:
    """Drops partial build outputs made for another encoder/corpus/chunking, then records `state`."""
    path = os.path.join(index_dir, BUILD_STATE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            previous = json.load(f)
        if previous == state:
            return
        diffs: list[str] = []
        _diff("build", previous, state, diffs)
        logging.warning("%s: discarding a partial build (%s)", index_dir, "; ".join(diffs))
    shutil.rmtree(os.path.join(index_dir, CHUNKS_DIR), ignore_errors=True)
    shutil.rmtree(os.path.join(index_dir, searchers.SCANN_DIR), ignore_errors=True)
    if os.path.exists(os.path.join(index_dir, EMBEDDINGS_FILE)):
        os.remove(os.path.join(index_dir, EMBEDDINGS_FILE))
    _write_json(path, state)


def _embed_rows(store, embedder: Embedder, start: int, stop: int, batch_size: int, bar) -> np.ndarray:
    """`[stop - start, D] float32` embeddings of corpus rows [start, stop), in batches."""
    parts = []
    for lo in range(start, stop, batch_size):
        hi = min(lo + batch_size, stop)
        vectors = np.asarray(embedder.encode_passages(store.contents(lo, hi)), np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != hi - lo or (parts and vectors.shape[1] != parts[0].shape[1]):
            raise ValueError(f"encode_passages returned shape {vectors.shape} for rows [{lo}, {hi}) of "
                             f"{store.path}; expected [{hi - lo}, D] with one D for all batches")
        if not np.isfinite(vectors).all():
            raise ValueError(f"encode_passages returned non-finite values for rows [{lo}, {hi}) of {store.path}")
        parts.append(vectors)
        bar.update(hi - lo)
    return np.concatenate(parts)


def _concat_chunks(index_dir: str, chunk_paths: list[str], num_rows: int) -> bool:
    """Writes the chunks as one `embeddings.npy`; returns whether every row has unit norm."""
    first = np.load(chunk_paths[0], mmap_mode="r")
    path = os.path.join(index_dir, EMBEDDINGS_FILE)
    out = np.lib.format.open_memmap(path + ".tmp", mode="w+", dtype=np.float32, shape=(num_rows, first.shape[1]))
    row, normalized = 0, True
    for chunk_path in chunk_paths:
        chunk = np.load(chunk_path)
        if chunk.shape[1] != out.shape[1]:
            raise ValueError(f"{chunk_path}: dim {chunk.shape[1]}, expected {out.shape[1]} (from {chunk_paths[0]})")
        out[row:row + len(chunk)] = chunk
        normalized &= bool(np.all(np.abs(np.linalg.norm(chunk, axis=1) - 1) < NORM_TOLERANCE))
        row += len(chunk)
    out.flush()
    del out
    os.replace(path + ".tmp", path)
    return normalized


def embed_corpus(index_dir: str, store: document_store.DocumentStore, embedder: Embedder, batch_size: int,
                 chunk_rows: int) -> list[str]:
    """Embeds every corpus row into chunk files under `index_dir`, skipping chunks already saved.

    Returns:
      The chunk paths in row order.
    """
    num_rows = len(store)
    chunk_dir = os.path.join(index_dir, CHUNKS_DIR)
    os.makedirs(chunk_dir, exist_ok=True)
    starts = range(0, num_rows, chunk_rows)
    paths = [os.path.join(chunk_dir, f"chunk_{c:06d}.npy") for c in range(len(starts))]
    done_rows = sum(min(chunk_rows, num_rows - s) for s, p in zip(starts, paths) if os.path.isfile(p))
    if done_rows:
        logging.info("%s: resuming, %d of %d rows already embedded", index_dir, done_rows, num_rows)
    with tqdm(total=num_rows, initial=done_rows, unit="passage", desc=f"embedding {store.path}") as bar:
        for start, path in zip(starts, paths):
            if not os.path.isfile(path):
                _save_npy(path, _embed_rows(store, embedder, start, min(start + chunk_rows, num_rows),
                                            batch_size, bar))
    return paths


def build_index(index_dir: str, store: document_store.DocumentStore, embedder: Embedder, *,
                searcher: str = "auto", batch_size: int = 64, chunk_rows: int = 8192,
                scann_min_rows: int = 100_000) -> Index:
    """Embeds `store` with `embedder` and builds a searcher in `index_dir` (resumable).

    Args:
      searcher: "brute_force", "scann", or "auto" (ScaNN from `scann_min_rows` rows up).
      batch_size: passages per `encode_passages` call.
      chunk_rows: rows per saved chunk (the unit a killed build loses at most).

    Raises:
      FileExistsError: `index_dir` already holds a finished index.
      ValueError: bad arguments, or the embedder returned a wrong shape or non-finite values.
    """
    if searcher not in SEARCHER_TYPES:
        raise ValueError(f"searcher must be one of {list(SEARCHER_TYPES)}, got {searcher!r}")
    if not isinstance(embedder, Embedder):
        raise TypeError(f"embedder {type(embedder).__name__} lacks encode_queries/encode_passages/fingerprint")
    if batch_size < 1 or chunk_rows < 1:
        raise ValueError(f"batch_size and chunk_rows must be >= 1, got {batch_size} and {chunk_rows}")
    manifest_path = os.path.join(index_dir, MANIFEST_FILE)
    if os.path.isfile(manifest_path):
        raise FileExistsError(f"{manifest_path} exists: {index_dir} already holds an index; delete it to rebuild")
    os.makedirs(index_dir, exist_ok=True)
    fingerprint = _json_roundtrip(embedder.fingerprint())
    corpus = {"path": os.path.abspath(store.path), "sha256": store.checksum, "num_rows": len(store),
              "format": store.format}
    _reset_if_stale(index_dir, {"encoder": fingerprint, "corpus": corpus, "chunk_rows": chunk_rows})
    started = time.perf_counter()
    chunk_paths = embed_corpus(index_dir, store, embedder, batch_size, chunk_rows)
    normalized = _concat_chunks(index_dir, chunk_paths, len(store))
    embeddings = _load_embeddings(index_dir)
    kind = searcher if searcher != "auto" else ("scann" if len(store) >= scann_min_rows else "brute_force")
    if kind == "scann":
        searcher_config = {"type": kind, "params": searchers.scann_params(len(store), normalized)}
        built = searchers.ScannSearcher.build(embeddings, searcher_config["params"])
        built.save(index_dir)
    else:
        searcher_config = {"type": kind}
        built = searchers.BruteForceSearcher(embeddings)
    if os.path.abspath(store.offsets_path) != os.path.abspath(os.path.join(index_dir, OFFSETS_FILE)):
        shutil.copyfile(store.offsets_path, os.path.join(index_dir, OFFSETS_FILE))
    manifest = {"format_version": FORMAT_VERSION, "encoder": fingerprint, "dim": int(embeddings.shape[1]),
                "normalized": normalized, "corpus": corpus, "searcher": searcher_config,
                "embeddings": {"file": EMBEDDINGS_FILE, "dtype": "float32", "shape": list(embeddings.shape)},
                "build_seconds": round(time.perf_counter() - started, 1)}
    _write_json(manifest_path, manifest)
    shutil.rmtree(os.path.join(index_dir, CHUNKS_DIR))
    os.remove(os.path.join(index_dir, BUILD_STATE_FILE))
    logging.info("built %s: %d x %d, searcher %s", index_dir, *embeddings.shape, searcher_config)
    return Index(index_dir, manifest, built)


def read_manifest(index_dir: str) -> dict:
    """The manifest of a finished index; FileNotFoundError naming the file if there is none."""
    path = os.path.join(index_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {index_dir} is not a finished index "
                                "(build one with launch/build_index.py)")
    with open(path) as f:
        return json.load(f)


def load_index(index_dir: str, embedder: Embedder, store: document_store.DocumentStore) -> Index:
    """Loads an index after checking it was built with `embedder` over `store`'s corpus.

    Raises:
      FileNotFoundError: the manifest or a file it needs is missing (named).
      ValueError: encoder fingerprint, corpus checksum/rows or format version differ (each listed).
    """
    manifest = read_manifest(index_dir)
    check_manifest(manifest, os.path.join(index_dir, MANIFEST_FILE), embedder.fingerprint(), store.checksum,
                   len(store))
    if manifest["searcher"]["type"] == "scann":
        searcher = searchers.ScannSearcher.load(index_dir, manifest["searcher"]["params"])
    else:
        searcher = searchers.BruteForceSearcher(_load_embeddings(index_dir, manifest["embeddings"]["shape"]))
    return Index(index_dir, manifest, searcher)
