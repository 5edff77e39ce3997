"""The SSE delivery hot path: heartbeats without a timeout per wait."""

from __future__ import annotations

import asyncio

from bridge.connections.subscriber import Envelope, Subscriber
from bridge.errors import CloseReason
from bridge.streams.codec import EventType, StreamEvent


def _envelope(model: str, entry_id: tuple[int, int], seq: int = 1) -> Envelope:
    event = StreamEvent(EventType.TOKEN, "req1", seq, 1700000000000.5, content=f"tok{seq} ")
    return Envelope(model, entry_id, event)


async def test_a_silent_connection_gets_an_empty_batch_each_heartbeat() -> None:
    """With nothing queued, next_batch returns [] once the heartbeat period has passed."""
    sub = Subscriber("s", {}, queue_size=10)
    assert await asyncio.wait_for(sub.next_batch(0.05), 5) == []
    assert await asyncio.wait_for(sub.next_batch(0.05), 5) == []


async def test_queued_events_are_returned_even_when_the_heartbeat_is_due() -> None:
    """A heartbeat that falls due while events wait hands over the events, not a ping."""
    sub = Subscriber("s", {}, queue_size=10)
    waiting = asyncio.create_task(sub.next_batch(0.05))
    envelope = _envelope("gpt-4", (1, 0))
    assert sub.offer([envelope])
    assert await asyncio.wait_for(waiting, 5) == [envelope]


async def test_closing_ends_the_wait_with_closed() -> None:
    """A close wakes the waiting writer at once, heartbeat timer or not."""
    sub = Subscriber("s", {}, queue_size=10)
    waiting = asyncio.create_task(sub.next_batch(3600))
    await asyncio.sleep(0)
    sub.close(CloseReason.SHUTDOWN)
    exc = await asyncio.wait_for(asyncio.gather(waiting, return_exceptions=True), 5)
    assert type(exc[0]).__name__ == "Closed"
