"""Ctrl-C, SIGHUP and SIGQUIT stop training as SIGTERM does (finish the step, save, exit 0); a second signal
aborts at once without saving; a second job on the ``--save`` of a running one is refused in one line.

Hostile cases of issue 21: SIGINT to ``torchrun`` (or to a worker) killed the worker with a KeyboardInterrupt
trace and nothing saved (the DataLoader worker died of the forwarded SIGINT too); a second job started on
the directory of a running one trained to the end while the first died in its next save.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from dist import run_distributed

from megatron_mdm.launch import local_env, pretrain_command

pytestmark = [pytest.mark.dist]


def stop_signals_job(rank: int, world: int, run: str, plan: list) -> list:
    """One run stopped by each ``(iteration, signal)`` of ``plan`` in turn (sent to itself), each start resuming
    the last; after each stop: (iteration reached, stopped by signal?, the marker)."""
    from jobs import MASK_ID, PAD_ID, VOCAB, make_trainer, tiny_cfg
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from synthetic import SyntheticLoader

    from megatron_mdm.training.loop import Trainer

    out = []
    for k, (stop_at, name) in enumerate(plan):
        cfg = tiny_cfg(train_iters=10, save=run, load=run if k else None)
        if k == 0:
            trainer = make_trainer(cfg)
        else:  # a new job in the same world
            destroy_num_microbatches_calculator()
            loader = SyntheticLoader(PAD_ID, cfg.data.seq_length, cfg.optim.micro_batch_size, 0, 1, num_samples=64,
                                     seed=5)
            trainer = Trainer(cfg, VOCAB, MASK_ID, PAD_ID, loader)
        trainer.load()
        original = trainer.train_step

        def step(stop_at=stop_at, name=name, original=original, trainer=trainer):
            result = original()
            if trainer.state.iteration == stop_at:
                os.kill(os.getpid(), getattr(signal, name))
            return result

        trainer.train_step = step
        result = trainer.train()
        out.append((result["iteration"], result.get("stopped_by_signal", False),
                    (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip()))
    return out


def test_sigint_sighup_sigquit_finish_the_step_and_save(tmp_path):
    plan = [(1, "SIGINT"), (2, "SIGHUP"), (3, "SIGQUIT"), (4, "SIGUSR1")]
    out = run_distributed(stop_signals_job, 1, str(tmp_path / "run"), plan)[0]
    assert out == [(1, True, "1"), (2, True, "2"), (3, True, "3"), (4, True, "4")]


def abort_job(rank: int, world: int, run: str) -> None:
    """Save at 2; at 3 a Ctrl-C; while that save runs, a second Ctrl-C (more than a second later)."""
    from jobs import make_trainer, tiny_cfg

    trainer = make_trainer(tiny_cfg(train_iters=10, save=run, save_interval=2))
    original_step, original_save = trainer.train_step, trainer.save

    def step():
        result = original_step()
        if trainer.state.iteration == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    def save():
        if trainer.state.iteration == 3:  # the save the first Ctrl-C asked for, made slow
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(60)
        original_save()

    trainer.train_step, trainer.save = step, save
    trainer.train()


def test_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    import tempfile

    import torch.multiprocessing as mp
    from dist import _worker, free_port

    run = tmp_path / "run"
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(1, free_port(), abort_job, (str(run),), out_dir), nprocs=1,
                                 join=False, start_method="spawn")
        with pytest.raises(mp.ProcessExitedException) as e:
            while not ctx.join(timeout=300):
                pass
    assert e.value.exit_code == 128 + signal.SIGINT, e.value
    assert time.time() - t0 < 50  # at once: not after the 60 s the save would still take
    assert _marker(run) == 2 and sorted(p.name for p in run.glob("iter_*")) == ["iter_0000002"]


# ---- real jobs: torchrun, a DataLoader worker, a second job ------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from real_data import WORDS, prepare_word_dataset

    return prepare_word_dataset(tmp_path_factory.mktemp("signals"), 0, WORDS, 40, 300, 64, seq_length=32)


def _args(data: Path, run: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--tokenizer", str(data / "tok"), "--data-path", str(data / "shards"),
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "100000",
            "--log-interval", "1", "--num-workers", "1", "--save", str(run), "--save-interval", "2", *extra]


class Job:
    """A training job under torchrun (one worker, one DataLoader worker), its output read as it comes."""

    def __init__(self, args: list[str]) -> None:
        self.p = subprocess.Popen(pretrain_command(args, nproc=1, torchrun=True), env=local_env(PYTHONUNBUFFERED="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def last_iteration(self) -> int:
        done = re.findall(r"iter +(\d+) \|", self.text)
        return int(done[-1]) if done else 0

    def wait_for_iteration(self, n: int, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while self.last_iteration() < n:
            assert self.p.poll() is None and time.time() < deadline, self.text[-3000:]
            time.sleep(0.2)

    def processes(self) -> list[psutil.Process]:
        """torchrun's descendants now: the worker, its DataLoader worker, the checkpoint writer's processes."""
        return psutil.Process(self.p.pid).children(recursive=True)

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.p.wait(timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.p.pid, signal.SIGKILL)
        self.reader.join(10)
        return rc


def _marker(run: Path) -> int:
    return int((run / "latest_checkpointed_iteration.txt").read_text())


def _gone(procs: list[psutil.Process], timeout: float = 20) -> list[psutil.Process]:
    """Those of ``procs`` still running after ``timeout`` seconds."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_ctrl_c_to_torchrun_saves_and_a_second_job_is_refused(data, tmp_path):
    run = tmp_path / "run"
    first = Job(_args(data, run))
    try:
        first.wait_for_iteration(3)  # saved at 2: the checkpoint writer's processes exist
        # a second job on the same --save: one line, exit 2, nothing written
        from megatron_mdm.checkpoint import lock

        holder, config = lock.read_holder(run), (run / "config.yaml").stat().st_mtime_ns
        second = subprocess.run(pretrain_command(_args(data, run)), env=local_env(), capture_output=True, text=True,
                                timeout=300)
        lines = [ln for ln in second.stderr.splitlines() if ln.strip() and not re.match(r"^\[\d\d:\d\d:\d\d r\d+\] ", ln)
                 and "warn" not in ln.lower()]
        assert second.returncode == 2, second.stderr[-3000:]
        assert lines[-1].startswith(f"mdm-pretrain: LockError: --save: {run} is in use by job torchrun:"), lines
        assert "Traceback" not in second.stderr
        assert lock.read_holder(run) == holder and (run / "config.yaml").stat().st_mtime_ns == config
        # Ctrl-C (torchrun forwards SIGINT to the worker's process group, DataLoader worker included)
        procs = first.processes()
        assert len(procs) >= 3, procs  # the worker, its DataLoader worker, the checkpoint writer's Manager
        os.kill(first.p.pid, signal.SIGINT)
        first.finish()
    finally:
        if first.p.poll() is None:
            os.killpg(first.p.pid, signal.SIGKILL)
    out = first.text
    stopped = re.search(r"done: iteration (\d+), .*stopped by signal \(checkpoint saved\)", out)
    assert stopped, out[-3000:]
    assert "received SIGINT: saving after this step" in out and "KeyboardInterrupt" not in out
    assert _marker(run) == int(stopped.group(1)) == first.last_iteration() >= 3  # nothing lost
    assert not (run / "save.lock").exists()

    assert not _gone(procs), "processes of the job outlived it"
