"""How long each console script takes to print --help (the imports before argparse answers).

    python benchmarks/bench_help.py [--repeats 5] [--baseline REV]

Runs ``python -m megatron_mdm.cli.X --help`` (what the console script runs) for every script and the
subcommands people ask about, ``--repeats`` times each in a fresh process, and prints the median and the
slowest time. The goal is under 2 s for every one: command lines import torch, transformers or Megatron only
when they do work. ``--baseline REV`` also times the same commands in a checkout of REV (git worktree in a
temporary directory, same interpreter) side by side. Results go in docs/BENCHMARKS.md with the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [["pretrain"], ["tokenizer"], ["data"], ["data", "prepare"], ["convert"], ["generate"], ["eval"],
            ["eval", "lm-eval"], ["sweep"], ["plot"]]


def time_help(cmd: list[str], repeats: int, root: Path) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(root))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", f"megatron_mdm.cli.{cmd[0]}", *cmd[1:], "--help"], cwd=root,
                           env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise SystemExit(f"mdm-{' '.join(cmd)} --help failed: {r.stderr.strip().splitlines()[-1:]}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default=None, metavar="REV", help="also time this git revision")
    args = ap.parse_args()
    roots = {"this": REPO}
    tmp = None
    if args.baseline:
        tmp = tempfile.mkdtemp(prefix="bench-help-")
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", tmp, args.baseline], check=True,
                       capture_output=True)
        roots[args.baseline] = Path(tmp)
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.repeats} runs each; seconds")
        print(f"{'command':<24}" + "".join(f"{name + ' median':>18}{'max':>8}" for name in roots))
        for cmd in COMMANDS:
            row = f"{'mdm-' + ' '.join(cmd) + ' --help':<24}"
            for root in roots.values():
                try:
                    t = time_help(cmd, args.repeats, root)
                    row += f"{statistics.median(t):>18.2f}{max(t):>8.2f}"
                except SystemExit:
                    row += f"{'n/a':>18}{'':>8}"
            print(row, flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tmp], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
