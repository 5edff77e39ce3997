"""The fan-out reader delivers appends from their pub/sub messages, and reads a stream only
when a message shows a gap.

Real appends (the producer's script) against the test Redis: delivery, a model stream that
appears after tracking, sessions not tailed here, entries written without a message, a lost
connection, a session untracked and tracked again, and unreadable messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.redis_raw import RawConnection, pack
from bridge.redis_select import make_client
from bridge.settings import Settings
from bridge.streams.codec import EntryId, EventType, StreamEvent, now_ms
from bridge.streams.fanout import FanoutReader
from bridge.streams.keys import Keys
from bridge.streams.producer import StreamProducer
from tests.faults import wait_until

pytestmark = pytest.mark.integration

Delivered = list[tuple[str, str, list[tuple[EntryId, StreamEvent]]]]


class Harness:
    def __init__(
        self, redis: aioredis.Redis, settings: Settings, count: int, block_ms: int = 200
    ) -> None:
        self.keys = Keys(settings.key_prefix)
        self.redis = redis
        self.producer = StreamProducer(redis, self.keys, settings)
        self.delivered: Delivered = []
        self.firsts: dict[tuple[str, str], EntryId] = {}  # each stream's first batch's `after`
        self.breaks: list[tuple[str, str]] = []  # a batch's `after` was not the last entry
        self._last: dict[tuple[str, str], EntryId] = {}
        self.losses = 0  # the reader said its connection was lost
        assert settings.redis_url is not None
        self.blocking = make_client(
            settings.redis_url, settings, socket_timeout=block_ms / 1000 + 10
        )
        self.reader = FanoutReader(
            RawConnection(self.blocking, name="SUBSCRIBE", timed=False),
            RawConnection(redis, name="XREAD"),
            redis,
            self.keys,
            self.deliver,
            keepalive_s=block_ms / 1000,
            count=count,
            on_lost=self.lost,
        )

    def lost(self) -> None:
        self.losses += 1

    def deliver(
        self, session: str, model: str, after: EntryId, batch: list[tuple[EntryId, StreamEvent]]
    ) -> None:
        stream = (session, model)
        self.firsts.setdefault(stream, after)
        if self._last.get(stream, after) != after:
            self.breaks.append(stream)
        self._last[stream] = batch[-1][0]
        self.delivered.append((session, model, batch))

    async def start_generation(self, session: str, model: str, request_id: str) -> None:
        await self.redis.hset(self.keys.generation(request_id), "epoch", 1)
        await self.redis.xadd(self.keys.session_index(session), {"m": model, "r": request_id})

    async def append(self, session: str, model: str, request_id: str, seqs: range) -> None:
        events = [
            StreamEvent(EventType.TOKEN, request_id, seq, now_ms(), content=f"t{seq} ")
            for seq in seqs
        ]
        await self.producer.append(
            session=session, model=model, request_id=request_id, epoch=1, events=events
        )

    def contents(self, session: str, model: str) -> list[str]:
        return [
            event.content
            for s, m, batch in self.delivered
            if (s, m) == (session, model)
            for _, event in batch
        ]

    async def reading(self) -> bool:
        return self.reader.connected

    async def wait_for(self, session: str, model: str, count: int, what: str) -> list[str]:
        """Wait until `count` entries of the stream were delivered; their contents."""

        async def arrived() -> bool:
            return len(self.contents(session, model)) >= count

        await wait_until(arrived, 10, what)
        return self.contents(session, model)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The reader running (once it has read), then stopped, and its connection closed."""
        task = asyncio.create_task(self.reader.run())
        try:
            await wait_until(self.reading, 10, "the reader's first read")
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self.blocking.aclose()


@pytest.fixture
async def harness(redis: aioredis.Redis, settings: Settings) -> AsyncIterator[Harness]:
    h = Harness(redis, settings, count=4)
    async with h.running():
        yield h


def texts(seqs: range) -> list[str]:
    return [f"t{seq} " for seq in seqs]


async def test_appends_to_a_tracked_session_are_delivered_in_order(harness: Harness) -> None:
    await harness.start_generation("s1", "mock", "r1")
    await harness.reader.track("s1")
    for start in range(1, 30, 3):  # ten appends
        await harness.append("s1", "mock", "r1", range(start, start + 3))
    assert await harness.wait_for("s1", "mock", 30, "thirty tokens") == texts(range(1, 31))
    # each batch says which position it continues: the one before it, from tracking on
    assert harness.breaks == []
    assert harness.firsts[("s1", "mock")] == (0, 0)  # the stream was empty when tracked


