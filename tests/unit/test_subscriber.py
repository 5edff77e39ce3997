"""Subscriber: a connection's bounded queue, its overflow policy, and its resume cursor."""

from __future__ import annotations

import asyncio

import pytest

from bridge.connections.subscriber import Closed, Envelope, Subscriber
from bridge.errors import CloseReason
from bridge.streams.codec import EventType, StreamEvent, sse_data


def _env(seq: int, model: str = "m", ms: int = 1000) -> Envelope:
    event = StreamEvent(EventType.TOKEN, "req", seq, 1.5, content=f"t{seq}")
    return Envelope(model, (ms, seq), event)


def _sub(queue_size: int = 4, cursor: dict[str, tuple[int, int]] | None = None) -> Subscriber:
    return Subscriber("s1", cursor or {}, queue_size=queue_size)


async def test_offer_then_next_batch_returns_everything_queued_in_order() -> None:
    """Offered envelopes come back from next_batch in order, and the queue is then empty."""
    sub = _sub()
    first, second = [_env(1), _env(2)], [_env(3)]
    assert sub.offer(first)
    assert sub.offer(second)
    assert sub.queued == 3
    assert await sub.next_batch(1.0) == first + second
    assert sub.queued == 0


async def test_next_batch_wakes_when_an_offer_arrives() -> None:
    """A waiting next_batch returns as soon as another task offers an envelope."""
    sub = _sub()
    waiter = asyncio.ensure_future(sub.next_batch(5.0))
    await asyncio.sleep(0)  # let the waiter start waiting
    assert not waiter.done()
    env = _env(1)
    sub.offer([env])
    assert await asyncio.wait_for(waiter, 1.0) == [env]


async def test_next_batch_returns_empty_after_the_wait_when_idle() -> None:
    """With nothing queued, next_batch returns [] once the wait elapses."""
    sub = _sub()
    assert await asyncio.wait_for(sub.next_batch(0.01), 1.0) == []
    assert sub.closed is None


async def test_queue_may_fill_exactly_to_its_size() -> None:
    """Offering exactly queue_size envelopes is accepted."""
    sub = _sub(queue_size=3)
    assert sub.offer([_env(1), _env(2)])
    assert sub.offer([_env(3)])
    assert sub.queued == 3
    assert sub.closed is None


async def test_overflow_closes_as_slow_consumer_and_clears_the_queue() -> None:
    """One envelope past queue_size closes with SLOW_CONSUMER, empties the queue, calls on_close."""
    sub = _sub(queue_size=3)
    calls: list[CloseReason] = []
    sub.on_close = calls.append
    assert sub.offer([_env(1), _env(2)])
    assert not sub.offer([_env(3), _env(4)])
    assert sub.closed is CloseReason.SLOW_CONSUMER
    assert sub.queued == 0
    assert calls == [CloseReason.SLOW_CONSUMER]
    assert not sub.offer([_env(5)])
    sub.close(CloseReason.SHUTDOWN)
    assert sub.closed is CloseReason.SLOW_CONSUMER
    assert calls == [CloseReason.SLOW_CONSUMER]
    with pytest.raises(Closed) as info:
        await sub.next_batch(1.0)
    assert info.value.reason is CloseReason.SLOW_CONSUMER


async def test_single_batch_larger_than_the_queue_overflows() -> None:
    """A single offer bigger than the whole queue overflows even when the queue is empty."""
    sub = _sub(queue_size=2)
    assert not sub.offer([_env(1), _env(2), _env(3)])
    assert sub.closed is CloseReason.SLOW_CONSUMER


async def test_next_batch_raises_closed_after_close() -> None:
    """After close, next_batch raises Closed with the reason, even with nothing queued."""
    sub = _sub()
    sub.offer([_env(1)])
    sub.close(CloseReason.SHUTDOWN)
    assert sub.queued == 0
    with pytest.raises(Closed) as info:
        await asyncio.wait_for(sub.next_batch(5.0), 1.0)
    assert info.value.reason is CloseReason.SHUTDOWN


async def test_close_wakes_a_waiting_next_batch() -> None:
    """A next_batch that is waiting raises Closed promptly when the subscriber is closed."""
    sub = _sub()
    waiter = asyncio.ensure_future(sub.next_batch(5.0))
    await asyncio.sleep(0)
    sub.close(CloseReason.REDIS_UNAVAILABLE)
    with pytest.raises(Closed) as info:
        await asyncio.wait_for(waiter, 1.0)
    assert info.value.reason is CloseReason.REDIS_UNAVAILABLE


async def test_on_close_is_called_once() -> None:
    """on_close runs once, with the first reason, however often close is called."""
    sub = _sub()
    calls: list[CloseReason] = []
    sub.on_close = calls.append
    sub.close(CloseReason.CLIENT_GONE)
    sub.close(CloseReason.SHUTDOWN)
    sub.close(CloseReason.CLIENT_GONE)
    assert calls == [CloseReason.CLIENT_GONE]
    assert sub.closed is CloseReason.CLIENT_GONE
    assert not sub.offer([_env(1)])


def test_accept_dedupes_by_the_per_model_cursor() -> None:
    """accept admits only entries after the model's cursor and advances it."""
    sub = _sub(cursor={"m": (1000, 5)})
    assert not sub.accept("m", (1000, 4))
    assert not sub.accept("m", (1000, 5))
    assert not sub.accept("m", (999, 99))
    assert sub.accept("m", (1000, 6))
    assert not sub.accept("m", (1000, 6))
    assert sub.accept("m", (1001, 0))
    assert sub.cursor == {"m": (1001, 0)}


def test_accept_tracks_several_models_independently() -> None:
    """Each model has its own position; an entry of one model never blocks another."""
    sub = _sub()
    assert sub.accept("a", (2000, 0))
    assert sub.accept("b", (1000, 0))  # older than a's position, but another model
    assert not sub.accept("a", (1500, 0))
    assert sub.accept("b", (1000, 1))
    assert sub.cursor == {"a": (2000, 0), "b": (1000, 1)}
    assert sub.cursor_text == "a:2000-0,b:1000-1"


def test_subscriber_copies_the_cursor_it_is_given() -> None:
    """Advancing a subscriber's cursor does not change the dict it was created with."""
    start = {"m": (1, 0)}
    sub = _sub(cursor=start)
    sub.accept("m", (2, 0))
    assert start == {"m": (1, 0)}


def test_subscriber_ids_are_unique_and_name_the_transport() -> None:
    """Every subscriber gets a distinct id that starts with its transport."""
    subs = [Subscriber("s", {}, queue_size=1, transport="ws") for _ in range(50)]
    assert len({s.id for s in subs}) == 50
    assert all(s.id.startswith("ws_") for s in subs)


def test_envelope_sse_data_is_computed_once() -> None:
    """Envelope.sse_data returns the same bytes object every time, equal to codec.sse_data."""
    env = _env(3, model="gpt-4")
    first = env.sse_data
    assert first == sse_data(env.event, "gpt-4")
    assert env.sse_data is first
