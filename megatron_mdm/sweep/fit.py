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
A = e^a, B = e^b, E = e^e, from the best points of a grid of starts (``scipy.optimize.least_squares`` with
``loss="huber"``). It implies N_opt = G·(C/6)^(β/(α+β)), D_opt = G⁻¹·(C/6)^(α/(α+β)) with
G = (αA / βB)^(1/(α+β)).

Intervals: percentile bootstrap (2.5 %, 97.5 %; ``scipy.stats.bootstrap``) over runs resampled with
replacement (within each budget for the IsoFLOP approach; over all runs of the objective for the parametric
fit), over the resamples whose fit succeeded. With a handful of runs
per budget the intervals are wide, and they are the honest statement of what the sweep can say.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

HUBER_DELTA = 1e-3
MIN_BUDGETS = 3  # IsoFLOP minima needed for the power laws (two points would fit any law exactly)


class FitError(ValueError):
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

_LOWER = np.array([-np.inf, -np.inf, -np.inf, 0.0, 0.0])  # a, b, e free; 0 <= alpha, beta <= 5
_UPPER = np.array([np.inf, np.inf, np.inf, 5.0, 5.0])


def _terms(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])  # [3, k]


def _residuals(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray) -> np.ndarray:
    """Log-residuals ``lse(a - alpha ln N, b - beta ln D, e) - ln L``; theta = (a, b, e, alpha, beta)."""
    return special.logsumexp(_terms(theta, ln_n, ln_d), axis=0) - ln_l


def _jacobian(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray) -> np.ndarray:
    w = special.softmax(_terms(theta, ln_n, ln_d), axis=0)  # d lse / d term
    return np.stack([w[0], w[1], w[2], -w[0] * ln_n, -w[1] * ln_d], axis=1)  # [k, 5]


def huber_objective(theta, ln_n, ln_d, ln_l, delta: float = HUBER_DELTA) -> float:
    """Sum of the Huber losses (scipy.special.huber) of the log-residuals: Chinchilla's objective."""
    return float(special.huber(delta, _residuals(np.asarray(theta, dtype=np.float64), ln_n, ln_d, ln_l)).sum())


def _grid() -> np.ndarray:
    a = np.arange(0.0, 30.0, 5.0)
    e = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    al = np.array([0.1, 0.3, 0.6, 1.0, 1.5])
    g = np.stack(np.meshgrid(a, a, e, al, al, indexing="ij"), -1).reshape(-1, 5)
    return g


def parametric_fit(n, d, loss, delta: float = HUBER_DELTA, starts: np.ndarray | None = None, top: int = 10) -> dict:
    """Chinchilla's approach 3: E, A, B, alpha, beta of L(N, D) = E + A/N^alpha + B/D^beta.

    ``scipy.optimize.least_squares(loss="huber", f_scale=delta)`` on the log-residuals: its cost,
    0.5 r² for |r| <= delta and delta (|r| - delta/2) beyond, is the Huber loss of Hoffmann et al.
    (trust-region reflective, alpha and beta bounded to [0, 5]).

    Args:
        n, d, loss: non-embedding parameters, training tokens and final loss of each run.
        starts: initial points (a, b, e, alpha, beta); default a grid, of which the ``top`` best by the
            objective are optimised.

    Returns:
        dict with E, A, B, alpha, beta, the objective value, the implied optimal-allocation exponents
        ``n_opt_exponent`` = beta/(alpha+beta) and ``d_opt_exponent`` = alpha/(alpha+beta), the optimizer used.
    """
    ln_n = np.log(np.asarray(n, dtype=np.float64))
    ln_d = np.log(np.asarray(d, dtype=np.float64))
    ln_l = np.log(np.asarray(loss, dtype=np.float64))
    if len(ln_l) < 5:
        raise FitError(f"the parametric law has 5 parameters; {len(ln_l)} runs are too few")
    cand = _grid() if starts is None else np.atleast_2d(np.asarray(starts, dtype=np.float64))
    if len(cand) > top:
        r = special.logsumexp(np.stack([cand[:, :1] - cand[:, 3:4] * ln_n, cand[:, 1:2] - cand[:, 4:5] * ln_d,
                                        np.broadcast_to(cand[:, 2:3], (len(cand), len(ln_n)))]), axis=0) - ln_l
        vals = special.huber(delta, r).sum(axis=1)
        cand = cand[np.argsort(vals)[:top]]
    best_x, best_v = None, math.inf
    for x0 in cand:
        res = optimize.least_squares(_residuals, np.clip(x0, _LOWER, _UPPER), jac=_jacobian, bounds=(_LOWER, _UPPER),
                                     method="trf", loss="huber", f_scale=delta, args=(ln_n, ln_d, ln_l),
                                     ftol=1e-15, xtol=1e-15, gtol=1e-15, max_nfev=2000)
        v = huber_objective(res.x, ln_n, ln_d, ln_l, delta)
        if v < best_v:
            best_x, best_v = np.asarray(res.x), v
    a, b, e, alpha, beta = (float(t) for t in best_x)
    s = alpha + beta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
            "objective": best_v, "theta": [a, b, e, alpha, beta], "optimizer": "least_squares (huber, trf)",
            "n_opt_exponent": beta / s if s > 0 else float("nan"),
            "d_opt_exponent": alpha / s if s > 0 else float("nan")}


