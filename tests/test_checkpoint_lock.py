"""The lock of a run directory (``checkpoint.lock``): one job writes a ``--save`` directory at a time.

Hostile case (issue 21): a second job started on the directory of a running one trained to the end and the
first died in its next save. Holders here are real processes (a live one, one killed with ``kill -9``); the
records of other hosts and of reused pids are written by hand (no second host in CI). The end-to-end case (a
second ``pretrain`` refused while a torchrun job trains) is in ``tests/test_training_signals.py``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from dist import run_distributed

from megatron_mdm.checkpoint import lock
from megatron_mdm.checkpoint.layout import LOCK_FILE

HOLD = """
import sys, time
from megatron_mdm.checkpoint import lock
held = lock.acquire(sys.argv[1], job=sys.argv[2])
print("held", flush=True)
time.sleep(600)
"""


def _holder(root: Path, job: str) -> subprocess.Popen:
    """A process that takes the lock of ``root`` as ``job`` and keeps it."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root), job], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _record(root: Path, **fields) -> None:
    root.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "job": "slurm:1", "started": "2025-01-01T00:00:00+00:00",
            "ticks": None}
    (root / LOCK_FILE).write_text(json.dumps(dict(base, **fields)))


def test_live_holder_refuses_then_its_stale_lock_is_taken_over(tmp_path, caplog):
    run = tmp_path / "run"
    p = _holder(run, "slurm:77")
    try:
        record = lock.read_holder(run)
        assert (record.pid, record.job, record.host) == (p.pid, "slurm:77", socket.gethostname())
        with pytest.raises(lock.LockError) as e:
            lock.acquire(run, job="slurm:78")
        msg = str(e.value)
        assert msg.startswith(f"--save: {run} is in use by job slurm:77 (pid {p.pid} on host ") and "\n" not in msg
        assert msg.endswith("wait for it to end, or choose another --save"), msg
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (run / LOCK_FILE).exists()  # a killed job leaves its record
    with caplog.at_level(logging.WARNING):
        held = lock.acquire(run, job="slurm:78")
    assert f"took over the lock of job slurm:77 (pid {p.pid}" in caplog.text
    assert lock.read_holder(run).job == "slurm:78"
    held.release()
    assert not (run / LOCK_FILE).exists()  # a job that ends gives the directory back


def test_record_without_advisory_lock_live_process_is_refused(tmp_path):
    """A file system without advisory locks: the record alone refuses a live process of this host."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _record(tmp_path, pid=p.pid, ticks=lock._start_ticks(p.pid))
        with pytest.raises(lock.LockError, match=f"in use by job slurm:1 \\(pid {p.pid} on host"):
            lock.acquire(tmp_path, job="slurm:2")
    finally:
        p.kill()
        p.wait()


def test_reused_pid_is_not_the_holder(tmp_path):
    """The recorded pid now belongs to a process that started later than the holder: the lock is stale."""
    _record(tmp_path, pid=os.getppid(), ticks=(lock._start_ticks(os.getppid()) or 0) + 12345)
    lock.acquire(tmp_path, job="slurm:2").release()


def test_other_host_is_refused_with_how_to_clear_it_unless_same_job(tmp_path):
    _record(tmp_path, host="node-elsewhere", pid=4242, job="torchrun:abc")
    with pytest.raises(lock.LockError) as e:
        lock.acquire(tmp_path, "--output", job="torchrun:xyz")
    msg = str(e.value)
    assert msg.startswith(f"--output: {tmp_path} is locked by job torchrun:abc (pid 4242 on host node-elsewhere"), msg
    assert f"if that job is no longer running, delete {tmp_path / LOCK_FILE} and start again" in msg
    # a restart of the same job (torchrun elastic, a requeued job) takes over its own lock, on any host
    lock.acquire(tmp_path, job="torchrun:abc").release()


def test_job_id_follows_the_launcher():
    assert lock.job_id({"SLURM_JOB_ID": "81", "TORCHELASTIC_RUN_ID": "x"}) == "slurm:81"
    assert lock.job_id({"TORCHELASTIC_RUN_ID": "f00d"}) == "torchrun:f00d"
    # torchrun without --rdzv-id: its agent (the worker's parent) is the job, the same for every restart
    assert lock.job_id({"TORCHELASTIC_RUN_ID": "none"}, host="h") == f"torchrun:h:{os.getppid()}"
    assert lock.job_id({"PMIX_NAMESPACE": "prterun-h-1@1"}) == "mpi:prterun-h-1@1"
    assert lock.job_id({}, host="h") == f"process:h:{os.getpid()}"


def test_save_that_cannot_be_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "run"):
        assert "is not a directory" in lock.directory_problem(bad)
        with pytest.raises(lock.LockError, match="--save: .* is not a directory"):
            lock.acquire(bad)
    assert lock.directory_problem(tmp_path / "new" / "run") is None


def _collective_job(rank: int, world: int, free: str, taken: str) -> list[str]:
    import torch

    torch.distributed.init_process_group("gloo")
    out = []
    for root in (free, taken):
        try:
            held = lock.acquire_collective(root)
        except lock.LockError as e:
            out.append(f"refused: {e}")
            continue
        out.append(f"held on rank {rank}" if held is not None else "ok")
        if held is not None:
            held.release()
    return out


@pytest.mark.dist
def test_every_rank_agrees(tmp_path):
    """Only rank 0 takes the lock; every rank gets the same outcome."""
    p = _holder(tmp_path / "taken", "slurm:5")
    try:
        out = run_distributed(_collective_job, 2, str(tmp_path / "free"), str(tmp_path / "taken"))
    finally:
        p.kill()
        p.wait()
    assert [o[0] for o in out] == ["held on rank 0", "ok"]
    assert out[0][1] == out[1][1] and out[0][1].startswith(f"refused: --save: {tmp_path / 'taken'} is in use by "
                                                           "job slurm:5"), out