async def test_a_model_stream_begun_after_tracking_is_read_from_its_start(
    harness: Harness,
) -> None:
    assert harness.reader.models("s2") is None  # not tracked
    await harness.reader.track("s2")
    assert harness.reader.models("s2") == set()  # tracked, no streams yet: catch-up skips
    await harness.start_generation("s2", "other", "r2")
    await harness.append("s2", "other", "r2", range(1, 4))
    await harness.wait_for("s2", "other", 3, "the new model's tokens")
    assert harness.reader.models("s2") == {"other"}
    assert harness.firsts[("s2", "other")] == (0, 0)  # read from its start


async def test_appends_of_sessions_not_tailed_here_are_not_delivered(harness: Harness) -> None:
    await harness.start_generation("mine", "mock", "r3")
    await harness.start_generation("theirs", "mock", "r4")
    await harness.reader.track("mine")
    await harness.append("theirs", "mock", "r4", range(1, 3))
    await harness.append("mine", "mock", "r3", range(1, 3))
    await harness.wait_for("mine", "mock", 2, "the tailed session's tokens")
    assert {s for s, _, _ in harness.delivered} == {"mine"}


async def test_entries_written_without_a_message_are_read_at_the_next_one(
    harness: Harness,
) -> None:
    """An entry the script did not write (so no message named it) comes before the next
    append's own entries: that message's `prev` is past the reader's position, so the reader
    reads the stream from its position."""
    await harness.start_generation("quiet", "mock", "r5")
    await harness.reader.track("quiet")
    stream = harness.keys.stream("quiet", "mock")
    fields = {"t": "token", "r": "r5", "s": "1", "ts": "1", "c": "unannounced "}
    await harness.redis.xadd(stream, fields)  # written with no message
    await harness.append("quiet", "mock", "r5", range(2, 4))
    got = await harness.wait_for("quiet", "mock", 3, "the unannounced entry and the next")
    assert got == ["unannounced ", "t2 ", "t3 "]
    assert harness.breaks == []


async def test_messages_behind_a_reply_still_waiting_are_delivered_by_the_follow_loop(
    harness: Harness,
) -> None:
    """A message is delivered from the connection's callback only when no reply waits ahead of
    it; one that arrives behind a waiting reply (here a PONG read in the same chunk) is queued,
    and the follow loop delivers it, in order with those handed over before."""
    await harness.start_generation("queued", "mock", "r9")
    await harness.reader.track("queued")
    await harness.append("queued", "mock", "r9", range(1, 3))
    await harness.wait_for("queued", "mock", 2, "the first tokens, from the callback")
    handled: list[bytes] = []
    on_message = harness.reader._on_message
    by_callback: list[Any] = []
    on_reply = harness.reader._on_reply

    def spying(channel: bytes, payload: bytes) -> list[bytes]:
        handled.append(payload)
        return on_message(channel, payload)

    def listening(reply: Any) -> Any:
        by_callback.append(reply)
        return on_reply(reply)

    harness.reader._on_message = spying  # type: ignore[method-assign]
    harness.reader._subscriber.listen(listening)
    subscription = harness.reader._subscriber._replies
    assert subscription is not None
    subscription.transport.pause_reading()  # the PONG and the message arrive in one chunk
    await harness.reader._subscriber.send(pack("PING", "behind"))
    await harness.append("queued", "mock", "r9", range(3, 5))
    await asyncio.sleep(0.1)
    subscription.transport.resume_reading()
    got = await harness.wait_for("queued", "mock", 4, "the tokens queued behind the PONG")
    assert got == texts(range(1, 5))
    assert harness.breaks == []
    assert len(handled) == 1  # the message, handled once
    # by the loop: the callback saw the PONG ahead of it (and keepalive ones), no message
    assert [b"pong", b"behind"] in by_callback
    assert [reply for reply in by_callback if reply[0] == b"message"] == []


async def test_unreadable_messages_make_the_reader_read_the_session_s_streams(
    harness: Harness,
) -> None:
    """A message that is not the script's (any process may PUBLISH) is counted and skipped;
    the reader reads the session's streams instead, and keeps running."""
    await harness.start_generation("odd", "mock", "r8")
    await harness.reader.track("odd")
    stream = harness.keys.stream("odd", "mock")
    await harness.redis.xadd(stream, {"t": "token", "r": "r8", "s": "1", "ts": "1", "c": "x "})
    channel = harness.keys.live_channel("odd")
    far = f"{2**62}-0"  # past every real id: taken as a position, it would hide what follows
    fake = '[[9,1,"t","token","r","r8","s","9","ts","1","c","fake "]]'
    for hostile in (
        b"",
        b"mock",
        b"a:b\n0-0\n1\n1-1\n[]",
        b"mock\n0-0\n5\n9-9\n[[1]]",
        f"mock\n0-0\n0\n{far}\n{fake}".encode(),  # entry index 0: not one of the script's
        b"\xff",
    ):
        await harness.redis.publish(channel, hostile)
    assert await harness.wait_for("odd", "mock", 1, "the entry, read from the stream") == ["x "]

    async def all_counted() -> bool:  # the one naming ids before the position is not read
        return harness.reader.malformed == 5

    await wait_until(all_counted, 10, "five unreadable messages")
    await harness.append("odd", "mock", "r8", range(2, 3))
    got = await harness.wait_for("odd", "mock", 2, "the next append, from its message")
    assert got == ["x ", "t2 "]


