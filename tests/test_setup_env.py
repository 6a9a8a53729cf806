"""examples/setup_env.sh where the package is already importable (the Dockerfile's image: its torch, Transformer
Engine and Apex must be the ones used): the environment it makes is a thin venv over the interpreter's own, and
nothing is installed. pip is pointed at no index and no wheel cache meanwhile, so any install would fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow]


def _setup(venv: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, MDM_VENV=str(venv), PIP_NO_INDEX="1",
               PIP_FIND_LINKS=str(venv / "no-wheels-here"), PIP_INDEX_URL="http://127.0.0.1:9/none")
    return subprocess.run(["bash", str(REPO / "examples/setup_env.sh")], env=env, capture_output=True, text=True,
                          timeout=600)


def _ask(python: Path, code: str) -> str:
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                          cwd="/").stdout.strip()


def test_setup_uses_the_environment_that_already_has_the_package(tmp_path):
    venv = tmp_path / "venv"
    p = _setup(venv)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "already imports torch, megatron.core and this checkout's megatron_mdm" in p.stdout, p.stdout
    assert "Collecting" not in p.stdout and "upgrading pip" not in p.stdout, p.stdout
    where = "import sys, torch, megatron.core, megatron_mdm; print(torch.__file__, megatron.core.__file__, " \
            "megatron_mdm.__file__, sys.prefix)"
    mine, base = _ask(venv / "bin/python", where).split(), _ask(Path(sys.executable), where).split()
    assert mine[:3] == base[:3] and mine[3] == str(venv), (mine, base)  # the same packages, not copies
    assert not list((venv / "lib").glob("python*/site-packages/torch"))
    # the console scripts, run by the new environment's interpreter
    r = subprocess.run([str(venv / "bin/mdm-convert"), "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr[-2000:]
    assert (venv / "bin/torchrun").read_text().startswith(f"#!{venv / 'bin/python'}")
    # a second run finds it done
    again = _setup(venv)
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr
