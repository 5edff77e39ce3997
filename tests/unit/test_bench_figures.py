"""The bench's figures: the pace a run was generated at, how many sessions streamed at once,
and S3's verdict on a step."""

from __future__ import annotations

from typing import Any

from bench.loadgen import ClientStats
from bench.scenarios import PACE_LIMIT, Shape, _concurrent, _pace, passes_step

SHAPE = Shape(sessions=2, connections=1, tokens=101, rate=50.0)  # 2 s from first to last token


def client(seconds: float, start_s: float = 1.0) -> ClientStats:
    """A client that received SHAPE's tokens, stamped over `seconds` from `start_s` on, each
    received 2 ms after its stamp."""
    stats = ClientStats(expected=SHAPE.tokens)
    step_us = seconds * 1e6 / (SHAPE.tokens - 1)
    for seq in range(1, SHAPE.tokens + 1):
        stamp = int(start_s * 1e6 + (seq - 1) * step_us)
        stats.token(seq, stamp, stamp + 2_000)
    return stats


def step(pace: float = 1.0, p99_ms: float = 10.0, concurrent: int = 10) -> dict[str, Any]:
    return {
        "sessions": 10,
        "concurrent": concurrent,
        "added_ms": {"p99": p99_ms},
        "pace": pace,
        "lost": 0,
        "duplicates": 0,
        "incomplete": 0,
    }


def test_the_pace_is_the_asked_rate_over_the_rate_the_upstream_wrote_at() -> None:
    assert _pace(SHAPE, [client(2.0), client(2.0)]) == 1.0
    assert _pace(SHAPE, [client(4.0), client(4.0), client(2.0)]) == 0.5  # the median client
    assert _pace(SHAPE, []) == 0.0


def test_sessions_stream_at_once_while_their_first_to_last_tokens_overlap() -> None:
    """Two sessions (one with two tabs) overlap; a third starts after both ended."""
    overlapping = {"a": [client(2.0, 1.0), client(2.0, 1.5)], "b": [client(2.0, 2.0)]}
    assert _concurrent(overlapping) == 2
    assert _concurrent(overlapping | {"c": [client(2.0, 5.0)]}) == 2
    assert _concurrent({"a": [client(2.0, 1.0)], "b": [client(2.0, 3.002)]}) == 1
    assert _concurrent({"a": [ClientStats(expected=1)]}) == 0  # no token, no stream


def test_a_step_passes_only_at_its_rate_with_its_sessions_streaming_at_once() -> None:
    """An upstream starved of CPU writes late and stamps late, and generations that start
    slowly barely overlap: either way the tokens look fast while the step offered less load
    than it names."""
    assert passes_step(step())
    assert passes_step(step(pace=PACE_LIMIT, concurrent=9))
    assert not passes_step(step(pace=0.5))
    assert not passes_step(step(concurrent=6))
    assert not passes_step(step(p99_ms=300.0))
