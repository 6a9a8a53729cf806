"""A scheduler's SIGTERM to the whole process group (trainer, its DataLoader workers, the checkpoint writer's
processes) ends in a graceful save: the workers and writers ignore it, the trainer finishes the step, saves, and
exits 0 (the writer's Manager used to die of it and fail that save). A SIGTERM from the trainer
itself (the DataLoader's shutdown, and multiprocessing's at exit) still ends a worker."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_mdm.launch import free_port, pretrain_command

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "examples" / "data" / "tinyshakespeare.txt.zst"



def _port() -> str:
    return str(free_port())


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


def _worker_pids(it) -> list[int]:
    return [w.pid for w in it._items._workers]  # the DataLoader iterator's worker processes


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it has exited (it is our child)
    except ChildProcessError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="workers tell senders apart only on Linux")
def test_workers_ignore_a_foreign_sigterm_but_not_the_trainers(data):
    from megatron_mdm.data.loader import build_pretrain_loader

    it = iter(build_pretrain_loader([(1.0, str(data / "shards"))], 64, 4, 2, 0, 1, 2, 0, verify="none"))
    first = next(it)
    pids = _worker_pids(it)
    for pid in pids:  # from another process, as a scheduler's (or torchrun's) signal to the process group
        for sig in ("TERM", "USR1", "INT", "HUP", "QUIT"):
            subprocess.run(["kill", f"-{sig}", str(pid)], check=True)
    time.sleep(1)
    assert all(_alive(p) for p in pids)
    assert next(it)["tokens"].shape == first["tokens"].shape
    it._items._shutdown_workers()  # the trainer's own SIGTERM (terminate()): the next test
    deadline = time.time() + 30
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)


def test_exit_with_a_live_worker_loader_in_a_reference_cycle_does_not_hang(data, tmp_path):
    """The DataLoader's cleanup of a loader freed by the cycle collector loses its stop message and falls back
    to terminate(): workers that ignored every SIGTERM kept the interpreter waiting at exit forever."""
    script = tmp_path / "cycle.py"
    script.write_text(f"""
import gc
from megatron_mdm.data.loader import build_pretrain_loader

class Holder:
    pass

h = Holder()
h.it = iter(build_pretrain_loader([(1.0, {str(data / "shards")!r})], 64, 4, 2, 0, 1, 2, 0, verify="none"))
h.me = h
next(h.it)
del h
gc.collect()
print("done", flush=True)
""")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "done" in r.stdout, r.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_and_exits_0(data, tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_",
                                                                      "OMPI_", "PMI"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=_port(), PYTHONPATH=str(REPO))
    cmd = pretrain_command(["--preset", "tiny", "--tokenizer",
           str(data / "tok"), "--data-path", str(data / "shards"), "--seq-length", "64", "--micro-batch-size", "2",
           "--global-batch-size", "4", "--train-iters", "100000", "--log-interval", "1", "--num-workers", "2",
           "--save", str(run), "--save-interval", "2"])
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group, as a batch job's
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in p.stdout:
            lines.append(line)
            if "iter       3 |" in line:  # saved at 2: the checkpoint writer's processes are running too
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
    assert saved >= 3 and (run / f"iter_{saved:07d}" / "metadata.json").is_file()
