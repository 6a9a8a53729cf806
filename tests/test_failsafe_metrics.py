"""metrics.jsonl and TensorBoard after a resume: each iteration once, the dropped records kept aside.

References: the records are compared with what each run returned (losses per step), and the
TensorBoard curves are read back with TensorBoard's own reader (which applies ``purge_step``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_mdm.training.metrics import DROPPED_NAME, MetricsWriter


def _records(path: Path, events: bool = False) -> list[dict]:
    """The records of a metrics file (the start events too with ``events``)."""
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return recs if events else [r for r in recs if "event" not in r]


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
    assert _tb_scalars(save / "tensorboard", "train/loss_mdm_elbo") == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 104.0),
                                                          (5, 105.0), (6, 106.0)]


def test_fresh_start_in_an_old_run_directory_drops_everything(tmp_path):
    save = tmp_path / "run"
    _write_run(save, range(0, 4), 10.0, start=0)
    _write_run(save, range(0, 3), 50.0, start=0)  # the same command again, nothing loaded
    assert [(r["iteration"], r["loss"]) for r in _records(save / "metrics.jsonl")] == [(0, 50.0), (1, 51.0),
                                                                                       (2, 52.0)]
    assert len(_records(save / DROPPED_NAME)) == 4
    assert _tb_scalars(save / "tensorboard", "train/loss_mdm_elbo") == [(0, 50.0), (1, 51.0), (2, 52.0)]


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
    tb = _tb_scalars(run / "tensorboard", "train/loss_mdm_elbo")
    assert [s for s, _ in tb] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in tb] == pytest.approx(first["losses"][:3] + resumed["losses"], rel=1e-6)  # float32


def test_records_have_time_and_the_start_event_and_tags_are_grouped(tmp_path):
    """metrics.jsonl: wall-clock time in every record, a start record naming what was loaded; TensorBoard: grouped
    tags with the objective's loss in the name, the same series against tokens, the config as text."""
    import time

    save = tmp_path / "run"
    t0 = time.time()
    w = MetricsWriter(str(save), None, enabled=True, objective="arm")
    w.start(0, tokens=0, info={"loaded_from": "runs/x", "finetune": True}, config_text="optim:\n  lr: 0.1\n")
    w.write({"iteration": 0, "val_loss": 5.0, "val_ppl": 148.4, "consumed_samples": 0, "tokens": 0})
    w.write({"iteration": 2, "loss": 4.0, "lr": 1e-3, "tokens_per_sec": 99.0, "mem_rss_gib": 0.5,
             "consumed_samples": 8, "tokens": 256, "eta_s": 3.0})
    w.close()
    recs = _records(save / "metrics.jsonl", events=True)
    assert recs[0] == {"event": "start", "iteration": 0, "objective": "arm", "tokens": 0, "loaded_from": "runs/x",
                       "finetune": True, "time": recs[0]["time"]}
    assert all(t0 - 1 <= r["time"] <= time.time() + 1 for r in recs)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(save / "tensorboard"))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {"val/loss_arm_next_token", "val/ppl_arm", "train/loss_arm_next_token",
                                         "train/lr", "perf/tokens_per_sec", "memory/mem_rss_gib"}
    assert [(e.step, e.value) for e in ea.Scalars("train/loss_arm_next_token")] == [(2, 4.0)]
    assert "config/text_summary" in ea.Tags()["tensors"]
    by_tokens = EventAccumulator(str(save / "tensorboard" / "by_tokens"))
    by_tokens.Reload()
    assert [(e.step, e.value) for e in by_tokens.Scalars("train_by_tokens/loss_arm_next_token")] == [(256, 4.0)]
    assert [(e.step, e.value) for e in by_tokens.Scalars("val_by_tokens/loss_arm_next_token")] == [(0, 5.0)]


def test_mdm_and_arm_losses_are_different_series():
    from megatron_mdm.training.metrics import series_name

    assert series_name("val_loss", "mdm") == "val/loss_mdm_elbo" and series_name("val_ppl", "mdm") == "val/ppl_bound_mdm"
    assert series_name("loss", "arm") == "train/loss_arm_next_token"
    assert series_name("tokens", "mdm") is None and series_name("time", "arm") is None


def test_wandb_offline_resume_logs_to_the_same_run(tmp_path, monkeypatch):
    """The real wandb package, offline: a start and a resume into the same run directory are one W&B run, and
    its rows are the records' series against the iteration."""
    pytest.importorskip("wandb")
    from wandb_records import history, run_info

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save = tmp_path / "run"
    args = {"project": "mdm-test", "name": "quick", "config": {"optim": {"lr": 0.1}}}
    for start, its in ((0, (1, 2)), (2, (3,))):
        w = MetricsWriter(str(save), None, enabled=True, objective="mdm", wandb=args)
        w.start(start, tokens=start * 64)
        for it in its:
            w.write({"iteration": it, "loss": 10.0 - it, "lr": 0.1, "consumed_samples": it, "tokens": it * 64})
        w.close()
    run_id = (save / "wandb" / "run_id.txt").read_text().strip()
    files = sorted((save / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    assert run_info(files[0]) == (run_id, "quick", "mdm-test")
    rows = [r for f in files for r in history(f)]
    assert [(r["iteration"], r["tokens"], r["train/loss_mdm_elbo"]) for r in rows] == [(1, 64, 9.0), (2, 128, 8.0),
                                                                                        (3, 192, 7.0)]
