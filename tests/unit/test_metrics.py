"""The metrics module: naming conventions, bounded labels, and the hot-path helpers."""

from __future__ import annotations

import ast
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge import metrics
from bridge.errors import ProviderError
from bridge.providers.base import Delta, Finish
from bridge.providers.metered import metered
from bridge.streams.codec import now_ms

SRC = Path(metrics.__file__).parent
UNBOUNDED_LABELS = {"session", "session_id", "request_id", "connection_id", "user", "path"}


def bridge_families() -> list[object]:
    return [f for f in metrics.REGISTRY.collect() if f.name.startswith("bridge_")]


LES = ("0.0025", "0.005", "0.01", "0.025", "0.05", "+Inf")


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_metric_is_declared_in_the_metrics_module() -> None:
    """No other module constructs a Counter, Gauge, Histogram, Summary or Info."""
    kinds = {"Counter", "Gauge", "Histogram", "Summary", "Info"}
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "metrics.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in kinds:
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_names_units_and_labels_follow_the_conventions() -> None:
    """bridge_ namespace, _total on counters, histograms name their unit, no unbounded labels."""
    families = [
        f for f in metrics.REGISTRY.collect() if not f.name.startswith(("process_", "python_"))
    ]
    assert len(families) >= 20
    for family in families:
        assert family.name.startswith("bridge_"), family.name
        assert "_ms" not in family.name
        assert "millis" not in family.name
        if family.type == "histogram":  # durations in seconds, or a count with its unit
            assert family.name.endswith(("_seconds", "_requests")), family.name
        for sample_ in family.samples:
            if family.type == "counter":
                assert sample_.name.endswith("_total"), sample_.name
            assert not set(sample_.labels) & UNBOUNDED_LABELS, sample_


def test_generation_outcomes_exist_at_zero_from_the_start() -> None:
    """Every outcome is exported before it happens, so rate() and alerts see a series."""
    for outcome in ("complete", "error", "cancelled", "taken_over", "interrupted"):
        assert (
            metrics.REGISTRY.get_sample_value("bridge_generations_total", {"outcome": outcome})
            is not None
        )


def test_live_delivery_counts_tokens_and_observes_their_latency() -> None:
    """Live tokens are counted and timed from their producer timestamp; clock skew clamps at 0."""
    before_count = sample("bridge_tokens_delivered_total", transport="sse")
    before_obs = sample("bridge_token_delivery_latency_seconds_count", transport="sse")
    before_fast = sample(
        "bridge_token_delivery_latency_seconds_bucket", transport="sse", le="0.001"
    )
    now = time.time() * 1000
    metrics.SSE.delivered([now - 2000.0, now + 60_000.0])  # 2 s old; one from a clock ahead
    assert sample("bridge_tokens_delivered_total", transport="sse") == before_count + 2
    assert sample("bridge_token_delivery_latency_seconds_count", transport="sse") == before_obs + 2
    fast = sample("bridge_token_delivery_latency_seconds_bucket", transport="sse", le="0.001")
    assert fast == before_fast + 1


def test_delivery_latency_buckets_are_inclusive_and_cumulative(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A latency equal to a bound counts in that bucket (`le`), every wider bucket counts it
    too, and the sum adds the latencies: the text format Prometheus expects of a histogram."""
    monkeypatch.setattr(metrics.time, "time", lambda: 1000.0)  # now: 1,000,000 ms
    name = "bridge_token_delivery_latency_seconds"

    def buckets() -> dict[str, float]:
        return {le: sample(f"{name}_bucket", transport="websocket", le=le) for le in LES}

    before, before_sum = buckets(), sample(f"{name}_sum", transport="websocket")
    metrics.WEBSOCKET.delivered([1_000_000.0 - 5.0, 1_000_000.0 - 30.0])  # 5 ms, 30 ms
    grown = {le: count - before[le] for le, count in buckets().items()}
    assert grown == {"0.0025": 0, "0.005": 1, "0.01": 1, "0.025": 1, "0.05": 2, "+Inf": 2}
    assert sample(f"{name}_sum", transport="websocket") - before_sum == pytest.approx(0.035)


def test_replayed_tokens_are_counted_but_not_timed() -> None:
    """History replay is delivery, but its age is not a delay: no latency observation."""
    before_count = sample("bridge_tokens_delivered_total", transport="sse")
    before_obs = sample("bridge_token_delivery_latency_seconds_count", transport="sse")
    metrics.SSE.delivered([1.0, 2.0, 3.0], live=False)
    assert sample("bridge_tokens_delivered_total", transport="sse") == before_count + 3
    assert sample("bridge_token_delivery_latency_seconds_count", transport="sse") == before_obs


def test_render_is_the_text_format() -> None:
    """The exposition names its types and carries the bridge metrics."""
    text = metrics.render().decode()
    assert "# TYPE bridge_tokens_produced_total counter" in text
    assert "_created" not in text


async def _stream(
    *items: Delta | Finish, fail: ProviderError | None = None
) -> AsyncIterator[Delta | Finish]:
    for item in items:
        yield item
    if fail is not None:
        raise fail


async def test_metered_stream_counts_tokens_first_token_and_duration() -> None:
    """A provider call: tokens produced, one time-to-first-token, duration with outcome ok."""
    model = "unit-ok"
    stream = metered(
        _stream(Delta("a"), Delta(""), Delta("b"), Finish()),
        provider="mock",
        model=model,
        created_ms=now_ms() - 500,
    )
    items = [item async for item in stream]
    assert len(items) == 4
    assert sample("bridge_tokens_produced_total", model=model) == 2
    assert sample("bridge_time_to_first_token_seconds_count", model=model) == 1
    assert sample("bridge_time_to_first_token_seconds_sum", model=model) >= 0.5
    duration = "bridge_provider_request_duration_seconds_count"
    assert sample(duration, provider="mock", outcome="ok") >= 1


async def test_metered_stream_counts_provider_errors_by_code() -> None:
    """A failing call re-raises and counts its code; a takeover observes no first token."""
    model = "unit-fail"
    failure = ProviderError("provider_auth", "no")
    before = sample("bridge_provider_errors_total", provider="unit", code="provider_auth")
    with pytest.raises(ProviderError):
        async for _ in metered(
            _stream(Delta("a"), fail=failure), provider="unit", model=model, created_ms=None
        ):
            pass
    assert sample("bridge_provider_errors_total", provider="unit", code="provider_auth") == (
        before + 1
    )
    assert sample("bridge_time_to_first_token_seconds_count", model=model) == 0
    assert (
        sample("bridge_provider_request_duration_seconds_count", provider="unit", outcome="error")
        >= 1
    )


async def test_metered_stream_closed_early_is_cancelled_and_closes_the_provider() -> None:
    """Stopping early (cancel, deadline, fencing) records `cancelled` and closes the provider."""
    closed = []

    async def endless() -> AsyncIterator[Delta | Finish]:
        try:
            while True:
                yield Delta("x")
        finally:
            closed.append(True)

    stream = metered(endless(), provider="unit-cancel", model="unit-cancel", created_ms=None)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert closed == [True]
    outcome = "bridge_provider_request_duration_seconds_count"
    assert sample(outcome, provider="unit-cancel", outcome="cancelled") == 1
