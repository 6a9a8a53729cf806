"""examples/mpirun/pretrain_mdm.sh as its header says, from a fresh copy of the repository.

The header's CPU check runs the quickstart's outputs: the test writes them where ``examples/quickstart.sh`` does
(outputs/quickstart/tokenizer-512 and shards-512-64, made with the quickstart's commands on a part of its corpus)
and runs the header's command verbatim, with a few flags appended to shorten it. Port 29500 is held busy meanwhile
(the launcher used to fix it), no ``-x`` warning may appear for an unset variable, and the same command run
again resumes from SAVE.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cluster import clean_env, fresh_copy

pytestmark = [pytest.mark.slow, pytest.mark.dist]

SCRIPT = "examples/mpirun/pretrain_mdm.sh"
FAST = ["--micro-batch-size", "4", "--global-batch-size", "8", "--eval-interval", "none", "--log-interval", "1"]


def header_command(script: Path, marker: str = "a CPU check") -> tuple[dict, list[str]]:
    """The environment and arguments of the header's example after the comment line containing ``marker``."""
    lines = script.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line) + 1
    text = ""
    for line in lines[start:]:
        text += line.lstrip("#").strip().rstrip("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    words = shlex.split(text)
    env = dict(w.split("=", 1) for w in words[:words.index("bash")])
    return env, words[words.index("bash") + 2:]


@pytest.fixture(scope="module")
def copy(tmp_path_factory):
    repo = fresh_copy(tmp_path_factory.mktemp("clone"))
    qs, py = repo / "outputs" / "quickstart", sys.executable
    corpus = "examples/data/tinyshakespeare.txt.zst"
    # the quickstart's steps 2 and 3 (examples/quickstart.sh), on the first 800 documents
    subprocess.run([py, "tokenizer/train_tokenizer.py", "--input", corpus, "--vocab-size", "512", "--max-docs", "800",
                    "--output", str(qs / "tokenizer-512")], cwd=repo, check=True, capture_output=True)
    subprocess.run([py, "data_prep/prepare_data.py", "--input", corpus, "--tokenizer", str(qs / "tokenizer-512"),
                    "--output", str(qs / "shards-512-64"), "--seq-length", "64", "--val-fraction", "0.05",
                    "--workers", "1"], cwd=repo, check=True, capture_output=True)
    return repo


def test_header_cpu_check_runs_on_the_quickstart_outputs_and_resumes(copy):
    if not (shutil.which("mpirun") or (Path(sys.executable).parent / "mpirun").exists()):
        pytest.skip("mpirun is not installed (pip install '.[mpi]')")
    env, args = header_command(copy / SCRIPT)
    assert env["DATA"].startswith("outputs/quickstart/") and (copy / env["DATA"] / "manifest.json").is_file(), env
    assert (copy / env["TOK"] / "tokenizer.json").is_file(), env
    run_env = clean_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
    run_env.pop("PYTHONPATH", None)
    held = socket.socket()
    try:
        held.bind(("127.0.0.1", 29500))  # the port the launcher used to fix
    except OSError:
        pass  # taken already: just as good
    try:
        outs = []
        for iters in ("3", "4"):
            p = subprocess.run(["bash", SCRIPT, *args, *FAST, "--train-iters", iters], cwd=copy, env=run_env,
                               capture_output=True, text=True, timeout=600)
            out = p.stdout + p.stderr
            assert p.returncode == 0, out[-4000:]
            outs.append(out)
    finally:
        held.close()
    assert "world 2 (TP 2, PP 1, DP 1)" in outs[0], outs[0][-3000:]
    port = int(re.search(r"master port (\d+)", outs[0]).group(1))
    assert port != 29500
    for out in outs:
        assert "Could not find the environment variable" not in out, out[-3000:]
    assert "iterations 3 -> 4" in outs[1], outs[1][-3000:]  # the same command again resumed from SAVE
    assert (copy / env["SAVE"] / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
