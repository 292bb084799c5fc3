r"""Will a config's training step fit in device memory? Compiles its update and rollout programs ahead of
time and reads XLA's memory analysis.

    python launch/plan_memory.py --config=configs/stage2.py:checkpoint=/models/Qwen2.5-VL-7B-Instruct \
        --topology=v5p:4x4x4
    python launch/plan_memory.py --config=configs/stage1.py:demo --topology=v5e:2x2

--topology names a TPU slice (libtpu compiles for it on any host, no TPU needed: `pip install
-e ".[tpu]"` or ".[dev]"); without it the plan is for this host's devices (e.g. a GPU node).
Only the checkpoint's config.json is read. The sizes are the largest the config allows (every
length at its limit, rwr_jax/train/memory_plan.py); override them with the usual flags, e.g.
--config.data.max_prompt_length=2048 --config.rollout.max_completion_length=4096
--config.train.num_micro_batches=8. Exit status 1 when the step does not fit. A 7B model takes
minutes to compile (6 min for the update on v5p:2x2x2 with 2 cores).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rwr_jax.train import memory_plan  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config, e.g. configs/stage2.py:checkpoint=DIR.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice to plan for, e.g. v5p:2x2x2, v6e:4x4 (default: this "
                                "host's devices).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    devices = memory_plan.topology_devices(_TOPOLOGY.value) if _TOPOLOGY.value else jax.devices()
    plan = memory_plan.plan_memory(_CONFIG.value, devices)
    print(plan.report())
    return 1 if plan.fits is False else 0


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
