"""Checkpoints: exact resume, resharded resume, SIGTERM save, and safety of an interrupted save."""

import json
from pathlib import Path

import pytest
from dist import run_distributed
from jobs import crash_during_save_job, tiny_cfg, train_job

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_resume_is_bit_exact(tmp_path):
    run = str(tmp_path / "run")
    full = run_distributed(train_job, 1, {"train_iters": 6, "save": run, "save_interval": 3})[0]
    assert (Path(run) / "iter_0000003" / "config.yaml").is_file()
    resumed = run_distributed(train_job, 1, {"train_iters": 6, "load": run, "ckpt_iteration": 3,
                                             "save": str(tmp_path / "run2")})[0]
    assert resumed["iteration"] == 6
    assert resumed["losses"] == full["losses"][3:]  # bit-exact on CPU
    assert resumed["grad_norms"] == full["grad_norms"][3:]


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2},
                                    {"pipeline_model_parallel_size": 2}])
def test_resharded_resume(tmp_path, layout):
    """Save at TP=2 (or PP=2), resume at TP=1/PP=1: the same losses as going on at TP=2/PP=2."""
    run = str(tmp_path / "run")
    full = run_distributed(train_job, 2, dict(layout, train_iters=6, save=run, save_interval=3))[0]
    resumed = run_distributed(train_job, 1, {"train_iters": 6, "load": run, "ckpt_iteration": 3})[0]
    assert resumed["iteration"] == 6
    for a, b in zip(resumed["losses"], full["losses"][3:]):
        assert abs(a - b) <= 2e-4 * abs(b), (resumed["losses"], full["losses"])


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run = str(tmp_path / "run")
    out = run_distributed(train_job, 2, {"train_iters": 8, "save": run}, "synthetic", 2)
    for r in out:
        assert r["stopped_by_signal"] and r["iteration"] == 2
    assert (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    # and the run goes on from there to the end
    rest = run_distributed(train_job, 1, {"train_iters": 4, "load": run, "save": run})[0]
    assert rest["iteration"] == 4 and len(rest["losses"]) == 2


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    first = run_distributed(train_job, 1, {"train_iters": 3, "save": run})[0]
    err = run_distributed(crash_during_save_job, 1, {"train_iters": 6, "load": run, "save": run})[0]
    assert "simulated node failure" in err
    assert (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    again = run_distributed(train_job, 1, {"train_iters": 6, "load": run, "save": run})[0]
    assert again["iteration"] == 6
    # the failed save left no partial directory; a later save of that iteration completes it
    assert (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert first["iteration"] == 3


def test_metrics_jsonl_records(tmp_path):
    run = str(tmp_path / "run")
    run_distributed(train_job, 1, {"train_iters": 3, "save": run})
    every = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    assert every[0]["event"] == "start" and every[0]["iteration"] == 0 and every[0]["objective"] == "mdm"
    lines = every[1:]
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    for r in lines:
        for key in ("consumed_samples", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "time"):
            assert key in r
    assert lines[-1]["consumed_samples"] == 3 * 8 and lines[-1]["tokens"] == 3 * 8 * tiny_cfg().data.seq_length
    assert [r["time"] for r in every] == sorted(r["time"] for r in every)


def test_async_save_resumes_exactly(tmp_path):
    run = str(tmp_path / "run")
    full = run_distributed(train_job, 1, {"train_iters": 4, "save": run, "save_interval": 2,
                                          "async_save": True, "keep_last": 1})[0]
    # keep-last-1: only the final checkpoint is left once the asynchronous saves are finalised
    assert sorted(p.name for p in Path(run).glob("iter_*")) == ["iter_0000004"]
    assert (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    run2 = str(tmp_path / "run2")
    run_distributed(train_job, 1, {"train_iters": 4, "save": run2, "save_interval": 2, "async_save": True})
    resumed = run_distributed(train_job, 1, {"train_iters": 4, "load": run2, "ckpt_iteration": 2})[0]
    assert resumed["losses"] == full["losses"][2:]
