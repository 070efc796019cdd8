"""Tests for utils/option_checks.py: each bad value is one UserError line naming the option."""

import math

import numpy as np
import pytest

from utils.errors import UserError
from utils.option_checks import check_positive, check_range, check_window


@pytest.mark.parametrize("value, integer", [(1, True), (3, True), (np.int64(2), True), (0.5, False), (7, False)])
def test_check_positive_accepts(value, integer):
    assert check_positive(value, "--batch-size", integer) == value


@pytest.mark.parametrize("value, integer", [(0, True), (-1, True), (1.5, True), (True, True), ("4", True),
                                            (0.0, False), (-0.1, False), (math.nan, False), (math.inf, False),
                                            (None, False)])
def test_check_positive_refuses(value, integer):
    kind = "a positive integer" if integer else "a positive finite number"
    with pytest.raises(UserError) as err:
        check_positive(value, "--batch-size", integer)
    assert str(err.value) == f"--batch-size: must be {kind}, got {value!r}"
    assert err.value.about == "--batch-size"


def test_check_range():
    assert check_range(2.0, "--tolerance-mm", low=0.0) == 2.0
    assert check_range(0, "--workers", low=0, high=64, integer=True) == 0
    assert check_range(64, "--workers", low=0, high=64, integer=True) == 64
    with pytest.raises(UserError, match=r"^--tolerance-mm: must be a finite number in 0..inf, got -1$"):
        check_range(-1, "--tolerance-mm", low=0.0)
    with pytest.raises(UserError, match=r"^--workers: must be an integer in 0..64, got 65$"):
        check_range(65, "--workers", low=0, high=64, integer=True)
    with pytest.raises(UserError, match=r"^spacing: must be a finite number in -inf..10, got nan$"):
        check_range(math.nan, "spacing", high=10)


def test_check_window():
    assert check_window(-400, 400, "--min-clip/--max-clip") == (-400, 400)
    with pytest.raises(UserError, match=r"^--max-clip: must be finite numbers, got -400..inf$"):
        check_window(-400, math.inf, "--max-clip")
    with pytest.raises(UserError, match=r"^--min-clip/--max-clip: the minimum must be below the maximum, got 5..5$"):
        check_window(5, 5, "--min-clip/--max-clip")
