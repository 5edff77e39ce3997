"""The processor chain and the backoff helper, without Redis."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from bridge.backoff import Backoff
from bridge.streams.codec import EventType, StreamEvent
from bridge.streams.processor import (
    GenerationContext,
    ProcessorChain,
    analytics,
    count_tokens,
    log_events,
)


def ctx() -> GenerationContext:
    return GenerationContext("s", "m", "r", "w", 1)


def event(kind: EventType, seq: int, content: str = "") -> StreamEvent:
    return StreamEvent(kind, "r", seq, 0.0, content=content)


def test_the_chain_applies_processors_in_order_and_passes_changed_events_on() -> None:
    """Each processor gets the event the previous one returned."""

    def shout(c: GenerationContext, e: StreamEvent) -> StreamEvent:
        return StreamEvent(e.type, e.request_id, e.seq, e.ts, content=e.content.upper())

    chain = ProcessorChain((shout, count_tokens))
    context = ctx()
    out = chain(context, event(EventType.TOKEN, 1, "hey "))
    assert out.content == "HEY "
    assert (context.tokens, context.characters) == (1, 4)


def test_count_tokens_counts_only_tokens() -> None:
    """Seams and terminal events are not tokens."""
    context = ctx()
    for e in (
        event(EventType.SEAM, 1),
        event(EventType.TOKEN, 2, "a"),
        event(EventType.COMPLETE, 3),
    ):
        count_tokens(context, e)
    assert context.tokens == 1


def test_log_events_logs_seams_at_info() -> None:
    """Seams are logged at info level; tokens and terminal events at debug."""
    with capture_logs() as logs:
        log_events(ctx(), event(EventType.TOKEN, 1, "a"))
        log_events(ctx(), event(EventType.SEAM, 2))
        log_events(ctx(), event(EventType.COMPLETE, 3))
    assert [(entry["event"], entry["log_level"]) for entry in logs] == [
        ("token", "debug"),
        ("event_seam", "info"),
        ("event_complete", "debug"),
    ]


def test_a_failing_analytics_hook_is_logged_and_the_event_passes() -> None:
    """A hook that raises never breaks the generation."""

    def broken(c: GenerationContext, e: StreamEvent) -> None:
        raise RuntimeError("down")

    original = event(EventType.TOKEN, 1, "a")
    with capture_logs() as logs:
        assert analytics(broken)(ctx(), original) is original
    assert logs[0]["event"] == "analytics_hook_failed"


async def test_a_loop_stops_even_when_a_call_swallows_its_cancellation() -> None:
    """A cancel swallowed inside a call (as Python 3.11's wait_for can do inside redis-py)
    still stops a loop that waits with Backoff."""
    entered = asyncio.Event()

    async def swallowing_call() -> None:
        entered.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return

    async def loop() -> None:
        backoff = Backoff(0.01)
        while True:
            await swallowing_call()
            await backoff.wait()

    task = asyncio.create_task(loop())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(5):
            await task


async def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    """Each wait doubles the next delay up to the cap; reset starts over."""
    backoff = Backoff(0.001, 0.003)
    delays = []
    for _ in range(4):
        delays.append(backoff.delay_s)
        await backoff.wait()
    assert delays == [0.001, 0.002, 0.003, 0.003]
    backoff.reset()
    assert backoff.delay_s == 0.001
