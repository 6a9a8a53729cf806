"""``pretrain/pretrain_mdm.py`` with a bad flag: exit status 2 and one line naming the flag, at once.

Each case runs the script as a user would (a subprocess, no launcher: world size 1). Besides the
log lines (``[HH:MM:SS r0] ...``) stderr must hold exactly one line, it names the flag, and there is
no traceback. The checks that need no torch import come first in the script, so most cases exit in
well under a second; the world-size check imports torch (a few seconds here).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d r\d+\] ")

# (flags, the flag the error must name)
CASES = [
    (["--train-iters", "-5"], "--train-iters"),
    (["--train-iters", "0"], "--train-iters"),
    ([], "--train-iters"),  # neither --train-iters nor --train-tokens
    (["--train-iters", "3", "--eval-interval", "2", "--eval-iters", "0"], "--eval-iters"),
    (["--train-iters", "3", "--micro-batch-size", "0"], "--micro-batch-size"),
    (["--train-iters", "3", "--num-workers", "-1"], "--num-workers"),
    (["--train-iters", "3", "--lr", "nan"], "--lr"),
    (["--train-iters", "3", "--seq-length", "1"], "--seq-length"),
    (["--train-iters", "3", "--objective", "gpt"], "--objective"),
    (["--train-iters", "3", "--config", "/nonexistent/run.yaml"], "--config"),
    (["--train-iters", "3", "--tensor-model-parallel-size", "2"], "--tensor-model-parallel-size"),
]


@pytest.mark.parametrize("argv,flag", CASES, ids=[" ".join(a) or "no-train-iters" for a, _ in CASES])
def test_bad_flag_is_one_line_naming_it(argv, flag, tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "pretrain" / "pretrain_mdm.py"), *argv],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("pretrain_mdm.py: configuration error: " + flag + ":"), lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not any(tmp_path.iterdir())  # nothing written: no run directory, no checkpoint
    print(f"{elapsed:.2f}s {' '.join(argv)}")


def _run_script(argv: list[str], cwd: Path, prefix: tuple = ()) -> tuple[subprocess.CompletedProcess, list[str]]:
    r = subprocess.run([*prefix, sys.executable, str(REPO / "pretrain" / "pretrain_mdm.py"), *argv],
                       capture_output=True, text=True, timeout=120, cwd=cwd, stdin=subprocess.DEVNULL)
    return r, [ln for ln in r.stderr.splitlines() if ln.strip() and not LOG_LINE.match(ln)]


def test_save_that_is_a_file_is_one_line(tmp_path):
    """Hostile case (issue 21): ``--save`` naming a file (or a path under one)."""
    (tmp_path / "notes").write_text("x")
    for save, what in ((tmp_path / "notes", "exists and is not a directory"),
                       (tmp_path / "notes" / "run", f"{tmp_path / 'notes'} is not a directory")):
        r, lines = _run_script(["--train-iters", "3", "--save", str(save)], tmp_path)
        assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
        assert lines[0].startswith("pretrain_mdm.py: configuration error: --save: ") and what in lines[0], lines


def _unshare_mount() -> tuple:
    """A command prefix that runs the rest in a private mount namespace with a read-only tmpfs on ``$1`` (an
    unprivileged user namespace), or () where the machine does not allow it."""
    prefix = ("unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o ro,size=1m none "$1" && shift && exec "$@"', "sh")
    try:
        ok = subprocess.run([*prefix, "/tmp", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else ()


def test_save_on_a_read_only_file_system_is_one_line(tmp_path):
    prefix = _unshare_mount()
    if not prefix:
        pytest.skip("no unprivileged mount namespaces here (unshare -rm): a read-only file system cannot be made")
    ro = tmp_path / "ro"
    ro.mkdir()
    r, lines = _run_script(["--train-iters", "3", "--save", str(ro / "run")], tmp_path, (*prefix, str(ro)))
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0] == f"pretrain_mdm.py: configuration error: --save: {ro / 'run'} is on a read-only file system"
