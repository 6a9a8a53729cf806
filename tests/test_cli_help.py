"""Every console script's --help: plain text (no reST quotes), each paragraph once, each default once; a bad flag
is one line on stderr with exit status 2. (How fast --help is: benchmarks/bench_help.py, not a timed test.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    ["pretrain"], ["tokenizer"], ["tokenizer", "train"], ["data"], ["data", "prepare"], ["data", "prepare-sft"],
    ["convert"], ["convert", "to-hf"], ["convert", "from-hf"], ["generate"], ["eval"], ["eval", "elbo"],
    ["eval", "mc"], ["eval", "lm-eval"], ["sweep"], ["sweep", "plan"], ["sweep", "launch"], ["plot"],
]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"megatron_mdm.cli.{module}", *args], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_help_is_plain_text_without_repeats(cmd):
    r = _run(*cmd, "--help")
    assert r.returncode == 0 and r.stderr == "", r.stderr[-2000:]
    text = r.stdout
    assert "``" not in text and "(default: None)" not in text
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) > 8]
    assert len(paragraphs) == len(set(paragraphs)), "a paragraph is printed twice"
    for line in text.splitlines():  # a default is stated once per option
        assert line.count("(default:") <= 1, line


@pytest.mark.parametrize("cmd", [["pretrain"], ["data", "prepare"], ["eval", "elbo"], ["plot"], ["generate"]],
                         ids=lambda c: " ".join(c))
def test_a_bad_flag_is_one_line(cmd):
    r = _run(*cmd, "--no-such-flag")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"mdm-{' '.join(cmd)}: error: ") and lines[0].endswith("--help)"), lines[0]
