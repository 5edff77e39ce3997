"""The reliability mechanisms of the streams layer, one by one, against a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from bridge.errors import Fenced, GenerationStopped, MalformedEntry
from bridge.generation import CLAIM_SCRIPT
from bridge.providers.base import Message
from bridge.redis_select import make_client
from bridge.settings import Settings
from bridge.streams.cancel import CancelWatch, cancel_session
from bridge.streams.codec import EventType, StreamEvent, now_ms
from bridge.streams.consumer import WorkQueue
from bridge.streams.jobs import GenerationJob, decode_job, encode_job, enqueue
from bridge.streams.keys import Keys
from bridge.streams.processor import GenerationContext
from bridge.streams.producer import GenerationWriter, StreamProducer
from tests.faults import RedisProcess, TcpProxy, wait_until

pytestmark = pytest.mark.integration


def job(session: str = "s1", model: str = "mock") -> GenerationJob:
    return GenerationJob(uuid.uuid4().hex, session, model, (Message("user", "hi"),))


async def claim(redis: aioredis.Redis, keys: Keys, j: GenerationJob, worker: str = "w") -> int:
    script = redis.register_script(CLAIM_SCRIPT)
    raw = await script(
        keys=[keys.generation(j.request_id), keys.usage(j.session_id)],
        args=[worker, j.session_id, j.model_id, 3600],
    )
    return int(raw[0])


def context(j: GenerationJob, epoch: int) -> GenerationContext:
    return GenerationContext(j.session_id, j.model_id, j.request_id, "w", epoch)


def token(j: GenerationJob, seq: int) -> StreamEvent:
    return StreamEvent(EventType.TOKEN, j.request_id, seq, now_ms(), content=f"w{seq} ")


@pytest.fixture
def keys(settings: Settings) -> Keys:
    return Keys(settings.key_prefix)


async def test_a_stale_epoch_cannot_append_and_nothing_is_written(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """After a takeover bumps the epoch, the old owner's append is refused inside the script:
    the stream and the usage stay exactly as they were."""
    j = job()
    await enqueue(redis, keys, settings, j)
    producer = StreamProducer(redis, keys, settings)
    old = await claim(redis, keys, j)
    stale = producer.writer(context(j, old))
    await stale.token("a ")
    await stale.drain()
    assert await claim(redis, keys, j, "other") == old + 1
    await stale.token("b ")
    with pytest.raises(Fenced, match="owner epoch is 2"):
        await stale.drain()
    assert await redis.xlen(keys.stream(j.session_id, j.model_id)) == 1
    assert await redis.hget(keys.usage(j.session_id), "mock") == b"1"


async def test_a_retried_append_writes_and_counts_nothing_twice(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """The same batch appended twice (a retry after a lost reply) is stored and counted once."""
    j = job()
    await enqueue(redis, keys, settings, j)
    producer = StreamProducer(redis, keys, settings)
    epoch = await claim(redis, keys, j)
    batch = [token(j, 1), token(j, 2)]
    for _ in range(2):
        stored = await producer.append(
            session=j.session_id, model=j.model_id, request_id=j.request_id, epoch=epoch,
            events=batch,
        )  # fmt: skip
        assert stored.last_seq == 2
    assert await redis.xlen(keys.stream(j.session_id, j.model_id)) == 2
    assert await redis.hgetall(keys.usage(j.session_id)) == {b"mock": b"2", b"*": b"2"}


async def test_the_session_token_limit_is_exact_across_generations(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Two generations of one session against a limit of 5: exactly 5 tokens are stored and
    counted, the writer that hits the limit stops with `session_limit`, and its sequence
    numbers stay gap-free for the error event that follows."""
    limited = msgspec.structs.replace(settings, session_token_limit=5)
    producer = StreamProducer(redis, keys, limited)
    first, second = job(), job(model="other")
    for j in (first, second):
        await enqueue(redis, keys, limited, j)
    w1 = producer.writer(context(first, await claim(redis, keys, first)))
    w2 = producer.writer(context(second, await claim(redis, keys, second)))
    for text in ("a ", "b ", "c "):
        await w1.token(text)
    await w1.drain()
    for text in ("d ", "e ", "f ", "g "):
        await w2.token(text)
    with pytest.raises(GenerationStopped) as stopped:
        await w2.drain()
    assert stopped.value.code == "session_limit"
    assert w2.seq == 2
    await w2.finish(EventType.ERROR, {"code": "session_limit", "message": "cut"})
    entries: Any = await redis.xrange(keys.stream(second.session_id, "other"))
    assert [int(f[b"s"]) for _, f in entries] == [1, 2, 3]
    assert await redis.hget(keys.usage(first.session_id), "*") == b"5"


