r"""Med-RwR evaluation: accuracy with retrieval rounds, optionally CDIR.

    python launch/eval.py --config=configs/eval.py:demo --workdir=/tmp/rwr_eval
    python launch/eval.py --config=configs/eval.py:demo,cdir --workdir=/tmp/rwr_eval_cdir
    python launch/eval.py --config=configs/eval.py:checkpoint=/ckpt/stage2/hf_export,\
data=/data/test.jsonl,corpus=/data/textbooks.jsonl,encoder=/models/bge-m3 --workdir=/eval/stage2

Writes <workdir>/predictions.jsonl (one line per record, flushed batch by batch: rerun the
same command after a crash and it continues with the records not yet there) and
<workdir>/metrics.json (accuracy and the rest, `rwr_jax.eval.predictions.summarize`).
Several processes (hosts) split the records: --distributed or --coordinator_address,
--num_processes, --process_id, as for launch/train.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rwr_jax import config_lib, host_memory  # noqa: E402
from rwr_jax.eval import evaluate  # noqa: E402
from rwr_jax.train import multihost  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/eval.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Predictions, metrics, demo data, indexes (resumed if it holds "
                               "predictions).")
_JOIN_PROCESSES = multihost.define_flags(__name__)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory()  # before JAX starts its CPU backend (see rwr_jax/host_memory.py)
    _JOIN_PROCESSES()  # --distributed / --coordinator_address: several processes split the records
    config_lib.enable_compilation_cache(_CONFIG.value.compilation_cache_dir, _WORKDIR.value)
    evaluate.evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
