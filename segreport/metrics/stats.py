"""Summaries and paired comparisons of per-case (or per-seed) scores.

All summaries are nan-aware: a nan score (e.g. HD95 when a case has neither a prediction nor a
lesion) is left out and ``n`` says how many values were used. Standard deviations are sample
standard deviations (``ddof=1``): the scores are a sample of cases or seeds, and the spread is
reported to judge how far a mean could move on another sample; with fewer than two values it is nan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _scipy_stats


def mean_std(values) -> dict[str, float]:
    """``{"mean", "std", "n"}`` of the finite values (nan ignored; std with ddof=1)."""
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    mean = float(x.mean()) if n else float("nan")
    # np.std(ddof=1) on one value warns and returns nan: say nan without the warning
    std = float(x.std(ddof=1)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n}


def mean_std_over_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per metric, mean and sample std over runs that differ only in their random seed.

    ``runs`` is one ``{metric: value}`` dict per seed (e.g. each run's summary means). A metric
    missing from a run, or nan there, is left out for that run; ``n`` counts the runs used.
    """
    if not runs:
        raise ValueError("mean_std_over_seeds needs at least one run")
    names = list(dict.fromkeys(k for run in runs for k in run))  # first-seen order
    return {k: mean_std([run.get(k, float("nan")) for run in runs]) for k in names}


def paired_t_test(a, b, confidence: float = 0.95) -> dict[str, float]:
    """Two-sided paired t-test of ``a`` against ``b`` (same cases, same order).

    Pairs where either score is nan are dropped first. Returns ``t``, ``p``, ``mean_diff``
    (mean of ``a - b``), ``ci_low``/``ci_high`` (the ``confidence`` interval of the mean
    difference, from the t distribution) and ``n`` (pairs used). Uses ``scipy.stats.ttest_rel``.
    """
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_t_test needs scores for the same cases: got {a.size} and {b.size} values")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2:
        raise ValueError(f"paired_t_test needs at least two complete pairs, got {a.size}")
    res = _scipy_stats.ttest_rel(a, b)
    ci = res.confidence_interval(confidence_level=confidence)
    return {
        "t": float(res.statistic),
        "p": float(res.pvalue),
        "mean_diff": float(np.mean(a - b)),
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "n": int(a.size),
    }
