"""Tests for rwr_jax.retrieval.index: build, save and load with either searcher, manifest checks, resumable builds."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest

from rwr_jax.retrieval import document_store, index as index_lib

WORDS = ("fever cough dyspnea chest pain troponin aspirin insulin metformin sepsis lactate biopsy tumor "
         "anemia ferritin renal creatinine stroke thrombolysis fracture cast asthma steroid rash").split()


class HashEmbedder:
    """Test fixture for the `Embedder` protocol: L2-normalised signed hashed bag-of-words vectors."""

    def __init__(self, dim: int = 64, name: str = "hash-bow", fail_on_call: int | None = None):
        self.dim, self.name, self.fail_on_call = dim, name, fail_on_call
        self.passage_calls = self.query_calls = 0

    def _embed(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.md5(word.encode()).digest()[:8], "little")
                out[i, h % self.dim] += 1.0 if (h >> 40) & 1 else -1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-6)

    def encode_queries(self, texts):
        self.query_calls += 1
        return self._embed(texts)

    def encode_passages(self, texts):
        self.passage_calls += 1
        if self.passage_calls == self.fail_on_call:
            raise RuntimeError(f"embedder killed on call {self.passage_calls}")
        return self._embed(texts)

    def fingerprint(self):
        return {"name": self.name, "dim": self.dim, "pooling": "bag-of-words", "normalize": True}


def write_corpus(path, num_passages, seed=0):
    """A deterministic .jsonl corpus of `num_passages` distinct 6-word passages."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(num_passages):
            text = " ".join(rng.choice(WORDS, 5)) + f" case{i}"
            f.write(json.dumps({"id": f"doc{i}", "text": text}) + "\n")
    return str(path)


def _build(tmp_path, num_passages=40, embedder=None, **kwargs):
    os.makedirs(tmp_path, exist_ok=True)
    store = document_store.DocumentStore(write_corpus(tmp_path / "corpus.jsonl", num_passages))
    embedder = embedder or HashEmbedder()
    return index_lib.build_index(str(tmp_path / "index"), store, embedder, **kwargs), store, embedder


def test_brute_force_build_search_and_load(tmp_path):
    index, store, embedder = _build(tmp_path)
    assert index.manifest["searcher"] == {"type": "brute_force"}
    assert index.manifest["dim"] == 64 and index.manifest["normalized"] is True
    assert index.manifest["corpus"]["num_rows"] == 40 and index.manifest["corpus"]["sha256"] == store.checksum
    assert sorted(os.listdir(tmp_path / "index")) == ["corpus_offsets.npy", "embeddings.npy", "manifest.json"]
    embeddings = np.load(tmp_path / "index" / "embeddings.npy")
    np.testing.assert_allclose(embeddings, embedder._embed(store.contents(0, 40)), rtol=1e-6)
    queries = embedder.encode_queries([store.passage(i).text for i in (3, 17, 39)])
    loaded = index_lib.load_index(str(tmp_path / "index"), HashEmbedder(), store)
    scores, rows = loaded.search(queries, 4)
    np.testing.assert_array_equal(rows[:, 0], [3, 17, 39])
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    reference = np.sort(queries @ embeddings.T, axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(scores, reference, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"query embeddings must be \[Q, 64\], got \(3, 32\)"):
        loaded.search(queries[:, :32], 4)


def test_scann_index_build_save_load(tmp_path):
    index, store, embedder = _build(tmp_path, num_passages=3000, searcher="auto", scann_min_rows=2000)
    assert index.manifest["searcher"]["type"] == "scann"
    assert index.manifest["searcher"]["params"]["num_leaves"] == 30
    loaded = index_lib.load_index(str(tmp_path / "index"), HashEmbedder(), store)
    queries = embedder.encode_queries([store.passage(i).text for i in range(0, 3000, 300)])
    scores, rows = loaded.search(queries, 5)
    np.testing.assert_array_equal(rows[:, 0], np.arange(0, 3000, 300))
    assert rows.shape == (10, 5) and np.all(np.diff(scores, axis=1) <= 1e-6)
    # Asking for every row: the searched leaves hold fewer, and the rest come back as -1 / -inf.
    scores, rows = loaded.search(queries[:2], 10_000)
    assert rows.shape == (2, 3000) and np.all((rows == -1) == np.isneginf(scores))
    found = rows[0][rows[0] >= 0]
    assert 0 < len(found) < 3000 and len(set(found.tolist())) == len(found)
    fewer_leaves = loaded.searcher.search(queries, 5, leaves_to_search=1)[1]
    assert fewer_leaves.shape == (10, 5)


@pytest.mark.parametrize("embedder_kwargs, other_corpus, message", [
    ({"dim": 32}, False, "encoder.dim: index has 64, given 32"),
    ({"name": "other"}, False, "encoder.name: index has 'hash-bow', given 'other'"),
    ({}, True, "corpus.sha256: index has '[0-9a-f]{64}' .*, given corpus has '[0-9a-f]{64}'"),
])
def test_load_refuses_mismatch(tmp_path, embedder_kwargs, other_corpus, message):
    _, store, _ = _build(tmp_path)
    if other_corpus:
        store = document_store.DocumentStore(write_corpus(tmp_path / "other.jsonl", 40, seed=1))
    with pytest.raises(ValueError, match=f"manifest.json does not match: {message}"):
        index_lib.load_index(str(tmp_path / "index"), HashEmbedder(**embedder_kwargs), store)


def test_missing_index_files(tmp_path):
    _, store, _ = _build(tmp_path, num_passages=2500, searcher="scann")
    with pytest.raises(FileNotFoundError, match="nowhere/manifest.json not found"):
        index_lib.load_index(str(tmp_path / "nowhere"), HashEmbedder(), store)
    shutil.rmtree(tmp_path / "index" / "scann")
    with pytest.raises(FileNotFoundError, match="scann/scann_assets.pbtxt not found"):
        index_lib.load_index(str(tmp_path / "index"), HashEmbedder(), store)
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps(dict(manifest, searcher={"type": "brute_force"})))
    os.remove(tmp_path / "index" / "embeddings.npy")
    with pytest.raises(FileNotFoundError, match="index/embeddings.npy not found"):
        index_lib.load_index(str(tmp_path / "index"), HashEmbedder(), store)


