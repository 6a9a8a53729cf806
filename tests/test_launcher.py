"""mdm-pretrain as the launcher: torchrun flags split from the training flags, the configuration checked before
any worker starts, and a worker's user error reaching the user as one line (no torchrun traceback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm.launch import launcher_world_size, local_env, pretrain_command, split_launcher_args, under_launcher

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"
LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d r\d+\] ")


def test_split_keeps_each_side_in_order():
    argv = ["--nproc-per-node", "2", "--config", "c.yaml", "--standalone", "--data-path", "0.3", "a", "0.7", "b",
            "--master_port=1234", "--max-restarts", "1", "--bf16", "-r", "3", "--tensor-model-parallel-size", "2"]
    launcher, rest = split_launcher_args(argv)
    assert launcher == ["--nproc-per-node", "2", "--standalone", "--master_port=1234", "--max-restarts", "1",
                        "-r", "3"]
    assert rest == ["--config", "c.yaml", "--data-path", "0.3", "a", "0.7", "b", "--bf16",
                    "--tensor-model-parallel-size", "2"]
    assert split_launcher_args(["--train-iters", "2"]) == ([], ["--train-iters", "2"])


@pytest.mark.parametrize("launcher,world", [
    ([], 1), (["--nproc-per-node", "4"], 4), (["--nproc_per_node=2", "--nnodes", "3"], 6),
    (["--nproc-per-node", "gpu"], None), (["--nproc-per-node", "2", "--nnodes", "1:4"], None),
    (["--nproc-per-node", "2", "--nnodes", "2:2"], 4),
])
def test_world_size_of_the_launcher_flags(launcher, world):
    assert launcher_world_size(launcher) == world


def test_local_env_gives_each_job_its_own_rendezvous():
    """An inherited MASTER_PORT (another job's, or an in-process run's) is not reused: two jobs started with it
    collided (EADDRINUSE); launcher variables are dropped; ``extra`` wins."""
    busy = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "10856", "RANK": "3", "SLURM_PROCID": "3", "KEEP": "x"}
    a, b = local_env(busy), local_env(busy)
    assert a["MASTER_ADDR"] == "127.0.0.1" and "10856" not in (a["MASTER_PORT"], b["MASTER_PORT"])
    assert a["MASTER_PORT"] != b["MASTER_PORT"]  # random draws of a band of thousands: equal ~1 in 10^4
    assert "RANK" not in a and "SLURM_PROCID" not in a and a["KEEP"] == "x"
    assert local_env(busy, MASTER_PORT="4242")["MASTER_PORT"] == "4242"


def test_launcher_environments():
    assert under_launcher({}) is None
    assert under_launcher({"RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    assert under_launcher({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == "slurm"
    assert under_launcher({"OMPI_COMM_WORLD_RANK": "0"}) == "mpi" and under_launcher({"PMI_RANK": "3"}) == "mpi"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed besides the log (its lines, and the resolved config's); no traceback."""
    text = re.sub(r"(resolved config:\n)(.*\n)*?\n", r"\1", r.stderr)  # the one multi-line log record
    lines = [ln for ln in text.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    for text in (r.stdout, r.stderr):
        assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("launcher")
    py = sys.executable
    subprocess.run([py, str(REPO / "tokenizer/train_tokenizer.py"), "--input", str(CORPUS), "--vocab-size", "300",
                    "--max-docs", "300", "--output", str(d / "tok")], check=True, capture_output=True)
    subprocess.run([py, str(REPO / "data_prep/prepare_data.py"), "--input", str(CORPUS), "--tokenizer", str(d / "tok"),
                    "--output", str(d / "shards"), "--seq-length", "32"],
                   check=True, capture_output=True)
    return d


def _flags(data: Path, *more: str) -> list[str]:
    return ["--preset", "tiny", "--tokenizer", str(data / "tok"), "--data-path", str(data / "shards"),
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
            "--num-workers", "0", *more]


@pytest.mark.parametrize("more,starts_with", [
    (["--tensor-model-parallel-size", "4"], "mdm-pretrain: configuration error: --tensor-model-parallel-size:"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "3"], "mdm-pretrain: configuration error: "),
    (["--tokenizer", "/nonexistent/tok"], "mdm-pretrain: configuration error: --tokenizer: /nonexistent/tok"),
    (["--train-iter", "5"], "mdm-pretrain: error: unrecognized arguments: --train-iter 5"),
    (["--bf16", "yes"], "mdm-pretrain: error: unrecognized arguments: yes"),
])
def test_launcher_refuses_a_bad_configuration_before_any_worker(data, tmp_path, more, starts_with):
    """The launcher's own checks: the layout against --nproc-per-node, the files, the flags' spelling."""
    cmd = pretrain_command(_flags(data, "--save", str(tmp_path / "run"), *more), 2)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert _one_error_line(r).startswith(starts_with)
    assert "CPU development mode" not in r.stderr  # no worker started
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_workers_user_error_is_one_line(data, tmp_path):
    """An error found by the workers (here: --load names no checkpoint) is printed once for both ranks."""
    cmd = pretrain_command(_flags(data, "--load", str(tmp_path / "missing")), 2)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert "CPU development mode" in r.stderr  # the workers did start
    assert _one_error_line(r) == f"mdm-pretrain: CheckpointError: --load: {tmp_path / 'missing'} does not exist"


def test_launcher_flags_inside_torchrun_are_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "megatron_mdm.cli.pretrain", "--nproc-per-node", "2", "--train-iters",
                        "1"], env=_env(RANK="0", WORLD_SIZE="1"), capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert _one_error_line(r).startswith("mdm-pretrain: --nproc-per-node: this process is already a worker")
