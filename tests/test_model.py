"""The model on Megatron-core: attention direction, SDPA core attention, vocab-parallel loss."""

import pytest
from dist import run_distributed
from jobs import model_checks_job, sdpa_vs_megatron_job

pytestmark = pytest.mark.dist


def test_sdpa_attention_matches_megatron_dot_product_attention():
    errs = run_distributed(sdpa_vs_megatron_job, 1)[0]
    assert errs["no_mask"] < 1e-5 and errs["causal"] < 1e-5, errs


@pytest.mark.parametrize("tp", [1, 2])
def test_mdm_is_bidirectional_arm_is_causal_and_loss_is_exact(tp):
    for out in run_distributed(model_checks_job, tp, tp):
        # MDM: changing the last token changes position 0
        assert out["mdm_pos0_change_last"] > 1e-4
        assert out["mdm_last_change_first"] > 1e-4
        # ARM: position 0 never sees the future; the last position sees the past
        assert out["arm_pos0_change_last"] == 0.0
        assert out["arm_last_change_first"] > 1e-4
        # the per-token loss from Megatron's vocab-parallel cross-entropy equals float64 CE
        assert out["mdm_ce_err"] < 1e-4 and out["arm_ce_err"] < 1e-4, out
