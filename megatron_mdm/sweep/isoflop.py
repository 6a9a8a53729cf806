r"""IsoFLOP minima and the power laws of the compute-optimal frontier (Hoffmann et al. 2022, approach 2; the
scaling paper's method).

* Per budget C, a parabola through (ln N, L) of its runs: L ≈ p2·x² + p1·x + p0, x = ln N. Its vertex
  gives N*(C) = exp(-p1 / 2p2), L*(C) = p0 - p1² / 4p2 and D*(C) = C / (6·N*(C)) (C the 6·N·D budget).
* The compute of a minimum: the budget C = 6·N·D, or with ``flops="full"`` the full count of the runs
  (``collect.full_flops``: attention and output layer too) interpolated in ln N to N* (log-linear between
  the two runs around it), since the full count of an IsoFLOP group varies with the model's shape.
* Power laws by least squares in log-log: N* = k_N·C^a, D* = k_D·C^b, L* = k_L·C^γ, and, given the
  irreducible loss E, L* - E = k'·C^γ' (the frontier of L = E + A/N^α + B/D^β is exactly E + K·C^γ').
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_mdm.errors import UserError

MIN_BUDGETS = 3  # IsoFLOP minima needed for the power laws (two points would fit any law exactly)
FLOPS = ("6nd", "full")


class FitError(UserError, ValueError):
    """Too few or unusable runs for a fit; the message says what is missing."""


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
    compute: float = 0.0  # the minimum's compute in the chosen FLOP count (the budget for 6·N·D)


def isoflop_minimum(n: np.ndarray, loss: np.ndarray, budget: float) -> IsoflopMinimum:
    """Least-squares parabola in ln N through one budget's runs, and its vertex.

    Raises:
        FitError: fewer than 3 distinct sizes, a parabola that opens downwards (no minimum), or a vertex far
            outside the sampled sizes or at a loss that is not positive (an extrapolation gone wrong).
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
    n_opt, loss_opt = float(np.exp(xs)), float(p0 - p1 * p1 / (4 * p2))
    if not loss_opt > 0:
        raise FitError(f"budget {budget:.3g}: the parabola's vertex (N = {n_opt:.3g}) lies at a loss of "
                       f"{loss_opt:.3g}, not positive (an extrapolation outside the sampled sizes)")
    return IsoflopMinimum(budget=float(budget), coef=(float(p2), float(p1), float(p0)), n_opt=n_opt,
                          d_opt=float(budget / (6 * n_opt)), loss_opt=loss_opt,
                          inside=bool(x.min() <= xs <= x.max()), n_points=len(x), compute=float(budget))


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


def _full_compute(group: list[dict], n_opt: float, budget: float) -> float:
    """The full FLOP count at N*: the budget times the runs' full/6ND ratio, log-linear in ln N."""
    if any(r.get("flops_full") is None for r in group):
        raise FitError("--flops full needs the flops_full column of every run (write the CSV with this version's "
                       "`mdm-sweep collect`)")
    pts = sorted((float(r["non_embedding_params"]), float(r["flops_full"]) /
                  (6.0 * float(r["non_embedding_params"]) * float(r["tokens"]))) for r in group)
    ratio = np.interp(np.log(n_opt), np.log([p[0] for p in pts]), np.log([p[1] for p in pts]))
    return float(budget * np.exp(ratio))


def isoflop_fit(rows: list[dict], flops: str = "6nd") -> dict:
    """Per-budget minima of one objective's runs and the N*, D*, L* power laws in the compute of ``flops``."""
    if flops not in FLOPS:
        raise FitError(f"--flops {flops!r}: choose from {', '.join(FLOPS)}")
    groups: dict[float, list[dict]] = {}
    for r in rows:
        groups.setdefault(float(r["budget"]), []).append(r)
    minima, problems = [], []
    for c, group in sorted(groups.items()):
        n = np.array([r["non_embedding_params"] for r in group], dtype=np.float64)
        loss = np.array([r["val_loss"] for r in group], dtype=np.float64)
        try:
            m = isoflop_minimum(n, loss, c)
        except FitError as e:
            problems.append(str(e))
            continue
        if flops == "full":
            m.compute = _full_compute(group, m.n_opt, c)
        minima.append(m)
    out: dict = {"minima": minima, "problems": problems}
    if len(minima) < MIN_BUDGETS:
        problems.append(f"IsoFLOP minima at {len(minima)} budget(s): the power laws need {MIN_BUDGETS}")
    else:
        cs = np.array([m.compute for m in minima])
        try:
            laws = {k: power_law(cs, [getattr(m, k) for m in minima]) for k in ("n_opt", "d_opt", "loss_opt")}
        except FitError as e:  # e.g. a full FLOP count that is not positive
            problems.append(f"no power laws: {e}")
        else:
            out.update(laws)
    return out


def reducible_law(minima: list[IsoflopMinimum], e: float) -> tuple[float, float]:
    """(γ', k') of L* - E = k'·C^γ' over the minima; FitError when a minimum is not above E."""
    ls = np.array([m.loss_opt for m in minima])
    if not np.all(ls > e):
        raise FitError(f"E = {e:.4g} is not below every IsoFLOP minimum (lowest L* {ls.min():.4g}): no power law "
                       "of L* - E")
    return power_law([m.compute for m in minima], ls - e)
