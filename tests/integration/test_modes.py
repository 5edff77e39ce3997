"""Generation modes and cancellation in-process, against the test Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.jobs.structured import StructuredMode
from bridge.modes import ChatMode, Modes, Outcome
from bridge.providers.base import Message
from bridge.settings import Settings
from bridge.streams.cancel import CancelWatch, request_cancel
from bridge.streams.codec import EventType, StreamEvent, now_ms, to_fields
from bridge.streams.jobs import Fallback, GenerationJob, enqueue
from bridge.streams.keys import Keys
from bridge.streams.seed_requests import ReplyMode

pytestmark = pytest.mark.integration

COMPLETE: Outcome = (EventType.COMPLETE, {"finishReason": "stop"})


class Writer:
    """The part of a GenerationWriter the modes read."""

    tokens = 0


def job(request_id: str = "r1", **changes: Any) -> GenerationJob:
    base = GenerationJob(request_id, f"s-{request_id}", "mock", (Message("user", "hi"),))
    return msgspec.structs.replace(base, **changes)


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
async def watch(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[CancelWatch]:
    """A CancelWatch whose subscription is running."""
    watch = CancelWatch(redis, keys)
    task = asyncio.create_task(watch.watch())
    async with asyncio.timeout(10):
        await watch.ready.wait()
    yield watch
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def hanging(started: asyncio.Event) -> Any:
    async def run_provider(_job: GenerationJob, _writer: Any) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    return run_provider


async def test_request_cancel_answers_by_state(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Unknown generation: `unknown`; queued: `cancelling` (flag set); ended: its status."""
    assert await request_cancel(redis, keys, "nope") == "unknown"
    await enqueue(redis, keys, settings, job())
    assert await request_cancel(redis, keys, "r1") == "cancelling"
    assert await redis.hget(keys.generation("r1"), "cancel") == b"1"
    await redis.hset(keys.generation("r1"), "status", "complete")
    assert await request_cancel(redis, keys, "r1") == "complete"


