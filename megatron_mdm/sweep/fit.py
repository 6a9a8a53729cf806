r"""All scaling-law fits of a collected sweep, with intervals from one bootstrap over the whole pipeline.

Per objective (the untagged runs; ``checks``): the IsoFLOP minima and the power laws of N*, D*, L* and
L* - E in C (``isoflop``), and the parametric law L(N, D) = E + A/N^α + B/D^β (``parametric``), whose E
is the irreducible loss. With both objectives, the MDM/ARM compute multiplier at each ARM budget
(``multiplier``) two ways side by side: from the laws of L* - E (``law``) and read off the measured
frontiers where they overlap (``measured``), each marked interpolated or extrapolated, with the trend
of each; and, for comparison, the pure power laws L* = k·C^γ (``pure``, biased when E > 0).

Compute: ``flops="6nd"`` (C = 6·N·D, the papers' count) or ``"full"`` (attention and output layer too,
``collect.full_flops``), for every law in C and the multiplier.

Intervals: 95 % percentile bootstrap (``bootstrap``): the runs of each (objective, budget) are resampled
with replacement, and every step above is redone on each resample (minima, the parametric fit for E,
the power laws, both multipliers, their trends), so E's uncertainty reaches the multiplier. A quantity's
interval uses the resamples where it could be computed; a law needs the same budgets to have minima as in
the point estimate.
"""

from __future__ import annotations

import math

import numpy as np

from megatron_mdm.sweep import multiplier as mult
from megatron_mdm.sweep.bootstrap import bootstrap_distribution, interval
from megatron_mdm.sweep.checks import screen_rows, variant_checks
from megatron_mdm.sweep.isoflop import FitError, isoflop_fit, reducible_law
from megatron_mdm.sweep.parametric import HUBER_DELTA, KEYS, parametric_fit

__all__ = ["FitError", "fit_sweep", "summary"]

NAN = math.nan


def _parametric(rows: list[dict], starts=None) -> dict:
    if len({r["non_embedding_params"] for r in rows}) < 2 or len({r["tokens"] for r in rows}) < 2:
        raise FitError("the parametric law needs at least 2 sizes and 2 token counts")
    return parametric_fit([r["non_embedding_params"] for r in rows], [r["tokens"] for r in rows],
                          [r["val_loss"] for r in rows], starts=starts)


def estimate(rows: list[dict], flops: str = "6nd", parametric: bool = True, starts: dict | None = None) -> dict:
    """The point estimates of every fit on ``rows`` (one objective's or both; untagged, screened)."""
    est: dict = {"objectives": {}}
    for obj in sorted({r["objective"] for r in rows}):
        mine = [r for r in rows if r["objective"] == obj]
        e: dict = {"iso": isoflop_fit(mine, flops), "par": None, "par_error": None, "reducible": None,
                   "reducible_error": None}
        if parametric:
            try:
                e["par"] = _parametric(mine, None if starts is None else starts.get(obj))
            except FitError as err:
                e["par_error"] = str(err)
        if "loss_opt" in e["iso"] and e["par"] is not None:
            try:
                e["reducible"] = reducible_law(e["iso"]["minima"], e["par"]["E"])
            except FitError as err:
                e["reducible_error"] = str(err)
        est["objectives"][obj] = e
    o = est["objectives"]
    if "arm" in o and "mdm" in o and "loss_opt" in o["arm"]["iso"] and "loss_opt" in o["mdm"]["iso"]:
        est["multiplier"] = _multiplier(o["arm"], o["mdm"])
    return est


