"""Which collected runs a fit may use, what is wrong with the others, and the variant runs beside the grid.

* :func:`screen_rows`: finished runs (status ``done``) with a validation loss. A loss that is not a positive
  finite number, or a run without N or tokens, is left out with one warning line naming the run; a run whose
  6·N·D misses its budget by more than the plan's tolerance (tokens that disagree with budget / 6N) is kept
  and named in a warning.
* :func:`variant_checks`: tagged runs (``mdm-sweep plan --tag``: a second seed, other learning rates) against
  the main grid's run of the same objective, budget and shape: the loss differences, their spread (for a
  seed, the run-to-run noise: rms of the differences / sqrt 2) and each group's own IsoFLOP minimum.
"""

from __future__ import annotations

import math

import numpy as np

from megatron_mdm.sweep.isoflop import FitError, isoflop_minimum

BUDGET_TOLERANCE = 0.05  # as the plan's default --tolerance


def where(row: dict) -> str:
    """How a warning names a row: its CSV line and run name."""
    line = f"line {row['_line']}" if row.get("_line") is not None else "row"
    return f"{line} ({row.get('name') or 'unnamed run'})"


def _positive(x) -> bool:
    try:
        return math.isfinite(float(x)) and float(x) > 0
    except (TypeError, ValueError):
        return False


def screen_rows(rows: list[dict], tolerance: float = BUDGET_TOLERANCE) -> tuple[list[dict], list[str]]:
    """(the rows a fit can use, one warning per row left out or suspicious); see the module docstring."""
    usable, warnings = [], []
    for r in rows:
        if r.get("status", "done") != "done" or r.get("val_loss") is None:
            continue
        if not _positive(r["val_loss"]):
            warnings.append(f"{where(r)}: val_loss {r['val_loss']} is not a positive number; left out")
            continue
        bad = [k for k in ("budget", "non_embedding_params", "tokens") if not _positive(r.get(k))]
        if bad:
            warnings.append(f"{where(r)}: no positive {', '.join(bad)}; left out")
            continue
        err = 6.0 * float(r["non_embedding_params"]) * float(r["tokens"]) / float(r["budget"]) - 1.0
        if abs(err) > tolerance:
            warnings.append(f"{where(r)}: 6·N·D = {6.0 * r['non_embedding_params'] * r['tokens']:.4g} is {err:+.1%} "
                            f"off its budget {float(r['budget']):.4g} (its tokens disagree with budget / 6N)")
        usable.append(r)
    return usable, warnings


def main_rows(rows: list[dict]) -> list[dict]:
    """The main grid: usable rows without a tag."""
    return [r for r in screen_rows(rows)[0] if not r.get("tag")]


def _minimum(rows: list[dict]) -> dict | None:
    try:
        m = isoflop_minimum([r["non_embedding_params"] for r in rows], [r["val_loss"] for r in rows],
                            float(rows[0]["budget"]))
    except FitError:
        return None
    return {"n_opt": m.n_opt, "loss_opt": m.loss_opt, "inside": m.inside}


def variant_checks(rows: list[dict]) -> list[dict]:
    """One entry per (tag, objective, budget) of the tagged rows (see the module docstring)."""
    main = {(r["objective"], float(r["budget"]), r.get("shape")): r for r in rows if not r.get("tag")}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("tag"):
            groups.setdefault((r["tag"], r["objective"], float(r["budget"])), []).append(r)
    out = []
    for (tag, obj, c), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        group = sorted(group, key=lambda r: r["non_embedding_params"])
        pairs = [{"shape": r.get("shape"), "n": r["non_embedding_params"], "main": main[k]["val_loss"],
                  "variant": r["val_loss"], "diff": r["val_loss"] - main[k]["val_loss"]}
                 for r in group if (k := (obj, c, r.get("shape"))) in main]
        base = [main[(obj, c, r.get("shape"))] for r in group if (obj, c, r.get("shape")) in main]
        diffs = np.array([p["diff"] for p in pairs])
        entry = {"tag": tag, "objective": obj, "budget": c, "lr": _one(group, "lr"), "seed": _one(group, "seed"),
                 "main_lr": _one(base, "lr"), "main_seed": _one(base, "seed"), "pairs": pairs,
                 "mean_diff": float(diffs.mean()) if len(diffs) else None,
                 "sd_diff": float(diffs.std(ddof=1)) if len(diffs) > 1 else None,
                 "minimum": _minimum(group) if len(group) >= 3 else None,
                 "main_minimum": _minimum(base) if len(base) >= 3 else None}
        same_lr = entry["lr"] is not None and entry["lr"] == entry["main_lr"]
        if same_lr and entry["seed"] != entry["main_seed"] and entry["sd_diff"] is not None:
            # one run's loss: a difference of two seeds has mean 0 and variance 2 sd^2
            entry["noise_sd"] = float(math.sqrt(np.mean(diffs ** 2) / 2))
        out.append(entry)
    return out


def _one(rows: list[dict], key: str):
    vals = {r.get(key) for r in rows}
    return vals.pop() if len(vals) == 1 else None
