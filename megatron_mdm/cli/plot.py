"""``mdm-plot``: training loss, validation loss (ELBO), learning rate and throughput of runs, as one PNG.

    mdm-plot outputs/quickstart/latest                          # -> <run>/curves.png
    mdm-plot runs/mdm runs/arm --x flops --output cmp.png       # several runs on one figure
    mdm-plot runs/mdm --unigram runs/shards                     # with the unigram level of the data

Each RUN is a run directory written with --save (metrics.jsonl, config.yaml). ``--x`` chooses the
axis: iterations, tokens (consumed samples x sequence length) or flops (6·N·tokens, N non-embedding).
Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.errors import UserError, report


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-plot", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with metrics.jsonl)")
    p.add_argument("--output", "-o", default=None,
                   help="PNG to write (default: RUN/curves.png for one run, curves.png for several)")
    p.add_argument("--x", choices=["iterations", "tokens", "flops"], default="iterations", help="x axis")
    p.add_argument("--log-x", action="store_true", help="logarithmic x axis")
    p.add_argument("--label", action="append", default=None,
                   help="legend label of a run; repeat once per run, in order (default: the directory names)")
    p.add_argument("--unigram", default=None, metavar="DATA",
                   help="prepared dataset: draw the unigram entropy of its validation tokens on the loss panels")
    p.add_argument("--title", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_mdm.sweep.curves import RunError, load_run, plot_runs, unigram_entropy

    try:
        labels = args.label or [None] * len(args.runs)
        if len(labels) != len(args.runs):
            raise RunError(f"--label: {len(labels)} labels for {len(args.runs)} runs")
        runs = [load_run(r, lab) for r, lab in zip(args.runs, labels)]
        ref = unigram_entropy(args.unigram) if args.unigram else None
        out = args.output or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else "curves.png")
        path = plot_runs(runs, out, x=args.x, log_x=args.log_x, reference=ref, title=args.title)
    except (UserError, ValueError, OSError) as e:
        return report("mdm-plot", f"error: {e}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
