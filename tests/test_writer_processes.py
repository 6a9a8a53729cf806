"""The checkpoint writer's helper process lives and dies with the trainer (megatron_mdm.checkpoint.writer_processes).

megatron-core's checkpoint writer keeps a multiprocessing Manager process from the first save on. Before the
fix it died of a scheduler's SIGUSR1/SIGTERM to the job step (which Slurm delivers to each node at its own
moment: a save begun by the signal on another node lost its Manager) and outlived a SIGKILLed trainer (an
orphan holding the task's output open: srun waited 60 s for it, and it stayed). Here a real process saves a
real checkpoint and lists its children; SIGUSR1 and SIGTERM to the Manager leave it running, and after the
trainer is killed every child must be gone within a few seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mdm.launch import free_port

pytestmark = [pytest.mark.dist]

SCRIPT = """
import os, sys, time
sys.path.insert(0, {tests!r})
from ckpt_jobs import tiny_run_job
tiny_run_job(0, 1, {root!r}, None, [1])
children = [p for p in os.listdir("/proc") if p.isdigit()
            and open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
print("children", " ".join(children), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_checkpoint_helper_survives_stop_signals_and_ends_with_a_killed_trainer(tmp_path):
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    script = SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path / "run"))
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    children: list[int] = []
    try:
        for line in p.stdout:
            if line.startswith("children"):
                children = [int(x) for x in line.split()[1:]]
                break
        assert (tmp_path / "run" / "iter_0000001" / "metadata.json").is_file(), "no checkpoint was saved"
        helpers = [c for c in children if b"multiprocessing" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert helpers, f"the save started no helper process (children {children}): nothing to check"
        manager = next(c for c in helpers if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes())
        os.kill(manager, signal.SIGUSR1)  # what a scheduler sends to every process of the job step
        os.kill(manager, signal.SIGTERM)
        time.sleep(1)
        assert _alive(manager), "the checkpoint writer's Manager died of a stop signal"
        p.kill()
        p.wait()
        deadline = time.time() + 20
        while any(_alive(c) for c in children) and time.time() < deadline:
            time.sleep(0.2)
        left = [c for c in children if _alive(c)]
        assert not left, f"still running after the trainer was killed: {left}"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for c in children:  # our own test's leftovers, by pid
            if _alive(c):
                os.kill(c, signal.SIGKILL)
