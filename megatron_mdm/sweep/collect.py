"""Collect a sweep: the final validation loss of each run (from its ``metrics.jsonl``) into one CSV.

One row per run of the plan: its budget, objective, shape, N, D, C = 6·N·D, the iteration and value
of its last validation loss, the last logged training loss, and a status: ``done`` (the last
validation is at the run's final iteration), ``incomplete`` (the run stopped earlier) or ``missing``
(no metrics yet). ``fit`` uses the ``done`` rows.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from megatron_mdm.sweep.curves import RunError, read_metrics
from megatron_mdm.sweep.launch import run_dir
from megatron_mdm.sweep.plan import Plan

COLUMNS = ("name", "objective", "budget", "shape", "num_layers", "hidden_size", "non_embedding_params", "iters",
           "tokens", "flops", "val_iteration", "val_loss", "train_loss", "status")


def collect(plan: Plan, out: str | Path) -> list[dict]:
    """One dict per run of the plan (keys: COLUMNS)."""
    rows = []
    for run in plan.runs:
        row = {"name": run.name, "objective": run.objective, "budget": run.budget, "shape": run.shape,
               "num_layers": run.model.get("num_layers"), "hidden_size": run.model.get("hidden_size"),
               "non_embedding_params": run.non_embedding_params, "iters": run.iters, "tokens": run.tokens,
               "flops": run.flops, "val_iteration": None, "val_loss": None, "train_loss": None,
               "status": "missing"}
        try:
            train, val = read_metrics(run_dir(out, run))
        except RunError:
            rows.append(row)
            continue
        val = [r for r in val if isinstance(r.get("val_loss"), (int, float)) and math.isfinite(r["val_loss"])]
        if val:
            row["val_iteration"], row["val_loss"] = int(val[-1]["iteration"]), float(val[-1]["val_loss"])
        if train:
            row["train_loss"] = train[-1].get("loss")
        row["status"] = "done" if row["val_iteration"] == run.iters else "incomplete"
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in COLUMNS})
    return path


def read_csv(path: str | Path) -> list[dict]:
    """Rows of a collected CSV with numbers parsed (empty cells -> None)."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such file (write it with `mdm-sweep collect`)")
    ints = {"num_layers", "hidden_size", "non_embedding_params", "iters", "tokens", "val_iteration"}
    floats = {"budget", "flops", "val_loss", "train_loss"}
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"objective", "budget", "non_embedding_params", "tokens", "val_loss"} - set(reader.fieldnames or [])
        if missing:
            raise RunError(f"{path}: not a sweep CSV (no column {', '.join(sorted(missing))})")
        for r in reader:
            out = {}
            for k, v in r.items():
                if v in ("", None):
                    out[k] = None
                elif k in ints:
                    out[k] = int(float(v))
                elif k in floats:
                    out[k] = float(v)
                else:
                    out[k] = v
            rows.append(out)
    return rows
