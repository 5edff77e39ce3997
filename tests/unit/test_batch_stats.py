"""Batch statistics: nearest-rank quantiles over a bounded window, and the slowest requests."""

from __future__ import annotations

import pytest

from bridge.batching.stats import BatchStats, Series, quantile


@pytest.mark.parametrize(
    ("q", "expected"), [(0.5, 50.0), (0.95, 95.0), (0.99, 99.0), (1.0, 100.0), (0.001, 1.0)]
)
def test_nearest_rank_quantiles(q: float, expected: float) -> None:
    """On 1..100 the q quantile is the value of rank ceil(q * n)."""
    assert quantile([float(v) for v in range(1, 101)], q) == expected


def test_a_series_keeps_only_its_window() -> None:
    """Old samples fall out of the window (bounded memory); the count keeps growing."""
    series = Series(window=10)
    for value in range(1000):
        series.add(float(value))
    summary = series.summary()
    assert summary["count"] == 1000
    assert summary["p50"] == 994.0
    assert summary["max"] == 999.0
    assert Series(5).summary() == {"count": 0}


def test_the_report_names_the_slowest_requests() -> None:
    """The slowest requests are kept, slowest first, however many finished."""
    stats = BatchStats(slowest=2)
    for index, latency in enumerate([5.0, 50.0, 20.0, 1.0]):
        stats.request_done(f"r{index}", latency)
    report = stats.report()
    assert report["slowest"] == [
        {"requestId": "r1", "latencyMs": 50.0},
        {"requestId": "r2", "latencyMs": 20.0},
    ]
    assert report["latencyMs"]["count"] == 4
