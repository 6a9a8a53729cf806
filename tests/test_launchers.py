"""The training entry (python -m megatron_mdm.cli.pretrain) launched the way clusters launch it: mpirun (OpenMPI env) and SLURM (srun env).

torchrun is covered by test_examples.py. Here two processes get only the launcher's own environment
variables (no RANK/WORLD_SIZE), so ``runtime.detect_launch_env`` must find rank, size and master.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm.launch import PRETRAIN_MODULE, free_port

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _port() -> str:
    return str(free_port())


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "PMI"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    py = sys.executable
    subprocess.run([py, str(REPO / "tokenizer/train_tokenizer.py"), "--input", str(CORPUS), "--vocab-size", "400",
                    "--max-docs", "800", "--output", str(d / "tok")], check=True, capture_output=True)
    subprocess.run([py, str(REPO / "data_prep/prepare_data.py"), "--input", str(CORPUS), "--tokenizer", str(d / "tok"),
                    "--output", str(d / "shards"), "--seq-length", "64"], check=True, capture_output=True)
    return d


def _args(data: Path, run: Path) -> list[str]:
    return ["-m", PRETRAIN_MODULE, "--preset", "tiny", "--tokenizer", str(data / "tok"),
            "--data-path", str(data / "shards"), "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "3", "--log-interval", "1",
            "--tensor-model-parallel-size", "2", "--save", str(run)]


def _check_run(run: Path, out: str) -> None:
    assert "world 2 (TP 2, PP 1, DP 1)" in out, out[-3000:]
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_mpirun_launch(data, tmp_path):
    mpirun = shutil.which("mpirun") or str(Path(sys.executable).parent / "mpirun")
    if not Path(mpirun).exists():
        pytest.skip("mpirun is not installed (pip install '.[mpi]')")
    run = tmp_path / "run"
    env = _clean_env(MASTER_PORT=_port())
    p = subprocess.run([mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "OMP_NUM_THREADS",
                        "-x", "MASTER_PORT", sys.executable] + _args(data, run),
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    _check_run(run, p.stdout + p.stderr)


def test_slurm_environment_launch(data, tmp_path):
    """Two processes with what srun sets (SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST/JOB_ID), nothing else."""
    run = tmp_path / "run"
    job_id = str(int(_port()) % 10000 + 1)  # the runtime derives MASTER_PORT = 20000 + job id % 10000
    procs = []
    for rank in range(2):
        env = _clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=job_id)
        procs.append(subprocess.Popen([sys.executable] + _args(data, run), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    _check_run(run, outs[0])