async def test_a_job_cancelled_before_it_starts_never_calls_the_provider(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """The flag is checked before the mode runs."""
    await enqueue(redis, keys, settings, job())
    await request_cancel(redis, keys, "r1")

    async def run_provider(_job: GenerationJob, _writer: Any) -> Outcome:
        raise AssertionError("the provider must not be called")

    kind, data = await Modes(CancelWatch(redis, keys)).run(job(), Writer(), run_provider)  # type: ignore[arg-type]
    assert kind is EventType.CANCELLED
    assert data["usage"]["completionTokens"] == 0


async def test_a_running_job_is_cancelled_through_the_channel(
    redis: aioredis.Redis, keys: Keys, settings: Settings, watch: CancelWatch
) -> None:
    """A cancel published while the provider runs stops it with a `cancelled` outcome."""
    await enqueue(redis, keys, settings, job())
    await redis.hset(keys.generation("r1"), "status", "running")
    started = asyncio.Event()
    run = asyncio.create_task(Modes(watch).run(job(), Writer(), await hanging(started)))  # type: ignore[arg-type]
    await started.wait()
    assert await request_cancel(redis, keys, "r1") == "cancelling"
    async with asyncio.timeout(10):
        kind, _ = await run
    assert kind is EventType.CANCELLED


async def test_a_cancel_missed_while_unsubscribed_is_applied_on_subscribe(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Only the flag was set (the message was lost): subscribing re-reads it and cancels."""
    await enqueue(redis, keys, settings, job())
    cancels = CancelWatch(redis, keys)
    started = asyncio.Event()
    run = asyncio.create_task(Modes(cancels).run(job(), Writer(), await hanging(started)))  # type: ignore[arg-type]
    await started.wait()
    await redis.hset(keys.generation("r1"), "cancel", "1")
    watcher = asyncio.create_task(cancels.watch())
    try:
        async with asyncio.timeout(10):
            kind, _ = await run
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    assert kind is EventType.CANCELLED


async def test_shutting_down_is_not_mistaken_for_a_cancel(
    redis: aioredis.Redis, keys: Keys, watch: CancelWatch
) -> None:
    """Cancelling the worker's own task propagates: the request stays pending for reclaim."""
    started = asyncio.Event()
    run = asyncio.create_task(Modes(watch).run(job(), Writer(), await hanging(started)))  # type: ignore[arg-type]
    await started.wait()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_an_unknown_mode_is_an_error_naming_the_known_ones() -> None:
    """A request written by a newer version fails clearly instead of crashing the worker."""

    async def run_provider(_job: GenerationJob, _writer: Any) -> Outcome:
        raise AssertionError("not called")

    kind, data = await Modes().run(job(mode="teleport"), Writer(), run_provider)  # type: ignore[arg-type]
    assert kind is EventType.ERROR
    assert data["message"] == "this worker has no mode 'teleport'; it knows chat"


@pytest.mark.parametrize(
    ("tokens_before_failure", "calls"), [(0, ["mock", "backup"]), (1, ["mock"])]
)
async def test_fallbacks_only_replace_a_model_that_wrote_nothing(
    tokens_before_failure: int, calls: list[str]
) -> None:
    """An error before any token moves to the next stream; after a token it is final."""
    seen: list[str] = []
    writer = Writer()

    async def run_provider(attempt: GenerationJob, _writer: Any) -> Outcome:
        seen.append(attempt.model_id)
        if attempt.model_id == "mock":
            writer.tokens = tokens_before_failure
            return EventType.ERROR, {"code": "provider_unavailable", "message": "down"}
        return COMPLETE

    fallback = Fallback("backup", (Message("user", "b"),), {"mock_tokens": 1})
    await ChatMode().run(job(fallbacks=(fallback,)), writer, run_provider)  # type: ignore[arg-type]
    assert seen == calls


async def write_terminal(
    redis: aioredis.Redis, keys: Keys, the_job: GenerationJob, kind: EventType, data: dict[str, Any]
) -> None:
    """Write a token and a terminal event of `the_job` to its stream."""
    stream = keys.stream(the_job.session_id, the_job.model_id)
    token = StreamEvent(EventType.TOKEN, the_job.request_id, 1, now_ms(), "hello ")
    terminal = StreamEvent(kind, the_job.request_id, 2, now_ms(), data=data)
    for event in (token, terminal):
        flat = to_fields(event)
        await redis.xadd(stream, dict(zip(flat[::2], flat[1::2], strict=True)))


async def test_a_settled_job_keeps_its_result_for_the_result_ttl(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """`settled` stores status and result in the job's hash, expiring after the result TTL."""
    settings = msgspec.structs.replace(settings, job_result_ttl_s=123)
    the_job = job("j1", mode="structured")
    result = {"summary": "s", "sentiment": "neutral", "tags": ["t"], "entities": []}
    await write_terminal(
        redis, keys, the_job, EventType.COMPLETE, {"result": result, "attempts": 1}
    )
    await StructuredMode(redis, keys, settings).settled(the_job)
    stored = await redis.hgetall(keys.job("j1"))
    assert stored[b"status"] == b"completed"
    assert msgspec.json.decode(stored[b"result"]) == result
    assert 0 < await redis.ttl(keys.job("j1")) <= 123


async def test_a_reply_is_published_once_however_often_it_settles(
    redis: aioredis.Redis, keys: Keys, settings: Settings, key_prefix: str
) -> None:
    """A redelivered request settles again; the results stream still gets one entry."""
    settings = msgspec.structs.replace(settings, results_stream=f"{key_prefix}llm_results")
    the_job = job(
        "summary.1-0",
        mode="reply",
        meta={"request_id": "ext-1", "type": "summary", "model": "mock"},
    )
    usage = {"promptTokens": 3, "completionTokens": 1, "totalTokens": 4}
    await write_terminal(redis, keys, the_job, EventType.COMPLETE, {"usage": usage})
    mode = ReplyMode(redis, keys, settings)
    await mode.settled(the_job)
    await mode.settled(the_job)
    entries = await redis.xrange(settings.results_stream)
    assert len(entries) == 1
    fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert fields["request_id"] == "ext-1"
    assert fields["result"] == "hello "
    assert (fields["prompt_tokens"], fields["completion_tokens"], fields["total_tokens"]) == (
        "3",
        "1",
        "4",
    )
