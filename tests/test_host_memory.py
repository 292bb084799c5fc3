"""Keeping freed host memory: a warm repeated large allocation faults no new pages."""

import subprocess
import sys

import pytest

# Allocates and frees a 64 MB buffer (writing every page) 4 times; prints the page faults of the last 3.
_PROBE = """
import resource, sys
import numpy as np
from rwr_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
np._core.multiarray._set_madvise_hugepage(False)  # count 4 KiB pages, as XLA's buffers get
np.ones(8 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    np.ones(8 << 20)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    applied, faults = out.split()
    return applied, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="keep_freed_memory sets glibc mallopt parameters: Linux only (False elsewhere)")
def test_kept_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    applied, kept = _faults("keep")
    _, default = _faults("default")
    print(f"page faults of 3 warm 64 MB allocations: default malloc {default}, keeping freed memory {kept}")
    assert applied == "True"
    assert default >= 2 * pages  # glibc maps fresh pages for every large block
    assert kept < pages // 10
