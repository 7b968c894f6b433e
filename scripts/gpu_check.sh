#!/usr/bin/env bash
# The GPU path on one GPU, in under 8 minutes: versions and Transformer Engine, packed (THD)
# numerics against each conversation alone, 30 bf16 iterations with the distributed optimizer
# + save + resume, --finetune --bf16 continuing from the loaded model, a CPU-written checkpoint
# trained and chatted with on the GPU, tools/chat.py, LoRA on the TE layers (learns, resumes
# exactly), a bf16 Mixture of Experts (learns; a CPU-written checkpoint resumes on the GPU),
# FP8 (--fp8-format hybrid) vs bf16 on an FP8 GPU, --tp-comm-overlap on 2+ GPUs.
# One PASS / FAIL / SKIP line per result, with its numbers; exit code 1 when one failed.
# Details: python scripts/gpu_check.py --help.
#
#   bash scripts/gpu_check.sh                     # sets up .venv (scripts/setup.sh) first
#   bash scripts/gpu_check.sh --python python3    # an interpreter that has the packages already
#                                                 # (e.g. a GPU machine without a package registry)
#   bash scripts/gpu_check.sh --only thd,chat     # some checks; --work-dir DIR (default runs/gpu_check)
#
# Without CUDA the GPU-only parts print "SKIP (no CUDA)" and the rest runs on CPU, smaller.
set -euo pipefail
cd "$(dirname "$0")/.."
py=
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --python)
      if [ $# -lt 2 ]; then
        echo "gpu_check: --python needs an interpreter, e.g. --python python3" >&2; exit 2
      fi
      py=$2; shift 2 ;;
    --python=*) py=${1#--python=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -z "$py" ]; then
  bash scripts/setup.sh
  py=.venv/bin/python
elif ! command -v "$py" >/dev/null 2>&1; then
  echo "gpu_check: --python $py: no such interpreter; give a name on PATH or a path to" \
    "Python 3.10+ with torch and megatron-core installed" >&2
  exit 2
fi
exec "$py" scripts/gpu_check.py ${args[@]+"${args[@]}"}
