#!/usr/bin/env bash
# MDM pretraining launched with mpirun (OpenMPI or MPICH/Hydra), one rank per GPU (or per CPU process).
#
#   # one node, 8 GPUs
#   DATA=/data/shards TOK=/data/tok bash examples/mpirun/pretrain_mdm.sh
#   # two nodes, 8 GPUs each (run it on node1, where rank 0 runs; the hosts must reach it on MASTER_PORT)
#   NP=16 HOSTS=node1:8,node2:8 DATA=... TOK=... bash examples/mpirun/pretrain_mdm.sh --lr 2e-4
#   # a CPU check on one machine (gloo) after `bash examples/quickstart.sh`: its tokenizer, shards and config
#   NP=2 CONFIG=examples/configs/quickstart.yaml DATA=outputs/quickstart/shards-512-64 \
#       TOK=outputs/quickstart/tokenizer-512 SAVE=outputs/mpirun-run bash examples/mpirun/pretrain_mdm.sh \
#       --tensor-model-parallel-size 2 --train-iters 20
#
# The runtime (megatron_mdm/runtime.py) reads OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} (OpenMPI) or
# PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH, Intel MPI) and gets the master address from rank 0 through
# mpi4py (pip install -e .[mpi]); without mpi4py set MASTER_ADDR (127.0.0.1 on one node). MASTER_PORT
# defaults to a port that is free on this machine (megatron_mdm/launch.py); set it when rank 0 runs on
# another host. Paths are relative to the repository root. Rerunning the same command resumes from SAVE.
# Extra arguments go to pretrain/pretrain_mdm.py.
set -euo pipefail

cd "$(dirname "$0")/../.."
NP="${NP:-8}"
HOSTS="${HOSTS:-}"
CONFIG="${CONFIG:-examples/configs/smdm_1.1b.yaml}"
DATA="${DATA:?set DATA to a shard directory written by data_prep/prepare_data.py (or mdm-data prepare)}"
TOK="${TOK:?set TOK to the tokenizer directory}"
SAVE="${SAVE:-runs/mpirun-$(date +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
if [ -z "${MASTER_PORT:-}" ]; then
  MASTER_PORT="$("$PYTHON" -c 'from megatron_mdm.launch import free_port; print(free_port())')"
fi
export MASTER_PORT
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

LOAD=()
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
  LOAD=(--load "$SAVE")
fi

MPI_ARGS=(-np "$NP")
if mpirun --version 2>&1 | grep -qi "open mpi"; then
  # OpenMPI: export the environment the ranks need (only variables that are set: -x of an unset one is a
  # warning per rank), no core binding (the data loader and gloo need the cores), root inside containers.
  MPI_ARGS+=(--bind-to none --map-by slot)
  for var in PATH LD_LIBRARY_PATH PYTHONPATH MASTER_ADDR MASTER_PORT OMP_NUM_THREADS VIRTUAL_ENV; do
    if [ -n "${!var:-}" ]; then MPI_ARGS+=(-x "$var"); fi
  done
  if [ "$(id -u)" = 0 ]; then MPI_ARGS+=(--allow-run-as-root); fi
  if [ "$NP" -gt "$(nproc)" ] && [ -z "$HOSTS" ]; then MPI_ARGS+=(--oversubscribe); fi
  if [ -n "$HOSTS" ]; then MPI_ARGS+=(--host "$HOSTS"); fi
else
  # MPICH / Hydra: -envall forwards the environment; hosts as a comma-separated list.
  MPI_ARGS+=(-envall)
  if [ -n "$HOSTS" ]; then MPI_ARGS+=(-hosts "$HOSTS"); fi
fi

echo "mpirun: $NP ranks, config $CONFIG, save $SAVE, master port $MASTER_PORT"
exec mpirun "${MPI_ARGS[@]}" "$PYTHON" pretrain/pretrain_mdm.py \
  --config "$CONFIG" --tokenizer "$TOK" --data-path "$DATA" --save "$SAVE" ${LOAD[@]+"${LOAD[@]}"} "$@"
