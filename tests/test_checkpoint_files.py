"""The run directory (``checkpoint.layout``) and the checksum checks (``checkpoint.integrity``), in one process.

Checkpoint directories here are made by hand (a ``metadata.json`` marks one complete) or by
``torch.distributed.checkpoint.save`` without a process group, so these tests need no gloo world.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from megatron_mdm.checkpoint import integrity, layout
from megatron_mdm.checkpoint.layout import CheckpointError


def fake_ckpt(path: Path, payload: bytes = b"x") -> Path:
    path.mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(payload)
    (path / "metadata.json").write_text("{}")
    return path


def real_ckpt(path: Path, seed: int = 0) -> Path:
    """A torch_dist directory (two shard files, ``.metadata``), a ``common.pt`` and a manifest."""
    import torch.distributed.checkpoint as dcp

    g = torch.Generator().manual_seed(seed)
    sd = {"a": torch.randn(64, 32, generator=g), "b": torch.randn(1000, generator=g)}
    writer = dcp.FileSystemWriter(str(path), thread_count=2)
    dcp.save(sd, storage_writer=writer, no_dist=True)
    torch.save({"meta": {"iteration": 1}}, path / "common.pt")
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    integrity.write_manifest(path, integrity.hash_files(path, integrity.all_files(path)))
    return path


def make_legacy(ck: Path) -> Path:
    """A checkpoint as versions before checksums wrote it: no manifest, a config.yaml without
    ``checkpoint.verify_checkpoint`` (which arrived with the checksums)."""
    (ck / "checksums.json").unlink()
    (ck / "config.yaml").write_text("model:\n  num_layers: 2\ncheckpoint:\n  save: run\n  keep_last: 2\n")
    return ck


# ---- checkpoint.layout ----------------------------------------------------------------------------------


def test_commit_moves_into_place_then_marker_then_prunes(tmp_path):
    for it in (2, 4):
        tmp = fake_ckpt(layout.temp_dir(tmp_path, it, "aa"))
        layout.commit(tmp_path, tmp, it, keep_last=1)
        assert layout.read_latest_iteration(tmp_path) == it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000004", layout.TRACKER]


def test_resave_of_marker_iteration_replaces_it_whole(tmp_path):
    fake_ckpt(layout.iteration_dir(tmp_path, 4), b"old")
    layout.write_tracker(tmp_path, 4)
    tmp = fake_ckpt(layout.temp_dir(tmp_path, 4, "bb"), b"new")
    layout.commit(tmp_path, tmp, 4)
    assert (layout.iteration_dir(tmp_path, 4) / "__0_0.distcp").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000004"]


def test_swap_cut_short_loads_the_set_aside_copy_and_cleanup_keeps_it(tmp_path):
    """Killed between the two renames of a re-save: the marker's iteration is only in ``.old-``."""
    fake_ckpt(tmp_path / "iter_0000004.old-cc", b"old")
    fake_ckpt(tmp_path / "iter_0000004.tmp-dd", b"new")
    fake_ckpt(tmp_path / "iter_0000002")
    layout.write_tracker(tmp_path, 4)
    assert layout.resolve_checkpoint(tmp_path).name == "iter_0000004.old-cc"
    assert layout.clean_leftovers(tmp_path) == ["iter_0000004.tmp-dd"]
    assert (tmp_path / "iter_0000004.old-cc").is_dir()
    # the next save moves the marker on; then the copy is no longer needed
    layout.commit(tmp_path, fake_ckpt(layout.temp_dir(tmp_path, 6, "ee")), 6)
    assert layout.clean_leftovers(tmp_path) == ["iter_0000004.old-cc"]


def test_prune_never_removes_the_marker_checkpoint(tmp_path):
    for it in (1, 2, 3, 5):  # 5: renamed into place, killed before the marker moved
        fake_ckpt(layout.iteration_dir(tmp_path, it))
    (tmp_path / "iter_0000004").mkdir()  # an incomplete directory of an older version
    layout.write_tracker(tmp_path, 2)
    assert layout.prune(tmp_path, keep_last=1) == [1]
    assert layout.complete_iterations(tmp_path) == [2, 3, 5]


