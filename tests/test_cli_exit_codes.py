"""Every console script exits 2 with one line on stderr, naming the file or flag, for a user's error.

The scripts are those the package installs (``console_scripts`` entry points), so a new one without a case here
fails the test; each runs as a user runs it, in a subprocess (its installed script when present).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

SCRIPTS = {e.name: e.value for e in entry_points(group="console_scripts") if e.value.startswith("megatron_mdm.")}

# script -> (arguments with a user's error, what the one line must contain); {tmp} is a fresh directory
CASES = {
    "mdm-pretrain": (["--train-iters", "3", "--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml"),
    "mdm-tokenizer": (["train", "--input", "{tmp}/missing.txt", "--vocab-size", "300", "--output", "{tmp}/tok"],
                      "{tmp}/missing.txt: no input file matches"),
    "mdm-data": (["prepare", "--input", "{tmp}/missing.jsonl", "--tokenizer", "{tmp}/tok", "--output", "{tmp}/d",
                  "--seq-length", "8"], "{tmp}/missing.jsonl: no input file matches"),
    "mdm-convert": (["to-hf", "--load", "{tmp}/missing", "--output", "{tmp}/hf"], "--load: {tmp}/missing does not exist"),
    "mdm-generate": (["--model", "{tmp}/missing"], "--model {tmp}/missing: no such directory"),
    "mdm-eval": (["elbo", "--model", "{tmp}/missing", "--data", "{tmp}/data.txt"], "--model {tmp}/missing"),
    "mdm-sweep": (["collect", "--plan", "{tmp}/missing.yaml", "--out", "{tmp}/sweep"], "{tmp}/missing.yaml"),
    "mdm-plot": (["{tmp}/missing-run"], "{tmp}/missing-run"),
}


def _command(name: str) -> list[str]:
    installed = Path(sys.executable).parent / name
    if installed.is_file():
        return [str(installed)]
    module, func = SCRIPTS[name].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


def test_every_console_script_has_a_case():
    assert SCRIPTS, "megatron-mdm is not installed (pip install -e .)"
    assert set(SCRIPTS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error_is_one_line_exit_2(name, tmp_path):
    argv, words = CASES[name]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    r = subprocess.run([*_command(name), *argv], capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not re.search(r"warn", ln, re.IGNORECASE)]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), r.stderr[-2000:]
    assert words.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
