"""What lets one command line serve a job's first start and all its restarts (issue 22 item 2):
``--load D --save D`` with no checkpoint in D yet starts from scratch; a ``--load`` elsewhere without a
checkpoint stays an error.

All runs share one process (one spawn instead of several): each builds its own Trainer, as a fresh process
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

    from megatron_mdm.checkpointing import CheckpointError

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


def test_load_equal_to_save(tmp_path):
    chain, fresh = tmp_path / "chain", tmp_path / "fresh"
    out = run_distributed(runs_job, 1, [
        {"train_iters": 8},                                                          # 0: the reference
        {"train_iters": 8, "save": str(chain), "load": str(chain)},                  # 1: from scratch
        {"train_iters": 8, "save": str(chain), "load": str(chain)},                  # 2: resumes at 8
        {"train_iters": 8, "save": str(fresh), "load": str(tmp_path / "elsewhere")},  # 3
        {"train_iters": 8, "save": str(fresh), "load": str(fresh), "ckpt_iteration": 5},  # 4
    ])[0]
    ref = out[0]
    alone = run_distributed(train_job, 1, {"train_iters": 8})[0]
    assert alone["losses"] == ref["losses"] and alone["grad_norms"] == ref["grad_norms"]
    assert [r["iteration"] for r in out[1:3]] == [8, 8]
    assert out[1]["losses"] == ref["losses"]  # from scratch: the reference's steps, bit-exact
    assert out[2]["losses"] == []  # the second start found the checkpoint and had nothing left to do
    assert _marker(chain) == "8"
    # a --load that is not --save must hold a checkpoint; an explicit --ckpt-iteration too
    assert "does not exist" in out[3]["error"] and str(tmp_path / "elsewhere") in out[3]["error"]
    assert "does not exist" in out[4]["error"] and str(fresh) in out[4]["error"]