def test_resolve_errors_name_the_complete_iterations(tmp_path):
    fake_ckpt(layout.iteration_dir(tmp_path, 2))
    (tmp_path / "iter_0000004").mkdir()
    layout.write_tracker(tmp_path, 4)
    with pytest.raises(CheckpointError, match=r"iteration 4 .*complete iterations: \[2\]; pass --ckpt-iteration 2"):
        layout.resolve_checkpoint(tmp_path)
    (tmp_path / layout.TRACKER).write_text("four\n")
    with pytest.raises(CheckpointError, match="expected an iteration number"):
        layout.resolve_checkpoint(tmp_path)


@pytest.mark.parametrize("text", ["\u00b2", "\u0664", "4\u00b2", "\U0001d7d2", "\xff\xfe"])
def test_marker_with_digits_int_does_not_read_is_one_line(tmp_path, text):
    """Hostile case: str.isdigit() accepts '²' (int() fails with a traceback) and Arabic-Indic digits (int()
    reads them); a marker holds ASCII digits only. Undecodable bytes too are one line naming the file."""
    fake_ckpt(layout.iteration_dir(tmp_path, 4))
    (tmp_path / layout.TRACKER).write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    with pytest.raises(CheckpointError) as e:
        layout.read_latest_iteration(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / layout.TRACKER}: ") and "\n" not in str(e.value), e.value


def test_owned_by_run_and_holds_run(tmp_path):
    run = tmp_path / "run"
    fake_ckpt(layout.iteration_dir(run, 2))
    layout.write_tracker(run, 2)
    for inside in ("", "iter_0000002", "iter_0000002/x", "tensorboard", "metrics.jsonl", layout.LOCK_FILE,
                   "iter_0000009.tmp-ab"):
        assert layout.owned_by_run(run, run / inside), inside
    for outside in ("hf", "export/x"):
        assert not layout.owned_by_run(run, run / outside), outside
    assert not layout.owned_by_run(run, tmp_path)  # it contains the run: the callers check that themselves
    (tmp_path / "link").symlink_to(run / "iter_0000002")
    assert layout.owned_by_run(run, tmp_path / "link")
    assert layout.holds_run(run) and not layout.holds_run(tmp_path) and not layout.holds_run(run / "nope")


# ---- checkpoint.integrity ------------------------------------------------------------------------------


