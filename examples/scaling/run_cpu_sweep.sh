#!/usr/bin/env bash
# The CPU-scale IsoFLOP sweep of docs/SCALING.md on Tiny Shakespeare: MDM and ARM each bracketed at their own
# budgets (the ARM's 16-1000x smaller, so that its loss frontier overlaps the MDM's), a second seed at one
# budget per objective, and a learning-rate check per size at one budget per objective. 85 runs; about
# 55 minutes on an idle 2-core machine with both cores used (two launches side by side).
#
#   bash examples/scaling/run_cpu_sweep.sh [WORK_DIR]        # default outputs/scaling
#
# tokenizer (byte-level BPE, 512 ids) -> 64-token shards with a 5% validation split -> mdm-sweep plan (one
# group per line below, --append) -> two launches side by side (--part 1/2, 2/2; under nice; re-running skips
# finished runs and resumes an interrupted one from its checkpoint) -> collect -> fit (bootstrap) -> plot.
# Environment: SWEEP_NICE (default 19), SWEEP_PARTS (launches side by side, default 2), SWEEP_PLAN_ONLY=1 (write
# the plan, print it and stop).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${1:-outputs/scaling}"
PY="${PYTHON:-python}"
NICE="${SWEEP_NICE:-19}"
PARTS="${SWEEP_PARTS:-2}"
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
PLAN="$WORK/plan.yaml"
if [ ! -f "$PLAN" ]; then
  group() {  # objective budgets shapes [tag run-args [head-dim]]; the first group writes the plan, the others append
    local append=()
    [ -f "$PLAN" ] && append=(--append)
    "$PY" -m megatron_mdm.cli.sweep plan --objectives "$1" --budgets $2 --shapes "$3" --head-dim "${6:-8}" \
      --seq-length 64 --global-batch-size 8 --config examples/scaling/cpu_sweep.yaml \
      --train-args "--tokenizer $WORK/tok --data-path $WORK/shards" --tag "${4:-}" --run-args "${5:-}" \
      "${append[@]}" --output "$PLAN" | tail -n 1
  }
  # main grid: shapes per budget chosen around the expected minimum (N* grows with C)
  group mdm 1.6e11 1x8,1x16,1x24,1x32,2x32,2x48
  group mdm 3.2e11 1x16,1x24,1x32,2x32,2x48
  group mdm 6.4e11 1x16,1x24,1x32,2x32,2x48,2x64
  group arm "1.25e9 2.5e9" 1x8,1x16,1x24,1x32,2x32
  group arm "5e9 1e10 2e10" 1x8,1x16,1x24,1x32,2x32,2x48
  # the ARM's minimum at its small budgets lies at or below the 1k-parameter 1x8: a 460-parameter 1x4 (one
  # head of 4) brackets it
  group arm "1.25e9 2.5e9 5e9 1e10" 1x4 "" "" 4
  # noise: a second seed (initialisation, data order, masks, validation draw) at one budget per objective
  group mdm 1.6e11 1x16,1x24,1x32,2x32 seed2 "--seed 2"
  group arm 5e9 1x8,1x16,1x24,1x32,2x32,2x48 seed2 "--seed 2"
  # learning rate per size: 1e-3 and 1e-2 beside the recipe's 3e-3 (min lr a tenth of it, as the recipe)
  group mdm 1.6e11 1x16,1x24,1x32,2x32 lr1e-3 "--lr 1e-3 --min-lr 1e-4"
  group mdm 1.6e11 1x16,1x24,1x32,2x32 lr1e-2 "--lr 1e-2 --min-lr 1e-3"
  group arm 5e9 1x8,1x16,1x24,1x32,2x32,2x48 lr1e-3 "--lr 1e-3 --min-lr 1e-4"
  group arm 5e9 1x8,1x16,1x24,1x32,2x32,2x48 lr1e-2 "--lr 1e-2 --min-lr 1e-3"
  # an ARM budget between 2.5e9 and 5e9: its minimum falls inside the MDM's measured minima (4.00-4.55), a
  # second budget where the multiplier is read off measured frontiers (added after the first 79 runs)
  group arm 3.5e9 1x8,1x16,1x24,1x32,2x32
  group arm 3.5e9 1x4 "" "" 4
fi
if [ -n "${SWEEP_PLAN_ONLY:-}" ]; then
  "$PY" -c "from megatron_mdm.sweep.plan import Plan, describe; print(describe(Plan.load('$PLAN')))"
  exit 0
fi
pids=()
for i in $(seq 1 "$PARTS"); do
  "$PY" -m megatron_mdm.cli.sweep launch --plan "$PLAN" --out "$WORK" --nice "$NICE" --part "$i/$PARTS" \
    > "$WORK/launch_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" -eq 0 ] || { echo "a launch failed: see $WORK/launch_*.log" >&2; exit 1; }
"$PY" -m megatron_mdm.cli.sweep collect --plan "$PLAN" --out "$WORK"
"$PY" -m megatron_mdm.cli.sweep fit --csv "$WORK/results.csv" --bootstrap 200
"$PY" -m megatron_mdm.cli.sweep plot --csv "$WORK/results.csv" --title "CPU IsoFLOP sweep: Tiny Shakespeare, BPE 512, seq 64"
