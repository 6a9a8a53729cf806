"""Saves never lose the checkpoint the marker names; failed saves are one line; tokenizer changes refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckpt_jobs import failed_saves_job, tokenizer_job
from dist import run_distributed
from jobs import crash_during_save_job, train_job

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_rerun_of_finished_job_keeps_its_checkpoint(tmp_path):
    """Issue 10 item 1: a finished job resubmitted with --load used to delete iter_0000003 and write it
    again; killed in that window the run had no loadable checkpoint. Now it does not save at all: the
    save here would die half-written, and the checkpoint is untouched and loads."""
    run = str(tmp_path / "run")
    run_distributed(train_job, 1, {"train_iters": 3, "save": run})
    files = sorted(p.name for p in (Path(run) / "iter_0000003").iterdir())
    err = run_distributed(crash_during_save_job, 1, {"train_iters": 3, "load": run, "save": run})[0]
    assert err == "no error"  # nothing trained, nothing saved
    assert (Path(run) / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert sorted(p.name for p in (Path(run) / "iter_0000003").iterdir()) == files
    again = run_distributed(train_job, 1, {"train_iters": 4, "load": run})[0]
    assert again["iteration"] == 4 and len(again["losses"]) == 1


def test_failed_saves_leave_the_previous_checkpoint(tmp_path):
    from megatron_mdm import compat

    run = str(tmp_path / "run")
    out = run_distributed(failed_saves_job, 1, run)[0]
    good = {"dirs": ["iter_0000003"], "marker": "3"}
    assert out["initial"] == good
    # a re-save of the marker's own iteration that dies: the old checkpoint is untouched
    assert "iteration 3 could not be written" in out["resave_dies"], out["resave_dies"]
    assert "simulated node failure" in out["resave_dies"]
    assert out["resave_dies_after"] == good and out["resave_dies_same"]
    for name in ("disk_full_sync", "disk_full_async"):
        msg = out[name]
        assert "\n" not in msg and "checkpoint iteration 4 could not be written" in msg, msg
        if compat.minor_release(compat.mcore_version()) < (0, 17):
            assert "disk full (No space left on device)" in msg, msg
        else:  # megatron-core 0.19's shard writer keeps only the exception class (its log has the errno)
            assert "disk full" in msg or "OSError" in msg, msg
        assert msg.endswith("the previous checkpoint (iteration 3) stays in force"), msg
        assert out[name + "_after"] == good and out[name + "_same"]  # no partial directory left
    # then a normal save works and removes the leftover of a killed save (not the marker's checkpoint)
    assert out["final"] == {"dirs": ["iter_0000003", "iter_0000004"], "marker": "4"}


def _word_tokenizer(out: Path, reverse: bool) -> None:
    """A word-level tokenizer with a mask token; ``reverse`` gives the same words other ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|mask|>", "<|pad|>", "<|eos|>", "<|unk|>"]
    words = [f"w{i}" for i in range(96)]
    vocab = {t: i for i, t in enumerate(specials + (words[::-1] if reverse else words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", unk_token="<|unk|>",
                            mask_token="<|mask|>").save_pretrained(str(out))


def test_other_tokenizer_is_refused_unless_finetune_allows_it(tmp_path):
    from megatron_mdm.tokenization import MDMTokenizer

    a, b = tmp_path / "tok_a", tmp_path / "tok_b"
    _word_tokenizer(a, False)
    _word_tokenizer(b, True)
    ha, hb = MDMTokenizer.load(a).hash, MDMTokenizer.load(b).hash
    assert ha != hb and MDMTokenizer.load(a).vocab_size == MDMTokenizer.load(b).vocab_size
    out = run_distributed(tokenizer_job, 1, str(tmp_path / "run"), str(a), str(b))[0]
    for name in ("resume_b", "finetune_b"):
        msg = out[name]
        assert msg.startswith("CheckpointError: --tokenizer ") and "\n" not in msg, msg
        assert str(a) in msg and str(b) in msg and ha[:12] in msg and hb[:12] in msg, msg
    assert out["resume_b"].endswith("pass --finetune --allow-tokenizer-change to finetune with a new one")
    assert out["finetune_b"].endswith("pass --allow-tokenizer-change to finetune with a new one")
    assert out["finetune_b_allowed"] == "ok"
    assert out["resume_allow"].startswith("ConfigError: --allow-tokenizer-change: only applies with --finetune")
    assert out["resume_a"] == "ok"


def test_checkpoint_without_tokenizer_record_uses_its_tokenizer_copy(tmp_path):
    """Checkpoints saved before the hash was recorded: the hash of their ``tokenizer/`` copy."""
    import shutil

    from megatron_mdm.checkpoint.checkpointing import CheckpointError, check_tokenizer
    from megatron_mdm.tokenization import MDMTokenizer

    ck = tmp_path / "iter_0000002"
    _word_tokenizer(ck / "tokenizer", False)
    _word_tokenizer(tmp_path / "other", True)
    shutil.copytree(ck / "tokenizer", tmp_path / "same")
    same = (MDMTokenizer.load(tmp_path / "same").hash, str(tmp_path / "same"))
    other = (MDMTokenizer.load(tmp_path / "other").hash, str(tmp_path / "other"))
    check_tokenizer(ck, {}, same, finetune=False, allow_change=False)
    with pytest.raises(CheckpointError, match="is not the tokenizer checkpoint"):
        check_tokenizer(ck, {}, other, finetune=False, allow_change=False)


def test_resumes_that_cannot_work_name_the_flag(tmp_path):
    """Hostile cases (issue 21): a distributed-optimizer checkpoint resumed without --use-distributed-optimizer
    died with ``KeyError: 'pre_wd_mult'`` (the other way round: "is it a checkpoint of the same architecture?");
    --train-iters below the loaded iteration ran nothing and printed "last loss nan"."""
    from ckpt_jobs import resume_mistakes_job

    out = run_distributed(resume_mistakes_job, 1, str(tmp_path))[0]
    assert out["dist_with_flag"] == out["dist_finetuned_without_flag"] == "ok"
    for case, saved, fix in (("dist_without_flag", "with", "pass --use-distributed-optimizer to resume it"),
                             ("plain_with_flag", "without", "drop --use-distributed-optimizer to resume it")):
        msg = out[case]
        assert msg.startswith(f"CheckpointError: --use-distributed-optimizer: checkpoint {tmp_path}"), msg
        assert f"was saved {saved} the distributed optimizer" in msg and fix in msg and "--finetune" in msg, msg
    for case, flag in (("train_iters_below", "--train-iters"), ("train_tokens_below", "--train-tokens")):
        msg = out[case]
        assert msg.startswith(f"ConfigError: {flag}: this run ends at iteration 1, before the iteration of the "
                              "checkpoint it resumes (2, "), msg
        assert f"raise {flag} to continue it, or pass --finetune" in msg, msg
