"""Runs a test's command as several local JAX processes (DESIGN.md §5: processes on one
machine stand in for hosts, joined by JAX's gloo CPU collectives)."""

import importlib.metadata
import os
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jaxlib_version() -> tuple[int, ...]:
    return tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])


# XLA's CPU compiler with LLVM at -O0 and its elemental (pre-MLIR) fusion emitters: the tests'
# small programs compile about 2x faster than with the defaults (MLIR fusion emitters, -O2) and
# pass the same tolerances. Runs that stand for a user's command (the README's) keep the defaults.
# jaxlib 0.11 (seen on 0.11.2) no longer knows the emitter flag, and a process given an unknown
# XLA flag exits at start-up with no message under pytest: it is passed to older ones only.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0" + (
    " --xla_cpu_use_fusion_emitters=false" if _jaxlib_version() < (0, 11) else "")


def free_address() -> str:
    """host:port for a coordinator (a port free now)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return f"localhost:{s.getsockname()[1]}"


def subprocess_env(devices: int) -> dict:
    """The environment of a process with `devices` CPU devices, its own compilation cache (the workdir's)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


def run_processes(commands: list[list[str]], env: dict, timeout: int = 900) -> list[str]:
    """Starts every command at once in the repository root; asserts each exits 0; returns their outputs."""
    running = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for c in commands]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in running]
    finally:
        for p in running:
            p.kill()
    for p, output in zip(running, outputs):
        assert p.returncode == 0, output[-6000:]
    return outputs
