"""Means over seeds with their Student's t 95% intervals: the sweeps' report and bench's experiments."""

from __future__ import annotations

import math
import statistics


def mean_interval(values: list, level: float = 0.95) -> tuple:
    """(mean, low, high) of independent repetitions; low and high are nan for fewer than two."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t  # scipy only where an interval is drawn

    half = t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def percent_interval(values: list, signed: bool = False) -> str:
    """'75.30 [74.10, 76.50]' in percent points (the mean alone for one value); signed for differences."""
    sign = "+" if signed else ""
    mean, low, high = (100 * v for v in mean_interval(values))
    text = f"{mean:{sign}.2f}"
    return text if len(values) < 2 else f"{text} [{low:{sign}.2f}, {high:{sign}.2f}]"
