r"""Runs benchmarks, ours vs a reference in the same process (protocol: shared BENCHMARKS.md).

    python launch/bench.py rollout rollout_retrieval train_step          # tiny and small shapes
    python launch/bench.py rollout --shapes=tiny --repeats=5
    python launch/bench.py retrieval                                     # 1M x 384 + MiniLM corpus
    python launch/bench.py retrieval --num_vectors=100000 --num_passages=5000   # quick
    python launch/bench.py train_step --shapes=small,0.5b --dtype=bfloat16 --attention_kernel=cudnn   # a GPU
    python launch/bench.py train_step --shapes=small --profile_dir=/tmp/bench_profile   # + a trace of ours

On a GPU the references run there too (torch on CUDA), and JAX allocates GPU memory as it
needs it rather than 75% of it up front, so that both sides fit.

Prints the machine line first, then per benchmark (and shape) a breakdown and one
summary line per measured pair:
`<name> [<shape>]: ours <value> <unit> | <reference> <value> <unit> | ratio <r>x | <extra>`,
ratio = how many times better ours is. Each module in `rwr_jax/bench/` documents what
its benchmark compares.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the torch reference shares the GPU

from absl import app, flags, logging  # noqa: E402

from rwr_jax import host_memory  # noqa: E402
from rwr_jax.bench import common  # noqa: E402

_SHAPES = flags.DEFINE_list("shapes", ["tiny", "small"], f"Model shapes: {sorted(common.SHAPES)}.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats (median reported), >= 3 by protocol.")
_NUM_VECTORS = flags.DEFINE_integer("num_vectors", 1_000_000, "retrieval: rows of the clustered dataset.")
_DIM = flags.DEFINE_integer("dim", 384, "retrieval: dimension of the clustered dataset.")
_NUM_CENTRES = flags.DEFINE_integer("num_centres", 2000, "retrieval: gaussian centres of the clustered dataset.")
_NOISE = flags.DEFINE_float("noise", 0.05, "retrieval: per-dimension noise std around the unit-norm centres.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 1000, "retrieval: queries for recall (a prefix is timed).")
_NUM_PASSAGES = flags.DEFINE_integer("num_passages", 10_000, "retrieval: passages of the generated corpus (0: skip).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "train_step: compute dtype of both sides (parameters stay float32).")
_ATTENTION_KERNEL = flags.DEFINE_string("attention_kernel", "xla",
                                        "train_step: ours, a name in the attention registry (cudnn: NVIDIA GPUs).")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "train_step: trace one more update of ours with jax.profiler "
                                   "into this directory (xprof / TensorBoard's profile tab).")
_EMBEDDER = flags.DEFINE_enum("embedder", "auto", ["auto", "flax", "sentence_transformers"],
                              "retrieval: MiniLM embedder, our Flax encoder or sentence-transformers (auto: Flax).")


def _per_shape(module: str, function: str, **flag_kwargs: flags.FlagHolder):
    """A benchmark that runs `rwr_jax.bench.<module>.<function>(shape, repeats, **flags' values)` for each
    --shapes."""
    def run():
        bench = getattr(__import__(f"rwr_jax.bench.{module}", fromlist=[function]), function)
        for shape in _SHAPES.value:
            logging.info("running %s [%s]", function, shape)
            bench(shape, _REPEATS.value, **{name: flag.value for name, flag in flag_kwargs.items()})
    return run


def _retrieval():
    from rwr_jax.bench import retrieval  # pylint: disable=g-import-not-at-top
    retrieval.bench_retrieval(
        num_vectors=_NUM_VECTORS.value, dim=_DIM.value, num_centres=_NUM_CENTRES.value, noise=_NOISE.value,
        num_queries=_NUM_QUERIES.value, num_passages=_NUM_PASSAGES.value, embedder=_EMBEDDER.value,
        repeats=_REPEATS.value)


BENCHMARKS = {
    "rollout": _per_shape("rollout", "bench_rollout"),
    "rollout_retrieval": _per_shape("rollout", "bench_rollout_retrieval"),
    "train_step": _per_shape("train_step", "bench_train_step", dtype=_DTYPE, attention_kernel=_ATTENTION_KERNEL,
                            profile_dir=_PROFILE_DIR),
    "retrieval": _retrieval,
}


def main(argv):
    names = argv[1:]
    if not names:
        raise app.UsageError(f"expected benchmark names, from {sorted(BENCHMARKS)}")
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise app.UsageError(f"unknown benchmark(s) {unknown}; valid names: {sorted(BENCHMARKS)}")
    bad_shapes = [shape for shape in _SHAPES.value if shape not in common.SHAPES]
    if bad_shapes:
        raise app.UsageError(f"--shapes: unknown {bad_shapes}; valid shapes: {sorted(common.SHAPES)}")
    from rwr_jax.models import attention  # pylint: disable=g-import-not-at-top (its kernels register)
    try:
        attention.registry.lookup("attention", _ATTENTION_KERNEL.value)
    except LookupError as e:
        raise app.UsageError(f"--attention_kernel: {e}") from None
    if _REPEATS.value < 1:
        raise app.UsageError(f"--repeats must be >= 1, got {_REPEATS.value}")
    packages = ("scann", "faiss-cpu") if "retrieval" in names else ()
    kept = host_memory.keep_freed_memory()  # before JAX starts its CPU backend (see rwr_jax/host_memory.py)
    common.emit(common.machine_line(packages, malloc="keeps freed memory" if kept else "default"))
    for name in names:
        BENCHMARKS[name]()


if __name__ == "__main__":
    app.run(main)
