r"""The compute multiplier of the MDM over the ARM at equal loss, two ways, and its trend.

At an ARM budget C (compute of its IsoFLOP minimum) the multiplier is m(C) = C_MDM / C, where C_MDM is the
compute at which the MDM's loss frontier reaches the ARM's frontier loss at C.

* **law**: both frontiers as L*(C) = E + k·C^γ, E each objective's irreducible loss (from its parametric
  fit), k and γ by a power law fitted to L* - E. Then C_MDM = ((L_ARM(C) - E_MDM) / k_MDM)^(1/γ_MDM) with
  L_ARM(C) = E_ARM + k_ARM·C^γ_ARM. With E = 0 this is the pure power law of the scaling paper's figure,
  which is biased when E > 0: L* - E, not L*, is the power law, so the local slope of L* is steeper for the
  objective with the higher loss and a constant gap reads as a shrinking one.
* **measured**: no law at all. The ARM's measured minimum loss L*_ARM(C) is located on the MDM's measured
  frontier (its minima (C_i, L*_i) in order of C), and ln C_MDM is interpolated linearly in L between the two
  MDM minima around it. Defined only where the frontiers overlap (L*_ARM(C) within the MDM's measured L*
  range on a decreasing stretch of it).

A multiplier is *interpolated* when the ARM's loss lies within the MDM's measured L* range (the MDM side is
read off measured minima) and *extrapolated* otherwise (the law's value then rests on its extension).
The trend is the least-squares slope of ln m against ln C over the ARM budgets (0: a constant gap).
"""

from __future__ import annotations

import math

import numpy as np


def law_compute(loss: float, law: tuple[float, float, float]) -> float:
    """The compute at which L = E + k·C^γ reaches ``loss`` (NaN when it never does: loss <= E)."""
    e, gamma, k = law
    if not loss > e or not k > 0 or gamma == 0:
        return math.nan
    return float(((loss - e) / k) ** (1.0 / gamma))


def law_loss(c: float, law: tuple[float, float, float]) -> float:
    e, gamma, k = law
    return float(e + k * c ** gamma)


def measured_compute(loss: float, frontier_c: list[float], frontier_l: list[float]) -> float:
    """ln C interpolated linearly in L between the two measured minima around ``loss`` on a decreasing
    stretch of the frontier (minima in order of C); NaN outside the measured losses."""
    pts = sorted(zip(frontier_c, frontier_l))
    for (c0, l0), (c1, l1) in zip(pts, pts[1:]):
        if l1 < l0 and l1 <= loss <= l0:
            w = (loss - l0) / (l1 - l0)
            return float(math.exp(math.log(c0) + w * (math.log(c1) - math.log(c0))))
    return math.nan


def trend(cs, ms) -> float:
    """Least-squares slope of ln m against ln C over the finite values (NaN with fewer than 2)."""
    pairs = [(c, m) for c, m in zip(cs, ms) if math.isfinite(m) and m > 0]
    if len(pairs) < 2 or len({c for c, _ in pairs}) < 2:
        return math.nan
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def in_range(loss: float, frontier_l: list[float]) -> bool:
    return bool(frontier_l) and min(frontier_l) <= loss <= max(frontier_l)