async def test_the_end_sets_retention_and_a_new_generation_keeps_the_stream_alive(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """A terminal event sets the retention TTL; a later generation on the same stream raises
    it back for as long as it may run, so retention never expires a live answer."""
    short = msgspec.structs.replace(settings, stream_ttl_s=60, generation_deadline_s=600)
    producer = StreamProducer(redis, keys, short)
    first, second = job(), job()
    stream = keys.stream(first.session_id, first.model_id)
    await enqueue(redis, keys, short, first)
    w1 = producer.writer(context(first, await claim(redis, keys, first)))
    await w1.token("a ")
    await w1.finish(EventType.COMPLETE, {})
    assert 0 < await redis.ttl(stream) <= 60
    assert 0 < await redis.ttl(keys.generation(first.request_id)) <= 60
    await enqueue(redis, keys, short, second)
    w2 = producer.writer(context(second, await claim(redis, keys, second)))
    await w2.token("b ")
    await w2.drain()
    assert await redis.ttl(stream) > 600


@pytest.fixture(scope="module")
def tcp_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A Redis on TCP of this module's own, to put a proxy in front of."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"), persistent=False).start()
    yield server
    server.kill()


@contextlib.asynccontextmanager
async def proxied_writer(
    server: RedisProcess, keys: Keys, settings: Settings
) -> AsyncIterator[tuple[TcpProxy, GenerationWriter, GenerationJob]]:
    """The writer of a generation just claimed, its Redis connection through a proxy."""
    with TcpProxy(server.port) as proxy:
        client = make_client(proxy.url, settings, retries=0)
        try:
            j = job()
            await enqueue(client, keys, settings, j)
            writer = StreamProducer(client, keys, settings).writer(
                context(j, await claim(client, keys, j))
            )
            yield proxy, writer, j
        finally:
            await client.aclose()


async def stored_texts(server: RedisProcess, keys: Keys, j: GenerationJob) -> list[str]:
    """The content of every entry of the generation's stream, in order."""
    redis = aioredis.Redis.from_url(server.url)
    try:
        entries: Any = await redis.xrange(keys.stream(j.session_id, j.model_id))
    finally:
        await redis.aclose()
    return [fields.get(b"c", b"").decode() for _, fields in entries]


async def retried(writer: GenerationWriter) -> bool:
    return writer.retries >= 2


async def test_the_writer_rides_out_an_unreachable_redis(
    keys: Keys, settings: Settings, tcp_redis: RedisProcess
) -> None:
    """Appends made while the network to Redis is cut are retried, and once it is back every
    token is stored exactly once, in order."""
    quick = msgspec.structs.replace(settings, redis_timeout_s=1.0)
    async with proxied_writer(tcp_redis, keys, quick) as (proxy, writer, j):
        await writer.token("t0 ")
        await writer.drain()
        proxy.cut()
        for index in range(1, 50):
            await writer.token(f"t{index} ")
        await wait_until(lambda: retried(writer), 30, "append retries")
        proxy.restore()
        await writer.finish(EventType.COMPLETE, {})
    assert (await stored_texts(tcp_redis, keys, j))[:-1] == [f"t{i} " for i in range(50)]
    redis = aioredis.Redis.from_url(tcp_redis.url)
    assert await redis.hget(keys.usage(j.session_id), "*") == b"50"
    await redis.aclose()


async def test_a_writer_gives_up_after_its_retry_time_and_a_later_call_sends_the_rest(
    keys: Keys, settings: Settings, tcp_redis: RedisProcess
) -> None:
    """Past its retry time the writer raises the connection error once; the events it could
    not store stay queued, and its next call stores them, each once, in order."""
    brief = msgspec.structs.replace(settings, redis_timeout_s=1.0, generation_deadline_s=0.5)
    async with proxied_writer(tcp_redis, keys, brief) as (proxy, writer, j):
        proxy.cut()
        await writer.token("t0 ")
        await writer.token("t1 ")
        with pytest.raises(RedisConnectionError):
            await writer.drain()
        assert writer.retries >= 1
        proxy.restore()
        await writer.finish(EventType.COMPLETE, {})
    assert (await stored_texts(tcp_redis, keys, j))[:-1] == ["t0 ", "t1 "]


async def test_an_aborted_writer_stops_retrying_and_writes_nothing_more(
    keys: Keys, settings: Settings, tcp_redis: RedisProcess
) -> None:
    """Abandoning a writer whose append waits for a retry cancels the retry: once Redis is
    back, nothing it had queued is written."""
    async with proxied_writer(tcp_redis, keys, settings) as (proxy, writer, j):
        await writer.token("t0 ")
        await writer.drain()
        proxy.cut()
        await writer.token("t1 ")
        await wait_until(lambda: retried(writer), 30, "append retries")
        await writer.abort()
        retries = writer.retries
        proxy.restore()
        await asyncio.sleep(1.0)  # past the next retry's backoff (0.2 s by now)
        await writer.drain()  # nothing in flight: returns at once, raising nothing
    assert writer.retries == retries
    assert await stored_texts(tcp_redis, keys, j) == ["t0 "]


@pytest.fixture
async def queues(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> tuple[WorkQueue, WorkQueue]:
    fast = msgspec.structs.replace(settings, reclaim_idle_ms=100)
    first = WorkQueue(redis, redis, keys, fast, "first")
    second = WorkQueue(redis, redis, keys, fast, "second")
    await first.ensure_group()
    return first, second


async def idle_past(redis: aioredis.Redis, keys: Keys, entry_id: str, ms: int) -> None:
    async def idle() -> bool:
        info: Any = await redis.xpending_range(
            keys.requests, keys.worker_group, entry_id, entry_id, 1
        )
        return bool(info) and int(info[0]["time_since_delivered"]) > ms

    await wait_until(idle, 10, "idle time")


async def test_renewal_reports_a_lost_request_and_never_steals_it_back(
    redis: aioredis.Redis, keys: Keys, settings: Settings, queues: tuple[WorkQueue, WorkQueue]
) -> None:
    """A request reclaimed by another worker is reported lost by the first worker's renewal,
    which leaves it with its new owner."""
    first, second = queues
    await enqueue(redis, keys, settings, job())
    [delivery] = await first.read(10, block_ms=100)
    await idle_past(redis, keys, delivery.entry_id, 100)
    [taken] = await second.reclaim()
    assert taken.entry_id == delivery.entry_id
    assert taken.times_delivered == 2
    assert await first.renew([delivery.entry_id]) == [delivery.entry_id]
    assert await second.renew([delivery.entry_id]) == []
    info: Any = await redis.xpending_range(keys.requests, keys.worker_group, "-", "+", 10)
    assert info[0]["consumer"] == b"second"


async def test_a_released_request_is_reclaimed_at_once(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """A worker that stops gracefully hands its running request back: another worker's next
    reclaim takes it without waiting for the idle time."""
    slow = msgspec.structs.replace(settings, reclaim_idle_ms=600_000)
    first = WorkQueue(redis, redis, keys, slow, "first")
    second = WorkQueue(redis, redis, keys, slow, "second")
    await first.ensure_group()
    await enqueue(redis, keys, settings, job())
    [delivery] = await first.read(10, block_ms=100)
    assert await second.reclaim() == []
    await first.release([delivery.entry_id])
    assert [d.entry_id for d in await second.reclaim()] == [delivery.entry_id]


async def test_the_request_stream_is_trimmed_below_what_the_group_still_needs(
    redis: aioredis.Redis, keys: Keys, settings: Settings, queues: tuple[WorkQueue, WorkQueue]
) -> None:
    """Of five requests, three read and the first and third acknowledged: trimming removes
    only the first; the pending second, the third after it, and the unread ones stay."""
    first, _ = queues
    for _ in range(5):
        await enqueue(redis, keys, settings, job())
    read = await first.read(3, block_ms=100)
    first.ack(read[0].entry_id)
    first.ack(read[2].entry_id)
    await first.flush_acks()
    assert await first.trim() == 1
    remaining: Any = await redis.xrange(keys.requests)
    assert remaining[0][0].decode() == read[1].entry_id
    assert len(remaining) == 4
    first.ack(read[1].entry_id)
    await first.flush_acks()
    assert await first.trim() == 2  # up to the last delivered; the unread two stay
    assert await redis.xlen(keys.requests) == 2
    assert await first.trim() == 0


async def test_a_vanished_group_is_created_again_by_the_next_read(
    redis: aioredis.Redis, keys: Keys, settings: Settings, queues: tuple[WorkQueue, WorkQueue]
) -> None:
    """After the request stream and its group are lost (a Redis restart without persistence),
    reading recreates them and the next request is served."""
    first, _ = queues
    await redis.delete(keys.requests)
    assert await first.read(10, block_ms=100) == []
    assert await first.reclaim() == []
    await enqueue(redis, keys, settings, job())
    assert len(await first.read(10, block_ms=100)) == 1


async def test_only_busygroup_is_tolerated_when_creating_the_group(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Creating the group twice is fine; a request stream of the wrong type is an error."""
    queue = WorkQueue(redis, redis, keys, settings, "w")
    await queue.ensure_group()
    await queue.ensure_group()
    await redis.delete(keys.requests)
    await redis.set(keys.requests, "not a stream")
    with pytest.raises(aioredis.ResponseError, match="WRONGTYPE"):
        await queue.ensure_group()


async def test_enqueue_is_idempotent_and_never_resets_a_started_generation(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Queuing the same request again (a retry after a lost reply) adds nothing and leaves the
    state of a generation a worker already claimed untouched."""
    j = job()
    assert await enqueue(redis, keys, settings, j) is not None
    await claim(redis, keys, j)
    assert await enqueue(redis, keys, settings, j) is None
    assert await redis.xlen(keys.requests) == 1
    assert await redis.hget(keys.generation(j.request_id), "epoch") == b"1"


@pytest.mark.parametrize(
    "fields",
    [
        {b"job": b"{}"},
        {b"job": encode_job(GenerationJob("r", "a:b", "m", ()))},
        {b"job": encode_job(GenerationJob("r", "s", "..", ()))},
        {b"job": encode_job(GenerationJob("r/x", "s", "m", ()))},
    ],
)
def test_a_request_whose_ids_cannot_be_key_parts_is_malformed(fields: dict[bytes, bytes]) -> None:
    """Ids that would be unsafe in key names make the request malformed (it is dead-lettered)."""
    with pytest.raises(MalformedEntry):
        decode_job(fields)


async def test_a_cancel_flags_the_generation_and_tells_the_workers(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Cancel flags queued or running generations of the session (matching the filters),
    wakes the process running them, and reports the ones that had already ended."""
    watch = CancelWatch(redis, keys)
    task = asyncio.create_task(watch.watch())
    try:
        await asyncio.wait_for(watch.ready.wait(), 10)
        running, other_model, ended = job(), job(model="other"), job()
        for j in (running, other_model, ended):
            await enqueue(redis, keys, settings, j)
        await claim(redis, keys, running)
        await redis.hset(keys.generation(ended.request_id), "status", "complete")
        work = asyncio.create_task(watch.run(running.request_id, asyncio.Event().wait()))
        outcome = await cancel_session(redis, keys, "s1", model="mock")
        assert [t.request_id for t in outcome.cancelling] == [running.request_id]
        assert outcome.cancelling[0].status == "running"
        assert [(t.request_id, t.status) for t in outcome.ended] == [(ended.request_id, "complete")]
        assert await asyncio.wait_for(work, 10) is None  # stopped by the cancel
        assert await redis.hget(keys.generation(running.request_id), "cancel") == b"1"
        assert await redis.hget(keys.generation(other_model.request_id), "cancel") is None
        nothing = await cancel_session(redis, keys, "another-session")
        assert nothing.cancelling == nothing.ended == []
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
