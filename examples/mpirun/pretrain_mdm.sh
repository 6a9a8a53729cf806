#!/usr/bin/env bash
# MDM pretraining launched with mpirun (OpenMPI or MPICH/Hydra), one rank per GPU (or per CPU process).
#
#   # one node, 8 GPUs
#   DATA=/data/shards TOK=/data/tok bash examples/mpirun/pretrain_mdm.sh
#   # two nodes, 8 GPUs each (hosts must reach each other on MASTER_PORT)
#   NP=16 HOSTS=node1:8,node2:8 DATA=... TOK=... bash examples/mpirun/pretrain_mdm.sh --lr 2e-4
#   # a CPU check on one machine (gloo): the quickstart's data and the quickstart config
#   NP=2 CONFIG=examples/configs/quickstart.yaml DATA=outputs/quickstart/shards \
#       TOK=outputs/quickstart/tokenizer SAVE=outputs/mpirun-run bash examples/mpirun/pretrain_mdm.sh \
#       --tensor-model-parallel-size 2 --train-iters 20
#
# The runtime (megatron_mdm/runtime.py) reads OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK} (OpenMPI) or
# PMI_RANK/PMI_SIZE/MPI_LOCALRANKID (MPICH, Intel MPI) and gets the master address from rank 0 through
# mpi4py (pip install -e .[mpi]); without mpi4py set MASTER_ADDR (127.0.0.1 on one node).
# Extra arguments go to pretrain/pretrain_mdm.py.
set -euo pipefail

cd "$(dirname "$0")/../.."
NP="${NP:-8}"
HOSTS="${HOSTS:-}"
CONFIG="${CONFIG:-examples/configs/smdm_1.1b.yaml}"
DATA="${DATA:?set DATA to a shard directory written by data_prep/prepare_data.py (or mdm-data prepare)}"
TOK="${TOK:?set TOK to the tokenizer directory}"
SAVE="${SAVE:-runs/mpirun-$(date +%Y%m%d-%H%M%S)}"
PYTHON="${PYTHON:-$(command -v python)}"
export MASTER_PORT="${MASTER_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

LOAD=()
if [ -f "$SAVE/latest_checkpointed_iteration.txt" ]; then
  LOAD=(--load "$SAVE")
fi

MPI_ARGS=(-np "$NP")
if mpirun --version 2>&1 | grep -qi "open mpi"; then
  # OpenMPI: export the environment, no core binding (the data loader and gloo need the cores),
  # allow root inside containers.
  MPI_ARGS+=(--bind-to none --map-by slot -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH -x MASTER_PORT
             -x OMP_NUM_THREADS)
  [ -n "${MASTER_ADDR:-}" ] && MPI_ARGS+=(-x MASTER_ADDR)
  [ "$(id -u)" = 0 ] && MPI_ARGS+=(--allow-run-as-root)
  [ "$NP" -gt "$(nproc)" ] && [ -z "$HOSTS" ] && MPI_ARGS+=(--oversubscribe)
  [ -n "$HOSTS" ] && MPI_ARGS+=(--host "$HOSTS")
else
  # MPICH / Hydra: -envall forwards the environment; hosts as a comma-separated list.
  MPI_ARGS+=(-envall)
  [ -n "$HOSTS" ] && MPI_ARGS+=(-hosts "$HOSTS")
fi

echo "mpirun: $NP ranks, config $CONFIG, save $SAVE"
exec mpirun "${MPI_ARGS[@]}" "$PYTHON" pretrain/pretrain_mdm.py \
  --config "$CONFIG" --tokenizer "$TOK" --data-path "$DATA" --save "$SAVE" "${LOAD[@]}" "$@"
