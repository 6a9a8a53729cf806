#!/usr/bin/env bash
# The CPU-scale IsoFLOP sweep of docs/SCALING.md: 5 budgets x 5 shapes x {MDM, ARM} on Tiny Shakespeare
# (50 runs; about 25 minutes on an idle 2-core machine, estimated from the measured runs).
#
#   bash examples/scaling/run_cpu_sweep.sh [WORK_DIR]        # default outputs/scaling_cpu
#
# tokenizer (byte-level BPE, 512 ids) -> 64-token shards with a 5% validation split -> mdm-sweep plan ->
# launch (one process per run, sequential, under nice; re-running skips finished runs and resumes an
# interrupted one from its checkpoint) -> collect -> fit (bootstrap) -> plot. Environment overrides:
#   SWEEP_BUDGETS  (default "5e9 1e10 2e10 4e10 8e10")   SWEEP_SHAPES (default "1x16,1x32,1x48,2x48,2x64")
#   SWEEP_NICE     (default 15)      SWEEP_MAX_RUNS (train at most this many runs in this call; default all)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${1:-outputs/scaling_cpu}"
PY="${PYTHON:-python}"
BUDGETS="${SWEEP_BUDGETS:-5e9 1e10 2e10 4e10 8e10}"
SHAPES="${SWEEP_SHAPES:-1x16,1x32,1x48,2x48,2x64}"
NICE="${SWEEP_NICE:-15}"
CORPUS=examples/data/tinyshakespeare.txt.zst
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
mkdir -p "$WORK"

if [ ! -f "$WORK/tok/tokenizer.json" ]; then
  "$PY" tokenizer/train_tokenizer.py --input "$CORPUS" --vocab-size 512 --output "$WORK/tok" >/dev/null
fi
if [ ! -f "$WORK/shards/valid/manifest.json" ]; then
  "$PY" data_prep/prepare_data.py --input "$CORPUS" --tokenizer "$WORK/tok" --output "$WORK/shards" \
    --seq-length 64 --val-fraction 0.05 --workers 1 | tail -n 1
fi
if [ ! -f "$WORK/plan.yaml" ]; then
  # shellcheck disable=SC2086
  "$PY" -m megatron_mdm.cli.sweep plan --budgets $BUDGETS --shapes "$SHAPES" --head-dim 16 \
    --objectives mdm,arm --seq-length 64 --global-batch-size 8 \
    --config examples/scaling/cpu_sweep.yaml \
    --train-args "--tokenizer $WORK/tok --data-path $WORK/shards" --output "$WORK/plan.yaml"
fi
MAX=()
[ -n "${SWEEP_MAX_RUNS:-}" ] && MAX=(--max-runs "$SWEEP_MAX_RUNS")
"$PY" -m megatron_mdm.cli.sweep launch --plan "$WORK/plan.yaml" --out "$WORK" --nice "$NICE" "${MAX[@]}"
"$PY" -m megatron_mdm.cli.sweep collect --plan "$WORK/plan.yaml" --out "$WORK"
"$PY" -m megatron_mdm.cli.sweep fit --csv "$WORK/results.csv" --bootstrap 200
"$PY" -m megatron_mdm.cli.sweep plot --csv "$WORK/results.csv" --title "CPU IsoFLOP sweep: Tiny Shakespeare, BPE 512, seq 64"