async def test_a_session_tracked_again_after_untracking_keeps_its_subscription(
    harness: Harness,
) -> None:
    """Untracking queues an UNSUBSCRIBE for the next keepalive; tracking the session again
    before or after it went out leaves the session subscribed."""
    await harness.start_generation("back", "mock", "r9")
    await harness.reader.track("back")
    harness.reader.untrack("back")
    await harness.reader.track("back")  # before the keepalive: the UNSUBSCRIBE is dropped
    await asyncio.sleep(0.5)  # keepalives (every 0.2 s here) go out
    await harness.append("back", "mock", "r9", range(1, 3))
    await harness.wait_for("back", "mock", 2, "tokens after tracking again")
    harness.reader.untrack("back")
    await asyncio.sleep(0.5)  # the UNSUBSCRIBE goes out
    await harness.reader.track("back")
    await harness.append("back", "mock", "r9", range(3, 5))
    got = await harness.wait_for("back", "mock", 4, "tokens after the UNSUBSCRIBE")
    assert got == texts(range(1, 5))


async def test_a_redis_error_makes_the_reader_re_read_everything(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """After its connection fails, the reader says so (what it delivered may be gone from a
    restarted Redis), subscribes again and re-reads every tailed stream: entries written while
    it was away arrive though their messages went nowhere."""
    h = Harness(redis, settings, count=100)
    await h.start_generation("gap", "mock", "r6")
    async with h.running():
        await h.reader.track("gap")
        assert h.losses == 0
        await h.blocking.connection_pool.disconnect()  # the reader's read fails
        await h.append("gap", "mock", "r6", range(1, 6))
        got = await h.wait_for("gap", "mock", 5, "the tokens written while it was away")
        assert got == texts(range(1, 6))
        assert h.breaks == []
        assert h.losses >= 1


async def test_a_gap_longer_than_one_read_is_read_whole_at_once(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """Ten entries written without messages, read four at a time here: the next append's
    message makes the reader read them all at once, not at the 30 s keepalive."""
    h = Harness(redis, settings, count=4, block_ms=30_000)
    await h.start_generation("big", "mock", "r7")
    async with h.running():
        await h.reader.track("big")
        stream = h.keys.stream("big", "mock")
        for seq in range(1, 11):
            fields = {"t": "token", "r": "r7", "s": str(seq), "ts": "1", "c": f"t{seq} "}
            await h.redis.xadd(stream, fields)  # type: ignore[arg-type]
        await h.append("big", "mock", "r7", range(11, 13))
        got = await h.wait_for("big", "mock", 12, "the gap and the append")
        assert got == texts(range(1, 13))
        assert h.breaks == []  # four reads of four, each continuing the last


async def test_a_session_tracked_while_the_reader_is_away_is_subscribed_when_it_is_back(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """With no subscription (the reader not started, or reconnecting), tracking waits for the
    reader's next subscribing, which includes the session; its appends then arrive."""
    h = Harness(redis, settings, count=100)
    await h.start_generation("late", "mock", "r10")
    tracking = asyncio.create_task(h.reader.track("late"))
    await asyncio.sleep(0.3)
    assert not tracking.done()  # nothing subscribed it yet
    async with h.running():
        await asyncio.wait_for(tracking, 10)
        assert h.reader.models("late") == {"mock"}
        await h.append("late", "mock", "r10", range(1, 3))
        await h.wait_for("late", "mock", 2, "the tokens of the session tracked early")


async def test_tracking_fails_in_time_when_no_subscription_can_be_made(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """No reader to confirm a subscription (Redis away): tracking raises a Redis timeout
    after `timeout_s` (the SSE route answers `reconnect`) and leaves nothing tracked."""
    h = Harness(redis, settings, count=100)
    h.reader = FanoutReader(
        RawConnection(h.blocking, name="SUBSCRIBE", timed=False),
        RawConnection(redis, name="XREAD"),
        redis,
        h.keys,
        lambda s, m, after, batch: None,
        timeout_s=0.3,
    )
    try:
        with pytest.raises(RedisTimeoutError):
            await h.reader.track("never")
        assert h.reader.tracked_sessions == 0
        assert h.reader.models("never") is None
    finally:
        await h.blocking.aclose()
