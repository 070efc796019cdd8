"""Range checks for command-line options and config fields: each bad value is one ``UserError`` line.

Pure functions: they return the value when it is acceptable, so a caller can write
``batch_size = check_positive(args.batch_size, "--batch-size", integer=True)``. The message
names the option (``"--batch-size"`` or a config field such as ``"batch_size"``) and what is
allowed, e.g. ``--batch-size: must be a positive integer, got -1``.
"""

from __future__ import annotations

import math
import numbers

from utils.errors import UserError


def check_positive(value, option: str, integer: bool = False):
    """``value`` if it is a finite number > 0 (an integer when ``integer``), else UserError."""
    kind = "a positive integer" if integer else "a positive finite number"
    if not _is_number(value, integer) or not math.isfinite(value) or value <= 0:
        raise UserError(f"must be {kind}, got {value!r}", option)
    return value


def check_range(value, option: str, low: float | None = None, high: float | None = None,
                integer: bool = False):
    """``value`` if it is finite and within ``low..high`` (inclusive; None = unbounded), else UserError."""
    bounds = f"{'-inf' if low is None else f'{low:g}'}..{'inf' if high is None else f'{high:g}'}"
    kind = "an integer" if integer else "a finite number"
    if (not _is_number(value, integer) or not math.isfinite(value)
            or (low is not None and value < low) or (high is not None and value > high)):
        raise UserError(f"must be {kind} in {bounds}, got {value!r}", option)
    return value


def check_window(low, high, option: str) -> tuple[float, float]:
    """``(low, high)`` if both are finite numbers with ``low < high`` (an HU clip window), else UserError."""
    for value in (low, high):
        if not _is_number(value, False) or not math.isfinite(value):
            raise UserError(f"must be finite numbers, got {low!r}..{high!r}", option)
    if not low < high:
        raise UserError(f"the minimum must be below the maximum, got {low!r}..{high!r}", option)
    return low, high


def _is_number(value, integer: bool) -> bool:
    """A real number (not a bool); with ``integer``, an integer type."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) if integer else True
