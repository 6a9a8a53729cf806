r"""Scaling-law fits of a collected sweep, with bootstrap intervals.

IsoFLOP approach (Hoffmann et al. 2022, approach 2; the scaling paper's method), per objective:

* per budget C, a parabola through (ln N, L) of its runs: L ≈ p2·x² + p1·x + p0, x = ln N. Its vertex
  gives N*(C) = exp(-p1 / 2p2), L*(C) = p0 - p1² / 4p2 and D*(C) = C / (6·N*(C));
* power laws by least squares in log-log: N* = k_N·C^a, D* = k_D·C^b, L* = k_L·C^γ (γ < 0).

Compute multiplier of MDM over ARM at equal loss: for an ARM budget C with frontier loss L = L*_ARM(C),
the MDM needs C_MDM(L) = (L / k_L,MDM)^(1/γ_MDM); multiplier m(C) = C_MDM(L*_ARM(C)) / C. Its trend is
d ln m / d ln C = γ_ARM / γ_MDM - 1 (0: a constant multiplier, > 0: a gap growing with scale).

Parametric approach (approach 3): L(N, D) = E + A / N^α + B / D^β fitted on all runs of an objective by
minimising the Huber loss (δ = 1e-3) of log-residuals, ``lse(a - α ln N, b - β ln D, e) - ln L`` with
A = e^a, B = e^b, E = e^e, from the best points of a grid of starts (L-BFGS-B from scipy when installed,
else a Nelder-Mead in numpy). It implies N_opt = G·(C/6)^(β/(α+β)), D_opt = G⁻¹·(C/6)^(α/(α+β)) with
G = (αA / βB)^(1/(α+β)).

Intervals: percentile bootstrap (2.5 %, 97.5 %) over runs resampled with replacement (within each budget
for the IsoFLOP approach; over all runs of the objective for the parametric fit). With a handful of runs
per budget the intervals are wide, and they are the honest statement of what the sweep can say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_mdm.errors import UserError

HUBER_DELTA = 1e-3
MIN_BUDGETS = 3  # IsoFLOP minima needed for the power laws (two points would fit any law exactly)


class FitError(UserError, ValueError):
    """Too few or unusable runs for a fit; the message says what is missing."""


# ---- IsoFLOP approach -----------------------------------------------------------------------------


@dataclass
class IsoflopMinimum:
    """The parabola of one budget and its vertex."""

    budget: float
    coef: tuple[float, float, float]  # p2, p1, p0 of L = p2 x² + p1 x + p0, x = ln N
    n_opt: float
    d_opt: float
    loss_opt: float
    inside: bool  # the vertex lies within the sampled range of N (else it is an extrapolation)
    n_points: int


def isoflop_minimum(n: np.ndarray, loss: np.ndarray, budget: float) -> IsoflopMinimum:
    """Least-squares parabola in ln N through one budget's runs, and its vertex.

    Raises:
        FitError: fewer than 3 distinct sizes, or a parabola that opens downwards (no minimum).
    """
    n, loss = np.asarray(n, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    x = np.log(n)
    if len(np.unique(x)) < 3:
        raise FitError(f"budget {budget:.3g}: {len(np.unique(x))} distinct sizes, a parabola needs 3")
    p2, p1, p0 = np.polyfit(x, loss, 2)
    if not p2 > 0:
        raise FitError(f"budget {budget:.3g}: the losses do not curve upwards in ln N (no IsoFLOP minimum)")
    xs = -p1 / (2 * p2)
    if not np.isfinite(xs) or abs(xs - x.mean()) > 20:  # e^20 = 5e8 times beyond the sampled sizes
        raise FitError(f"budget {budget:.3g}: the parabola is nearly flat, its vertex (ln N = {xs:.3g}) is far "
                       "outside the sampled sizes")
    n_opt = float(np.exp(xs))
    return IsoflopMinimum(budget=float(budget), coef=(float(p2), float(p1), float(p0)), n_opt=n_opt,
                          d_opt=float(budget / (6 * n_opt)), loss_opt=float(p0 - p1 * p1 / (4 * p2)),
                          inside=bool(x.min() <= xs <= x.max()), n_points=len(x))


def power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient · x^exponent, least squares in log-log."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise FitError("a power law needs finite positive values")
    lx, ly = np.log(x), np.log(y)
    if len(np.unique(lx)) < 2:
        raise FitError("a power law needs at least 2 distinct budgets")
    e, c = np.polyfit(lx, ly, 1)
    return float(e), float(np.exp(c))


def _groups(rows: list[dict]) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    by: dict[float, list] = {}
    for r in rows:
        by.setdefault(float(r["budget"]), []).append((r["non_embedding_params"], r["val_loss"]))
    return {c: (np.array([p[0] for p in v], dtype=np.float64), np.array([p[1] for p in v], dtype=np.float64))
            for c, v in sorted(by.items())}


def isoflop_fit(rows: list[dict]) -> dict:
    """Point estimates of one objective: per-budget minima and the N*, D*, L* power laws."""
    minima = []
    problems = []
    for c, (n, loss) in _groups(rows).items():
        try:
            minima.append(isoflop_minimum(n, loss, c))
        except FitError as e:
            problems.append(str(e))
    out: dict = {"minima": minima, "problems": problems}
    if len(minima) < MIN_BUDGETS:
        problems.append(f"IsoFLOP minima at {len(minima)} budget(s): the power laws need {MIN_BUDGETS}")
    else:
        cs = np.array([m.budget for m in minima])
        out["n_opt"] = power_law(cs, [m.n_opt for m in minima])
        out["d_opt"] = power_law(cs, [m.d_opt for m in minima])
        out["loss_opt"] = power_law(cs, [m.loss_opt for m in minima])
    return out


def multiplier(arm: dict, mdm: dict, budgets: list[float]) -> dict:
    """The MDM/ARM compute multiplier at equal loss at each ARM budget, and its trend exponent."""
    g_a, k_a = arm["loss_opt"]
    g_m, k_m = mdm["loss_opt"]
    out = []
    for c in budgets:
        loss = k_a * c ** g_a
        c_mdm = (loss / k_m) ** (1.0 / g_m)
        out.append({"budget": float(c), "loss": float(loss), "mdm_compute": float(c_mdm),
                    "multiplier": float(c_mdm / c)})
    return {"budgets": out, "trend": float(g_a / g_m - 1.0)}


# ---- parametric approach --------------------------------------------------------------------------


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    a = np.abs(r)
    val = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    grad = np.where(a <= delta, r, delta * np.sign(r))
    return val, grad


def _objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of the log-residuals and its gradient; theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])  # [3, k]
    m = terms.max(axis=0)
    w = np.exp(terms - m)
    s = w.sum(axis=0)
    lse = m + np.log(s)
    w /= s  # softmax weights of the three terms
    val, g = _huber(lse - ln_l, delta)
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * ln_n).sum(), -(g * w[1] * ln_d).sum()])
    return float(val.sum()), grad


def _grid() -> np.ndarray:
    a = np.arange(0.0, 30.0, 5.0)
    e = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    al = np.array([0.1, 0.3, 0.6, 1.0, 1.5])
    g = np.stack(np.meshgrid(a, a, e, al, al, indexing="ij"), -1).reshape(-1, 5)
    return g


def _nelder_mead(f, x0: np.ndarray, iters: int = 3000, tol: float = 1e-12) -> np.ndarray:
    """A plain Nelder-Mead simplex (the fallback when scipy is not installed)."""
    n = len(x0)
    simplex = [x0] + [x0 + np.eye(n)[i] * (0.1 if x0[i] == 0 else 0.1 * max(abs(x0[i]), 1.0)) for i in range(n)]
    vals = [f(x) for x in simplex]
    for _ in range(iters):
        order = np.argsort(vals)
        simplex, vals = [simplex[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + 1e-30):
            break
        centroid = np.mean(simplex[:-1], axis=0)
        xr = centroid + (centroid - simplex[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2 * (centroid - simplex[-1])
            fe = f(xe)
            simplex[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            simplex[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (simplex[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                simplex[-1], vals[-1] = xc, fc
            else:
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                vals = [vals[0]] + [f(x) for x in simplex[1:]]
    return simplex[int(np.argmin(vals))]


def have_scipy() -> bool:
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        return False
    return True


def parametric_fit(n, d, loss, delta: float = HUBER_DELTA, starts: np.ndarray | None = None, top: int = 10,
                   optimizer: str = "auto") -> dict:
    """Chinchilla's approach 3: E, A, B, alpha, beta of L(N, D) = E + A/N^alpha + B/D^beta.

    Args:
        n, d, loss: non-embedding parameters, training tokens and final loss of each run.
        starts: initial points (a, b, e, alpha, beta); default a grid, of which the ``top`` best by the
            objective are optimised.
        optimizer: ``lbfgs`` (scipy), ``nelder-mead`` (numpy) or ``auto`` (lbfgs when scipy is present).

    Returns:
        dict with E, A, B, alpha, beta, the objective value, the implied optimal-allocation exponents
        ``n_opt_exponent`` = beta/(alpha+beta) and ``d_opt_exponent`` = alpha/(alpha+beta), the optimizer used.
    """
    ln_n = np.log(np.asarray(n, dtype=np.float64))
    ln_d = np.log(np.asarray(d, dtype=np.float64))
    ln_l = np.log(np.asarray(loss, dtype=np.float64))
    if len(ln_l) < 5:
        raise FitError(f"the parametric law has 5 parameters; {len(ln_l)} runs are too few")
    if optimizer == "auto":
        optimizer = "lbfgs" if have_scipy() else "nelder-mead"
    cand = _grid() if starts is None else np.atleast_2d(np.asarray(starts, dtype=np.float64))
    if len(cand) > top:
        vals = np.array([_objective(t, ln_n, ln_d, ln_l, delta)[0] for t in cand])
        cand = cand[np.argsort(vals)[:top]]
    best_x, best_v = None, math.inf
    for x0 in cand:
        if optimizer == "lbfgs":
            from scipy.optimize import minimize

            res = minimize(_objective, x0, args=(ln_n, ln_d, ln_l, delta), jac=True, method="L-BFGS-B",
                           bounds=[(None, None), (None, None), (None, None), (0.0, 5.0), (0.0, 5.0)],
                           options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
            x, v = res.x, float(res.fun)
        elif optimizer == "nelder-mead":
            x = _nelder_mead(lambda t: _objective(t, ln_n, ln_d, ln_l, delta)[0], np.array(x0, dtype=np.float64))
            v = _objective(x, ln_n, ln_d, ln_l, delta)[0]
        else:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        if v < best_v:
            best_x, best_v = np.asarray(x), v
    a, b, e, alpha, beta = (float(t) for t in best_x)
    s = alpha + beta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
            "objective": best_v, "theta": [a, b, e, alpha, beta], "optimizer": optimizer,
            "n_opt_exponent": beta / s if s > 0 else float("nan"),
            "d_opt_exponent": alpha / s if s > 0 else float("nan")}


def parametric_loss(p: dict, n, d) -> np.ndarray:
    return p["E"] + p["A"] / np.asarray(n, dtype=np.float64) ** p["alpha"] + \
        p["B"] / np.asarray(d, dtype=np.float64) ** p["beta"]


# ---- everything, with intervals --------------------------------------------------------------------


def _interval(samples: list[float]) -> list[float] | None:
    xs = np.array([s for s in samples if s is not None and math.isfinite(s)])
    if len(xs) < 10:
        return None
    return [float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))]


def _est(value, samples) -> dict:
    return {"value": None if value is None else float(value), "ci": _interval(samples)}


def usable_rows(rows: list[dict]) -> list[dict]:
    """Rows of finished runs with a finite validation loss."""
    return [r for r in rows if r.get("status", "done") == "done" and r.get("val_loss") is not None
            and math.isfinite(float(r["val_loss"])) and r.get("non_embedding_params") and r.get("tokens")]


def fit_sweep(rows: list[dict], bootstrap: int = 200, seed: int = 0, parametric: bool = True,
              parametric_bootstrap: int | None = None, optimizer: str = "auto") -> dict:
    """All fits of a collected sweep (rows as from ``collect.read_csv``), with bootstrap intervals.

    Returns a JSON-serialisable dict: per objective the per-budget minima, the exponents a (N*), b (D*),
    gamma (L*) with coefficients, the parametric law; with both objectives the multiplier.
    """
    rows = usable_rows(rows)
    if not rows:
        raise FitError("no finished runs with a validation loss to fit")
    rng = np.random.default_rng(seed)
    objectives = sorted({r["objective"] for r in rows})
    result: dict = {"objectives": {}, "bootstrap": bootstrap, "seed": seed, "huber_delta": HUBER_DELTA}
    point: dict = {}
    boots: dict[str, list[dict]] = {}
    for obj in objectives:
        mine = [r for r in rows if r["objective"] == obj]
        est = isoflop_fit(mine)
        point[obj] = est
        by_budget: dict[float, list[dict]] = {}
        for r in mine:
            by_budget.setdefault(float(r["budget"]), []).append(r)
        samples = []
        for _ in range(bootstrap if "n_opt" in est else 0):
            res = [by_budget[c][i] for c in by_budget for i in rng.integers(0, len(by_budget[c]), len(by_budget[c]))]
            fb = isoflop_fit(res)
            samples.append(fb if "n_opt" in fb and len(fb["minima"]) == len(est["minima"]) else None)
        boots[obj] = samples
        ok = [s for s in samples if s is not None]
        entry: dict = {
            "runs": len(mine),
            "budgets": [{"budget": m.budget, "n_points": m.n_points, "n_opt": m.n_opt, "d_opt": m.d_opt,
                         "loss_opt": m.loss_opt, "inside": m.inside, "coef": list(m.coef),
                         "n_opt_ci": _interval([s["minima"][i].n_opt for s in ok]),
                         "loss_opt_ci": _interval([s["minima"][i].loss_opt for s in ok])}
                        for i, m in enumerate(est["minima"])],
            "problems": est["problems"],
            "bootstrap_used": len(ok),
        }
        if "n_opt" in est:
            for key in ("n_opt", "d_opt", "loss_opt"):
                entry[f"{key}_exponent"] = _est(est[key][0], [s[key][0] for s in ok])
                entry[f"{key}_coef"] = est[key][1]
            entry["exponent_sum"] = est["n_opt"][0] + est["d_opt"][0]
        if parametric:
            try:
                p = parametric_fit([r["non_embedding_params"] for r in mine], [r["tokens"] for r in mine],
                                   [r["val_loss"] for r in mine], optimizer=optimizer)
                starts = np.array(p["theta"])
                pb = []
                for _ in range(parametric_bootstrap if parametric_bootstrap is not None else bootstrap // 2):
                    idx = rng.integers(0, len(mine), len(mine))
                    sub = [mine[i] for i in idx]
                    if len({r["non_embedding_params"] for r in sub}) < 2 or len({r["tokens"] for r in sub}) < 2:
                        continue
                    pb.append(parametric_fit([r["non_embedding_params"] for r in sub], [r["tokens"] for r in sub],
                                             [r["val_loss"] for r in sub], starts=starts, optimizer=optimizer))
                entry["parametric"] = {k: _est(p[k], [q[k] for q in pb]) for k in
                                       ("E", "A", "B", "alpha", "beta", "n_opt_exponent", "d_opt_exponent")}
                entry["parametric"]["objective"] = p["objective"]
                entry["parametric"]["optimizer"] = p["optimizer"]
                entry["parametric"]["bootstrap_used"] = len(pb)
            except FitError as e:
                entry["parametric"] = {"error": str(e)}
        result["objectives"][obj] = entry
    if {"mdm", "arm"} <= set(objectives) and "loss_opt" in point["mdm"] and "loss_opt" in point["arm"]:
        budgets = [m.budget for m in point["arm"]["minima"]]
        mult = multiplier(point["arm"], point["mdm"], budgets)
        pairs = [(a, m) for a, m in zip(boots["arm"], boots["mdm"]) if a is not None and m is not None]
        mb = [multiplier(a, m, budgets) for a, m in pairs]
        lo_l = min(m.loss_opt for m in point["mdm"]["minima"])
        hi_l = max(m.loss_opt for m in point["mdm"]["minima"])
        for i, row in enumerate(mult["budgets"]):
            row["ci"] = _interval([x["budgets"][i]["multiplier"] for x in mb])
            row["extrapolated"] = not (lo_l <= row["loss"] <= hi_l)  # outside the MDM's measured L* range
        mult["trend"] = _est(mult["trend"], [x["trend"] for x in mb])
        result["multiplier"] = mult
    return result


def summary(fit: dict) -> str:
    """The fit as text for the terminal and docs."""
    def fmt(e: dict, spec: str = ".3f") -> str:
        if e.get("value") is None:
            return "n/a"
        ci = e.get("ci")
        return f"{e['value']:{spec}}" + (f" [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else " [no interval]")

    lines = [f"bootstrap: {fit['bootstrap']} resamples, 95% percentile intervals in brackets"]
    for obj, e in fit["objectives"].items():
        lines.append(f"{obj.upper()} ({e['runs']} runs)")
        for b in e["budgets"]:
            flag = "" if b["inside"] else "  (vertex outside the sampled sizes: extrapolated)"
            lines.append(f"  C={b['budget']:.3g}: N*={b['n_opt']:.4g} D*={b['d_opt']:.4g} L*={b['loss_opt']:.4f}{flag}")
        for p in e["problems"]:
            lines.append(f"  {p}")
        if "n_opt_exponent" in e:
            lines.append(f"  N* ~ C^a, a = {fmt(e['n_opt_exponent'])}; D* ~ C^b, b = {fmt(e['d_opt_exponent'])}; "
                         f"L* ~ C^gamma, gamma = {fmt(e['loss_opt_exponent'], '.4f')}")
        par = e.get("parametric")
        if par and "error" not in par:
            lines.append(f"  L(N,D) = E + A/N^alpha + B/D^beta: E = {fmt(par['E'])}, alpha = {fmt(par['alpha'])}, "
                         f"beta = {fmt(par['beta'])}, A = {par['A']['value']:.4g}, B = {par['B']['value']:.4g}; "
                         f"implied a = {fmt(par['n_opt_exponent'])}, b = {fmt(par['d_opt_exponent'])} "
                         f"({par['optimizer']})")
        elif par:
            lines.append(f"  parametric fit: {par['error']}")
    m = fit.get("multiplier")
    if m:
        lines.append("compute multiplier of MDM over ARM at equal loss (ARM budget -> loss L*_ARM -> MDM compute):")
        for b in m["budgets"]:
            ci = f" [{b['ci'][0]:.3g}, {b['ci'][1]:.3g}]" if b.get("ci") else ""
            ex = "  (extrapolated: beyond the MDM's measured losses)" if b.get("extrapolated") else ""
            lines.append(f"  C={b['budget']:.3g}: L={b['loss']:.4f}, MDM needs {b['mdm_compute']:.3g} = "
                         f"{b['multiplier']:.3g}x{ci}{ex}")
        lines.append(f"  trend d ln(multiplier) / d ln C = {fmt(m['trend'])} (0: constant gap)")
    return "\n".join(lines)
