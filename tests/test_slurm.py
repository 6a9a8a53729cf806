"""examples/slurm/pretrain_mdm.sbatch, unchanged, on a real two-node Slurm cluster (tests/cluster.py).

Every job is submitted from a fresh copy of the repository (its tracked and untracked-but-not-ignored
files: no logs/, no outputs/) with the CPU overrides of the script's header, one task on each of n1 and n2
(world 2, data parallel). One uninterrupted job is the reference; the others are interrupted and resumed
and must end with its losses and gradient norms, bit for bit (CPU, same layout, as the resume tests).

- a time-limit signal: ``scancel --signal=USR1 --batch`` (what ``#SBATCH --signal=B:USR1@N`` does at N s
  before the limit) saves and exits 0; the resubmitted job resumes;
- a node lost: kill -9 of the task on n2 ends the whole job; the last checkpoint loads (checksums) and the
  resubmitted job resumes;
- a hung node: SIGSTOP of the task on n2 ends the job after --distributed-timeout-minutes, with an error
  naming rank 1.

Each test prints what it measured (``pytest -s``): signal -> checkpoint saved, kill -> job end,
stop -> job end (docs/CLUSTER.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster import SlurmCluster, clean_env, fresh_copy, missing_reason
from real_data import WORDS, prepare_word_dataset

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "examples/slurm/pretrain_mdm.sbatch"
CPU = ["--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node", "0", "--cpus-per-task", "1"]
ITERS = 24
TRAIN = ["--preset", "tiny", "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "16",
         "--train-iters", str(ITERS), "--lr-warmup-iters", "2", "--log-interval", "1", "--save-interval", "8",
         "--eval-interval", "none"]
JOB_TIMEOUT = 420  # a job of ~30 s on an idle 2-core machine; generous for a loaded one

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root: slurmd runs the jobs, apt-get may install slurm-wlm and "
                    "munge, and /etc/hosts may need n1 and n2")
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster().start()
    yield c
    c.stop()
    shutil.rmtree(c.root, ignore_errors=True)


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    d = fresh_copy(tmp_path_factory.mktemp("clone"))
    assert not (d / "logs").exists() and (d / SCRIPT).is_file()
    return d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_word_dataset(tmp_path_factory.mktemp("slurm-data"), 3, WORDS, 300, 300, 200, seq_length=64)


class Jobs:
    """Submits the script from the clone with one run directory each, and reads what the jobs wrote."""

    def __init__(self, cluster: SlurmCluster, clone: Path, data: Path, runs: Path):
        self.cluster, self.clone, self.data, self.runs = cluster, clone, data, runs

    def submit(self, name: str, *extra: str) -> int:
        env = clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(self.clone),
                        CONFIG="examples/configs/quickstart.yaml", DATA=str(self.data / "shards"),
                        TOK=str(self.data / "tok"), SAVE=str(self.runs / name))
        return self.cluster.sbatch(SCRIPT, CPU, TRAIN + list(extra), cwd=self.clone, env=env)

    def log(self, job_id: int) -> str:
        path = self.clone / f"mdm-pretrain-{job_id}.out"  # the script's --output=%x-%j.out
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def wait(self, job_id: int, state: str = "COMPLETED") -> dict:
        info = self.cluster.wait(job_id, JOB_TIMEOUT)
        assert info["JobState"] == state, f"job {job_id}: {info.get('JobState')} {info.get('ExitCode')}\n" \
                                          f"{self.log(job_id)[-4000:]}"
        return info

    def records(self, name: str, dropped: bool = False) -> list[dict]:
        path = self.runs / name / ("metrics.dropped.jsonl" if dropped else "metrics.jsonl")
        if not path.exists():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]

    def wait_for_step(self, job_id: int, name: str, step: int) -> None:
        deadline = time.time() + JOB_TIMEOUT
        while not any(r["iteration"] >= step for r in self.records(name)):
            state = self.cluster.job(job_id)["JobState"]
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"{state}: {self.log(job_id)[-3000:]}"
            assert time.time() < deadline, self.log(job_id)[-3000:]
            time.sleep(0.2)

    def marker(self, name: str) -> int:
        return int((self.runs / name / "latest_checkpointed_iteration.txt").read_text())


@pytest.fixture(scope="module")
def jobs(cluster, clone, data, tmp_path_factory):
    return Jobs(cluster, clone, data, tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def reference(jobs):
    """The uninterrupted job: its per-step losses and gradient norms."""
    job_id = jobs.submit("reference")
    info = jobs.wait(job_id)
    return job_id, info, [(r["iteration"], r["loss"], r["grad_norm"]) for r in jobs.records("reference")]


def steps(records: list[dict]) -> list[tuple]:
    return [(r["iteration"], r["loss"], r["grad_norm"]) for r in records]


def test_fresh_clone_trains_on_two_nodes_and_saves(jobs, reference):
    job_id, info, ref = reference
    assert info["ExitCode"] == "0:0" and info["NodeList"] == "n[1-2]", info
    log = jobs.log(job_id)
    assert "2 nodes x 1 tasks" in log and "world 2 (TP 1, PP 1, DP 2)" in log, log[-3000:]
    assert f"done: iteration {ITERS}" in log
    assert [s[0] for s in ref] == list(range(1, ITERS + 1))
    assert jobs.marker("reference") == ITERS
    assert (jobs.runs / "reference" / f"iter_{ITERS:07d}" / "metadata.json").is_file()


def test_time_limit_signal_saves_exits_0_and_resubmission_resumes_exactly(jobs, reference):
    ref = reference[2]
    job_id = jobs.submit("signal")
    jobs.wait_for_step(job_id, "signal", 3)
    t_signal = time.time()
    jobs.cluster.run("scancel", "--signal=USR1", "--batch", str(job_id))  # = --signal=B:USR1@N at N s left
    info = jobs.wait(job_id)
    log = jobs.log(job_id)
    assert info["ExitCode"] == "0:0" and "forwarding SIGUSR1 to the tasks" in log, log[-3000:]
    assert "stopped by signal (checkpoint saved)" in log, log[-3000:]
    saved = jobs.marker("signal")
    assert 3 <= saved < ITERS, f"the signal came too late to interrupt (iteration {saved})"
    took = (jobs.runs / "signal" / "latest_checkpointed_iteration.txt").stat().st_mtime - t_signal
    print(f"\n[measured] scancel --signal=USR1 --batch -> checkpoint of iteration {saved} saved: {took:.1f} s")

    again = jobs.submit("signal")  # the same command
    jobs.wait(again)
    assert f"iterations {saved} -> {ITERS}" in jobs.log(again), jobs.log(again)[-3000:]
    assert steps(jobs.records("signal")) == ref


def test_lost_node_ends_the_job_and_resubmission_resumes_exactly(jobs, reference):
    ref = reference[2]
    job_id = jobs.submit("lost")
    jobs.wait_for_step(job_id, "lost", 10)  # past the save at iteration 8
    pid = jobs.cluster.task_pid(job_id, rank=1)
    assert pid is not None, "no task of rank 1 found"
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)  # the task on n2
    info = jobs.wait(job_id, state="FAILED")
    took = time.time() - t_kill
    print(f"\n[measured] kill -9 of the task on n2 -> job {info['JobState']}: {took:.1f} s")
    assert took < 60, f"the job took {took:.0f} s to end after its task on n2 died"  # 16 s measured
    saved = jobs.marker("lost")
    assert saved in (8, 16), saved
    killed_run = steps(jobs.records("lost"))
    assert killed_run[-1][0] >= 10

    again = jobs.submit("lost")  # the same command (`scontrol requeue` works too, but Slurm holds a
    jobs.wait(again)              # requeued job for about two minutes first: docs/CLUSTER.md)
    log = jobs.log(again)
    assert f"iterations {saved} -> {ITERS}" in log, log[-3000:]  # the checkpoint loaded (checksums verified)
    assert steps(jobs.records("lost")) == ref
    # the steps the killed job did past the checkpoint were the reference's too
    assert steps(jobs.records("lost", dropped=True)) == ref[saved:killed_run[-1][0]]


def test_hung_node_ends_the_job_after_the_timeout_naming_the_rank(jobs):
    timeout_min = 0.25
    job_id = jobs.submit("hung", "--distributed-timeout-minutes", str(timeout_min))
    jobs.wait_for_step(job_id, "hung", 3)
    pid = jobs.cluster.task_pid(job_id, rank=1)
    assert pid is not None, "no task of rank 1 found"
    t_stop = time.time()
    os.kill(pid, signal.SIGSTOP)  # the task on n2 hangs
    try:
        info = jobs.wait(job_id, state="FAILED")
        took = time.time() - t_stop
    finally:
        if jobs.cluster.task_pid(job_id, rank=1) == pid:  # still the stopped task (Slurm ends it itself)
            os.kill(pid, signal.SIGKILL)
    log = jobs.log(job_id)
    print(f"\n[measured] SIGSTOP of the task on n2 -> job {info['JobState']}: {took:.1f} s "
          f"(--distributed-timeout-minutes {timeout_min})")
    assert timeout_min * 60 <= took < timeout_min * 60 + 90, took
    want = (f"rank 0: a collective operation timed out after --distributed-timeout-minutes {timeout_min}; "
            "rank 1 stopped answering")
    assert want in log, log[-3000:]
    assert "pretrain_mdm.py: TrainingError: " + want in log  # one line from the CLI, no traceback


def test_container_mounts_cover_repo_data_tokenizer_and_save(tmp_path):
    """With CONTAINER set, srun gets pyxis' options and the mounts cover what the job reads and writes (pyxis is
    not on the test cluster: a stand-in srun on PATH records the arguments the script gives it)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_SRUN_OUT"\n')
    (fake / "srun").chmod(0o755)
    data, tok, save = tmp_path / "data" / "shards", tmp_path / "tok", tmp_path / "ckpt" / "run"
    data.mkdir(parents=True)
    tok.mkdir()
    env = clean_env(PATH=f"{fake}:{os.environ['PATH']}", FAKE_SRUN_OUT=str(tmp_path / "args"), CONTAINER="mdm.sqsh",
                    DATA=str(data), TOK=str(tok), SAVE=str(save), SLURM_SUBMIT_DIR=str(REPO))
    p = subprocess.run(["bash", str(REPO / SCRIPT), "--train-iters", "1"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    args = (tmp_path / "args").read_text().splitlines()
    mounts = next(a for a in args if a.startswith("--container-mounts=")).split("=", 1)[1].split(",")
    for path in (REPO, data, tok, save):
        assert f"{path}:{path}" in mounts, (path, mounts)
    assert "--container-image=mdm.sqsh" in args and f"--container-workdir={REPO}" in args
    assert args[args.index("--save") + 1] == str(save) and args[-2:] == ["--train-iters", "1"]
