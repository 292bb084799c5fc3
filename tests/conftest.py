"""Test-wide settings, applied before jax or transformers is imported anywhere.

Eight fake CPU devices let multi-device tests build real meshes on one machine
(asserted in those tests); the hub is off so nothing is ever downloaded.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
