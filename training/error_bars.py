"""Error bars (e.g. SD over training seeds) drawn over a bar chart of ``training.visualization``."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def add_error_bars(fig: Figure, spreads: list[list[float]]) -> Figure:
    """Draw symmetric error bars on the bars of a ``dice_bar_chart`` figure, in place.

    Args:
        fig: a figure from ``training.visualization.dice_bar_chart`` (one axes).
        spreads: per series, per bar (the chart's organ order: organ ids, then other keys), the
            half-length of the bar; NaN draws none.

    Returns:
        `fig`. Raises ValueError when `spreads` does not match the chart's series and bars.
    """
    ax = fig.axes[0]
    series = [container for container in ax.containers if hasattr(container, "patches")]
    if len(series) != len(spreads) or any(len(c.patches) != len(s) for c, s in zip(series, spreads)):
        raise ValueError(f"spreads {[len(s) for s in spreads]} do not match the chart's bars "
                         f"{[len(c.patches) for c in series]}")
    for container, spread in zip(series, spreads):
        x = [bar.get_x() + bar.get_width() / 2 for bar in container.patches]
        heights = [bar.get_height() for bar in container.patches]
        ax.errorbar(x, heights, yerr=np.nan_to_num(np.asarray(spread, dtype=float)), fmt="none", ecolor="black",
                    elinewidth=0.8, capsize=2)
    return fig
