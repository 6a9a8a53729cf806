"""--mock-data's loader and --no-load-optim / --no-load-rng on a resume."""

from __future__ import annotations

import pytest
import torch

from megatron_mdm.data.mock import MockLoader


def _batches(loader: MockLoader, n: int) -> list[torch.Tensor]:
    it = iter(loader)
    return [next(it)["tokens"] for _ in range(n)]


def test_mock_data_is_a_function_of_seed_and_consumed_samples():
    """Two DP ranks read the halves of what one rank reads; a resume at a consumed-sample count continues the
    stream; the mask id never appears; another seed is other data."""
    one = MockLoader(50, 16, global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1, seed=3, mask_id=7)
    whole = torch.cat(_batches(one, 8))  # 2 global batches of 8
    for rank in range(2):
        part = MockLoader(50, 16, 8, 2, dp_rank=rank, dp_size=2, seed=3, mask_id=7)
        got = torch.cat(_batches(part, 4))  # rank r: samples 4r..4r+3 of each global batch
        want = torch.cat([whole[g * 8 + 4 * rank:g * 8 + 4 * rank + 4] for g in range(2)])
        assert torch.equal(got, want)
    resumed = MockLoader(50, 16, 8, 2, 0, 1, seed=3, mask_id=7)
    resumed.load_state_dict({"consumed_samples": 8})
    assert torch.equal(torch.cat(_batches(resumed, 4)), whole[8:16])
    assert not (whole == 7).any() and whole.min() >= 0 and whole.max() <= 49
    assert len(torch.unique(whole)) > 40  # spread over the vocabulary
    other = MockLoader(50, 16, 8, 2, 0, 1, seed=4, mask_id=7)
    assert not torch.equal(torch.cat(_batches(other, 4)), whole[:8])
    assert torch.equal(torch.cat(_batches(one, 4)), whole[:8])  # each iter starts at the loaded position


@pytest.mark.slow
@pytest.mark.dist
def test_no_load_optim_keeps_the_schedule_and_starts_a_fresh_optimizer(tmp_path):
    """Against the uninterrupted run: an exact resume repeats its losses; --no-load-optim keeps the learning
    rates of the schedule but not the losses (fresh Adam moments); --no-load-rng still resumes exactly here (the
    masks are drawn from (seed, iteration), and nothing else in this model draws from the global RNG)."""
    from dist import run_distributed
    from jobs import train_job

    run = str(tmp_path / "run")
    full = run_distributed(train_job, 1, {"train_iters": 4, "save": run, "save_interval": 2, "log_interval": 1})[0]
    exact = run_distributed(train_job, 1, {"train_iters": 4, "load": run, "ckpt_iteration": 2, "log_interval": 1})[0]
    fresh = run_distributed(train_job, 1, {"train_iters": 4, "load": run, "ckpt_iteration": 2, "log_interval": 1,
                                           "load_optim": False})[0]
    assert exact["losses"] == full["losses"][2:]
    assert fresh["losses"][0] == full["losses"][2]  # the same weights, data and masks at step 3
    assert fresh["losses"][1] != full["losses"][3]  # step 4 follows a step with fresh moments
    assert fresh["lrs"] == full["lrs"][2:]
    norng = run_distributed(train_job, 1, {"train_iters": 4, "load": run, "ckpt_iteration": 2, "log_interval": 1,
                                           "load_rng": False})[0]
    assert norng["losses"] == full["losses"][2:]
