"""What every benchmark shares: the machine line, timing, the summary line, the model shapes.

Protocol (shared BENCHMARKS.md): ours and the reference run in the same process on the
same inputs, both warmed up first (first-call time reported apart), the timed part is
repeated (median reported), and each measured pair ends in one summary line

    <name> [<shape>]: ours <value> <unit> | <reference> <value> <unit> | ratio <r>x | <extra>
"""

import contextlib
import importlib.metadata
import os
import platform
import time
from typing import Callable

import numpy as np

# Hugging Face `Qwen2Config` keyword arguments of the benchmark shapes: BENCHMARKS.md's tiny
# (MLP 4 x width) and small, and Qwen2.5-0.5B's decoder (a real size that fits a GPU twice,
# ours and the reference's, each with its reference model and AdamW state).
SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1536, vocab_size=32000),
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936),
}


def emit(line: str) -> None:
    """Writes one result line to stdout (results, unlike logs, are the program's output)."""
    print(line, flush=True)


def version(package: str) -> str:
    """The installed version of `package`, or "absent"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def machine_line(packages: tuple[str, ...] = (), malloc: str = "default") -> str:
    """The first output line: CPU, cores, devices, library versions, thread and malloc settings
    (`malloc`: what `rwr_jax.host_memory` did in this process; ours and the reference share it)."""
    import jax  # pylint: disable=g-import-not-at-top
    libraries = " | ".join(f"{p} {version(p)}" for p in ("flax", "torch", "transformers") + packages)
    threads = ""
    if version("torch") != "absent":
        import torch  # pylint: disable=g-import-not-at-top
        threads = f"torch threads {torch.get_num_threads()}, "
    return (f"machine: {cpu_name()} | {os.cpu_count()} cores | devices {jax.devices()} | jax {jax.__version__} | "
            f"{libraries} | threads: {threads}OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', 'unset')!r} | malloc: {malloc}")


def summary(name: str, shape: str, ours: float, reference: str, value: float, unit: str, extra: str,
            higher_is_better: bool = True) -> str:
    """One summary line; ratio = how many times better ours is (ours / reference, or its inverse)."""
    fmt = lambda v: f"{v:.3g}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    ratio = ours / value if higher_is_better else value / ours
    return f"{name} [{shape}]: ours {fmt(ours)} {unit} | {reference} {fmt(value)} {unit} | ratio {ratio:.2f}x | {extra}"


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


class Phases:
    """Accumulates wall time per phase; with `sync`, each mark first waits for the device value."""

    def __init__(self, sync: bool):
        self.sync, self.seconds, self._last = sync, {}, time.perf_counter()

    def mark(self, phase: str, value=None) -> None:
        """Charges the time since the previous mark to `phase`."""
        if self.sync and value is not None:
            import jax  # pylint: disable=g-import-not-at-top
            jax.block_until_ready(value)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def time_interleaved(runs: dict[str, Callable[[Phases], object]], repeats: int,
                     sync: bool = False) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
    """Times each run after one warm-up call, the repeats interleaved across runs (same machine load).

    Returns:
      (first-call seconds, median seconds, median seconds per phase), each keyed by run name.
    """
    first, times, phases = {}, {name: [] for name in runs}, {name: [] for name in runs}
    for name, run in runs.items():
        start = time.perf_counter()
        run(Phases(sync))
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, run in runs.items():
            clock = Phases(sync)
            start = time.perf_counter()
            run(clock)
            times[name].append(time.perf_counter() - start)
            phases[name].append(clock.seconds)
    median_phases = {name: {p: float(np.median([s.get(p, 0.0) for s in runs_phases])) for p in runs_phases[0]}
                     for name, runs_phases in phases.items()}
    return first, {name: float(np.median(t)) for name, t in times.items()}, median_phases


def full_precision_on_gpu():
    """A context in which float32 dots on a GPU keep full precision, as torch's do by default
    (XLA's default there is TF32); on a CPU they always do."""
    import jax  # pylint: disable=g-import-not-at-top
    return jax.default_matmul_precision("highest") if jax.default_backend() == "gpu" else contextlib.nullcontext()


def torch_device() -> str:
    """Where the PyTorch reference runs: "cuda" when JAX runs on a GPU, else "cpu"."""
    import jax  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    if jax.default_backend() != "gpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("JAX runs on a GPU but this torch build sees none: the reference would run on the CPU; "
                           "install a CUDA build of torch, or set JAX_PLATFORMS=cpu")
    return "cuda"


def torch_reference_runs(prefix: str, threads: tuple[int, ...]) -> dict[str, int]:
    """Run name -> torch threads of a reference: on a CPU one run per thread count (`<prefix>_<n>t`, the
    fastest is the reference); on a GPU one run, `<prefix>_cuda`, whose threads only drive the device."""
    if torch_device() == "cpu":
        return {f"{prefix}_{n}t": n for n in threads}
    return {f"{prefix}_cuda": threads[0]}


def torch_sync() -> None:
    """Waits for queued CUDA work (a no-op on the CPU), so that a phase mark times what ran in it."""
    import torch  # pylint: disable=g-import-not-at-top
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def random_qwen2(shape: str, seed: int = 0, **overrides):
    """A random `transformers.Qwen2ForCausalLM` of `shape` (eval mode, on `torch_device()`) and our
    (config, params) of it; `overrides`: our DecoderConfig fields not in the checkpoint (dtype, ...).

    The HF model is saved to a temporary directory and loaded with
    `convert.load_hf_params`, so both sides hold the same weights by construction.
    """
    import tempfile  # pylint: disable=g-import-not-at-top

    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    from rwr_jax.models.qwen2_vl import convert  # pylint: disable=g-import-not-at-top
    from rwr_jax.models.qwen2_vl.config import read_hf_config  # pylint: disable=g-import-not-at-top
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    torch.manual_seed(seed)
    hf_config = transformers.Qwen2Config(
        **SHAPES[shape], rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_model = transformers.Qwen2ForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        config, _ = read_hf_config(directory, **overrides)
        params = convert.load_hf_params(directory, config, progress=False)
    return hf_model.to(torch_device()), config, params
