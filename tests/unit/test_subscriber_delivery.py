"""The SSE delivery hot path: heartbeats without a timeout per wait, frames encoded once."""

from __future__ import annotations

import asyncio

from bridge.connections.sse import encode_batch
from bridge.connections.subscriber import Envelope, Subscriber
from bridge.errors import CloseReason
from bridge.streams.codec import EventType, StreamEvent, format_cursor, sse_frame


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


def test_one_model_connections_share_the_envelope_frame() -> None:
    """For a one-model cursor the frame is the same bytes object for every connection."""
    envelope = _envelope("gpt-4", (1700000000000, 3), seq=4)
    first, second = Subscriber("s", {}, queue_size=10), Subscriber("s", {}, queue_size=10)
    chunk, _ = encode_batch(first, [envelope])
    assert chunk == encode_batch(second, [envelope])[0]
    expected_id = format_cursor({"gpt-4": (1700000000000, 3)})
    assert chunk == sse_frame("token", envelope.sse_data, expected_id)
    assert envelope.frame is envelope.frame


def test_a_two_model_cursor_gets_its_own_id_line() -> None:
    """A connection that follows two models sends both positions in each event's id."""
    sub = Subscriber("s", {"claude": (5, 0)}, queue_size=10)
    envelope = _envelope("gpt-4", (7, 1))
    chunk, _ = encode_batch(sub, [envelope])
    assert chunk.startswith(b"id: claude:5-0,gpt-4:7-1\nevent: token\n")
    assert encode_batch(sub, [envelope]) == (b"", [])  # already sent: dropped by the cursor
