"""``mdm-sweep``: IsoFLOP scaling-law sweeps of MDM and ARM (library: ``megatron_mdm.sweep``).

    mdm-sweep plan    --budgets 1e12 3e12 1e13 --presets tiny,quickstart --widths 96,160 \\
                      --objectives mdm,arm --seq-length 64 --global-batch-size 16 \\
                      --config examples/configs/quickstart.yaml --train-args "--data-path D --tokenizer T" \\
                      --output sweep/plan.yaml
    mdm-sweep launch  --plan sweep/plan.yaml --out sweep            # local, sequential, resumable
    mdm-sweep launch  --plan sweep/plan.yaml --out sweep --slurm sweep/sweep.sbatch   # SLURM job array
    mdm-sweep collect --plan sweep/plan.yaml --out sweep            # -> sweep/results.csv
    mdm-sweep fit     --csv sweep/results.csv                       # -> sweep/fit.json + summary
    mdm-sweep plot    --csv sweep/results.csv                       # -> sweep/scaling.png

Errors are one line on stderr and exit status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from megatron_mdm.cli import ArgumentParser
from megatron_mdm.errors import UserError, report


def _csv_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="mdm-sweep", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("plan", help="the runs of each IsoFLOP budget, as a YAML/JSON plan")
    q.add_argument("--budgets", type=float, nargs="+", required=True, help="FLOP budgets C (C = 6·N·D)")
    q.add_argument("--presets", type=_csv_list, default=[], help="comma list of model presets (megatron_mdm.presets)")
    q.add_argument("--widths", type=lambda s: [int(x) for x in _csv_list(s)], default=[],
                   help="comma list of hidden sizes for the depth/width rule (shapes between presets)")
    q.add_argument("--shapes", type=_csv_list, default=[],
                   help="comma list of LAYERSxHIDDEN shapes by the rule's heads and FFN width (e.g. 1x32,2x64)")
    q.add_argument("--aspect", type=float, default=32.0, help="rule: layers = round(hidden / aspect) (default 32)")
    q.add_argument("--head-dim", type=int, default=32, help="rule: attention head size (default 32)")
    q.add_argument("--objectives", type=_csv_list, default=["mdm", "arm"], help="comma list (default mdm,arm)")
    q.add_argument("--seq-length", type=int, required=True)
    q.add_argument("--global-batch-size", type=int, required=True)
    q.add_argument("--micro-batch-size", type=int, default=None, help="default: the global batch size")
    q.add_argument("--config", default=None, help="base recipe YAML for every run (pretrain_mdm.py --config)")
    q.add_argument("--train-args", default="", help="extra pretrain_mdm.py flags for every run, one quoted string")
    q.add_argument("--per-budget", type=int, default=None,
                   help="sizes per budget: the K shapes around N ~ sqrt(C / (6 ratio)) (default: every feasible)")
    q.add_argument("--ratio", type=float, default=20.0, help="tokens per parameter of the --per-budget guess")
    q.add_argument("--min-iters", type=int, default=10, help="leave out runs shorter than this many steps")
    q.add_argument("--tolerance", type=float, default=0.05, help="largest relative miss of a budget (default 0.05)")
    q.add_argument("--tag", default="", help="name of a variant group (e.g. seed2, lr1e-2): appended to its run names")
    q.add_argument("--run-args", default="", help="extra pretrain_mdm.py flags of these runs only, one quoted string "
                   "(e.g. \"--seed 2\"); they win over --train-args")
    q.add_argument("--append", action="store_true",
                   help="add these runs to the existing --output plan (same recipe) instead of writing a new one")
    q.add_argument("--output", required=True, help="plan file to write (.yaml or .json)")

    la = sub.add_parser("launch", help="train the plan's runs here one by one (resumable), or write a SLURM array")
    la.add_argument("--plan", required=True)
    la.add_argument("--out", required=True, help="sweep directory: one run directory per run")
    la.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    la.add_argument("--nice", type=int, default=None, help="run training under nice -n N (shared machines)")
    la.add_argument("--max-runs", type=int, default=None, help="train at most this many runs now")
    la.add_argument("--only", type=_csv_list, default=None, help="comma list of run names to train")
    la.add_argument("--part", default=None, metavar="I/N",
                    help="train only part I of N (runs split by estimated time): N launches side by side")
    la.add_argument("--keep-going", action="store_true", help="go on after a failed run")
    la.add_argument("--repo", default=None,
                    help="megatron-mdm checkout whose package the runs use (default: the installed one)")
    la.add_argument("--dry-run", action="store_true", help="print the command lines only")
    la.add_argument("--slurm", default=None, metavar="SCRIPT", help="write a SLURM job-array script instead")
    la.add_argument("--gpus", type=int, default=None, help="SLURM: GPUs per run (default: --nproc)")
    la.add_argument("--time", default="04:00:00", help="SLURM: time limit per run")
    la.add_argument("--python", default=None, help="python executable of the runs (default: this one; SLURM: python)")

    co = sub.add_parser("collect", help="final validation loss of every run -> one CSV")
    co.add_argument("--plan", required=True)
    co.add_argument("--out", required=True, help="sweep directory")
    co.add_argument("--csv", default=None, help="CSV to write (default OUT/results.csv)")

    fi = sub.add_parser("fit", help="IsoFLOP minima, power laws, multiplier, parametric law, bootstrap intervals")
    fi.add_argument("--csv", required=True)
    fi.add_argument("--output", default=None, help="JSON to write (default: fit.json beside the CSV)")
    fi.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    fi.add_argument("--seed", type=int, default=0)
    fi.add_argument("--no-parametric", action="store_true",
                    help="skip the L(N, D) fit (and with it E and the multiplier's law)")
    fi.add_argument("--flops", choices=["6nd", "full"], default="6nd",
                    help="compute as 6·N·D (default, the papers') or the full count with attention and output layer")

    pl = sub.add_parser("plot", help="IsoFLOP curves and frontiers, MDM and ARM on one PNG")
    pl.add_argument("--csv", required=True)
    pl.add_argument("--fit", default=None, help="fit JSON from `fit` (default: fit.json beside the CSV, else fit now)")
    pl.add_argument("--output", default=None, help="PNG to write (default: scaling.png beside the CSV)")
    pl.add_argument("--title", default=None)
    return p


def _plan(args) -> None:
    from megatron_mdm.sweep.plan import Plan, describe, make_plan, parse_shape, preset_shape, rule_shape

    shapes = [preset_shape(n) for n in args.presets]
    shapes += [rule_shape(w, args.aspect, args.head_dim) for w in args.widths]
    shapes += [parse_shape(s, args.head_dim) for s in args.shapes]
    plan = make_plan(args.budgets, shapes, args.objectives, args.seq_length, args.global_batch_size,
                     args.micro_batch_size, args.config, shlex.split(args.train_args), args.per_budget, args.ratio,
                     args.min_iters, args.tolerance, args.tag, shlex.split(args.run_args),
                     min_shapes=1 if args.append else 3)
    if args.append:
        plan = Plan.load(args.output).extend(plan)
        plan.check_curves()
    path = plan.save(args.output)
    print(describe(plan))
    print(f"wrote {path}")


def _launch(args) -> None:
    from megatron_mdm.sweep.launch import launch_local, local_command, write_slurm
    from megatron_mdm.sweep.plan import Plan, PlanError

    plan = Plan.load(args.plan)
    if args.part:
        try:
            i, n = (int(x) for x in args.part.split("/"))
        except ValueError:
            raise PlanError(f"--part {args.part!r}: expected I/N, e.g. 1/2") from None
        if not 1 <= i <= n:
            raise PlanError(f"--part {args.part}: I must be between 1 and N")
        mine = plan.partition(n)[i - 1]
        args.only = [r for r in mine if args.only is None or r in args.only]
    if args.slurm:
        path = write_slurm(plan, args.out, args.slurm, args.nproc, args.gpus, args.time, args.python or "python",
                           args.repo)
        print(f"wrote {path}: sbatch {path}  ({len(plan.runs)} array tasks)")
        return
    if args.dry_run:
        for run in plan.runs:
            if args.only is None or run.name in args.only:
                print(shlex.join(local_command(plan, run, args.out, args.nproc, args.python, args.nice)))
        return
    res = launch_local(plan, args.out, args.nproc, args.python, args.repo, args.nice, args.max_runs,
                       args.keep_going, args.only)
    print(f"trained {len(res['trained'])}, skipped {len(res['skipped'])} (finished), failed {len(res['failed'])}")
    if res["failed"]:
        raise SystemExit(1)


def _collect(args) -> None:
    from megatron_mdm.sweep.collect import collect, write_csv
    from megatron_mdm.sweep.plan import Plan

    rows = collect(Plan.load(args.plan), args.out)
    path = write_csv(rows, args.csv or Path(args.out) / "results.csv")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "incomplete", "missing")}
    print(f"wrote {path}: {len(rows)} runs ({', '.join(f'{v} {k}' for k, v in counts.items())})")


def _fit(args) -> dict:
    from megatron_mdm.sweep.collect import read_csv
    from megatron_mdm.sweep.fit import fit_sweep, summary

    fit = fit_sweep(read_csv(args.csv), bootstrap=args.bootstrap, seed=args.seed, parametric=not args.no_parametric,
                    flops=args.flops)
    out = Path(args.output or Path(args.csv).with_name("fit.json"))
    out.write_text(json.dumps(fit, indent=1) + "\n", encoding="utf-8")
    print(summary(fit))
    print(f"wrote {out}")
    return fit


def _plot(args) -> None:
    from megatron_mdm.sweep.collect import read_csv
    from megatron_mdm.sweep.fit import fit_sweep
    from megatron_mdm.sweep.plot import plot_sweep

    rows = read_csv(args.csv)
    fit_path = Path(args.fit) if args.fit else Path(args.csv).with_name("fit.json")
    if fit_path.is_file():
        fit = json.loads(fit_path.read_text(encoding="utf-8"))
    elif args.fit:
        raise FileNotFoundError(f"{fit_path}: no such fit file (write it with `mdm-sweep fit`)")
    else:
        fit = fit_sweep(rows, bootstrap=0)
    out = plot_sweep(rows, fit, args.output or Path(args.csv).with_name("scaling.png"), args.title)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"plan": _plan, "launch": _launch, "collect": _collect, "fit": _fit, "plot": _plot}[args.command](args)
    except (UserError, FileNotFoundError) as e:
        return report("mdm-sweep", f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
