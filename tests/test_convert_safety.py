"""``mdm-convert`` never destroys or silently corrupts a run (hostile cases of issue 21).

to-hf: an ``--output`` that is, contains or lies inside the checkpoint being read, that is part of a run or holds
another run is refused whatever the flags (``--output RUN --force`` used to replace every checkpoint,
metrics.jsonl and the marker of the run it read, exit 0); a full disk is one line. from-hf: a training run is
never written into (its marker moved from 4 back to 0); a non-empty directory that is not an earlier import needs
``--force``; integer weights, a ``vocab_size`` that disagrees with the embedding, an invalid config.json and
wrongly shaped tensors are one line naming the file or tensor. Each case runs the command line in this process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import run_distributed
from jobs import train_job

from megatron_mdm.cli import convert

pytestmark = [pytest.mark.dist]


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: what must not change."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = convert.main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err.startswith("mdm-convert: error: "), (argv, rc, err)
    return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A training run (checkpoints at 2 and 4, metrics.jsonl, TensorBoard files), a copy of it as another run,
    and a tiny HF Llama."""
    from test_hf_convert import make_hf_llama

    base = tmp_path_factory.mktemp("convert_safety")
    run_distributed(train_job, 1, {"train_iters": 4, "save_interval": 2, "save": str(base / "run"),
                                   "tensorboard_dir": str(base / "run" / "tensorboard")})
    shutil.copytree(base / "run", base / "other")
    make_hf_llama(base / "llama")
    return base


def test_to_hf_never_replaces_what_it_reads_or_another_run(runs, tmp_path, capsys):
    run, other = runs / "run", runs / "other"
    assert {"metrics.jsonl", "latest_checkpointed_iteration.txt"} <= set(_tree(run)) and any(
        k.startswith("tensorboard/") for k in _tree(run))
    before = {"run": _tree(run), "other": _tree(other)}
    for load in (run, run / "iter_0000004"):
        for output, why in ((run, "contains the checkpoint being read"),
                            (run / "iter_0000004", "the checkpoint being read"),
                            (run / "iter_0000004" / "hf", "lies inside the checkpoint being read"),
                            (runs, "contains the checkpoint being read"),
                            (run / "tensorboard", "is part of a training run"),
                            (run / "iter_0000002", "is part of a training run"),
                            (other, "is part of a training run")):
            err = _one_line_error(capsys, ["to-hf", "--load", str(load), "--output", str(output), "--force"])
            assert f"--output: {output} " in err and why in err, err
    assert {"run": _tree(run), "other": _tree(other)} == before
    # beside the run's own files is fine
    assert convert.main(["to-hf", "--load", str(run), "--output", str(run / "exports" / "hf")]) == 0
    assert (run / "exports" / "hf" / "config.json").is_file()
    assert {k: v for k, v in _tree(run).items() if not k.startswith("exports/")} == before["run"]


def _unshare_tmpfs(size: str) -> tuple:
    prefix = ("unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size} none "$1" && shift && exec "$@"', "sh")
    try:
        ok = subprocess.run([*prefix, "/tmp", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else ()


def test_to_hf_onto_a_full_disk_is_one_line(runs, tmp_path):
    prefix = _unshare_tmpfs("64k")
    if not prefix:
        pytest.skip("no unprivileged mount namespaces here (unshare -rm): a full disk cannot be made")
    small = tmp_path / "small"
    small.mkdir()
    r = subprocess.run([*prefix, str(small), sys.executable, "-m", "megatron_mdm.cli.convert", "to-hf", "--load",
                        str(runs / "run"), "--output", str(small / "hf")], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mdm-convert")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines == [f"mdm-convert: error: --output: could not write {small / 'hf'} (disk full (No space left on "
                     "device)); nothing was replaced"], r.stderr[-3000:]


def test_from_hf_never_rewinds_a_training_run(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    before = _tree(run)
    for force in ([], ["--force"]):
        err = _one_line_error(capsys, ["from-hf", "--hf", str(runs / "llama"), "--output", str(run), *force])
        assert f"--output: {run} holds a training run (its marker names iteration 4)" in err, err
    assert _tree(run) == before


def test_from_hf_into_a_non_empty_directory_needs_force(runs, tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine\n")
    err = _one_line_error(capsys, ["from-hf", "--hf", str(runs / "llama"), "--output", str(out)])
    assert "is not empty and is not an earlier import" in err and "--force" in err, err
    assert convert.main(["from-hf", "--hf", str(runs / "llama"), "--output", str(out), "--force"]) == 0
    assert (out / "todo.txt").read_text() == "mine\n" and (out / "iter_0000000" / "metadata.json").is_file()
    # an earlier import is replaced without --force
    assert convert.main(["from-hf", "--hf", str(runs / "llama"), "--output", str(out)]) == 0
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert json.loads((out / "mdm_import.json").read_text())["family"] == "Llama"


def _damaged_llama(src: Path, dst: Path, edit) -> Path:
    """A copy of the HF model ``src`` whose weights (and config) ``edit(tensors, config)`` changes."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _set(name: str, value):
    def edit(tensors, config):
        tensors[name] = value(tensors[name])
    return edit


def test_from_hf_refuses_weights_it_would_change_silently(runs, tmp_path, capsys):
    q1 = "model.layers.1.self_attn.q_proj.weight"
    cases = {
        # an int64 q_proj became weights of 68.0 for 0.068
        "int64": (_set(q1, lambda w: (w * 1000).round().to(torch.int64)),
                  f"{q1} holds int64 values, not floating point weights"),
        "bool": (_set("model.norm.weight", lambda w: w > 1), "model.norm.weight holds bool values"),
        # the embedding silently grew to config.json's size
        "vocab": (lambda t, c: c.update(vocab_size=120),
                  "says vocab_size 120 but model.embed_tokens.weight has 100 rows"),
        "layer_shape": (_set(q1, lambda w: w[:, :32].contiguous()),
                        f"{q1} has shape (64, 32), model.layers.0.self_attn.q_proj.weight has (64, 64)"),
        "config_shape": (_set("model.layers.0.mlp.up_proj.weight", lambda w: w[:100].contiguous()),
                         "model.layers.0.mlp.up_proj.weight has shape (100, 64), the config says (176, 64)"),
    }
    for name, (edit, words) in cases.items():
        hf = _damaged_llama(runs / "llama", tmp_path / name, edit)
        err = _one_line_error(capsys, ["from-hf", "--hf", str(hf), "--output", str(tmp_path / f"out_{name}")])
        assert words in err, (name, err)
        assert not (tmp_path / f"out_{name}").exists()  # refused before anything was written


def test_from_hf_invalid_config_json_is_one_line(runs, tmp_path, capsys):
    hf = tmp_path / "hf"
    shutil.copytree(runs / "llama", hf)
    (hf / "config.json").write_text('{"model_type": "llama",\n "hidden_size": 64,,\n}')
    err = _one_line_error(capsys, ["from-hf", "--hf", str(hf), "--output", str(tmp_path / "out")])
    assert f"--hf: {hf / 'config.json'} is not valid JSON (line 2, column" in err, err
    (hf / "config.json").write_text("[1, 2]")
    err = _one_line_error(capsys, ["from-hf", "--hf", str(hf), "--output", str(tmp_path / "out")])
    assert "holds list, not a JSON object" in err, err
