#!/usr/bin/env bash
# megatron-mdm quickstart: from a fresh clone to a trained, resumed, converted masked diffusion LM.
#
#   bash examples/quickstart.sh
#
# Steps: install (.venv) -> BPE tokenizer on the shipped Tiny Shakespeare corpus -> webdataset shards
# with a validation split -> a short autoregressive warm start of the `quickstart` model (100 steps) ->
# the MDM trained from those weights (AR-to-diffusion adaptation, --load --finetune) with 2 processes
# (TP=2, gloo, on CPU) and saved -> resume from the checkpoint with --load -> summary (validation ELBO
# against the unigram level, tokens/s, curves.png) -> export to Hugging Face and generate (best effort).
# On a machine where `nvidia-smi` works it uses the GPUs instead (one process per GPU, BF16).
#
# Why the warm start: a masked-diffusion model this small sits on the unigram plateau (it predicts token
# frequencies and ignores context) for a seed-dependent 200-600+ steps when trained from scratch, longer
# than a quickstart; the ARM learns to use context within 50 steps, and the MDM adapted from it is below
# the unigram level within 50 steps (docs/BENCHMARKS.md, "Quickstart"). MDM_QUICKSTART_ARM_ITERS=0
# trains the MDM from scratch instead.
#
# Work directory: outputs/quickstart (tokenizer and shards are reused on re-runs; each run gets a new
# run-* directory and outputs/quickstart/latest points at it).
# Environment overrides (used by the tests for a short run):
#   MDM_QUICKSTART_DIR            work directory            (default outputs/quickstart)
#   MDM_QUICKSTART_ARM_ITERS      ARM warm-start steps      (default 100; 0: MDM from scratch)
#   MDM_QUICKSTART_ITERS          MDM steps before the resume (default 200)
#   MDM_QUICKSTART_RESUME_ITERS   MDM steps after the resume  (default 100)
#   MDM_QUICKSTART_VOCAB          tokenizer vocabulary size (default 512)
#   MDM_QUICKSTART_SEED           seed of initialisation, data order and masks (default: the YAML's, 1234)
#   MDM_QUICKSTART_SKIP_SETUP=1   use the current python instead of running examples/setup_env.sh
#   MDM_QUICKSTART_SKIP_HF=1      skip the Hugging Face export and generation step
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
WORK="${MDM_QUICKSTART_DIR:-outputs/quickstart}"
ARM_ITERS="${MDM_QUICKSTART_ARM_ITERS:-100}"
ITERS="${MDM_QUICKSTART_ITERS:-200}"
RESUME_ITERS="${MDM_QUICKSTART_RESUME_ITERS:-100}"
VOCAB="${MDM_QUICKSTART_VOCAB:-512}"
SEQ=64
CORPUS="examples/data/tinyshakespeare.txt.zst"
CONFIG="examples/configs/quickstart.yaml"
T_START=$(date +%s)

