"""The fan-out reader blocks on the activity stream alone and reads only the streams it names.

Real appends (the producer's script) against the test Redis: delivery, a model stream that
appears after tracking, activity of sessions not tailed here, and recovery when
announcements may have been lost (the reader fell a full read behind).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bridge.redis_raw import RawConnection
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
        assert settings.redis_url is not None
        self.blocking = make_client(
            settings.redis_url, settings, socket_timeout=block_ms / 1000 + 10
        )
        self.reader = FanoutReader(
            RawConnection(self.blocking, name="XREAD", timed=False),
            redis,
            self.keys,
            lambda s, m, batch: self.delivered.append((s, m, batch)),
            block_ms=block_ms,
            count=count,
        )

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


@pytest.fixture
async def harness(redis: aioredis.Redis, settings: Settings) -> AsyncIterator[Harness]:
    h = Harness(redis, settings, count=4)
    task = asyncio.create_task(h.reader.run())
    try:
        await wait_until(h.reading, 10, "the reader's first read")
        yield h
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.blocking.aclose()


async def test_appends_to_a_tracked_session_are_delivered_in_order(harness: Harness) -> None:
    await harness.start_generation("s1", "mock", "r1")
    await harness.reader.track("s1")
    for start in range(1, 30, 3):  # ten appends: more than one activity read's worth
        await harness.append("s1", "mock", "r1", range(start, start + 3))

    async def all_there() -> bool:
        return len(harness.contents("s1", "mock")) == 30

    await wait_until(all_there, 10, "thirty tokens")
    assert harness.contents("s1", "mock") == [f"t{seq} " for seq in range(1, 31)]


async def test_a_model_stream_begun_after_tracking_is_read_from_its_start(
    harness: Harness,
) -> None:
    assert harness.reader.models("s2") is None  # not tracked
    await harness.reader.track("s2")
    assert harness.reader.models("s2") == set()  # tracked, no streams yet: catch-up skips
    await harness.start_generation("s2", "other", "r2")
    await harness.append("s2", "other", "r2", range(1, 4))

    async def arrived() -> bool:
        return len(harness.contents("s2", "other")) == 3

    await wait_until(arrived, 10, "the new model's tokens")
    assert harness.reader.models("s2") == {"other"}


async def test_activity_of_sessions_not_tailed_here_is_ignored(harness: Harness) -> None:
    await harness.start_generation("mine", "mock", "r3")
    await harness.start_generation("theirs", "mock", "r4")
    await harness.reader.track("mine")
    await harness.append("theirs", "mock", "r4", range(1, 3))
    await harness.append("mine", "mock", "r3", range(1, 3))

    async def mine_arrived() -> bool:
        return len(harness.contents("mine", "mock")) == 2

    await wait_until(mine_arrived, 10, "the tailed session's tokens")
    assert {s for s, _, _ in harness.delivered} == {"mine"}


async def test_announcements_lost_to_trimming_are_recovered_by_a_full_re_read(
    harness: Harness,
) -> None:
    """Entries whose announcement is gone (as when the activity stream was trimmed past a
    slow reader) still arrive: a full activity read (count=4 here) makes the reader re-read
    every stream it tails."""
    await harness.start_generation("quiet", "mock", "r5")
    await harness.reader.track("quiet")
    stream = harness.keys.stream("quiet", "mock")
    fields = {"t": "token", "r": "r5", "s": "1", "ts": "1", "c": "unannounced "}
    await harness.redis.xadd(stream, fields)  # written with no activity entry
    async with harness.redis.pipeline(transaction=True) as burst:  # one full read's worth
        for i in range(4):
            burst.xadd(harness.keys.activity, {"s": f"elsewhere{i}", "m": "mock"})
        await burst.execute()

    async def recovered() -> bool:
        return harness.contents("quiet", "mock") == ["unannounced "]

    await wait_until(recovered, 10, "the unannounced entry")


async def test_a_redis_error_makes_the_reader_re_read_everything(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """After its connection fails, the reader re-reads every tailed stream: entries written
    while it was away arrive even though their announcements came before it was back."""
    h = Harness(redis, settings, count=100)
    await h.start_generation("gap", "mock", "r6")
    await h.reader.track("gap")
    task = asyncio.create_task(h.reader.run())
    try:
        await wait_until(h.reading, 10, "the reader's first read")
        await h.blocking.connection_pool.disconnect()  # the reader's read fails
        await h.append("gap", "mock", "r6", range(1, 6))

        async def arrived() -> bool:
            return len(h.contents("gap", "mock")) == 5

        await wait_until(arrived, 10, "the tokens written while the reader was away")
        assert h.contents("gap", "mock") == [f"t{seq} " for seq in range(1, 6)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.blocking.aclose()


async def test_an_append_larger_than_one_read_arrives_without_waiting_for_more_activity(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """Ten entries announced once, read four at a time: the rest follow at once, not when
    the next announcement (or the 30 s block timeout) happens to come."""
    h = Harness(redis, settings, count=4, block_ms=30_000)
    await h.start_generation("big", "mock", "r7")
    await h.reader.track("big")
    task = asyncio.create_task(h.reader.run())
    try:
        await h.append("big", "mock", "r7", range(1, 3))  # a first wake-up: the reader is up

        async def started() -> bool:
            return len(h.contents("big", "mock")) == 2

        await wait_until(started, 10, "the first tokens")
        await h.append("big", "mock", "r7", range(3, 13))

        async def all_there() -> bool:
            return len(h.contents("big", "mock")) == 12

        await wait_until(all_there, 5, "the whole append")
        assert h.contents("big", "mock") == [f"t{seq} " for seq in range(1, 13)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await h.blocking.aclose()
