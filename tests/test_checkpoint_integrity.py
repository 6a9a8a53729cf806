"""Damaged checkpoints: the training load (2 ranks sharing the checks) and ``mdm-convert to-hf`` each
stop with one line naming the damaged file and the previous complete iteration.

One module fixture saves a real megatron-mdm run directory (iterations 2 and 4 of a tiny model, with
a tokenizer) in a one-process world; each case damages a copy of it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from ckpt_jobs import load_errors_job, tiny_run_job
from dist import run_distributed
from test_checkpoint_files import make_legacy

pytestmark = [pytest.mark.dist]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _largest_shard(ck: Path) -> Path:
    return max(ck.glob("*.distcp"), key=lambda p: p.stat().st_size)


# name -> (damage of iter_0000004, file the message must name, words it must contain). "_old": a checkpoint
# of a version before checksums (make_legacy), which loads with the size and structure checks only.
CASES = {
    "flipped_distcp": (lambda ck: _flip(_largest_shard(ck)), "distcp", "checksum mismatch"),
    "truncated_distcp_old": (lambda ck: (make_legacy(ck), _truncate(_largest_shard(ck))), "distcp", "truncated"),
    "truncated_metadata_old": (lambda ck: (make_legacy(ck), _truncate(ck / ".metadata")), ".metadata",
                               "unreadable"),
    "truncated_common_old": (lambda ck: (make_legacy(ck), _truncate(ck / "common.pt")), "common.pt", "unreadable"),
    "truncated_common": (lambda ck: _truncate(ck / "common.pt"), "common.pt", "truncated"),
    "missing_distcp": (lambda ck: _largest_shard(ck).unlink(), "distcp", "missing"),
    # issue 21: each was blamed on another file, or read before it was checked
    "flipped_metadata_json": (lambda ck: _flip(ck / "metadata.json"), "metadata.json", "checksum mismatch"),
    "flipped_common": (lambda ck: _flip(ck / "common.pt"), "common.pt", "checksum mismatch"),
    "flipped_config": (lambda ck: _flip(ck / "config.yaml"), "config.yaml", "checksum mismatch"),
    # issue 21: a deleted manifest hid the flipped shard, and .metadata was unpickled unchecked
    "deleted_manifest": (lambda ck: ((ck / "checksums.json").unlink(), _flip(_largest_shard(ck))),
                         "checksums.json", "--allow-unverified-checkpoint"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from test_hf_convert import make_tokenizer

    base = tmp_path_factory.mktemp("integrity")
    make_tokenizer(base / "tok")
    good = base / "good"
    dirs = run_distributed(tiny_run_job, 1, str(good), str(base / "tok"), [2, 4])[0]
    assert dirs == ["iter_0000002", "iter_0000004"]
    out = {"good": good, "cases": []}
    for name, (damage, _, _) in CASES.items():
        if "common" in name and not (good / "iter_0000004" / "common.pt").exists():
            continue  # megatron-core >= 0.17 keeps the common state in the shards (no common.pt)
        out["cases"].append(name)
        shutil.copytree(good, base / name)
        damage(base / name / "iter_0000004")
        out[name] = base / name
    return out


def _check(msg: str, name: str, flag: str) -> None:
    _, file_part, words = CASES[name]
    assert "\n" not in msg.strip(), msg
    named = re.search(r"iter_0000004/([^:]+): ", msg)
    assert named and file_part in named.group(1) and words in msg, (name, msg)
    assert msg.strip().endswith(f"load the previous complete checkpoint with {flag} 2"), (name, msg)


def test_training_load_names_the_damaged_file(runs):
    names = runs["cases"]
    opt_in = [str(runs["deleted_manifest"]), True]  # --allow-unverified-checkpoint
    both = run_distributed(load_errors_job, 2, [str(runs["good"])] + [str(runs[n]) for n in names] + [opt_in])
    assert both[0] == both[1]  # every rank raises the same error, whichever rank found the damage
    assert both[0][0] == "ok" and both[0][-1] == "ok"
    for name, msg in zip(names, both[0][1:-1]):
        _check(msg, name, "--ckpt-iteration")


def test_to_hf_exits_2_with_one_line(runs, tmp_path, capsys):
    from megatron_mdm.cli import convert

    assert convert.main(["to-hf", "--load", str(runs["good"]), "--output", str(tmp_path / "good")]) == 0
    for name in runs["cases"]:
        capsys.readouterr()
        rc = convert.main(["to-hf", "--load", str(runs[name]), "--output", str(tmp_path / name)])
        err = capsys.readouterr().err.strip()
        assert rc == 2, (name, err)
        assert err.startswith("mdm-convert: error: "), err
        _check(err, name, "--iteration")
    # the escape: flipped bytes are no longer looked for (the sizes still are)
    rc = convert.main(["to-hf", "--load", str(runs["flipped_distcp"]), "--output", str(tmp_path / "nv"),
                       "--no-verify-checkpoint"])
    assert rc == 0, capsys.readouterr().err
    # the opt-in for a checkpoint that lost its manifest: read unverified (the flipped shard goes unseen)
    rc = convert.main(["to-hf", "--load", str(runs["deleted_manifest"]), "--output", str(tmp_path / "unverified"),
                       "--allow-unverified-checkpoint"])
    assert rc == 0, capsys.readouterr().err


def test_damaged_config_yaml_is_not_taken_for_the_users_flags(runs, tmp_path):
    """Hostile case (issue 21): a changed value in a checkpoint's config.yaml was reported as a conflict with the
    user's own flags (or silently became the architecture); it is checked against the checksums first."""
    import argparse

    from megatron_mdm.checkpoint.layout import CheckpointError
    from megatron_mdm.config import add_arguments, from_args

    run = tmp_path / "run"
    shutil.copytree(runs["good"], run)
    cfg_file = run / "iter_0000004" / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("hidden_size: 64", "hidden_size: 96"))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for argv in ([], ["--hidden-size", "64"]):
        with pytest.raises(CheckpointError) as e:
            from_args(parser.parse_args(["--load", str(run), *argv]))
        msg = str(e.value)
        assert msg.startswith(f"{cfg_file}: sha256 checksum mismatch") and "\n" not in msg, msg
        assert msg.endswith("load the previous complete checkpoint with --ckpt-iteration 2"), msg
    assert from_args(parser.parse_args(["--load", str(runs["good"])])).model.hidden_size == 64
