"""Percentile bootstrap intervals (``scipy.stats.bootstrap``) of statistics that may fail on a resample.

Runs are resampled with replacement within strata (e.g. one objective's runs of one budget), each stratum
independently; the statistic is a whole fitting pipeline that returns NaN where a resample's fit fails, and
the interval is the 2.5 and 97.5 percentiles of the resamples whose fit succeeded.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import stats


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


def interval(samples) -> list[float] | None:
    """The 95 % percentile interval of the resamples whose fit succeeded (scipy.stats.bootstrap's
    ``method="percentile"`` on them); None with fewer than 10."""
    xs = np.array([s for s in samples if s is not None and math.isfinite(s)])
    if len(xs) < 10:
        return None
    return [float(np.percentile(xs, 2.5)), float(np.percentile(xs, 97.5))]
