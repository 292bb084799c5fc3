"""Test-wide settings, applied before jax or transformers is imported anywhere.

Eight fake CPU devices let multi-device tests build real meshes on one machine
(asserted in those tests); the hub is off so nothing is ever downloaded. A
compilation cache private to this session lets tests that build the same program
(a trainer run, stopped and resumed; subprocess launches) compile it once. Programs
compile with `FAST_COMPILE_FLAGS` (tests/multiprocess.py): compiling is most of the
suite's time.
"""

import os
import tempfile

from tests.multiprocess import FAST_COMPILE_FLAGS

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS, "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="rwr_jax_test_xla_cache_"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