def parametric_loss(p: dict, n, d) -> np.ndarray:
    return p["E"] + p["A"] / np.asarray(n, dtype=np.float64) ** p["alpha"] + \
        p["B"] / np.asarray(d, dtype=np.float64) ** p["beta"]


# ---- everything, with intervals --------------------------------------------------------------------


def bootstrap_distribution(strata: list[list[int]], statistic, n_resamples: int, seed: int) -> np.ndarray:
    """The bootstrap distribution of ``statistic`` by ``scipy.stats.bootstrap``: each stratum (a list of row
    indices) is resampled with replacement independently of the others (``paired=False``), and
    ``statistic(indices)`` (the row indices of one resample, stratum by stratum) returns a 1-d array,
    NaN where the fit failed. Strata of one row cannot be resampled and stay as they are.

    Returns:
        [n_resamples, k] array (no rows when nothing can be resampled).
    """
    fixed = np.array([i for s in strata if len(s) < 2 for i in s], dtype=np.int64)
    free = [np.asarray(s, dtype=np.int64) for s in strata if len(s) >= 2]
    if n_resamples <= 0 or not free:
        return np.zeros((0, 0))

    def stat(*samples):
        return np.atleast_1d(np.asarray(statistic(np.concatenate([*samples, fixed]).astype(np.int64)),
                                        dtype=np.float64))

    with warnings.catch_warnings():  # failed resamples (NaN) make scipy's own interval NaN; ours drops them
        warnings.simplefilter("ignore")
        res = stats.bootstrap(free, stat, n_resamples=n_resamples, vectorized=False, paired=False,
                              method="percentile", rng=np.random.default_rng(seed))
    return np.asarray(res.bootstrap_distribution, dtype=np.float64).reshape(-1, n_resamples).T


def _interval(samples) -> list[float] | None:
    """The 95 % percentile interval of the resamples whose fit succeeded (scipy.stats.bootstrap's
    ``method="percentile"`` on them); None with fewer than 10."""
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


def _isoflop_vector(rows: list[dict], point: dict) -> list[float]:
    """Per-budget N*, L*, then the exponents a, b, gamma and coefficient k_L of one resample (NaN: the
    fit failed or found a different number of minima than the point estimate)."""
    m = len(point["minima"])
    fb = isoflop_fit(rows)
    if "n_opt" not in fb or len(fb["minima"]) != m:
        return [math.nan] * (2 * m + 4)
    return ([x.n_opt for x in fb["minima"]] + [x.loss_opt for x in fb["minima"]]
            + [fb["n_opt"][0], fb["d_opt"][0], fb["loss_opt"][0], fb["loss_opt"][1]])


def _parametric_vector(rows: list[dict], starts) -> list[float]:
    if len({r["non_embedding_params"] for r in rows}) < 2 or len({r["tokens"] for r in rows}) < 2:
        return [math.nan] * len(PARAMETRIC_KEYS)
    q = parametric_fit([r["non_embedding_params"] for r in rows], [r["tokens"] for r in rows],
                       [r["val_loss"] for r in rows], starts=starts)
    return [q[k] for k in PARAMETRIC_KEYS]


PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta", "n_opt_exponent", "d_opt_exponent")


