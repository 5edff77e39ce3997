"""Batch statistics for the health report: sizes, queue wait and latency quantiles.

Each series keeps its last `window` samples, so memory is bounded and the quantiles describe
recent traffic, as the seed's monitoring section asks (quantiles and the slowest requests).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any


def quantile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of non-empty, sorted values."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class Series:
    """The last `window` samples of one measurement."""

    def __init__(self, window: int) -> None:
        self._values: deque[float] = deque(maxlen=window)
        self.count = 0

    def add(self, value: float) -> None:
        self._values.append(value)
        self.count += 1

    def summary(self) -> dict[str, Any]:
        """Count, p50, p95, p99 and max of the retained samples (rounded to 0.1)."""
        values = sorted(self._values)
        if not values:
            return {"count": self.count}
        result: dict[str, Any] = {"count": self.count}
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            result[name] = round(quantile(values, q), 1)
        result["max"] = round(values[-1], 1)
        return result


class BatchStats:
    """What the batcher measured: batch sizes, queue wait, time to first chunk, latency."""

    def __init__(self, window: int = 1000, slowest: int = 5) -> None:
        self.batch_size = Series(window)
        self.queue_wait_ms = Series(window)
        self.first_chunk_ms = Series(window)
        self.latency_ms = Series(window)
        self._slowest: list[tuple[float, str]] = []  # a min-heap of the slowest requests
        self._keep = slowest

    def request_done(self, request_id: str, latency_ms: float) -> None:
        self.latency_ms.add(latency_ms)
        heapq.heappush(self._slowest, (latency_ms, request_id))
        if len(self._slowest) > self._keep:
            heapq.heappop(self._slowest)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary (camelCase, milliseconds)."""
        return {
            "batchSize": self.batch_size.summary(),
            "queueWaitMs": self.queue_wait_ms.summary(),
            "firstChunkMs": self.first_chunk_ms.summary(),
            "latencyMs": self.latency_ms.summary(),
            "slowest": [
                {"requestId": rid, "latencyMs": round(ms, 1)}
                for ms, rid in sorted(self._slowest, reverse=True)
            ],
        }
