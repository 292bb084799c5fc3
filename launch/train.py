r"""Med-RwR GRPO training (stage 1: text MCQ; stage 2: multimodal MCQ with all rewards).

    python launch/train.py --config=configs/stage2.py:demo --workdir=/tmp/rwr_stage2
    python launch/train.py --config=configs/stage1.py:checkpoint=/models/Qwen2.5-VL-7B-Instruct,\
data=/data/medqa.jsonl,corpus=/data/textbooks.jsonl,encoder=/models/bge-m3 --workdir=/ckpt/stage1

Resumes from the latest checkpoint in --workdir; writes TensorBoard events under
<workdir>/tensorboard, compiled programs under <workdir>/compilation_cache (config
`compilation_cache_dir`) and exports the trained policy to <workdir>/hf_export.

Several hosts (one process each, the same command on every host, a shared --workdir):
--distributed on TPU VM pods and SLURM clusters (JAX finds its peers), or name them, as on
one machine with several CPU processes (JAX's gloo collectives):

    python launch/train.py --config=configs/stage1.py:demo --config.mesh_devices=0 --workdir=/tmp/rwr_2p \
        --coordinator_address=localhost:1234 --num_processes=2 --process_id=0   # and =1
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rwr_jax import config_lib, host_memory  # noqa: E402
from rwr_jax.train import multihost, trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/stage2.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, exports (resumed if it holds a checkpoint).")
_JOIN_PROCESSES = multihost.define_flags(__name__)
_STOP_AFTER = flags.DEFINE_integer("stop_after", None, "Stop after this many steps of this run (for testing "
                                   "preemption and resume).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory()  # before JAX starts its CPU backend (see rwr_jax/host_memory.py)
    _JOIN_PROCESSES()  # --distributed / --coordinator_address: a multi-host run
    config_lib.enable_compilation_cache(_CONFIG.value.compilation_cache_dir, _WORKDIR.value)
    trainer.train(_CONFIG.value, _WORKDIR.value, stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
