"""kill -9 at fixed points of a run (issue 15 item 5): every resume starts from the newest complete
checkpoint and continues exactly as the uninterrupted run (bitwise, CPU).

One chain of runs in one run directory (8 steps, a save every 2, keep-last 2), each killed at another
point: between steps; inside a synchronous save (all shards written, nothing committed); inside an
``--async-save`` save (the writer busy, not finalised); inside the directory swap of a re-save of the
marker's own iteration (a run redone from iteration 2); then a run to the end.
Random kill times: ``benchmarks/kill_trials.py``.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from ckpt_jobs import kill_job
from dist import _worker, free_port, run_distributed

pytestmark = [pytest.mark.dist, pytest.mark.slow]

BASE = {"train_iters": 8, "save_interval": 2, "keep_last": 2}


def run_killed(fn, *args, attempts: int = 3) -> None:
    """Run ``fn(0, 1, *args)`` in one process that must die of SIGKILL.

    A run that could not start because another process took its rendezvous port between
    ``free_port()`` and the bind (other test processes on the machine) is retried."""
    for _ in range(attempts):
        with tempfile.TemporaryDirectory() as out_dir:
            ctx = mp.start_processes(_worker, args=(1, free_port(), fn, args, out_dir), nprocs=1, join=False,
                                     start_method="spawn")
            try:
                while not ctx.join(timeout=600):
                    pass
            except mp.ProcessExitedException as e:
                assert e.signal_name == "SIGKILL", e
                return
            result = Path(out_dir, "0.pkl")
            text = result.read_bytes()[-2000:].decode(errors="replace") if result.exists() else ""
            if "EADDRINUSE" not in text:
                raise AssertionError(f"the run was not killed: {text}")
    raise AssertionError(f"the run could not start: {text}")


def _state(run: Path) -> tuple:
    """(marker, directory names without their nonce)."""
    marker = (run / "latest_checkpointed_iteration.txt").read_text().strip()
    return marker, sorted(re.sub(r"-[0-9a-f]+$", "", p.name) for p in run.glob("iter_*"))


def test_kill_points_resume_exactly(tmp_path):
    ref_log, log = tmp_path / "ref.jsonl", tmp_path / "chain.jsonl"
    run_distributed(kill_job, 1, dict(BASE, save=str(tmp_path / "ref")), None, str(ref_log))
    ref = {r["iteration"]: r for r in map(json.loads, ref_log.read_text().splitlines())}
    assert sorted(ref) == list(range(1, 9))

    run = tmp_path / "run"
    args = dict(BASE, save=str(run), load=str(run))
    run_killed(kill_job, dict(BASE, save=str(run)), {"after_step": 3}, str(log))
    assert _state(run) == ("2", ["iter_0000002"])
    run_killed(kill_job, args, {"save_written": 4}, str(log))
    assert _state(run) == ("2", ["iter_0000002", "iter_0000004.tmp"])
    run_killed(kill_job, dict(args, async_save=True), {"async_scheduled": 6}, str(log))
    assert _state(run) == ("4", ["iter_0000002", "iter_0000004", "iter_0000006.tmp"])
    run_killed(kill_job, dict(args, ckpt_iteration=2), {"swap": 4}, str(log))
    assert _state(run) == ("4", ["iter_0000002", "iter_0000004.old", "iter_0000004.tmp"])
    last = run_distributed(kill_job, 1, args, None, str(log))[0]
    assert last["iteration"] == 8 and len(last["losses"]) == 4  # resumed at 4 (the set-aside copy)
    assert _state(run) == ("8", ["iter_0000006", "iter_0000008"])

    chain = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["iteration"] for r in chain] == [1, 2, 3, 3, 4, 3, 4, 5, 6, 3, 4, 5, 6, 7, 8]
    for r in chain:
        want = ref[r["iteration"]]
        assert (r["loss"], r["grad_norm"]) == (want["loss"], want["grad_norm"]), (r, want)


def test_no_process_outlives_a_rank_killed_during_an_async_save(tmp_path):
    """Hostile case (issue 21): after kill -9 of a rank during ``--async-save``, the checkpoint writer's
    processes (megatron-core's multiprocessing Manager and its resource tracker, the forked writer) were still
    running 20 minutes later. Now each dies with the process that started it."""
    import psutil

    children = tmp_path / "children.json"
    run_killed(kill_job, dict(BASE, save=str(tmp_path / "run"), async_save=True), {"async_scheduled": 2},
               str(tmp_path / "log.jsonl"), str(children))
    procs = []
    for pid in json.loads(children.read_text()):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    assert json.loads(children.read_text()), "the job started no writer process: nothing was tested"
    _, alive = psutil.wait_procs(procs, timeout=20)
    alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, [p.cmdline()[:4] for p in alive]
