"""The training entry (python -m megatron_mdm.cli.pretrain) launched with only the environment srun gives its
tasks (no RANK/WORLD_SIZE), so ``runtime.detect_launch_env`` must find rank, size and master.

torchrun is covered by test_examples.py and test_torchrun_elastic.py, mpirun (OpenMPI's environment) by
test_mpirun_launcher.py through examples/mpirun/pretrain_mdm.sh, real Slurm jobs by test_slurm.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from cluster import clean_env

from megatron_mdm.launch import PRETRAIN_MODULE, free_port

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"

pytestmark = [pytest.mark.slow, pytest.mark.dist]


def _port() -> str:
    return str(free_port())


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


def test_slurm_environment_launch(data, tmp_path):
    """Two processes with what srun sets (SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST/JOB_ID), nothing else."""
    run = tmp_path / "run"
    job_id = str(int(_port()) % 10000 + 1)  # the runtime derives MASTER_PORT = 20000 + job id % 10000
    procs = []
    for rank in range(2):
        env = clean_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                         SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=job_id)
        procs.append(subprocess.Popen([sys.executable] + _args(data, run), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    _check_run(run, outs[0])