def test_manifest_matches_an_independent_sha256(tmp_path):
    import hashlib

    ck = real_ckpt(tmp_path / "iter_0000001")
    files = json.loads((ck / "checksums.json").read_text())["files"]
    on_disk = sorted(p.relative_to(ck).as_posix() for p in ck.rglob("*") if p.is_file() and p.name != "checksums.json")
    assert sorted(files) == on_disk and len(on_disk) >= 5  # 2 shards, .metadata, common.pt, metadata.json
    for name, entry in files.items():
        data = (ck / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    integrity.verify_files(ck)


def _damage(path: Path, how: str) -> None:
    if how == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("manifest", [True, False])
@pytest.mark.parametrize("name,how,expect", [
    ("__0_0.distcp", "flip", "sha256 checksum mismatch"),
    ("__0_1.distcp", "truncate", "truncated"),
    ("__0_0.distcp", "delete", "missing"),
    (".metadata", "truncate", ""),
    (".metadata", "delete", "missing"),
])
def test_damaged_file_is_named_with_the_previous_complete_iteration(tmp_path, manifest, name, how, expect):
    real_ckpt(tmp_path / "iter_0000002", seed=1)
    ck = real_ckpt(tmp_path / "iter_0000004", seed=2)
    if not manifest:
        make_legacy(ck)
    _damage(ck / name, how)
    if how == "flip" and not manifest:  # sizes are right: only a checksum can see this
        integrity.verify_files(ck)
        return
    with pytest.raises(CheckpointError) as e:
        integrity.verify_files(ck)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{ck / name}: ") and expect in msg, msg
    assert msg.endswith("load the previous complete checkpoint with --ckpt-iteration 2"), msg


def test_no_verify_skips_hashes_not_sizes_and_names_the_callers_flag(tmp_path):
    ck = real_ckpt(tmp_path / "iter_0000003")
    _damage(ck / "__0_0.distcp", "flip")
    with integrity.verification(False):
        integrity.verify_files(ck)
    _damage(ck / "__0_1.distcp", "truncate")
    with integrity.verification(False, iteration_flag="--iteration"), pytest.raises(CheckpointError) as e:
        integrity.verify_files(ck)
    assert "__0_1.distcp" in str(e.value) and f"no earlier complete checkpoint in {tmp_path}" in str(e.value)


def test_checkpoint_saved_before_checksums_loads_with_a_warning(tmp_path, caplog):
    ck = make_legacy(real_ckpt(tmp_path / "iter_0000001"))
    with caplog.at_level(logging.WARNING):
        integrity.verify_files(ck)
    assert "has no checksums.json (saved before checksums existed)" in caplog.text


class _Touch:
    """Unpickling it creates a file: a stand-in for code a pickled file runs when it is loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("config", ["current", "none"])
def test_checkpoint_that_lost_its_manifest_is_refused_unless_allowed(tmp_path, caplog, config):
    """Hostile case: checksums.json deleted from a checkpoint of this version and a shard flipped. It used to
    export silently, unpickling ``.metadata`` on the way; now it is refused before any file is read, unless the
    user opts in."""
    import pickle

    real_ckpt(tmp_path / "iter_0000001", seed=1)
    ck = real_ckpt(tmp_path / "iter_0000002", seed=2)
    if config == "current":
        (ck / "config.yaml").write_text("checkpoint:\n  keep_last: 2\n  verify_checkpoint: true\n")
    (ck / "checksums.json").unlink()
    _damage(ck / "__0_0.distcp", "flip")
    ran = tmp_path / "unpickled"
    (ck / ".metadata").write_bytes(pickle.dumps(_Touch(ran)))
    with pytest.raises(CheckpointError) as e:
        integrity.verify_files(ck)
    assert str(e.value).startswith(f"{ck / 'checksums.json'}: missing ("), e.value
    assert "pass --allow-unverified-checkpoint to read the checkpoint unverified" in str(e.value)
    assert str(e.value).endswith("load the previous complete checkpoint with --ckpt-iteration 1")
    assert not ran.exists()  # nothing was unpickled
    with integrity.verification(allow_unverified=True, allow_flag=None), pytest.raises(CheckpointError) as e:
        integrity.verify_files(ck)  # opted in: the structure checks (which unpickle .metadata) run
    assert ran.exists() and ".metadata: unreadable" in str(e.value)
    with integrity.verification(allow_flag=None), pytest.raises(CheckpointError, match="restore it;"):
        integrity.verify_files(ck)  # a tool without the flag does not advise it


def test_previous_complete_skips_damaged_and_incomplete_iterations(tmp_path):
    real_ckpt(tmp_path / "iter_0000001", seed=1)
    bad = real_ckpt(tmp_path / "iter_0000002", seed=2)
    _damage(bad / "__0_0.distcp", "truncate")
    (tmp_path / "iter_0000003").mkdir()
    ck = real_ckpt(tmp_path / "iter_0000004", seed=4)
    assert integrity.previous_complete(ck) == 1


def test_save_error_reason_finds_disk_full_in_a_checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as inner:
            raise RuntimeError("Worker failure: [Errno 28]") from inner
    except RuntimeError as e:
        exc = CheckpointException("write", {1: _wrap_exception(e)})
    assert integrity.save_error_reason(exc) == "disk full (No space left on device)"
    pickled = CheckpointException("write", {0: _wrap_exception(RuntimeError("Worker failure: [Errno 28] No sp"))})
    assert integrity.save_error_reason(pickled) == "disk full (No space left on device)"
    other = CheckpointException("write", {0: _wrap_exception(ValueError("bad\nsecond line"))})
    assert integrity.save_error_reason(other) == "ValueError: bad"


def test_save_error_reason_reports_a_full_file_system_when_the_errno_is_lost(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    lost = RuntimeError("Worker failure: An error is caught while starting worker 0, error: <class 'OSError'>")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    assert integrity.save_error_reason(lost, tmp_path).startswith("disk full (5 MB free): Worker failure")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 1 << 30, 9 << 30))
    assert integrity.save_error_reason(lost, tmp_path).startswith("RuntimeError: Worker failure")
