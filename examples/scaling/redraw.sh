#!/usr/bin/env bash
# Redraw every number and figure of docs/SCALING.md from the shipped sweep results (docs/results/scaling):
# fit.json (C = 6·N·D) and fit_full.json (full FLOP count) by `mdm-sweep fit` with the documented bootstrap,
# and docs/figures/scaling_cpu.png, scaling_cpu_full.png by `mdm-sweep plot`. About a minute on 2 cores.
#
#   bash examples/scaling/redraw.sh [RESULTS_DIR] [FIGURES_DIR]    # defaults docs/results/scaling docs/figures
set -euo pipefail
cd "$(dirname "$0")/../.."
RES="${1:-docs/results/scaling}"
FIG="${2:-docs/figures}"
PY="${PYTHON:-python}"
TITLE="CPU IsoFLOP sweep: Tiny Shakespeare, BPE 512, seq 64"
"$PY" -m megatron_mdm.cli.sweep fit --csv "$RES/results.csv" --bootstrap 200 --seed 0 --output "$RES/fit.json" \
  > "$RES/fit.txt"
"$PY" -m megatron_mdm.cli.sweep fit --csv "$RES/results.csv" --bootstrap 200 --seed 0 --flops full \
  --output "$RES/fit_full.json" > "$RES/fit_full.txt"
"$PY" -m megatron_mdm.cli.sweep plot --csv "$RES/results.csv" --fit "$RES/fit.json" --output "$FIG/scaling_cpu.png" \
  --title "$TITLE (C = 6ND)"
"$PY" -m megatron_mdm.cli.sweep plot --csv "$RES/results.csv" --fit "$RES/fit_full.json" \
  --output "$FIG/scaling_cpu_full.png" --title "$TITLE (full FLOP count)"
sed -i '$d' "$RES/fit.txt" "$RES/fit_full.txt"  # the "wrote ..." line
echo "wrote $RES/fit.json, $RES/fit_full.json (summaries: fit.txt, fit_full.txt), $FIG/scaling_cpu.png, $FIG/scaling_cpu_full.png"
