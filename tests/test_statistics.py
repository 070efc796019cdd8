"""Spread over seeds and the paired Wilcoxon test, against hand-computed values."""

import math

import pytest

from utils.statistics import mean_sd, paired_wilcoxon


def test_mean_sd_by_hand():
    result = mean_sd([0.5, 0.7, 0.9, float("nan")])
    assert result["n"] == 3 and result["mean"] == pytest.approx(0.7)
    assert result["sd"] == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    single = mean_sd([0.4])
    assert single["mean"] == 0.4 and math.isnan(single["sd"])
    assert math.isnan(mean_sd([])["mean"])


def test_wilcoxon_all_eight_pairs_one_side_is_the_exact_minimum():
    better = [0.9, 0.8, 0.85, 0.7, 0.95, 0.6, 0.75, 0.88]
    worse = [b - 0.01 * (k + 1) for k, b in enumerate(better)]  # distinct positive differences
    result = paired_wilcoxon(better, worse)
    assert result["n"] == 8 and result["p_value"] == pytest.approx(2 / 2 ** 8)
    assert result["median_difference"] == pytest.approx(0.045)


def test_wilcoxon_drops_nan_pairs_and_reports_no_difference_as_nan():
    result = paired_wilcoxon([0.5, float("nan"), 0.7], [0.5, 0.1, 0.7])
    assert result["n"] == 2 and math.isnan(result["p_value"])
    with pytest.raises(ValueError, match="paired"):
        paired_wilcoxon([1, 2], [1])