def _multiplier(arm: dict, mdm: dict) -> dict:
    a_min, m_min = arm["iso"]["minima"], mdm["iso"]["minima"]
    m_c, m_l = [m.compute for m in m_min], [m.loss_opt for m in m_min]
    pure = {k: (0.0, *x["iso"]["loss_opt"]) for k, x in (("arm", arm), ("mdm", mdm))}
    law = None
    if arm["reducible"] and mdm["reducible"]:
        law = {k: (x["par"]["E"], *x["reducible"]) for k, x in (("arm", arm), ("mdm", mdm))}
    rows = []
    for m in a_min:
        c = m.compute
        row = {"budget": m.budget, "compute": c, "loss": m.loss_opt, "interpolated": mult.in_range(m.loss_opt, m_l),
               "measured_mdm_compute": mult.measured_compute(m.loss_opt, m_c, m_l),
               "pure_loss": mult.law_loss(c, pure["arm"])}
        row["pure_mdm_compute"] = mult.law_compute(row["pure_loss"], pure["mdm"])
        if law:
            row["law_loss"] = mult.law_loss(c, law["arm"])
            row["law_mdm_compute"] = mult.law_compute(row["law_loss"], law["mdm"])
            row["law_interpolated"] = mult.in_range(row["law_loss"], m_l)
        for k in ("measured", "pure", "law"):
            if f"{k}_mdm_compute" in row:
                row[f"{k}_multiplier"] = row[f"{k}_mdm_compute"] / c
        rows.append(row)
    cs = [r["compute"] for r in rows]
    out = {"budgets": rows, "E": {k: v[0] for k, v in law.items()} if law else None,
           "trend": {k: mult.trend(cs, [r.get(f"{k}_multiplier", NAN) for r in rows]) for k in ("law", "pure")}}
    measured = [r for r in rows if math.isfinite(r["measured_multiplier"])]
    out["trend"]["measured"] = mult.trend([r["compute"] for r in measured],
                                          [r["measured_multiplier"] for r in measured])
    out["measured_budgets"] = [r["budget"] for r in measured]
    return out


def scalars(est: dict, ref: dict | None = None) -> dict[str, float]:
    """Every bootstrapped quantity of an estimate by name. With ``ref`` (the point estimate), the laws and
    trends of a resample count only when its minima sit at the same budgets as the reference's."""
    out: dict[str, float] = {}
    for obj, e in est["objectives"].items():
        minima = e["iso"]["minima"]
        for m in minima:
            out[f"{obj}/n_opt/{m.budget}"] = m.n_opt
            out[f"{obj}/loss_opt/{m.budget}"] = m.loss_opt
        budgets = [m.budget for m in minima]
        same = ref is None or (obj in ref["objectives"] and
                               budgets == [m.budget for m in ref["objectives"][obj]["iso"]["minima"]])
        if "n_opt" in e["iso"] and same:
            for key in ("n_opt", "d_opt", "loss_opt"):
                out[f"{obj}/{key}_exponent"] = e["iso"][key][0]
        if e["reducible"] and same:
            out[f"{obj}/reducible_exponent"] = e["reducible"][0]
        if e["par"]:
            for k in KEYS:
                out[f"{obj}/par/{k}"] = e["par"][k]
    m = est.get("multiplier")
    if m:
        arms = [r["budget"] for r in m["budgets"]]
        same = ref is None or ("multiplier" in ref and arms == [r["budget"] for r in ref["multiplier"]["budgets"]])
        for r in m["budgets"]:
            for k in ("law", "measured", "pure"):
                if f"{k}_multiplier" in r:
                    out[f"mult/{k}/{r['budget']}"] = r[f"{k}_multiplier"]
        if same:
            for k in ("law", "pure"):
                out[f"mult/{k}/trend"] = m["trend"][k]
            if ref is None or m["measured_budgets"] == ref["multiplier"]["measured_budgets"]:
                out["mult/measured/trend"] = m["trend"]["measured"]
    return {k: float(v) for k, v in out.items()}