def test_build_resumes_after_interruption(tmp_path):
    # 50 rows, chunks of 8 rows, batches of 4: calls 1-2 fill chunk 0, 3-4 chunk 1, call 5 dies in chunk 2.
    store = document_store.DocumentStore(write_corpus(tmp_path / "corpus.jsonl", 50))
    index_dir = str(tmp_path / "index")
    with pytest.raises(RuntimeError, match="killed on call 5"):
        index_lib.build_index(index_dir, store, HashEmbedder(fail_on_call=5), batch_size=4, chunk_rows=8)
    assert sorted(os.listdir(os.path.join(index_dir, "embedding_chunks"))) == ["chunk_000000.npy",
                                                                               "chunk_000001.npy"]
    assert not os.path.exists(os.path.join(index_dir, "manifest.json"))
    resumed = HashEmbedder()
    index = index_lib.build_index(index_dir, store, resumed, batch_size=4, chunk_rows=8)
    assert resumed.passage_calls == 4 * 2 + 1  # chunks 2-5 (2 batches each) and chunk 6 (rows 48-49)
    clean, _, _ = _build(tmp_path / "clean", num_passages=50, batch_size=50)
    np.testing.assert_array_equal(np.load(os.path.join(index_dir, "embeddings.npy")),
                                  np.load(os.path.join(clean.index_dir, "embeddings.npy")))
    assert sorted(os.listdir(index_dir)) == ["corpus_offsets.npy", "embeddings.npy", "manifest.json"]
    assert index.manifest["corpus"]["num_rows"] == 50


def test_partial_build_for_another_encoder_is_discarded(tmp_path):
    store = document_store.DocumentStore(write_corpus(tmp_path / "corpus.jsonl", 50))
    index_dir = str(tmp_path / "index")
    with pytest.raises(RuntimeError):
        index_lib.build_index(index_dir, store, HashEmbedder(fail_on_call=5), batch_size=4, chunk_rows=8)
    other = HashEmbedder(dim=32)
    index = index_lib.build_index(index_dir, store, other, batch_size=4, chunk_rows=8)
    assert other.passage_calls == 13 and index.dim == 32


def test_build_refuses_existing_index_and_bad_embedder(tmp_path):
    _build(tmp_path)
    with pytest.raises(FileExistsError, match="already holds an index"):
        _build(tmp_path)

    class WrongShape(HashEmbedder):
        def encode_passages(self, texts):
            return super().encode_passages(texts)[:-1]

    with pytest.raises(ValueError, match=r"encode_passages returned shape \(3, 64\) for rows \[0, 4\)"):
        _build(tmp_path / "bad", embedder=WrongShape(), batch_size=4)
    with pytest.raises(ValueError, match="searcher must be one of"):
        _build(tmp_path / "bad2", searcher="hnsw")
