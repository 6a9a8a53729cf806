"""Distributed-optimizer checkpoints (issue 15 item 1): exact resume on the same layout, and resharding.

Reference: the uninterrupted run of the same job. Same layout (DP=2): losses and grad norms bitwise.
TP1 -> TP2 -> TP1 (one chain: a TP2 run resumes the TP1 run's step-2 checkpoint and saves at 4, a
TP1 run resumes that): losses within 2e-4 relative of the uninterrupted TP1 run, as
``test_resharded_resume``. DP2 -> DP1: one process reading and masking what the two DP ranks did
continues the DP=2 run (losses and grad norms within 2e-4: float32 sums in another order).
"""

from __future__ import annotations

import pytest
from ckpt_jobs import dp2_as_one_resume_job
from dist import run_distributed
from jobs import train_job

pytestmark = [pytest.mark.dist, pytest.mark.slow]

DO = {"use_distributed_optimizer": True}


def test_same_layout_resume_is_bit_exact_and_dp_may_shrink(tmp_path):
    run = str(tmp_path / "run")
    full = run_distributed(train_job, 2, dict(DO, train_iters=4, save=run, save_interval=2))[0]
    resumed = run_distributed(train_job, 2, dict(DO, train_iters=4, load=run, ckpt_iteration=2))
    for r in resumed:  # every rank reports the global loss and norm
        assert r["losses"] == full["losses"][2:]
        assert r["grad_norms"] == full["grad_norms"][2:]
    dp1 = run_distributed(dp2_as_one_resume_job, 1, dict(DO, train_iters=4, load=run, ckpt_iteration=2))[0]
    assert dp1["iteration"] == 4
    _close(dp1["losses"], full["losses"][2:])
    _close(dp1["grad_norms"], full["grad_norms"][2:])


def _close(got, want, rtol=2e-4):
    assert len(got) == len(want), (got, want)
    for x, y in zip(got, want):
        assert abs(x - y) <= rtol * abs(y), (got, want)


def test_tensor_parallel_reshard_both_ways(tmp_path):
    a, b = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    full = run_distributed(train_job, 1, dict(DO, train_iters=6, save=a, save_interval=2, keep_last=0))[0]
    up = run_distributed(train_job, 2, dict(DO, tensor_model_parallel_size=2, train_iters=4, lr_decay_iters=6,
                                            load=a, ckpt_iteration=2, save=b))[0]
    down = run_distributed(train_job, 1, dict(DO, train_iters=6, load=b, ckpt_iteration=4))[0]
    _close(up["losses"], full["losses"][2:4])
    _close(down["losses"], full["losses"][4:6])
