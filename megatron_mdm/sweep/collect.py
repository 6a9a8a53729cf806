"""Collect a sweep: the final validation loss of each run (from its ``metrics.jsonl``) into one CSV.

One row per run of the plan: its budget, objective, shape, N, D, C = 6·N·D, the iteration and value
of its last validation loss, the last logged training loss, and a status: ``done`` (the last
validation is at the run's final iteration), ``incomplete`` (the run stopped earlier) or ``missing``
(no metrics yet). ``fit`` uses the ``done`` rows.

From the run's ``config.yaml`` (once it started): its learning rate and seed, the padded output-layer
size, ``flops_full`` (:func:`full_flops`: the 6·N·D of the blocks plus attention scores and the output
layer) and ``epochs``, the training tokens over the tokens of its training data (the manifests of
``--data-path``). ``tag`` names a variant run (seed or learning-rate check; '' for the main grid).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from megatron_mdm.checkpoint import layout
from megatron_mdm.sweep.curves import RunError, read_metrics
from megatron_mdm.sweep.launch import run_dir
from megatron_mdm.sweep.plan import Plan

COLUMNS = ("name", "objective", "budget", "shape", "num_layers", "hidden_size", "non_embedding_params", "iters",
           "tokens", "flops", "val_iteration", "val_loss", "train_loss", "status", "tag", "lr", "seed", "seq_length",
           "vocab_size", "flops_full", "epochs")


def full_flops(n: float, num_layers: int, hidden: int, seq_length: int, vocab: int, tokens: float) -> float:
    """Training FLOPs with attention and the output layer: 3 (forward + backward) x tokens x
    (2·N for the blocks' matrices + 4·L·s·d for the attention scores QK^T and their weighted sum over all s
    positions + 2·d·V for the output layer). The input embedding is a lookup (no FLOPs). Every position
    attends to all s for both objectives, the convention of Hoffmann et al. (2022, appendix F) for causal
    models too, and what the kernels here compute."""
    return 3.0 * tokens * (2.0 * n + 4.0 * num_layers * seq_length * hidden + 2.0 * hidden * vocab)


def _run_config(d: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(layout.config_file(d).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _train_tokens(data_path: list) -> int | None:
    """Tokens of the training data of ``--data-path`` (sum over its prepared datasets), or None."""
    from megatron_mdm.config import ConfigError, parse_data_path
    from megatron_mdm.data import format as fmt

    try:
        return sum(int(fmt.read_manifest(p)["num_tokens"]) for _, p in parse_data_path(list(data_path)))
    except (ConfigError, OSError, KeyError, ValueError, TypeError):
        return None


def collect(plan: Plan, out: str | Path) -> list[dict]:
    """One dict per run of the plan (keys: COLUMNS)."""
    rows = []
    for run in plan.runs:
        row = {"name": run.name, "objective": run.objective, "budget": run.budget, "shape": run.shape,
               "num_layers": run.model.get("num_layers"), "hidden_size": run.model.get("hidden_size"),
               "non_embedding_params": run.non_embedding_params, "iters": run.iters, "tokens": run.tokens,
               "flops": run.flops, "val_iteration": None, "val_loss": None, "train_loss": None,
               "status": "missing", "tag": run.tag, "seq_length": plan.seq_length}
        cfg = _run_config(run_dir(out, run))
        if cfg:
            model, div = cfg.get("model", {}), cfg.get("model", {}).get("make_vocab_size_divisible_by") or 1
            row["lr"] = cfg.get("optim", {}).get("lr")
            row["seed"] = cfg.get("logging", {}).get("seed")
            if model.get("vocab_size"):
                row["vocab_size"] = -(-int(model["vocab_size"]) // div) * div
                row["flops_full"] = full_flops(run.non_embedding_params, run.model["num_layers"],
                                               run.model["hidden_size"], plan.seq_length, row["vocab_size"], run.tokens)
            data_tokens = _train_tokens(cfg.get("data", {}).get("data_path") or [])
            row["epochs"] = run.tokens / data_tokens if data_tokens else None
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
    """Rows of a collected CSV with numbers parsed (empty cells -> None); ``_line`` is each row's line.

    Raises:
        RunError: no such file, not a sweep CSV, or a cell that is not a number (the message names its line,
            run and column).
    """
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no such file (write it with `mdm-sweep collect`)")
    ints = {"num_layers", "hidden_size", "non_embedding_params", "iters", "tokens", "val_iteration", "seed",
            "seq_length", "vocab_size"}
    floats = {"budget", "flops", "val_loss", "train_loss", "lr", "flops_full", "epochs"}
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"objective", "budget", "non_embedding_params", "tokens", "val_loss"} - set(reader.fieldnames or [])
        if missing:
            raise RunError(f"{path}: not a sweep CSV (no column {', '.join(sorted(missing))})")
        for r in reader:
            out: dict = {"_line": reader.line_num}
            for k, v in r.items():
                if k is None or v is None:  # a row with more or fewer cells than the header
                    raise RunError(f"{path}: line {reader.line_num} ({r.get('name') or 'unnamed run'}): not "
                                   f"{len(reader.fieldnames)} cells as the header has")
                v = v.strip()
                try:
                    if v == "":
                        out[k] = None
                    elif k in ints:  # counts; a non-integral one (a synthetic sweep) stays a float
                        x = float(v)
                        out[k] = int(x) if x.is_integer() else x
                    elif k in floats:
                        out[k] = float(v)
                    else:
                        out[k] = v
                except ValueError:
                    raise RunError(f"{path}: line {reader.line_num} ({r.get('name') or 'unnamed run'}): column {k}: "
                                   f"{v!r} is not a number") from None
            rows.append(out)
    return rows
