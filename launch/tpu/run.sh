#!/usr/bin/env bash
# Training or evaluation on a TPU VM pod slice: launch/train.py or launch/eval.py on every
# worker at once, joined by --distributed (JAX finds the workers of the slice itself).
#
#   launch/tpu/run.sh train|eval TPU_NAME ZONE CONFIG WORKDIR [more flags of the script]
#   launch/tpu/run.sh train rwr-v5p-64 us-east5-a \
#  configs/stage2.py:checkpoint=/mnt/stage1,data=/mnt/mm.jsonl,corpus=/mnt/kb.jsonl,encoder=/mnt/bge-m3,clip=/mnt/clip \
#       /mnt/runs/stage2
#
# Every worker needs this repository installed at $REPO_DIR (default ~/rwr_jax: `pip install -e .`)
# and the same paths: WORKDIR on a shared filesystem (NFS, a gcsfuse mount), the checkpoint,
# data, corpus and encoder readable on every worker. The same command resumes a preempted run.
set -euo pipefail

if [[ $# -lt 5 || ( $1 != train && $1 != eval ) ]]; then
  sed -n '2,13p' "$0" >&2
  exit 2
fi
script=$1 tpu_name=$2 zone=$3 config=$4 workdir=$5
shift 5
repo_dir=${REPO_DIR:-'~/rwr_jax'}
command="cd ${repo_dir} && python launch/${script}.py --config=$(printf '%q' "${config}") \
--workdir=$(printf '%q' "${workdir}") --distributed"
if [[ $# -gt 0 ]]; then
  command+=" $(printf '%q ' "$@")"
fi
gcloud compute tpus tpu-vm ssh "${tpu_name}" --zone="${zone}" --worker=all --command="${command}"
