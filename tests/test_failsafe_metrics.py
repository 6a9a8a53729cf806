"""metrics.jsonl and TensorBoard after a resume: each iteration once, the dropped records kept aside.

References: the records are compared with what each run returned (losses per step), and the
TensorBoard curves are read back with TensorBoard's own reader (which applies ``purge_step``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_mdm.training.metrics import DROPPED_NAME, MetricsWriter


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _tb_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


def _write_run(save: Path, iterations: range, value: float, start: int) -> None:
    w = MetricsWriter(str(save), None, enabled=True)
    w.start(start)
    for it in iterations:
        w.write({"iteration": it, "loss": value + it})
    w.close()


def test_resume_drops_redone_records_and_keeps_them_aside(tmp_path):
    save = tmp_path / "run"
    w = MetricsWriter(str(save), None, enabled=True)
    w.start(0)
    w.write({"iteration": 0, "val_loss": 9.0})  # the untrained baseline validation
    for it in range(1, 6):
        w.write({"iteration": it, "loss": 10.0 + it})
    w.close()
    with open(save / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')  # a line cut by kill -9
    _write_run(save, range(4, 7), 100.0, start=3)  # resumed from the checkpoint of iteration 3
    recs = _records(save / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3, 4, 5, 6]
    assert [r.get("loss") for r in recs] == [None, 11.0, 12.0, 13.0, 104.0, 105.0, 106.0]
    dropped = (save / DROPPED_NAME).read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in dropped[:2]] == [4, 5] and dropped[2] == '{"iteration": 6, "lo'
    assert not (save / "metrics.jsonl.tmp").exists()
    # TensorBoard: the resumed writer purges the steps after 3, so each step has one value
    assert _tb_scalars(save / "tensorboard", "loss") == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 104.0),
                                                          (5, 105.0), (6, 106.0)]


def test_fresh_start_in_an_old_run_directory_drops_everything(tmp_path):
    save = tmp_path / "run"
    _write_run(save, range(0, 4), 10.0, start=0)
    _write_run(save, range(0, 3), 50.0, start=0)  # the same command again, nothing loaded
    assert [(r["iteration"], r["loss"]) for r in _records(save / "metrics.jsonl")] == [(0, 50.0), (1, 51.0),
                                                                                       (2, 52.0)]
    assert len(_records(save / DROPPED_NAME)) == 4
    assert _tb_scalars(save / "tensorboard", "loss") == [(0, 50.0), (1, 51.0), (2, 52.0)]


def test_writer_on_other_ranks_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "run"), None, enabled=False)
    w.start(3)
    w.write({"iteration": 4, "loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_real_resume_has_each_iteration_once(tmp_path):
    """Train 6 steps saving at 3 and 6, resume from 3 into the same run directory: 1..6 once each."""
    from dist import run_distributed
    from jobs import train_job

    run = tmp_path / "run"
    first = run_distributed(train_job, 1, {"train_iters": 6, "save": str(run), "save_interval": 3})[0]
    resumed = run_distributed(train_job, 1, {"train_iters": 6, "load": str(run), "ckpt_iteration": 3,
                                             "save": str(run)})[0]
    recs = _records(run / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in recs] == first["losses"][:3] + resumed["losses"]
    assert [json.loads(x)["iteration"] for x in (run / DROPPED_NAME).read_text().splitlines()] == [4, 5, 6]
    tb = _tb_scalars(run / "tensorboard", "loss")
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb] == pytest.approx(first["losses"][:3] + resumed["losses"], rel=1e-6)  # float32
