"""Percentiles, medians over repeats, and the percentile curves the charts draw."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

#: the percentiles a latency summary reports
SUMMARY_POINTS = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
#: where a percentile curve is sampled (dense towards the tail)
CURVE_POINTS = (
    [float(p) for p in range(0, 90, 5)]
    + [90.0 + i for i in range(10)]
    + [99.0 + i / 10 for i in range(10)]
    + [99.95, 100.0]
)


def percentile(ordered: Sequence[float], point: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(math.ceil(point / 100.0 * len(ordered)), 1)
    return float(ordered[min(rank, len(ordered)) - 1])


def summarize_us(values: Iterable[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9/max/mean of microsecond values, in milliseconds."""
    ordered = sorted(values)
    out = {name: percentile(ordered, p) / 1000.0 for name, p in SUMMARY_POINTS.items()}
    out["max"] = ordered[-1] / 1000.0 if ordered else 0.0
    out["mean"] = statistics.fmean(ordered) / 1000.0 if ordered else 0.0
    out["count"] = float(len(ordered))
    return {k: round(v, 3) for k, v in out.items()}


def curve_us(values: Iterable[int]) -> list[tuple[float, float]]:
    """(percentile, milliseconds) pairs for a latency-by-percentile chart."""
    ordered = sorted(values)
    return [(p, round(percentile(ordered, p) / 1000.0, 3)) for p in CURVE_POINTS]


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric leaf over repeats, keeping the shape of the first run.

    Lists (curves, steps, anomaly texts) are not averaged: they stay per repeat.
    """
    first = runs[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        values = [run[key] for run in runs if key in run]
        if isinstance(value, bool):
            out[key] = all(values)
        elif isinstance(value, int | float):
            out[key] = round(statistics.median(values), 3)
        elif isinstance(value, dict):
            out[key] = median_of(values)
    return out