def fit_sweep(rows: list[dict], bootstrap: int = 200, seed: int = 0, parametric: bool = True,
              parametric_bootstrap: int | None = None) -> dict:
    """All fits of a collected sweep (rows as from ``collect.read_csv``), with bootstrap intervals.

    Returns a JSON-serialisable dict: per objective the per-budget minima, the exponents a (N*), b (D*),
    gamma (L*) with coefficients, the parametric law; with both objectives the multiplier.
    """
    rows = usable_rows(rows)
    if not rows:
        raise FitError("no finished runs with a validation loss to fit")
    objectives = sorted({r["objective"] for r in rows})
    result: dict = {"objectives": {}, "bootstrap": bootstrap, "seed": seed, "huber_delta": HUBER_DELTA}
    point = {obj: isoflop_fit([r for r in rows if r["objective"] == obj]) for obj in objectives}
    fitted = [o for o in objectives if "n_opt" in point[o]]
    both = {"mdm", "arm"} <= set(fitted)
    # the IsoFLOP bootstrap: runs resampled within each (objective, budget); every objective's fit and the
    # multiplier from the same resample
    strata: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        if r["objective"] in fitted:
            strata.setdefault((r["objective"], float(r["budget"])), []).append(i)
    arm_budgets = [m.budget for m in point["arm"]["minima"]] if both else []

    def isoflop_stat(idx) -> list[float]:
        sub = [rows[i] for i in idx]
        out: list[float] = []
        laws = {}
        for obj in fitted:
            v = _isoflop_vector([r for r in sub if r["objective"] == obj], point[obj])
            laws[obj] = {"loss_opt": (v[-2], v[-1])}
            out += v
        if both:
            ok = all(math.isfinite(x) for x in out)
            mb = multiplier(laws["arm"], laws["mdm"], arm_budgets) if ok else None
            out += [b["multiplier"] for b in mb["budgets"]] + [mb["trend"]] if mb else [math.nan] * (len(arm_budgets) + 1)
        return out

    dist = bootstrap_distribution(list(strata.values()), isoflop_stat, bootstrap, seed)
    col = 0
    for obj in objectives:
        mine = [r for r in rows if r["objective"] == obj]
        est = point[obj]
        m = len(est["minima"])
        cols = dist[:, col : col + 2 * m + 4] if obj in fitted and len(dist) else np.zeros((0, 2 * m + 4))
        col += 2 * m + 4 if obj in fitted else 0
        good = cols[np.all(np.isfinite(cols), axis=1)]
        entry: dict = {
            "runs": len(mine),
            "budgets": [{"budget": x.budget, "n_points": x.n_points, "n_opt": x.n_opt, "d_opt": x.d_opt,
                         "loss_opt": x.loss_opt, "inside": x.inside, "coef": list(x.coef),
                         "n_opt_ci": _interval(good[:, i]), "loss_opt_ci": _interval(good[:, m + i])}
                        for i, x in enumerate(est["minima"])],
            "problems": est["problems"],
            "bootstrap_used": len(good),
        }
        if "n_opt" in est:
            for j, key in enumerate(("n_opt", "d_opt", "loss_opt")):
                entry[f"{key}_exponent"] = _est(est[key][0], good[:, 2 * m + j])
                entry[f"{key}_coef"] = est[key][1]
            entry["exponent_sum"] = est["n_opt"][0] + est["d_opt"][0]
        if parametric:
            try:
                p = parametric_fit([r["non_embedding_params"] for r in mine], [r["tokens"] for r in mine],
                                   [r["val_loss"] for r in mine])
                n_pb = parametric_bootstrap if parametric_bootstrap is not None else bootstrap // 2
                pd = bootstrap_distribution([list(range(len(mine)))],
                                            lambda idx, mine=mine, p=p: _parametric_vector([mine[i] for i in idx],
                                                                                           p["theta"]),
                                            n_pb, seed + 1)
                pd = pd[np.all(np.isfinite(pd), axis=1)] if len(pd) else np.zeros((0, len(PARAMETRIC_KEYS)))
                entry["parametric"] = {k: _est(p[k], pd[:, j]) for j, k in enumerate(PARAMETRIC_KEYS)}
                entry["parametric"]["objective"] = p["objective"]
                entry["parametric"]["optimizer"] = p["optimizer"]
                entry["parametric"]["bootstrap_used"] = len(pd)
            except FitError as e:
                entry["parametric"] = {"error": str(e)}
        result["objectives"][obj] = entry
    if both:
        mult = multiplier(point["arm"], point["mdm"], arm_budgets)
        mcols = dist[:, col:] if len(dist) else np.zeros((0, len(arm_budgets) + 1))
        mcols = mcols[np.all(np.isfinite(mcols), axis=1)]
        lo_l = min(x.loss_opt for x in point["mdm"]["minima"])
        hi_l = max(x.loss_opt for x in point["mdm"]["minima"])
        for i, row in enumerate(mult["budgets"]):
            row["ci"] = _interval(mcols[:, i])
            row["extrapolated"] = not (lo_l <= row["loss"] <= hi_l)  # outside the MDM's measured L* range
        mult["trend"] = _est(mult["trend"], mcols[:, -1])
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
