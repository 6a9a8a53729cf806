"""Process runtime: distributed init (torchrun, SLURM, MPI), Megatron parallel state, seeds, device.

Launchers set different environment variables; ``detect_launch_env`` maps each to (rank, world size,
local rank, master address/port):

* torchrun / torch.distributed.run: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``.
* SLURM (``srun``): ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``; the master is the first
  host of ``SLURM_JOB_NODELIST`` (expanded with ``scontrol`` when available) unless MASTER_ADDR is set.
* MPI (``mpirun``): OpenMPI ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}``, MPICH/Hydra ``PMI_{RANK,SIZE}``
  (``MPI_LOCALRANKID``); the master address is broadcast from rank 0 with mpi4py when present,
  else MASTER_ADDR must be set (single node: 127.0.0.1).

GPU processes use NCCL; without a GPU the CPU development mode (``cpu_fallback``) is switched on and
gloo is used. Only this module imports ``cpu_fallback``; other modules ask ``device()``.
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import socket
import subprocess
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megatron_mdm import heartbeat
from megatron_mdm.config import ParallelConfig, virtual_pipeline_size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # "node[01-04,07],other" -> "node01" without scontrol
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def detect_launch_env(env: Optional[dict] = None) -> LaunchEnv:
    """Read rank / world size / master from the launcher's environment variables."""
    env = dict(os.environ if env is None else env)
    port = int(env.get("MASTER_PORT", 29500))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env and "SLURM_JOB_ID" in env:
            port = 20000 + int(env["SLURM_JOB_ID"]) % 10000  # distinct per job on shared nodes
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    for rank_k, size_k, local_k in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
        ("PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ):
        if rank_k in env and size_k in env:
            rank, size = int(env[rank_k]), int(env[size_k])
            addr = env.get("MASTER_ADDR") or _mpi_master_addr(rank)
            return LaunchEnv(rank, size, int(env.get(local_k, 0)), addr, port, "mpi")
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def _mpi_master_addr(rank: int) -> str:
    try:
        from mpi4py import MPI  # noqa: PLC0415 - optional dependency
    except ImportError:
        return "127.0.0.1"
    host = socket.gethostbyname(socket.gethostname()) if rank == 0 else None
    return MPI.COMM_WORLD.bcast(host, root=0)


def has_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def hide_known_cpu_warnings() -> None:
    """Without a GPU, hide megatron-core's warnings that do not apply on CPU (``cpu_fallback.KNOWN_CPU_WARNINGS``).

    Call it before Megatron is imported: some are raised at import. ``init_distributed`` calls it too.
    """
    if not has_gpu():
        from megatron_mdm import cpu_fallback  # noqa: PLC0415 - the one place it is imported

        cpu_fallback.hide_known_warnings()


_DEVICE: Optional[torch.device] = None


def device() -> torch.device:
    """The device of this process's model and batches (set by ``init_distributed``)."""
    if _DEVICE is not None:
        return _DEVICE
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


def init_distributed(
    parallel: ParallelConfig, num_layers: Optional[int] = None, force_cpu: bool = False
) -> LaunchEnv:
    """Start torch.distributed and Megatron's parallel state.

    Args:
        parallel: TP/PP/VPP/CP sizes and the collective timeout.
        num_layers: model depth (needed to derive the virtual pipeline size).
        force_cpu: use the CPU development mode even when a GPU is present (tests).
    Returns:
        The launch environment (rank, world size, ...).
    """
    global _DEVICE
    launch = detect_launch_env()
    use_gpu = has_gpu() and not force_cpu
    if use_gpu:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        _DEVICE = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        from megatron_mdm import cpu_fallback  # noqa: PLC0415 - the one place it is imported

        cpu_fallback.enable()
        _DEVICE = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
        os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        if launch.world_size > 1 and os.environ["MASTER_PORT"] == "0":
            # torchrun --master-port 0 hands the workers port 0, not the port it picked: they would hang
            raise RuntimeError("MASTER_PORT is 0: give a real port (torchrun --master-port N, or "
                               "--rdzv-backend c10d --rdzv-endpoint HOST:PORT)")
        torch.distributed.init_process_group(
            backend=backend,
            init_method="env://",  # under torchrun this joins the agent's store (any --master-port)
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=parallel.distributed_timeout_minutes),
        )
    if (launch.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        log.warning("torchrun --max-restarts with its TCPStore shared with the workers: a restarted worker can read "
                    "the previous attempt's addresses from it and fail to connect (pytorch/pytorch#135712); start "
                    "torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (docs/CLUSTER.md)")
    init_parallel_state(parallel, num_layers)
    heartbeat.start(os.environ.get("MASTER_ADDR", launch.master_addr),
                    int(os.environ.get("MASTER_PORT", launch.master_port)), launch.rank, launch.world_size,
                    parallel.distributed_timeout_minutes)
    return launch


def init_parallel_state(parallel: ParallelConfig, num_layers: Optional[int] = None) -> None:
    """Megatron ``initialize_model_parallel`` with keyword arguments (0.16 and 0.19 differ by position)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    vpp = virtual_pipeline_size(parallel, num_layers) if num_layers is not None else None
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )


def set_seed(seed: int) -> None:
    """Seed Python, NumPy, torch and Megatron's model-parallel RNG tracker.

    Megatron offsets the tracker by TP rank (so TP shards of dropout differ) and the default seed
    by PP rank, as Megatron-LM's ``_set_random_seed`` does.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Destroy the parallel state and the process group; leave the CPU development mode."""
    from megatron.core import parallel_state as ps

    heartbeat.stop()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    from megatron_mdm import cpu_fallback  # noqa: PLC0415

    cpu_fallback.disable()
