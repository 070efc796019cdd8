"""Spread over training seeds and paired tests over test cases, for experiments reported with n.

Pure functions over plain sequences; ``benchmarks/partial_labels.py`` uses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats


def mean_sd(values: Sequence[float]) -> dict:
    """Mean and sample SD (ddof 1) of the finite values.

    Returns:
        ``{"mean", "sd", "n"}``: ``n`` finite values; ``mean`` NaN when n = 0, ``sd`` NaN when n < 2.
    """
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    mean = float(finite.mean()) if finite.size else math.nan
    sd = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
    return {"mean": mean, "sd": sd, "n": int(finite.size)}


def paired_wilcoxon(first: Sequence[float], second: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired values (``scipy.stats.wilcoxon``).

    Pairs with a NaN on either side are dropped; zero differences follow scipy's default
    (``zero_method="wilcox"``: dropped). With 8 pairs all on one side, the exact two-sided
    p-value is 2 / 2**8 = 0.0078, the smallest 8 pairs can give.

    Returns:
        ``{"p_value", "n" (pairs used), "median_difference" (first - second)}``; ``p_value`` NaN
        when no pair differs.

    Raises:
        ValueError: sequences of different lengths.
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired values must be two 1-D sequences of one length, got {first.shape} and {second.shape}")
    keep = np.isfinite(first) & np.isfinite(second)
    difference = first[keep] - second[keep]
    median = float(np.median(difference)) if difference.size else math.nan
    if not np.any(difference != 0):
        return {"p_value": math.nan, "n": int(keep.sum()), "median_difference": median}
    result = stats.wilcoxon(first[keep], second[keep])
    return {"p_value": float(result.pvalue), "n": int(keep.sum()), "median_difference": median}
