"""A scheduler's SIGTERM to the whole process group (trainer and its DataLoader workers) ends in a graceful
save: the workers ignore it, the trainer finishes the step, saves, and exits 0."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"

pytestmark = [pytest.mark.slow]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from megatron_mdm.data.prepare import prepare
    from megatron_mdm.data.readers import iter_documents
    from megatron_mdm.tokenization import train_bpe_tokenizer

    d = tmp_path_factory.mktemp("signals")
    docs = [doc[2] for _, doc in zip(range(1500), iter_documents(str(CORPUS)))]
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    train_bpe_tokenizer([str(d / "docs.jsonl")], 400, d / "tok")
    prepare([str(d / "docs.jsonl")], str(d / "tok"), str(d / "shards"), 64, shard_tokens=64 * 200)
    return d


def test_sigterm_to_the_process_group_saves_and_exits_0(data, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_",
                                                                      "OMPI_", "PMI"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=_port(), PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "pretrain/pretrain_mdm.py"), "--preset", "tiny", "--tokenizer",
           str(data / "tok"), "--data-path", str(data / "shards"), "--seq-length", "64", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "100000", "--log-interval", "1", "--num-workers", "2",
           "--save", str(run)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group, as a batch job's
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            if "iter       2 |" in line:
                started.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    try:
        assert started.wait(300), "".join(lines[-30:])
        time.sleep(0.5)
        os.killpg(p.pid, signal.SIGTERM)  # the trainer and both DataLoader workers
        rc = p.wait(300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    t.join(10)
    out = "".join(lines)
    assert rc == 0, out[-3000:]
    assert "stopped by signal (checkpoint saved)" in out and "killed by signal" not in out
    saved = int((run / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 2 and (run / f"iter_{saved:07d}" / "metadata.json").is_file()
