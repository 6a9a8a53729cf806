"""The SFT whole-sequence switch: batches lose their loss mask, the loader state passes through."""

import torch

from megatron_mdm.config import ObjectiveConfig
from megatron_mdm.data_setup import WholeSequence
from megatron_mdm.objective import MDMObjective


class _FakeSFT:
    def __init__(self):
        self.pos = 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield {"tokens": torch.full((2, 6), self.pos), "loss_mask": torch.tensor([[0, 0, 1, 1, 1, 1]] * 2).float()}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def test_whole_sequence_trains_prompt_positions_too():
    inner = _FakeSFT()
    loader = WholeSequence(inner)
    it = iter(loader)
    batch = next(it)
    assert set(batch) == {"tokens"} and int(batch["tokens"][0, 0]) == 1
    assert loader.state_dict() == {"pos": 1}
    loader.load_state_dict({"pos": 5})
    assert int(next(iter(loader))["tokens"][0, 0]) == 6
    # without a loss mask, prompt positions (the first two) get masked and weighted like the rest
    obj = MDMObjective(ObjectiveConfig(random_length_prob=0.0), mask_id=99, pad_id=98)
    g = torch.Generator().manual_seed(0)
    prepared = obj.prepare(torch.randint(0, 50, (256, 6), generator=g), batch.get("loss_mask"), g)
    assert (prepared.weights[:, :2] > 0).any() and int(prepared.num_tokens) == 256 * 6
