#!/usr/bin/env bash
# One call on the GPU machine: install the carried megatron-core (.devkit/whl) and run the GPU check
# (correctness, throughput/MFU/memory, largest micro-batch, distributed-checkpoint round trip on NCCL,
# torch.compile), each stage time-boxed; figures as JSON and this log under $OUT (or --out DIR, else
# outputs/gpu_check). `--dry-run` runs every stage on the CPU on the tiny preset (tested in CI).
# See benchmarks/gpu_check.py for the stages and docs/BENCHMARKS.md ("GPU check") for the device command.
#   bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--stages ...] [--budget-s N]
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/gpu_check}"
prev=""
for a in "$@"; do
  if [ "$prev" = "--out" ]; then out="$a"; fi
  case "$a" in --out=*) out="${a#--out=}" ;; esac
  prev="$a"
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NO_VCS_VERSION="${NO_VCS_VERSION:-1}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"${PYTHON:-python3}" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/log"
exit "${PIPESTATUS[0]}"
