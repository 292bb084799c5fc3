"""Tests for rwr_jax.retrieval.searchers: exact top-k, ScaNN recall, batch-1 and padded results."""

import numpy as np
import pytest

from rwr_jax.retrieval import searchers


def clustered(num, dim, num_centres, seed):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_centres, dim)).astype(np.float32)
    x = centres[rng.integers(0, num_centres, num)] + 0.3 * rng.standard_normal((num, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(rows, exact_rows):
    return np.mean([len(set(a) & set(b)) / exact_rows.shape[1] for a, b in zip(rows, exact_rows)])


@pytest.fixture(scope="module")
def clustered_searcher():
    database = clustered(20_000, 32, 200, seed=0)
    queries = clustered(20_200, 32, 200, seed=0)[20_000:]  # same centres, held-out points
    params = searchers.scann_params(20_000, normalized=True)
    return database, queries, params, searchers.ScannSearcher.build(database, params)


@pytest.mark.parametrize("k, block_rows", [(5, 128), (5, 1 << 18), (1000, 300)])
def test_exact_top_k_matches_numpy(k, block_rows):
    rng = np.random.default_rng(1)
    database = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    scores, rows = searchers.exact_top_k(database, queries, k, block_rows=block_rows)
    reference = queries @ database.T
    expected_rows = np.argsort(-reference, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, np.take_along_axis(reference, expected_rows, 1), rtol=1e-5, atol=1e-5)
    assert rows.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("block_rows", [None, 1024, 7])
def test_exact_top_k_breaks_ties_by_lower_row(block_rows):
    """Duplicate passages: the same rows whatever the block size or the other queries."""
    database = np.ones((5000, 4), np.float32)
    database[[10, 20]] *= 2  # two strictly better rows, then 4998 ties
    queries = np.ones((3, 4), np.float32)
    scores, rows = searchers.exact_top_k(database, queries, 4, block_rows=block_rows)
    np.testing.assert_array_equal(rows, [[10, 20, 0, 1]] * 3)
    np.testing.assert_array_equal(scores, [[8, 8, 4, 4]] * 3)


def test_scann_recall_on_small_clustered_set(clustered_searcher):
    database, queries, params, searcher = clustered_searcher
    assert params["num_leaves"] == 200 and params["num_leaves_to_search"] == 10
    scores, rows = searcher.search(queries, 10)
    _, exact = searchers.exact_top_k(database, queries, 10)
    assert recall(rows, exact) >= 0.9
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and rows.shape == scores.shape == (200, 10)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, rows, 1), rtol=1e-5, atol=1e-5)


def test_scann_batch_one_matches_batched(clustered_searcher):
    _, queries, _, searcher = clustered_searcher
    scores, rows = searcher.search(queries, 10, leaves_to_search=3)  # 200 queries: the thread-pool path
    few_scores, few_rows = searcher.search(queries[:3], 10, leaves_to_search=3)  # below 2 per thread
    singles = [searcher.search(queries[i:i + 1], 10, leaves_to_search=3) for i in range(len(queries))]
    np.testing.assert_array_equal(np.concatenate([r for _, r in singles]), rows)
    np.testing.assert_allclose(np.concatenate([s for s, _ in singles]), scores, rtol=1e-6)
    np.testing.assert_array_equal(few_rows, rows[:3])
    np.testing.assert_allclose(few_scores, scores[:3], rtol=1e-6)


def test_scann_all_leaves_and_full_reorder_is_exact(clustered_searcher):
    database, queries, params, searcher = clustered_searcher
    scores, rows = searcher.search(queries[:20], 10, leaves_to_search=params["num_leaves"], reorder=len(database))
    exact_scores, exact_rows = searchers.exact_top_k(database, queries[:20], 10)
    np.testing.assert_array_equal(rows, exact_rows)
    np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_queries", [1, 2, 40])
def test_scann_pads_when_fewer_than_k_found(num_queries):
    database = clustered(60, 16, 3, seed=1)
    params = dict(searchers.scann_params(60, normalized=True), num_leaves=3, num_leaves_to_search=1,
                  min_partition_size=1)
    searcher = searchers.ScannSearcher.build(database, params)
    scores, rows = searcher.search(database[:num_queries], 50)
    assert rows.shape == scores.shape == (num_queries, 50) and rows.dtype == np.int64
    missing = rows == -1
    assert missing.any(axis=1).all() and not missing[:, 0].any()  # one leaf of 60 rows holds fewer than 50
    np.testing.assert_array_equal(np.isneginf(scores), missing)
    np.testing.assert_array_equal(rows[:, 0], np.arange(num_queries))


def test_scann_params_scale_with_corpus():
    params = searchers.scann_params(1_000_000, normalized=True)
    assert (params["num_leaves"], params["num_leaves_to_search"], params["training_sample_size"]) == (2000, 100,
                                                                                                       100_000)
    assert params["spherical"] and params["dims_per_block"] == 1 and params["reorder"] == 100
    assert not searchers.scann_params(1_000_000, normalized=False)["spherical"]
    assert searchers.scann_params(20_000, normalized=True)["training_sample_size"] == 20_000
