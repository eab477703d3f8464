"""Statistics over the seeds of one env: the interquartile mean and percentile-bootstrap confidence intervals.

The report's table and learning-curve bands use these, so that a report needs no optional dependency; the
aggregates across envs (stratified bootstrap, performance profiles, probability of improvement) are rliable's,
in benchmarks/aggregate.py. For one env, rliable's IQM and stratified bootstrap reduce to these.
"""

import numpy as np


def iqm(x) -> float:
    """Interquartile mean: the mean of the middle half, dropping floor(n/4) values at each end
    (scipy.stats.trim_mean(x, 0.25); with fewer than 4 values it is the plain mean)."""
    x = np.sort(np.asarray(x, np.float64))
    k = int(np.floor(0.25 * len(x)))
    return float(np.mean(x[k : len(x) - k]))


def bootstrap_ci(x, statistic=iqm, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple:
    """Percentile bootstrap: resample the seeds with replacement n_boot times, return the
    ((1 - c)/2, (1 + c)/2) quantiles of the statistic (numpy's linear interpolation)."""
    x = np.asarray(x, np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, len(x), size=(n_boot, len(x)))]
    stats = np.array([statistic(s) for s in samples])
    lo, hi = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def bootstrap_band(curves: np.ndarray, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0):
    """Mean over seeds (axis 0) of curves on a common grid, with a percentile-bootstrap band of the mean."""
    curves = np.asarray(curves, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(curves), size=(n_boot, len(curves)))
    means = curves[idx].mean(1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return curves.mean(0), lo, hi
