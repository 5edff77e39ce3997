"""ConnectionManager: registration, delivery per session, tracking handshakes and shutdown."""

from __future__ import annotations

import asyncio

import pytest

from bridge.connections.manager import ConnectionManager
from bridge.connections.subscriber import Closed, Subscriber
from bridge.errors import CloseReason
from bridge.streams.codec import EntryId, EventType, StreamEvent


class FakeTracker:
    """A SessionTracker whose track() waits for `release` and may then fail."""

    def __init__(self, *, gate: bool = False) -> None:
        self.release = asyncio.Event()
        if not gate:
            self.release.set()
        self.started = asyncio.Event()
        self.fail_with: BaseException | None = None
        self.tracked: list[str] = []
        self.untracked: list[str] = []

    async def track(self, session: str) -> None:
        self.tracked.append(session)
        self.started.set()
        await self.release.wait()
        if self.fail_with is not None:
            raise self.fail_with

    def untrack(self, session: str) -> None:
        self.untracked.append(session)


def _batch(*seqs: int) -> list[tuple[EntryId, StreamEvent]]:
    return [((1000, s), StreamEvent(EventType.TOKEN, "req", s, 1.0, content=f"t{s}")) for s in seqs]


def _manager(
    tracker: FakeTracker | None = None, queue_size: int = 16, linger_s: float = 0.0
) -> ConnectionManager:
    manager = ConnectionManager(queue_size=queue_size, linger_s=linger_s)
    manager.tracker = tracker
    return manager


async def _settle(*tasks: asyncio.Future[object]) -> None:
    """Wait (bounded) until every task is done, without raising their errors."""
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2.0)


async def test_connect_and_disconnect_keep_counts() -> None:
    """connect registers connections per session; disconnect forgets them, session by session."""
    manager = _manager()
    a1 = await manager.connect("a", {})
    a2 = await manager.connect("a", {"m": (5, 0)})
    b1 = await manager.connect("b", {})
    assert manager.connection_count == 3
    assert manager.session_count == 2
    assert a2.cursor == {"m": (5, 0)}
    manager.disconnect(a1)
    assert (manager.connection_count, manager.session_count) == (2, 2)
    manager.disconnect(a2)
    assert (manager.connection_count, manager.session_count) == (1, 1)
    manager.disconnect(b1)
    manager.disconnect(b1)  # twice is harmless
    assert (manager.connection_count, manager.session_count) == (0, 0)


async def test_connect_uses_the_transport_and_queue_size() -> None:
    """A connection gets the requested transport and the manager's queue size."""
    manager = _manager(queue_size=2)
    sub = await manager.connect("a", {}, transport="ws")
    assert sub.transport == "ws"
    assert sub.session == "a"
    assert not sub.offer([object(), object(), object()])  # type: ignore[list-item]
    assert sub.closed is CloseReason.SLOW_CONSUMER


async def test_deliver_reaches_every_subscriber_of_the_session_only() -> None:
    """deliver hands the batch to every connection of its session and to no other session."""
    manager = _manager()
    a1 = await manager.connect("a", {})
    a2 = await manager.connect("a", {})
    b1 = await manager.connect("b", {})
    manager.deliver("a", "gpt-4", (1000, 0), _batch(1, 2))
    got1 = await a1.next_batch(1.0)
    got2 = await a2.next_batch(1.0)
    assert [(e.model, e.entry_id, e.event.seq) for e in got1] == [
        ("gpt-4", (1000, 1), 1),
        ("gpt-4", (1000, 2), 2),
    ]
    assert [e.event for e in got2] == [e.event for e in got1]
    assert b1.queued == 0
    assert await b1.next_batch(0.01) == []


async def test_delivered_envelopes_are_shared_and_encoded_once() -> None:
    """All connections of a session get the same Envelope objects, so sse_data is built once."""
    manager = _manager()
    a1 = await manager.connect("a", {})
    a2 = await manager.connect("a", {})
    manager.deliver("a", "m", (1000, 0), _batch(1))
    (env1,) = await a1.next_batch(1.0)
    (env2,) = await a2.next_batch(1.0)
    assert env1 is env2
    assert env1.sse_data is env2.sse_data


