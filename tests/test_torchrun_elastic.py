"""torchrun across nodes and elastic restarts (issue 22 item 2), with pretrain/pretrain_mdm.py unchanged.

- Two torchrun agents (``--nnodes 2``, one worker each, c10d rendezvous on 127.0.0.1: two "nodes" on one
  machine) train exactly like one agent with two workers: the same per-step losses and gradient norms.
- ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --max-restarts 1 ... --save D --load D``: the first start
  finds no checkpoint in D and starts from scratch; a kill -9 of the second agent's worker makes both agents restart their workers, which resume
  from D's last checkpoint by themselves and end with the uninterrupted run's losses (bit-exact, CPU), the
  steps redone after the restart included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import clean_env
from real_data import WORDS, prepare_word_dataset

from megatron_mdm.launch import free_port

REPO = Path(__file__).resolve().parents[1]
ITERS = 24
TIMEOUT = 420

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_word_dataset(tmp_path_factory.mktemp("torchrun-data"), 3, WORDS, 300, 300, 200, seq_length=64)


def _train_args(data: Path, run: Path) -> list[str]:
    return [str(REPO / "pretrain/pretrain_mdm.py"), "--config", str(REPO / "examples/configs/quickstart.yaml"),
            "--preset", "tiny", "--tokenizer", str(data / "tok"), "--data-path", str(data / "shards"),
            "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", str(ITERS),
            "--lr-warmup-iters", "2", "--log-interval", "1", "--save-interval", "8", "--eval-interval", "none",
            "--save", str(run)]


def _agents(n: int, nproc: int, args: list[str], logs: Path, *torchrun: str, **env: str) -> list[subprocess.Popen]:
    """``n`` torchrun agents with ``nproc`` workers each, meeting at one c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(n):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(n), "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "mdm-test", *torchrun, *args]
        log = open(logs / f"agent{i}.log", "w")
        procs.append(subprocess.Popen(cmd, env=clean_env(**env), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    return procs


def _finish(procs: list[subprocess.Popen], logs: Path) -> str:
    try:
        for p in procs:
            p.wait(TIMEOUT)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the agent we started and its workers
                p.wait()
    out = _logs(logs)
    assert all(p.returncode == 0 for p in procs), f"{[p.returncode for p in procs]}\n{out[-5000:]}"
    return out


def _logs(logs: Path) -> str:
    return "".join(f.read_text(errors="replace") for f in sorted(logs.glob("agent*.log")))


def _steps(run: Path, name: str = "metrics.jsonl") -> list[tuple]:
    path = run / name
    records = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One agent with two workers, uninterrupted."""
    d = tmp_path_factory.mktemp("one-agent")
    out = _finish(_agents(1, 2, _train_args(data, d / "run"), d), d)
    assert "world 2 (TP 1, PP 1, DP 2)" in out
    steps = _steps(d / "run")
    assert [s[0] for s in steps] == list(range(1, ITERS + 1))
    return steps


def test_two_agents_train_like_one_agent_with_two_workers(data, reference, tmp_path):
    out = _finish(_agents(2, 1, _train_args(data, tmp_path / "run"), tmp_path, "--max-restarts", "1"), tmp_path)
    assert "world 2 (TP 1, PP 1, DP 2)" in out
    assert _steps(tmp_path / "run") == reference
    # restarts allowed, torchrun's store shared with the workers: the one-line warning (pytorch#135712)
    assert out.count("start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1") == 1, out[-3000:]


def _worker_of(agent: subprocess.Popen) -> int | None:
    """The training worker the agent started (its child running pretrain_mdm.py)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == agent.pid and b"pretrain_mdm.py" in (proc / "cmdline").read_bytes():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_max_restarts_resumes_from_the_save_directory_after_a_worker_is_killed(data, reference, tmp_path):
    run = tmp_path / "run"
    args = _train_args(data, run) + ["--load", str(run)]  # the same command line for every (re)start
    # torch >= 2.5 shares the agent's TCPStore with the workers across restarts by default; a restarted
    # worker then read the killed attempt's gloo addresses and failed to connect (torch 2.13, pytorch#135712)
    procs = _agents(2, 1, args, tmp_path, "--max-restarts", "1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    try:
        deadline = time.time() + TIMEOUT
        while not any(s[0] >= 10 for s in _steps(run)):  # past the checkpoint of iteration 8
            assert time.time() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "agent0.log").read_text()[-3000:]
            time.sleep(0.2)
        victim = _worker_of(procs[1])
        assert victim is not None
        os.kill(victim, signal.SIGKILL)  # the worker on the second "node"
        t_kill = time.time()
        while _logs(tmp_path).count("training mdm: iterations") < 2 and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        print(f"\n[measured] kill -9 of a worker -> both agents' new workers training again: "
              f"{time.time() - t_kill:.1f} s")
    finally:
        out = _finish(procs, tmp_path)
    assert out.count("no checkpoint there yet (it is the --save directory): starting from scratch") == 1, out[-5000:]
    saved_before = [int(x.split("iterations ")[1].split(" ->")[0]) for x in out.splitlines()
                    if "training mdm: iterations" in x]
    assert saved_before[0] == 0 and saved_before[1] in (8, 16), saved_before  # the restart resumed
    resumed = saved_before[1]
    assert _steps(run) == reference
    redone = _steps(run, "metrics.dropped.jsonl")  # what the first workers did past the checkpoint
    assert redone and redone == reference[resumed:resumed + len(redone)]
