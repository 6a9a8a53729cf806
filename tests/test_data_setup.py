"""The SFT whole-sequence switch: batches lose their loss mask, the loader state passes through."""

import pytest
import torch

from megatron_mdm.config import ObjectiveConfig
from megatron_mdm.objective import MDMObjective
from megatron_mdm.training.data import WholeSequence


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


# ---- data options: each bad value is a one-line error at start, naming the flag --------------------


def _cfg(**data):
    from megatron_mdm.config import Config, set_field

    cfg = Config()
    cfg.optim.train_iters = 1
    for k, v in data.items():
        set_field(cfg, k, v)
    return cfg


@pytest.mark.parametrize("flags, message", [
    ({"data_path": "nan dirA 1 dirB"}, "--data-path: blend weight 'nan' must be a finite number"),
    ({"data_path": "inf dirA 1 dirB"}, "--data-path: blend weight 'inf'"),
    ({"data_path": "0.5x dirA 0.5 dirB"}, "--data-path: '0.5x' is not a weight"),
    ({"data_path": "0.5x dirA"}, "--data-path: '0.5x' is not a weight"),
    ({"valid_data_path": "0.5 dirA 0.5"}, "--valid-data-path: a weight without a path"),
    ({"num_workers": "-1"}, "--num-workers: must be >= 0, got -1"),
    ({"shuffle_buffer": "256"}, "--shuffle-buffer: was removed"),
    ({"data_shuffle": "window"}, "--data-shuffle: 'window' is not one of"),
    ({"verify_data": "md5"}, "--verify-data: 'md5' is not one of"),
])
def test_bad_data_options_are_refused_at_start(flags, message):
    from megatron_mdm.config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        _cfg(**flags).validate()


def test_data_options_that_are_fine():
    cfg = _cfg(data_path="0.7 dirA 0.3 dirB", num_workers="0", valid_data_path="dirA dirB")
    cfg.validate()
    assert cfg.data.data_shuffle == "global" and cfg.data.verify_data == "sha256"
    assert not cfg.data.override_data_state


def test_pretrain_refuses_a_bad_blend_weight_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(repo / "pretrain" / "pretrain_mdm.py"), "--train-iters", "1",
                        "--data-path", "0.5x", "dirA", "0.5", "dirB"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pretrain_mdm.py: configuration error: --data-path: '0.5x'")
