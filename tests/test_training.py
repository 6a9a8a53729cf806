"""The training loop: it learns a memorisable batch, and non-finite steps are skipped then stop it."""

import pytest
from dist import run_distributed
from jobs import nan_job, skipped_step_keeps_weights_job, train_job

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_optimizer_steps_reduce_loss_on_memorisable_batch(objective):
    r = run_distributed(train_job, 1, {"objective": objective, "train_iters": 60, "lr": 3e-3,
                                       "min_lr": 3e-3, "lr_decay_style": "constant",
                                       "global_batch_size": 4, "micro_batch_size": 4,
                                       "t_sampling": "antithetic"}, "memorise")[0]
    # one fixed batch of 4 random sequences: the loss falls far below the ~ln(100) of the start
    first = sum(r["losses"][:10]) / 10
    last = sum(r["losses"][-10:]) / 10
    assert last < 0.6 * first, r["losses"]


def test_nonfinite_steps_are_skipped_then_stop():
    ok = run_distributed(nan_job, 1, {"train_iters": 4, "max_consecutive_nan_steps": 2}, [2])[0]
    assert ok["skipped"] == 1 and len(ok["losses"]) == 4 and ok["changed"]
    bad = run_distributed(nan_job, 1, {"train_iters": 6, "max_consecutive_nan_steps": 2}, [2, 3, 4])[0]
    assert "TrainingError" in bad["error"] and "2 non-finite" in bad["error"]
    assert run_distributed(skipped_step_keeps_weights_job, 1)[0]
