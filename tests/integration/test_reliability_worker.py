"""The worker's failure handling, in process against a real Redis and a fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.errors import GenerationStopped
from bridge.providers.base import Message
from bridge.providers.registry import ProviderRegistry
from bridge.redis_raw import RawConnection
from bridge.redis_select import make_client
from bridge.settings import Settings, parse_models
from bridge.streams.codec import EntryId, EventType, StreamEvent, from_fields
from bridge.streams.fanout import FanoutReader
from bridge.streams.history import Gap, HistoryStats, replay
from bridge.streams.jobs import GenerationJob, enqueue
from bridge.streams.keys import Keys
from bridge.streams.processor import (
    DEFAULT_PROCESSORS,
    GenerationContext,
    Processor,
    analytics,
    count_tokens,
)
from bridge.worker import Worker
from tests.fakes.openai_upstream import FakeUpstream
from tests.faults import wait_until

pytestmark = pytest.mark.integration

MODELS = (
    "failing=openai:x?status=503,"
    "broken=openai:x?tokens=10&break_after=2,"
    "hung=openai:x?hang=true,"
    "mock=mock:mock"
)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def worker_settings(settings: Settings, upstream: FakeUpstream) -> Settings:
    return msgspec.structs.replace(
        settings,
        models=parse_models(MODELS),
        openai_base_url=upstream.base_url,
        provider_retry_backoff_s=0.01,
        generation_deadline_s=60.0,
        fanout_block_ms=200,
    )


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings, processors: Iterable[Processor] = DEFAULT_PROCESSORS
) -> AsyncIterator[Worker]:
    assert settings.redis_url is not None
    redis = make_client(settings.redis_url, settings)
    reader = make_client(settings.redis_url, settings, socket_timeout=10)
    providers = ProviderRegistry.from_settings(settings)
    worker = Worker(
        redis=redis,
        reader=reader,
        keys=Keys(settings.key_prefix),
        settings=settings,
        providers=providers,
        processors=processors,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await providers.aclose()
        await redis.aclose()
        await reader.aclose()


async def generate(
    redis: aioredis.Redis, settings: Settings, model: str, **params: Any
) -> list[StreamEvent]:
    """Queue a generation and read its stream until the terminal event."""
    keys = Keys(settings.key_prefix)
    job = GenerationJob(
        uuid.uuid4().hex, f"s_{uuid.uuid4().hex[:8]}", model, (Message("user", "hi"),), params
    )
    await enqueue(redis, keys, settings, job)
    key, last, events = keys.stream(job.session_id, model), "0-0", []
    async with asyncio.timeout(30):
        while True:
            result: Any = await redis.xread({key: last}, block=1000, count=100)
            for _, entries in result or ():
                for entry_id, fields in entries:
                    last = entry_id
                    events.append(from_fields(fields))
                    if events[-1].terminal:
                        return events


async def test_retryable_failures_before_the_first_token_are_retried(
    redis: aioredis.Redis, worker_settings: Settings, upstream: FakeUpstream
) -> None:
    """An upstream answering 503 is tried 1 + provider_retries times, then the stream gets an
    `error` that says how many attempts were made."""
    async with running_worker(worker_settings):
        events = await generate(redis, worker_settings, "failing")
    assert [e.type for e in events] == [EventType.ERROR]
    assert events[0].data is not None
    assert events[0].data["code"] == "provider_http_error"
    assert "after 3 attempts" in events[0].data["message"]
    assert len(upstream.requests) == 3


async def test_no_retry_once_a_token_was_written(
    redis: aioredis.Redis, worker_settings: Settings, upstream: FakeUpstream
) -> None:
    """A stream that breaks after two tokens is not retried (that would repeat the text): the
    two tokens stay, then an `error`."""
    async with running_worker(worker_settings):
        events = await generate(redis, worker_settings, "broken")
    assert [e.content for e in events if e.type is EventType.TOKEN] == ["t0 ", "t1 "]
    assert events[-1].data is not None
    assert events[-1].data["code"] == "provider_stream_broken"
    assert len(upstream.requests) == 1


async def test_the_deadline_ends_a_hung_upstream_and_closes_its_request(
    redis: aioredis.Redis, worker_settings: Settings, upstream: FakeUpstream
) -> None:
    """An upstream that never answers is cut at the generation deadline: `error` with
    `deadline_exceeded`, and the upstream sees its request closed."""
    short = msgspec.structs.replace(worker_settings, generation_deadline_s=3.0)
    async with running_worker(short):
        events = await generate(redis, short, "hung")
        assert len(upstream.requests) == 1
        await asyncio.wait_for(upstream.requests[0].disconnected.wait(), 10)
    assert events[-1].data is not None
    assert events[-1].data["code"] == "deadline_exceeded"


def stop_after(limit: int) -> Processor:
    def stop(ctx: GenerationContext, event: StreamEvent) -> StreamEvent:
        if event.type is EventType.TOKEN and ctx.tokens > limit:
            raise GenerationStopped("answer_too_long", f"more than {limit} tokens")
        return event

    return stop


async def test_processors_run_once_per_event_and_may_stop_a_generation(
    redis: aioredis.Redis, worker_settings: Settings
) -> None:
    """The chain sees each appended event once, in order; a processor that raises
    GenerationStopped ends the answer with its code; a failing hook changes nothing."""
    seen: list[tuple[str, int]] = []

    def record(ctx: GenerationContext, event: StreamEvent) -> None:
        seen.append((event.type.value, event.seq))

    def broken_hook(ctx: GenerationContext, event: StreamEvent) -> None:
        raise RuntimeError("analytics backend down")

    chain = (count_tokens, stop_after(3), analytics(record), analytics(broken_hook))
    async with running_worker(worker_settings, chain):
        events = await generate(redis, worker_settings, "mock", mock_tokens=10, mock_delay_ms=0)
    assert [(e.type.value, e.seq) for e in events] == seen
    assert seen == [("token", 1), ("token", 2), ("token", 3), ("error", 4)]
    assert events[-1].data == {"code": "answer_too_long", "message": "more than 3 tokens"}


async def test_malformed_requests_are_counted_and_dead_lettered(
    redis: aioredis.Redis, worker_settings: Settings
) -> None:
    """A request entry that does not decode is counted, dead-lettered, and the worker serves
    the next one."""
    keys = Keys(worker_settings.key_prefix)
    async with running_worker(worker_settings) as worker:
        await worker.queue.ensure_group()
        await redis.xadd(keys.requests, {"job": "{broken"})
        events = await generate(redis, worker_settings, "mock", mock_tokens=2, mock_delay_ms=0)
        assert events[-1].type is EventType.COMPLETE
        assert worker.malformed == 1
    dead: Any = await redis.xrange(keys.dead_letters)
    assert [fields[b"dead_reason"] for _, fields in dead] == [b"malformed"]


def reading(reader: FanoutReader) -> Callable[[], Awaitable[bool]]:
    async def connected() -> bool:
        return reader.connected

    return connected


async def test_readers_skip_and_count_malformed_entries(
    redis: aioredis.Redis, settings: Settings
) -> None:
    """The fan-out reader and the history replay skip an entry that does not decode, count
    it, and deliver the good entries around it."""
    keys = Keys(settings.key_prefix)
    delivered: list[tuple[EntryId, StreamEvent]] = []
    assert settings.redis_url is not None
    blocking = make_client(settings.redis_url, settings, socket_timeout=10)
    reader = FanoutReader(
        RawConnection(blocking, name="SUBSCRIBE", timed=False),
        RawConnection(redis, name="XREAD"),
        redis,
        keys,
        lambda s, m, after, batch: delivered.extend(batch),
        keepalive_s=0.2,
    )
    await redis.xadd(keys.session_index("s"), {"m": "mock", "r": "r"})
    task = asyncio.create_task(reader.run())
    try:
        await wait_until(reading(reader), 10, "the reader's first read")
        await reader.track("s")
        stream = keys.stream("s", "mock")
        await redis.xadd(stream, {"t": "what"})
        last = await redis.xadd(stream, {"t": "token", "r": "r", "s": "1", "ts": "1", "c": "ok "})
        # a message whose `prev` is past the reader's position: it reads the stream
        await redis.publish(keys.live_channel("s"), b"mock\n%s\n1\n%s\n[]" % (last, last))

        async def got_one() -> bool:
            return len(delivered) == 1

        await wait_until(got_one, 10, "delivery")
        assert reader.malformed == 1
        assert delivered[0][1].content == "ok "
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await blocking.aclose()
    stats = HistoryStats()
    batches = [item async for item in replay(redis, keys, "s", {}, stats=stats)]
    assert stats.malformed == 1
    envelopes = [env for batch in batches if not isinstance(batch, Gap) for env in batch]
    assert [env.event.content for env in envelopes] == ["ok "]


async def test_a_long_generation_is_never_stolen_from_a_live_worker(
    redis: aioredis.Redis, worker_settings: Settings
) -> None:
    """Two workers with a 300 ms reclaim time and a generation ten times longer: the running
    worker's renewals keep it, so there is no seam and the request is delivered once."""
    fast = msgspec.structs.replace(worker_settings, reclaim_idle_ms=300, generation_deadline_s=60.0)
    async with running_worker(fast), running_worker(fast):
        events = await generate(redis, fast, "mock", mock_tokens=150, mock_delay_ms=20)
    assert [e.type for e in events].count(EventType.SEAM) == 0
    assert events[-1].type is EventType.COMPLETE
    generation: Any = await redis.hgetall(Keys(fast.key_prefix).generation(events[0].request_id))
    assert generation[b"epoch"] == b"1"
