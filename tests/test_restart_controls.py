"""What lets one command line serve a job's first start and all its restarts, and the exits a scheduler
without signals needs (issue 22 items 2 and 3):

- ``--load D --save D`` with no checkpoint in D yet starts from scratch (a ``--load`` elsewhere without a
  checkpoint stays an error);
- ``--exit-interval N`` and ``--exit-duration-in-mins M`` save and return normally (exit 0 in the CLI);
  the same command resumed repeatedly reaches the end with the losses of an uninterrupted run (bit-exact on
  CPU, as ``test_checkpoint.test_resume_is_bit_exact``).

All runs share one process (one spawn instead of eight): each builds its own Trainer, as a fresh process
would. The reference is an uninterrupted run in the same process, checked against a run in its own process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist import run_distributed
from jobs import train_job

pytestmark = [pytest.mark.dist]


def runs_job(rank: int, world: int, runs: list) -> list:
    """``train_job`` for each overrides dict in turn; a CheckpointError is returned as {"error": message}."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    from megatron_mdm.checkpoint.checkpointing import CheckpointError

    out = []
    for overrides in runs:
        try:
            out.append(train_job(rank, world, overrides))
        except CheckpointError as e:
            out.append({"error": str(e)})
        finally:
            destroy_num_microbatches_calculator()
    return out


def _marker(run: Path) -> str:
    return (run / "latest_checkpointed_iteration.txt").read_text().strip()


def test_load_equal_to_save_and_exit_controls(tmp_path):
    chain, timed, fresh = tmp_path / "chain", tmp_path / "timed", tmp_path / "fresh"
    same = {"train_iters": 8, "save": str(chain), "load": str(chain), "exit_interval": 3}
    out = run_distributed(runs_job, 1, [
        {"train_iters": 8},                                    # 0: the uninterrupted reference
        same, same, same, same,                                # 1-4: one command line, run until done
        {"train_iters": 8, "save": str(timed), "load": str(timed), "exit_duration_in_mins": 1e-6},  # 5
        {"train_iters": 8, "save": str(fresh), "load": str(tmp_path / "elsewhere")},               # 6
        {"train_iters": 8, "save": str(fresh), "load": str(fresh), "ckpt_iteration": 5},            # 7
    ])[0]
    ref = out[0]
    alone = run_distributed(train_job, 1, {"train_iters": 8})[0]
    assert alone["losses"] == ref["losses"] and alone["grad_norms"] == ref["grad_norms"]

    # --load == --save, empty: from scratch; then each start resumes and exits at the next multiple of 3
    assert [r["iteration"] for r in out[1:5]] == [3, 6, 8, 8]
    assert [r["exit_reason"] for r in out[1:5]] == ["--exit-interval", "--exit-interval", None, None]
    assert not any(r["stopped_by_signal"] for r in out[1:5])
    assert out[1]["losses"] + out[2]["losses"] + out[3]["losses"] == ref["losses"]  # bit-exact
    assert out[1]["grad_norms"] + out[2]["grad_norms"] + out[3]["grad_norms"] == ref["grad_norms"]
    assert out[4]["losses"] == []  # a finished job started again trains nothing
    assert _marker(chain) == "8"

    # --exit-duration-in-mins: the time is up after the first step, which is saved
    assert (out[5]["iteration"], out[5]["exit_reason"]) == (1, "--exit-duration-in-mins")
    assert _marker(timed) == "1" and out[5]["losses"] == ref["losses"][:1]

    # a --load that is not --save must hold a checkpoint; an explicit --ckpt-iteration too
    assert "does not exist" in out[6]["error"] and str(tmp_path / "elsewhere") in out[6]["error"]
    assert "does not exist" in out[7]["error"] and str(fresh) in out[7]["error"]
