"""The trainer's data position on the real loader: saved once (global) in the checkpoint's meta; a checkpoint
without the global state (saved before it existed) resumes at its consumed samples with a warning."""

import logging
import shutil

import pytest
import torch
from dist import run_distributed
from real_data import WORDS, SampleIdRecorder, prepare_word_dataset

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_word_dataset(tmp_path_factory.mktemp("resume"), 0, WORDS, 30, 200, 40)



def resume_job(rank: int, world: int, data: str, overrides: dict) -> dict:
    from jobs import tiny_cfg

    from megatron_mdm import runtime
    from megatron_mdm.training.data import build_data
    from megatron_mdm.training.loop import Trainer

    cfg = tiny_cfg(tokenizer=f"{data}/tok", data_path=[f"{data}/shards"], num_workers=1, **overrides)
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    tok, loader, _ = build_data(cfg)
    rec = SampleIdRecorder(loader)
    trainer = Trainer(cfg, tok.vocab_size, tok.mask_id, tok.pad_id, rec)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: warnings.append(r.getMessage())
    logging.getLogger("megatron_mdm").addHandler(handler)
    trainer.load()
    result = trainer.train()
    mb = trainer.num_microbatches
    return {"losses": result["losses"], "warnings": warnings,
            "steps": [sum(rec.ids[i * mb:(i + 1) * mb], []) for i in range(len(rec.ids) // mb)]}


def test_checkpoint_without_global_data_state_resumes_at_its_consumed_samples(data, tmp_path):
    """The data position lives once in the checkpoint's meta; a checkpoint saved before the global order has
    none and resumes at its consumed samples, with a warning. (Resumes on other DP/TP/PP/CP layouts:
    tests/test_resume_matrix.py.)"""
    run = tmp_path / "run"
    full = run_distributed(resume_job, 1, str(data), {"train_iters": 3, "save": str(run), "save_interval": 2})[0]
    meta = torch.load(run / "iter_0000002" / "common.pt", weights_only=False)["meta"]
    assert meta["data_state"]["consumed_samples"] == 16 and meta["data_state"]["shuffle"] == "global"
    steps = full["steps"]
    assert len(steps) == 3 and all(len(s) == 8 for s in steps) and len({x for s in steps for x in s}) == 24

    old = tmp_path / "old"  # as saved before the global order: no data_state in its meta
    shutil.copytree(run, old)
    common = torch.load(old / "iter_0000002" / "common.pt", weights_only=False)
    del common["meta"]["data_state"]
    torch.save(common, old / "iter_0000002" / "common.pt")
    (old / "iter_0000002" / "checksums.json").unlink()  # edited by hand: as if saved before checksums too
    again = run_distributed(resume_job, 1, str(data), {"train_iters": 3, "load": str(old), "ckpt_iteration": 2,
                                                       "allow_unverified_checkpoint": True})[0]
    assert any("no global data-loader state" in w for w in again["warnings"])
    assert again["steps"] == steps[2:3]  # its consumed samples are the position
    assert abs(again["losses"][0] - full["losses"][2]) <= 1e-5 * abs(full["losses"][2])