def fit_sweep(rows: list[dict], bootstrap: int = 200, seed: int = 0, parametric: bool = True,
              flops: str = "6nd") -> dict:
    """All fits of a collected sweep (rows as from ``collect.read_csv``), with bootstrap intervals.

    Returns a JSON-serialisable dict: ``warnings`` (rows left out or suspicious), per objective the minima,
    exponents and the parametric law, with both objectives the ``multiplier``, and ``checks`` (the tagged
    variant runs: seeds, learning rates).
    """
    usable, warnings = screen_rows(rows)
    main = [r for r in usable if not r.get("tag")]
    if not main:
        raise FitError("no finished runs with a validation loss to fit")
    point = estimate(main, flops, parametric)
    ref = scalars(point)
    keys = list(ref)
    starts = {o: e["par"]["theta"] for o, e in point["objectives"].items() if e["par"]}
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(main):
        strata.setdefault((r["objective"], float(r["budget"])), []).append(i)

    def statistic(idx) -> list[float]:
        got = scalars(estimate([main[i] for i in idx], flops, parametric, starts), point)
        return [got.get(k, NAN) for k in keys]

    dist = bootstrap_distribution(list(strata.values()), statistic, bootstrap, seed)
    samples = {k: (dist[:, j] if len(dist) else np.zeros(0)) for j, k in enumerate(keys)}

    def est(key: str) -> dict:
        return {"value": ref.get(key), "ci": interval(samples[key]) if key in samples else None}

    def used(key: str) -> int:
        return int(np.isfinite(samples[key]).sum()) if key in samples else 0

    result: dict = {"flops": flops, "bootstrap": bootstrap, "seed": seed, "huber_delta": HUBER_DELTA,
                    "warnings": warnings, "objectives": {}}
    for obj, e in point["objectives"].items():
        iso = e["iso"]
        entry: dict = {
            "runs": sum(r["objective"] == obj for r in main),
            "budgets": [{"budget": m.budget, "compute": m.compute, "n_points": m.n_points, "n_opt": m.n_opt,
                         "d_opt": m.d_opt, "loss_opt": m.loss_opt, "inside": m.inside, "coef": list(m.coef),
                         "n_opt_ci": est(f"{obj}/n_opt/{m.budget}")["ci"],
                         "loss_opt_ci": est(f"{obj}/loss_opt/{m.budget}")["ci"]} for m in iso["minima"]],
            "problems": list(iso["problems"]),
            "bootstrap_used": used(f"{obj}/n_opt_exponent"),
        }
        if "n_opt" in iso:
            for key in ("n_opt", "d_opt", "loss_opt"):
                entry[f"{key}_exponent"] = est(f"{obj}/{key}_exponent")
                entry[f"{key}_coef"] = iso[key][1]
            entry["exponent_sum"] = iso["n_opt"][0] + iso["d_opt"][0]
        if e["reducible"]:
            entry["reducible_exponent"] = est(f"{obj}/reducible_exponent")
            entry["reducible_coef"] = e["reducible"][1]
        elif e["reducible_error"]:
            entry["problems"].append(e["reducible_error"])
        if e["par"]:
            entry["parametric"] = {k: est(f"{obj}/par/{k}") for k in KEYS}
            entry["parametric"].update(objective=e["par"]["objective"], optimizer=e["par"]["optimizer"],
                                       bootstrap_used=used(f"{obj}/par/E"))
        elif e["par_error"]:
            entry["parametric"] = {"error": e["par_error"]}
        result["objectives"][obj] = entry
    m = point.get("multiplier")
    if m:
        budgets = []
        for r in m["budgets"]:
            row = {k: v for k, v in r.items() if not k.endswith("_multiplier")}
            for k in ("law", "measured", "pure"):
                if f"{k}_multiplier" in r:
                    v = r[f"{k}_multiplier"]
                    row[k] = {"value": v if math.isfinite(v) else None,
                              "ci": interval(samples.get(f"mult/{k}/{r['budget']}", []))}
            budgets.append(row)
        result["multiplier"] = {
            "budgets": budgets, "E": m["E"], "measured_budgets": m["measured_budgets"],
            "trend": {k: {"value": m["trend"][k] if math.isfinite(m["trend"][k]) else None,
                          "ci": interval(samples.get(f"mult/{k}/trend", []))} for k in ("law", "measured", "pure")},
            "bootstrap_used": {k: used(f"mult/{k}/trend") for k in ("law", "measured", "pure")},
        }
    result["checks"] = variant_checks(usable)
    return _finite(result)


