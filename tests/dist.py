"""Run a test function in several gloo processes (Megatron's ``Utils.initialize_model_parallel`` role).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes; each sets the torchrun
environment variables, calls ``fn(rank, world_size, *args)`` and the list of return values (one per
rank, picklable) comes back. A failing rank's traceback is raised in the test process.

``fn`` must be importable (a module-level function of a test module). Parallel state is set up by
the function itself (``megatron_mdm.runtime.init_distributed``), so each test states its layout.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_mdm.launch import free_port  # noqa: F401 - re-exported for the tests


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - shipped back to the parent
        result = ("error", traceback.format_exc())
    finally:
        try:
            from megatron_mdm import runtime

            runtime.shutdown()
        except Exception:  # noqa: BLE001
            pass
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600,
                    attempts: int = 3) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return the results.

    A run whose rendezvous port was taken before rank 0 could bind it (``EADDRINUSE``, nothing has
    run yet) starts again on another port, up to ``attempts`` times."""
    for attempt in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.start_processes(
                _worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size,
                join=False, start_method="spawn",
            )
            while not ctx.join(timeout=timeout):
                pass
            outcomes = []
            for rank in range(world_size):
                path = os.path.join(out_dir, f"{rank}.pkl")
                if not os.path.exists(path):
                    raise RuntimeError(f"rank {rank} produced no result")
                with open(path, "rb") as f:
                    outcomes.append(pickle.load(f))
        errors = [(rank, value) for rank, (status, value) in enumerate(outcomes) if status == "error"]
        if errors and attempt + 1 < attempts and any("EADDRINUSE" in value for _, value in errors):
            continue
        if errors:
            rank, value = errors[0]
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        return [value for _, value in outcomes]
    raise AssertionError("unreachable")