async def test_deliver_to_an_unknown_session_does_nothing() -> None:
    """Delivering to a session without local connections is a no-op."""
    manager = _manager()
    a1 = await manager.connect("a", {})
    manager.deliver("nobody", "m", (1000, 0), _batch(1))
    assert a1.queued == 0


async def test_deliver_closes_only_the_overflowing_subscriber() -> None:
    """A full queue closes that connection as a slow consumer; the others keep receiving."""
    manager = _manager(queue_size=2)
    slow = await manager.connect("a", {})
    fast = await manager.connect("a", {})
    manager.deliver("a", "m", (1000, 0), _batch(1, 2))
    assert len(await fast.next_batch(1.0)) == 2
    manager.deliver("a", "m", (1000, 2), _batch(3))
    assert slow.closed is CloseReason.SLOW_CONSUMER
    assert fast.closed is None
    assert manager.overflows == 1
    assert [e.event.seq for e in await fast.next_batch(1.0)] == [3]


async def test_an_overflowed_subscriber_is_counted_once() -> None:
    """Later deliveries to an already closed slow consumer do not count further overflows."""
    manager = _manager(queue_size=1)
    slow = await manager.connect("a", {})
    manager.deliver("a", "m", (1000, 0), _batch(1, 2))
    assert slow.closed is CloseReason.SLOW_CONSUMER
    assert manager.overflows == 1
    manager.deliver("a", "m", (1000, 2), _batch(3))
    manager.deliver("a", "m", (1000, 3), _batch(4))
    assert manager.overflows == 1


async def test_first_connect_tracks_once_even_when_connects_race() -> None:
    """Concurrent first connects of a session call track once, and all wait for it to finish."""
    tracker = FakeTracker(gate=True)
    manager = _manager(tracker)
    tasks = [asyncio.ensure_future(manager.connect("a", {})) for _ in range(5)]
    await asyncio.wait_for(tracker.started.wait(), 1.0)
    await asyncio.sleep(0)  # let every connect reach its wait
    assert not any(t.done() for t in tasks)
    tracker.release.set()
    subs = await asyncio.wait_for(asyncio.gather(*tasks), 1.0)
    assert tracker.tracked == ["a"]
    assert manager.connection_count == 5
    await manager.connect("a", {})
    assert tracker.tracked == ["a"]
    await manager.connect("b", {})
    assert tracker.tracked == ["a", "b"]
    assert len({s.id for s in subs}) == 5


async def test_failing_track_fails_every_waiting_connect_and_the_next_one_retries() -> None:
    """A track error reaches every waiting connect and unregisters them; the next one retries."""
    tracker = FakeTracker(gate=True)
    tracker.fail_with = ConnectionError("redis down")
    manager = _manager(tracker)
    tasks = [asyncio.ensure_future(manager.connect("a", {})) for _ in range(3)]
    await asyncio.wait_for(tracker.started.wait(), 1.0)
    assert manager.connection_count == 3
    tracker.release.set()
    await _settle(*tasks)
    for task in tasks:
        with pytest.raises(ConnectionError, match="redis down"):
            task.result()
    assert manager.connection_count == 0
    assert manager.session_count == 0
    tracker.fail_with = None
    sub = await asyncio.wait_for(manager.connect("a", {}), 1.0)
    assert tracker.tracked == ["a", "a"]
    assert manager.connection_count == 1
    manager.deliver("a", "m", (1000, 0), _batch(1))
    assert sub.queued == 1


async def test_cancelled_connect_leaves_the_shared_track_running_for_the_others() -> None:
    """Cancelling one waiting connect unregisters it only; the others still get tracked."""
    tracker = FakeTracker(gate=True)
    manager = _manager(tracker)
    quitter = asyncio.ensure_future(manager.connect("a", {}))
    stayer = asyncio.ensure_future(manager.connect("a", {}))
    await asyncio.wait_for(tracker.started.wait(), 1.0)
    quitter.cancel()
    await _settle(quitter)
    assert quitter.cancelled()
    assert manager.connection_count == 1
    assert not stayer.done()
    tracker.release.set()
    sub = await asyncio.wait_for(stayer, 1.0)
    assert tracker.tracked == ["a"]
    assert tracker.untracked == []
    manager.deliver("a", "m", (1000, 0), _batch(1))
    assert sub.queued == 1