def _finite(x):
    """NaN and infinities as None (valid JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---- text ------------------------------------------------------------------------------------------


def _fmt(e: dict | None, spec: str = ".3f") -> str:
    if not e or e.get("value") is None:
        return "n/a"
    ci = e.get("ci")
    return f"{e['value']:{spec}}" + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else " [no interval]")


def summary(fit: dict) -> str:
    """The fit as text for the terminal and docs."""
    count = "C = 6·N·D" if fit.get("flops", "6nd") == "6nd" else "C = full FLOPs (attention and output layer too)"
    lines = [f"compute: {count}; bootstrap: {fit['bootstrap']} resamples of the whole fit, 95% percentile "
             "intervals in brackets"]
    lines += [f"warning: {w}" for w in fit.get("warnings", [])]
    for obj, e in fit["objectives"].items():
        lines.append(f"{obj.upper()} ({e['runs']} runs)")
        for b in e["budgets"]:
            flag = "" if b["inside"] else "  (vertex outside the sampled sizes: extrapolated)"
            comp = "" if b["compute"] == b["budget"] else f" (C={b['compute']:.3g})"
            lines.append(f"  budget {b['budget']:.3g}{comp}: N*={b['n_opt']:.4g} D*={b['d_opt']:.4g} "
                         f"L*={b['loss_opt']:.4f}{flag}")
        for p in e["problems"]:
            lines.append(f"  {p}")
        if "n_opt_exponent" in e:
            lines.append(f"  N* ~ C^a, a = {_fmt(e['n_opt_exponent'])}; D* ~ C^b, b = {_fmt(e['d_opt_exponent'])}; "
                         f"L* ~ C^gamma, gamma = {_fmt(e['loss_opt_exponent'], '.4f')}")
        par = e.get("parametric")
        if par and "error" not in par:
            if "reducible_exponent" in e:
                lines.append(f"  L* - E ~ C^gamma', gamma' = {_fmt(e['reducible_exponent'], '.4f')} "
                             f"(E = {par['E']['value']:.4f} from the parametric law)")
            lines.append(f"  L(N,D) = E + A/N^alpha + B/D^beta: E = {_fmt(par['E'])}, alpha = {_fmt(par['alpha'])}, "
                         f"beta = {_fmt(par['beta'])}, A = {par['A']['value']:.4g}, B = {par['B']['value']:.4g}; "
                         f"implied a = {_fmt(par['n_opt_exponent'])}, b = {_fmt(par['d_opt_exponent'])}")
        elif par:
            lines.append(f"  parametric fit: {par['error']}")
    m = fit.get("multiplier")
    if m:
        lines.append("compute multiplier of MDM over ARM at equal loss, at each ARM budget (ARM minimum -> MDM compute):")
        lines.append("  law: L* - E power laws (E from each parametric fit); measured: interpolated on the measured "
                     "MDM minima; pure: L* power laws (E = 0, biased when E > 0)")
        for b in m["budgets"]:
            mark = "interpolated" if b["interpolated"] else "extrapolated"
            parts = [f"{k} {_fmt(b.get(k), '.3g')}" for k in ("law", "measured", "pure") if b.get(k)]
            lines.append(f"  C={b['compute']:.3g}: L*_ARM={b['loss']:.4f} ({mark}): " + "; ".join(parts))
        lines.append("  trend d ln(multiplier) / d ln C (0: constant gap): " + "; ".join(
            f"{k} {_fmt(m['trend'][k])}" for k in ("law", "measured", "pure")) +
            f" (measured over {len(m['measured_budgets'])} budget(s))")
    for c in fit.get("checks", []):
        what = f"lr {c['lr']:g} vs {c['main_lr']:g}" if c["lr"] != c["main_lr"] and c["lr"] is not None \
            else f"seed {c['seed']} vs {c['main_seed']}"
        diffs = ", ".join(f"{p['shape']} {p['diff']:+.3f}" for p in c["pairs"])
        line = f"check {c['tag']} ({c['objective'].upper()} at {c['budget']:.3g}; {what}): loss - main: {diffs}"
        if c.get("noise_sd") is not None:
            line += f"; noise sd of one run {c['noise_sd']:.4f}"
        if c.get("minimum") and c.get("main_minimum"):
            line += (f"; minimum N*={c['minimum']['n_opt']:.4g} L*={c['minimum']['loss_opt']:.4f} vs main "
                     f"N*={c['main_minimum']['n_opt']:.4g} L*={c['main_minimum']['loss_opt']:.4f}")
        lines.append(line)
    return "\n".join(lines)
