r"""Chinchilla's approach 3: L(N, D) = E + A / N^α + B / D^β fitted on all runs of an objective.

Minimises the Huber loss (δ = 1e-3) of the log-residuals ``lse(a - α ln N, b - β ln D, e) - ln L`` with
A = e^a, B = e^b, E = e^e (Hoffmann et al. 2022), by ``scipy.optimize.least_squares(loss="huber")`` from the
best points of a grid of starts. The law implies N_opt = G·(C/6)^(β/(α+β)), D_opt = G⁻¹·(C/6)^(α/(α+β)) with
G = (αA / βB)^(1/(α+β)); its E is the irreducible loss the compute multiplier needs.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special

from megatron_mdm.sweep.isoflop import FitError

HUBER_DELTA = 1e-3
KEYS = ("E", "A", "B", "alpha", "beta", "n_opt_exponent", "d_opt_exponent")


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
                                     x_scale="jac", ftol=1e-12, xtol=1e-12, gtol=1e-12, max_nfev=2000)
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
