"""A collective that fails because another rank stopped answering names that rank (megatron_mdm.heartbeat).

Two real gloo processes all-reduce in a loop with a 6 s timeout; the test SIGSTOPs or SIGKILLs one of them.
gloo's own error names no rank ("Timed out waiting 6000ms for recv operation to complete"); the survivor's
message must name the stopped one, or say that the store's host (rank 0) is the one that does not answer.
The whole trainer path (TrainingError, one line, exit 1, under srun) is tests/test_slurm.py's hung-node test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_mdm.launch import free_port

pytestmark = [pytest.mark.dist]

TIMEOUT_MIN = 0.1  # 6 s

SCRIPT = f"""
import datetime, os, time
import torch, torch.distributed as dist
from megatron_mdm import heartbeat
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", timeout=datetime.timedelta(minutes={TIMEOUT_MIN}))
heartbeat.start("127.0.0.1", int(os.environ["MASTER_PORT"]), rank, 2, {TIMEOUT_MIN})
t = torch.ones(1)
dist.all_reduce(t)
print("ready", flush=True)
try:
    while True:
        dist.all_reduce(t)
        time.sleep(0.05)
except RuntimeError as e:
    assert heartbeat.is_peer_failure(e), e
    print("FAILURE:", heartbeat.describe_peer_failure(e), flush=True)
"""


def _start(port: int) -> list[subprocess.Popen]:
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.parametrize("how,victim", [("stop", 1), ("stop", 0), ("kill", 1)])
def test_survivor_names_the_rank_that_stopped_answering(how, victim):
    procs = _start(free_port())
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stdout.read()[-2000:]
        os.kill(procs[victim].pid, signal.SIGSTOP if how == "stop" else signal.SIGKILL)
        t0 = time.monotonic()
        survivor = procs[1 - victim]
        out = survivor.communicate(timeout=120)[0]
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    line = next((x for x in out.splitlines() if x.startswith("FAILURE:")), None)
    assert line is not None, out[-3000:]
    me = f"rank {1 - victim}: "
    if how == "kill":  # gloo sees the closed connection at once; the dead rank's heartbeat stopped
        assert me + "a collective operation lost its connection to another rank" in line, line
        assert "rank 1 stopped answering" in line, line
        assert took < TIMEOUT_MIN * 60 + 30, took
    elif victim == 1:
        assert me + f"a collective operation timed out after --distributed-timeout-minutes {TIMEOUT_MIN}" in line
        assert "rank 1 stopped answering" in line, line
        assert TIMEOUT_MIN * 60 <= took < TIMEOUT_MIN * 60 + 30, took
    else:  # rank 0 hosts the store: it cannot be asked
        assert me + "a collective operation timed out" in line, line
        assert "does not answer either" in line and "rank 0 under srun and mpirun" in line, line