async def test_last_disconnect_untracks() -> None:
    """Only the last connection of a session to leave calls untrack, once."""
    tracker = FakeTracker()
    manager = _manager(tracker)
    a1 = await manager.connect("a", {})
    a2 = await manager.connect("a", {})
    b1 = await manager.connect("b", {})
    manager.disconnect(a1)
    assert tracker.untracked == []
    manager.disconnect(a2)
    assert tracker.untracked == ["a"]
    manager.disconnect(a2)
    assert tracker.untracked == ["a"]
    manager.disconnect(b1)
    assert tracker.untracked == ["a", "b"]


async def test_reconnect_after_the_last_disconnect_tracks_again() -> None:
    """Once a session was untracked, its next connection calls track again."""
    tracker = FakeTracker()
    manager = _manager(tracker)
    manager.disconnect(await manager.connect("a", {}))
    await manager.connect("a", {})
    assert tracker.tracked == ["a", "a"]
    assert tracker.untracked == ["a"]


async def test_a_lingering_session_is_untracked_once_the_linger_passes() -> None:
    """With a linger, the last disconnect keeps the session tailed until it passes."""
    tracker = FakeTracker()
    manager = _manager(tracker, linger_s=0.05)
    manager.disconnect(await manager.connect("a", {}))
    assert tracker.untracked == []
    assert (manager.session_count, manager.lingering_count) == (0, 1)
    manager.deliver("a", "m", (1000, 0), _batch(1))  # nobody listens: dropped (Redis keeps it)
    await asyncio.sleep(0.1)
    assert tracker.untracked == ["a"]
    assert manager.lingering_count == 0
    await manager.connect("a", {})
    assert tracker.tracked == ["a", "a"]


async def test_a_reconnect_within_the_linger_skips_tracking() -> None:
    """A connection back within the linger neither re-tracks nor is untracked later."""
    tracker = FakeTracker()
    manager = _manager(tracker, linger_s=0.05)
    manager.disconnect(await manager.connect("a", {}))
    sub = await manager.connect("a", {})
    assert tracker.tracked == ["a"]
    assert manager.lingering_count == 0
    await asyncio.sleep(0.1)
    assert tracker.untracked == []
    manager.deliver("a", "m", (1000, 0), _batch(1))
    assert sub.queued == 1
    manager.disconnect(sub)  # leaving again starts a new linger
    await asyncio.sleep(0.1)
    assert tracker.untracked == ["a"]


async def test_a_session_whose_tracking_failed_does_not_linger() -> None:
    """Only a session that is really tailed lingers: a failed track is forgotten at once."""
    tracker = FakeTracker()
    tracker.fail_with = ConnectionError("redis away")
    manager = _manager(tracker, linger_s=10.0)
    with pytest.raises(ConnectionError):
        await manager.connect("a", {})
    assert manager.lingering_count == 0
    tracker.fail_with = None
    await manager.connect("a", {})
    assert tracker.tracked == ["a", "a"]


async def test_connect_without_tracker_registers_immediately() -> None:
    """With no tracker attached, connect just registers the connection."""
    manager = _manager(None)
    sub = await asyncio.wait_for(manager.connect("a", {}), 1.0)
    assert isinstance(sub, Subscriber)
    assert manager.connection_count == 1


async def test_close_all_closes_every_connection_with_the_reason() -> None:
    """close_all closes every connection of every session and returns how many there were."""
    manager = _manager()
    subs = [await manager.connect(s, {}) for s in ("a", "a", "b", "c")]
    waiter = asyncio.ensure_future(subs[0].next_batch(5.0))
    await asyncio.sleep(0)
    assert manager.close_all(CloseReason.SHUTDOWN) == 4
    assert all(s.closed is CloseReason.SHUTDOWN for s in subs)
    with pytest.raises(Closed):
        await asyncio.wait_for(waiter, 1.0)
    manager.deliver("a", "m", (1000, 0), _batch(1))
    assert all(s.queued == 0 for s in subs)
