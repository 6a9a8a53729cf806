"""megatron_mdm.compat: the megatron-core 0.16 / 0.19 differences, and checkpoints across the two.

The cross-version tests need both interpreters: ``tests/run_tests.sh`` runs the 0.19 leg with
``MDM_MCORE_OTHER_PYTHON`` naming the 0.16 interpreter (.venv), so a checkpoint written by one release
is loaded by the other in a subprocess. Reference: the uninterrupted run of the release that wrote
the checkpoint (losses must be bit-identical, as a same-release resume is: both releases run the same
float32 kernels on the CPU).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mdm import compat

REPO = Path(__file__).resolve().parents[1]
OTHER_PYTHON = os.environ.get("MDM_MCORE_OTHER_PYTHON")


# ---- pure functions -----------------------------------------------------------------------------

def test_minor_release_parses_plain_local_and_missing_versions():
    assert compat.minor_release("0.19.2") == (0, 19)
    assert compat.minor_release("0.19.2+c57ae75") == (0, 19)  # package_info inside a git tree
    assert compat.minor_release("0.16.0rc0.dev100093") == (0, 16)
    assert compat.minor_release("1.2") == (1, 2)
    assert compat.minor_release(None) is None
    assert compat.minor_release("unknown") is None


@pytest.mark.parametrize("saved, running, level", [
    ("0.16.1", "0.16.1", "ok"),
    ("0.19.0", "0.19.2+abc", "ok"),      # patch releases share the format
    ("0.16.1", "0.19.2", "warn"),        # older checkpoint: loads (tested below), lineage mixed
    ("0.19.2", "0.16.1", "error"),       # newer checkpoint: not readable
    ("1.0.0", "0.19.2", "error"),
    (None, "0.19.2", "ok"),              # checkpoints from before the version was recorded
    ("unknown", "0.16.1", "ok"),
])
def test_checkpoint_version_judgement(saved, running, level):
    got, message = compat.checkpoint_version_problem(saved, running)
    assert got == level
    if level == "error":
        assert saved in message and running in message and compat.ALLOW_MISMATCH_ENV in message
    if level == "warn":
        assert "one megatron-core version per run lineage" in message


def test_check_checkpoint_version_raises_checkpoint_error_unless_allowed(monkeypatch, caplog):
    from megatron_mdm.checkpoint.checkpointing import CheckpointError

    newer = f"{compat.minor_release(compat.mcore_version())[0]}.999.0"
    monkeypatch.delenv(compat.ALLOW_MISMATCH_ENV, raising=False)
    with pytest.raises(CheckpointError, match=r"/run/iter_1: written by megatron-core 0\.999\.0"):
        compat.check_checkpoint_version({"megatron_core_version": newer}, "/run/iter_1")
    monkeypatch.setenv(compat.ALLOW_MISMATCH_ENV, "1")
    compat.check_checkpoint_version({"megatron_core_version": newer}, "/run/iter_1")  # a warning only
    assert "0.999.0" in caplog.text
    compat.check_checkpoint_version({"megatron_core_version": compat.mcore_version()}, "/x")
    compat.check_checkpoint_version({}, "/x")


def test_mcore_version_is_the_installed_release_without_a_git_hash():
    from importlib.metadata import version

    v = compat.mcore_version()
    assert "+" not in v
    assert v == version("megatron-core")  # the distribution that megatron.core was imported from


def test_has_param_and_dist_save_kwargs_follow_the_signature():
    from megatron.core import dist_checkpointing

    def f(a, async_strategy=None):
        return a

    assert compat.has_param(f, "async_strategy") and not compat.has_param(f, "b")
    kwargs = compat.dist_save_kwargs()
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:  # >= 0.17
        assert kwargs == {"async_strategy": "mcore"}
    else:  # 0.16
        assert kwargs == {}


# ---- checkpoints across releases ------------------------------------------------------------------

def _train(python: str, overrides: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    """``tests.jobs.train_job`` in one gloo process of ``python``; its result as JSON on the last line."""
    code = ("import json, sys\n"
            "from tests.dist import run_distributed\n"
            "from tests.jobs import train_job\n"
            "r = run_distributed(train_job, 1, json.loads(sys.argv[1]))[0]\n"
            "print('RESULT ' + json.dumps({'losses': r['losses'], 'iteration': r['iteration']}))\n")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1")
    return subprocess.run([python, "-c", code, json.dumps(overrides)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _release(python: str) -> str:
    out = subprocess.run([python, "-c", "from megatron_mdm.compat import mcore_version; print(mcore_version())"],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                         text=True, timeout=300)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def other_python():
    if not OTHER_PYTHON:
        pytest.skip("MDM_MCORE_OTHER_PYTHON is not set (tests/run_tests.sh sets it for the 0.19 leg)")
    other, this = _release(OTHER_PYTHON), compat.mcore_version()
    if compat.minor_release(other) == compat.minor_release(this):
        pytest.skip(f"MDM_MCORE_OTHER_PYTHON has the same megatron-core minor release ({other})")
    return OTHER_PYTHON, other


@pytest.mark.dist
@pytest.mark.slow
def test_checkpoints_across_megatron_core_releases(other_python, tmp_path):
    """Older -> newer resumes exactly as under the writer; newer -> older is one clear error."""
    python, other = other_python
    newer_is_this = compat.minor_release(compat.mcore_version()) > compat.minor_release(other)
    old_py, new_py = (python, sys.executable) if newer_is_this else (sys.executable, python)
    old_run, new_run = tmp_path / "old", tmp_path / "new"

    full = _result(_train(old_py, {"train_iters": 3, "save": str(old_run), "save_interval": 2}))
    across = _result(_train(new_py, {"train_iters": 3, "load": str(old_run), "ckpt_iteration": 2}))
    assert across["iteration"] == 3
    # resumed on the newer release from the older one's iteration 2: bit-identical to going on under the older
    assert across["losses"] == full["losses"][2:]

    _result(_train(new_py, {"train_iters": 1, "save": str(new_run)}))
    out = tmp_path / "hf"
    proc = subprocess.run([old_py, "-m", "megatron_mdm.cli.convert", "to-hf", "--load", str(new_run),
                           "--output", str(out)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "Warning" not in x and "warn(" not in x]
    assert "Traceback" not in proc.stderr
    assert any("written by megatron-core >= 0.17" in x and "iter_0000001" in x for x in lines), proc.stderr