step() { printf '\n==== [%s] %s ====\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '\nquickstart: error: %s\n' "$*" >&2; exit 1; }

# Run a command, keep its full output in a log file, show the informative lines live.
run_logged() {
  local log="$1"; shift
  set +e
  "$@" 2>&1 | tee -a "$log" | grep --line-buffered -E \
    'iter +[0-9]+ \||validation (ELBO|loss)|saved checkpoint|loaded|training (mdm|arm)|CPU|error|Error|[Ww]arning|done:'
  local rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "---- last lines of $log ----" >&2
    tail -n 40 "$log" >&2
    die "command failed (exit $rc): $*"
  fi
}

# ---------------------------------------------------------------------------------------------------
step "1/8 environment (.venv)"
if [ "${MDM_QUICKSTART_SKIP_SETUP:-0}" = 1 ]; then
  PY="${PYTHON:-python}"
else
  bash examples/setup_env.sh
  PY="$REPO/.venv/bin/python"
fi
"$PY" -W ignore -c "import megatron_mdm, megatron.core, torch; print('torch', torch.__version__, '| megatron-core', megatron.core.__version__)" 2>/dev/null

NGPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
fi
GBS=64
if [ "$NGPU" -gt 0 ]; then
  # one process per GPU, data parallel, BF16; 64 sequences per step as on CPU
  NPROC=$NGPU
  while [ $((GBS % NPROC)) -ne 0 ]; do NPROC=$((NPROC - 1)); done
  MBS=$((GBS / NPROC)); [ "$MBS" -gt 16 ] && MBS=16
  LAYOUT=(--tensor-model-parallel-size 1 --bf16)
  echo "GPU mode: $NGPU GPU(s) found, $NPROC process(es), one per GPU, BF16"
else
  # CPU development mode: 2 gloo processes splitting the model with tensor parallelism
  NPROC=2
  MBS=32
  LAYOUT=(--tensor-model-parallel-size 2)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  echo "CPU mode: no GPU found; 2 processes (TP=2, gloo), OMP_NUM_THREADS=$OMP_NUM_THREADS"
fi
mkdir -p "$WORK"

# ---------------------------------------------------------------------------------------------------
step "2/8 tokenizer: byte-level BPE, vocabulary $VOCAB, on $CORPUS"
TOK="$WORK/tokenizer-$VOCAB"
if [ -f "$TOK/tokenizer.json" ]; then
  echo "reusing $TOK"
else
  # trained into a temporary directory, renamed when complete (its own report names that directory: kept in a log)
  "$PY" tokenizer/train_tokenizer.py --input "$CORPUS" --vocab-size "$VOCAB" --output "$TOK.tmp" \
    >"$WORK/tokenizer.log" 2>&1 || { tail -n 5 "$WORK/tokenizer.log" >&2; die "tokenizer training failed"; }
  rm -rf "$TOK" && mv "$TOK.tmp" "$TOK"
  echo "wrote $TOK (byte-level BPE, vocabulary $VOCAB, with <|mask|>, <|pad|>, <|bos|>, <|eos|>)"
fi

# ---------------------------------------------------------------------------------------------------
step "3/8 shards: ${SEQ}-token sequences, 5% of documents held out for validation"
SHARDS="$WORK/shards-$VOCAB-$SEQ"
if [ -f "$SHARDS/manifest.json" ] && [ -f "$SHARDS/valid/manifest.json" ]; then
  echo "reusing $SHARDS"
else
  "$PY" data_prep/prepare_data.py --input "$CORPUS" --tokenizer "$TOK" --output "$SHARDS" \
    --seq-length "$SEQ" --val-fraction 0.05 --workers 2 2>&1 | tail -n 1  # its summary line (on stderr)
fi

# ---------------------------------------------------------------------------------------------------
RUN="$WORK/run-$(date +%Y%m%d-%H%M%S)"
while [ -e "$RUN" ]; do RUN="$RUN-x"; done
mkdir -p "$RUN"
ln -sfn "$(basename "$RUN")" "$WORK/latest"
LOG="$RUN/pretrain.log"
TOTAL=$((ITERS + RESUME_ITERS))
# a free port for the rendezvous (several quickstarts or tests may run on one machine)
PORT=$("$PY" -c "from megatron_mdm.launch import free_port; print(free_port())")
SEED_FLAG=()
[ -n "${MDM_QUICKSTART_SEED:-}" ] && SEED_FLAG=(--seed "$MDM_QUICKSTART_SEED")
# mdm-pretrain (python -m megatron_mdm.cli.pretrain): checks the configuration, then starts the workers (torchrun's flags)
LAUNCH=("$PY" -m megatron_mdm.cli.pretrain --nproc-per-node "$NPROC" --master-port "$PORT"
        --config "$CONFIG" --tokenizer "$TOK" --data-path "$SHARDS" --seq-length "$SEQ"
        --micro-batch-size "$MBS" --global-batch-size "$GBS" "${LAYOUT[@]}" "${SEED_FLAG[@]}")

ARM_RUN="$RUN/arm-warmstart"
T0=$(date +%s)
START=()
if [ "$ARM_ITERS" -gt 0 ]; then
  step "4/8 autoregressive warm start: the same model as an ARM for $ARM_ITERS steps ($ARM_RUN)"
  run_logged "$RUN/arm-warmstart.log" "${LAUNCH[@]}" --objective arm --train-iters "$ARM_ITERS" \
    --lr-decay-iters "$ARM_ITERS" --save "$ARM_RUN"
  START=(--load "$ARM_RUN" --finetune)
  MDM_FROM="from the ARM's weights (--finetune)"
else
  step "4/8 no warm start (MDM_QUICKSTART_ARM_ITERS=0)"
  MDM_FROM="from scratch"
fi
TA=$(date +%s)

step "5/8 train the quickstart MDM $MDM_FROM for $ITERS steps (run dir $RUN)"
# --lr-decay-iters spans both MDM phases, so the resumed run continues the same cosine schedule.
run_logged "$LOG" "${LAUNCH[@]}" --save "$RUN" "${START[@]}" --train-iters "$ITERS" --lr-decay-iters "$TOTAL" \
  --save-interval "$ITERS"
T1=$(date +%s)
[ "$(cat "$RUN/latest_checkpointed_iteration.txt")" = "$ITERS" ] || die "no checkpoint at iteration $ITERS"

step "6/8 resume from the checkpoint at iteration $ITERS (--load) and train to $TOTAL"
run_logged "$LOG" "${LAUNCH[@]}" --save "$RUN" --load "$RUN" --train-iters "$TOTAL" --lr-decay-iters "$TOTAL"
T2=$(date +%s)
grep -q "iterations $ITERS -> $TOTAL" "$LOG" || die "the second run did not resume from iteration $ITERS"

# ---------------------------------------------------------------------------------------------------
step "7/8 summary"
"$PY" - "$RUN" "$VOCAB" "$((T1 - TA))" "$((T2 - T1))" "$ITERS" "$SHARDS" "$ARM_ITERS" "$((TA - T0))" <<'EOF'
import json, math, os, statistics, sys
from megatron_mdm.sweep.curves import read_metrics, unigram_entropy
run, vocab, t_first, t_resume, resume_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
unigram = unigram_entropy(sys.argv[6])
arm_iters, t_arm = int(sys.argv[7]), int(sys.argv[8])
if arm_iters > 0:
    _, arm_val = read_metrics(os.path.join(run, "arm-warmstart"))
    print(f"ARM warm start: {arm_iters} steps in {t_arm} s, validation loss (next token) "
          f"{arm_val[0]['val_loss']:.3f} -> {arm_val[-1]['val_loss']:.3f}; the MDM starts from its weights")
recs = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
val = [r for r in recs if "val_loss" in r]
train = [r for r in recs if "loss" in r]
tps = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
print(f"validation ELBO (nats/token, lower is better; uniform guess = ln {vocab} = {math.log(vocab):.2f}; "
      f"unigram level = {unigram:.3f}, the entropy of the validation tokens' unigram distribution:\n"
      f"  a model that ignores context cannot go below it)")
for r in val:
    mark = "   <- resumed here" if r["iteration"] == resume_at else ""
    print(f"  iter {r['iteration']:>5d}: {r['val_loss']:.3f}{mark}")
print(f"first -> last validation ELBO: {val[0]['val_loss']:.3f} (iter {val[0]['iteration']}) -> "
      f"{val[-1]['val_loss']:.3f} (iter {val[-1]['iteration']}), a drop of {val[0]['val_loss'] - val[-1]['val_loss']:.2f} nats/token")
below = unigram - val[-1]["val_loss"]
print(f"last validation ELBO vs unigram level: {val[-1]['val_loss']:.3f} vs {unigram:.3f}: "
      + (f"{below:.2f} nats/token below it: the model uses context" if below > 0.05 else
         "at the unigram level (within 0.05): not yet clearly using context (train longer)" if below > -0.05 else
         f"{-below:.2f} nats/token above it: not yet learning from context (train longer)"))
print(f"training loss: {train[0]['loss']:.3f} (iter {train[0]['iteration']}) -> {train[-1]['loss']:.3f} (iter {train[-1]['iteration']})")
print(f"throughput: median {statistics.median(tps):,.0f} tokens/s over {len(tps)} log intervals")
print(f"wall time: {t_first} s for MDM iterations 0-{resume_at}, {t_resume} s for the resumed run (incl. start-up)")
EOF
LATEST=$(cat "$RUN/latest_checkpointed_iteration.txt")
echo "checkpoint: $RUN/iter_$(printf %07d "$LATEST") (latest marker: $RUN/latest_checkpointed_iteration.txt)"
echo "metrics:    $RUN/metrics.jsonl   config: $RUN/config.yaml   log: $LOG"
echo "tensorboard: tensorboard --logdir $RUN/tensorboard"
if [ "$ARM_ITERS" -gt 0 ]; then TITLE="quickstart: the MDM after a $ARM_ITERS-step ARM warm start"; else TITLE="quickstart MDM"; fi
if "$PY" -m megatron_mdm.cli.plot "$RUN" --unigram "$SHARDS" --title "$TITLE" >/dev/null 2>"$RUN/plot.log"; then
  echo "curves:     $RUN/curves.png (training loss, validation ELBO vs the unigram level, lr, tokens/s; the ARM"
  echo "            warm start drawn before the MDM, the resume marked: mdm-plot)"
else
  echo "curves:     not drawn ($(tail -n 1 "$RUN/plot.log"))"
fi

# ---------------------------------------------------------------------------------------------------
HF="$RUN/hf"
step "8/8 export to Hugging Face and generate (best effort)"
echo "next steps:"
echo "  mdm-convert to-hf --load $RUN --output $HF"
echo "  mdm-generate --model $HF --prompt 'ROMEO:' --gen-length 64 --steps 64"
echo "  bigger runs: examples/configs/*.yaml, examples/slurm/, examples/mpirun/ (see examples/README.md)"
if [ "${MDM_QUICKSTART_SKIP_HF:-0}" = 1 ]; then
  echo "(skipped: MDM_QUICKSTART_SKIP_HF=1)"
elif [ -f megatron_mdm/cli/convert.py ] && [ -f megatron_mdm/cli/generate.py ]; then
  if "$PY" -m megatron_mdm.cli.convert to-hf --load "$RUN" --output "$HF" >"$RUN/convert.log" 2>&1; then
    echo "exported: $HF"
    if "$PY" -m megatron_mdm.cli.generate --model "$HF" --prompt "ROMEO:" --prompt "First Citizen:" \
        --gen-length 48 --steps 48 >"$RUN/generate.log" 2>&1; then
      echo "samples (a 4-layer model after a few minutes: expect Shakespeare-shaped fragments, not sense):"
      sed 's/^/  /' "$RUN/generate.log"
    else
      echo "WARNING: mdm-generate failed (see $RUN/generate.log); the trained checkpoint is unaffected"
    fi
  else
    echo "WARNING: mdm-convert failed (see $RUN/convert.log); the trained checkpoint is unaffected"
  fi
else
  echo "(mdm-convert / mdm-generate are not in this checkout yet: skipped)"
fi

printf '\nquickstart finished in %d s. Run directory: %s\n' "$(( $(date +%s) - T_START ))" "$RUN"
