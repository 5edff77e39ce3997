"""The producer's append script and GenerationWriter against a real Redis.

Fencing, idempotency by sequence, exact usage accounting, expiry after the terminal event,
batching of tokens that arrive during a round trip, and MAXLEN trimming.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.errors import Fenced
from bridge.settings import Settings
from bridge.streams.codec import EventType, StreamEvent, from_fields, parse_entry_id
from bridge.streams.keys import Keys
from bridge.streams.processor import GenerationContext
from bridge.streams.producer import GenerationWriter, StreamProducer

pytestmark = pytest.mark.integration

SESSION = "sess.one-1"
MODEL = "gpt-4"
RID = "req0001"


@pytest.fixture
def keys(key_prefix: str) -> Keys:
    return Keys(key_prefix)


@pytest.fixture
async def generation(redis: aioredis.Redis, keys: Keys) -> str:
    """A fresh generation hash owned by epoch 1, as a worker creates it before writing."""
    await redis.hset(keys.generation(RID), mapping={"epoch": 1, "status": "running", "seq": 0})
    return keys.generation(RID)


def _token(seq: int, text: str | None = None) -> StreamEvent:
    return StreamEvent(EventType.TOKEN, RID, seq, 1703123456789.0 + seq, content=text or f"t{seq}")


def _terminal(seq: int, kind: EventType = EventType.COMPLETE) -> StreamEvent:
    return StreamEvent(kind, RID, seq, 1703123456999.0, data={"finishReason": "stop"})


async def _append(
    producer: StreamProducer, events: Sequence[StreamEvent], *, epoch: int = 1
) -> None:
    await producer.append(session=SESSION, model=MODEL, request_id=RID, epoch=epoch, events=events)


def _appends(producer: StreamProducer, measure: Callable[[list[StreamEvent]], int]) -> list[int]:
    """`measure` of each append's events, in the order the producer is asked for them."""
    calls: list[int] = []
    original = producer.submit

    def measuring_submit(ctx: GenerationContext, events: list[StreamEvent], done: Any) -> None:
        calls.append(measure(events))
        original(ctx, events, done)

    producer.submit = measuring_submit  # type: ignore[method-assign]
    return calls


async def _write_all(producer: StreamProducer, texts: list[str]) -> GenerationWriter:
    """Write `texts` as one generation's tokens, as fast as the writer takes them, and finish."""
    writer = producer.writer(GenerationContext(SESSION, MODEL, RID, "w", 1))
    for text in texts:
        await writer.token(text)
    await writer.finish(EventType.COMPLETE, {"finishReason": "stop"})
    return writer


async def _stored(redis: aioredis.Redis, keys: Keys) -> list[tuple[tuple[int, int], StreamEvent]]:
    entries: Any = await redis.xrange(keys.stream(SESSION, MODEL))
    return [(parse_entry_id(raw_id), from_fields(fields)) for raw_id, fields in entries]


async def _usage(redis: aioredis.Redis, keys: Keys) -> int | None:
    raw = await redis.hget(keys.usage(SESSION), MODEL)
    return None if raw is None else int(raw)


async def test_appends_land_in_order_with_increasing_seq(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """Events appended in two calls are stored in order, decodable, with increasing seq."""
    producer = StreamProducer(redis, keys, settings)
    first = [_token(1, "Hel"), _token(2, "lo\n")]
    second = [StreamEvent(EventType.SEAM, RID, 3, 1.0, data={"mode": "continue"}), _token(4, "!")]
    await _append(producer, first)
    await _append(producer, second)
    stored = await _stored(redis, keys)
    assert [event for _, event in stored] == first + second
    ids = [entry_id for entry_id, _ in stored]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert int(await redis.hget(generation, "seq")) == 4
    assert await redis.hget(generation, "status") == b"running"


async def test_appending_the_same_events_twice_writes_them_once(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """A retried append whose first attempt landed writes nothing again; overlaps add only news."""
    producer = StreamProducer(redis, keys, settings)
    batch = [_token(1), _token(2), _token(3)]
    await _append(producer, batch)
    await _append(producer, batch)
    assert [e.seq for _, e in await _stored(redis, keys)] == [1, 2, 3]
    await _append(producer, [_token(2), _token(3), _token(4), _token(5)])
    assert [e.seq for _, e in await _stored(redis, keys)] == [1, 2, 3, 4, 5]
    assert int(await redis.hget(generation, "seq")) == 5


async def test_wrong_epoch_is_fenced_and_writes_nothing(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """An append with a stale or future epoch raises Fenced and changes no key."""
    producer = StreamProducer(redis, keys, settings)
    await _append(producer, [_token(1)])
    before = await redis.hgetall(generation)
    for epoch in (0, 2):
        with pytest.raises(Fenced, match=RID):
            await _append(producer, [_token(2), _terminal(3)], epoch=epoch)
    assert [e.seq for _, e in await _stored(redis, keys)] == [1]
    assert await redis.hgetall(generation) == before
    assert await _usage(redis, keys) == 1
    assert await redis.ttl(keys.stream(SESSION, MODEL)) != settings.stream_ttl_s


async def test_missing_generation_is_fenced(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Without a generation hash (no owner at all) an append raises Fenced and writes nothing."""
    producer = StreamProducer(redis, keys, settings)
    with pytest.raises(Fenced):
        await _append(producer, [_token(1)])
    assert await redis.exists(keys.stream(SESSION, MODEL), keys.usage(SESSION)) == 0


@pytest.mark.parametrize("kind", [EventType.COMPLETE, EventType.ERROR, EventType.CANCELLED])
async def test_appends_after_a_terminal_event_are_fenced(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str, kind: EventType
) -> None:
    """Once a terminal event is stored, new appends raise Fenced; a retried batch is a no-op."""
    producer = StreamProducer(redis, keys, settings)
    await _append(producer, [_token(1), _terminal(2, kind)])
    assert await redis.hget(generation, "status") == kind.value.encode()
    with pytest.raises(Fenced, match="ended"):
        await _append(producer, [_token(3)])
    await _append(producer, [_token(1), _terminal(2, kind)])  # a retry: already stored
    assert [e.seq for _, e in await _stored(redis, keys)] == [1, 2]
    assert await _usage(redis, keys) == 1


async def test_usage_counts_only_tokens_exactly_even_under_retries(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """The usage hash (field = model) and the generation's counter equal the token entries."""
    producer = StreamProducer(redis, keys, settings)
    seam = StreamEvent(EventType.SEAM, RID, 3, 1.0, data={"mode": "restart"})
    first = [_token(1), _token(2), seam, _token(4)]
    await _append(producer, first)
    await _append(producer, first)  # a duplicate retry
    await _append(producer, [_token(4), _token(5), _terminal(6)])
    stored = await _stored(redis, keys)
    token_entries = sum(1 for _, e in stored if e.type is EventType.TOKEN)
    assert token_entries == 4
    assert await _usage(redis, keys) == 4
    assert int(await redis.hget(generation, "tokens")) == 4
    assert await redis.hgetall(keys.usage(SESSION)) == {MODEL.encode(): b"4", b"*": b"4"}


async def test_usage_is_per_model_and_sums_over_generations(
    redis: aioredis.Redis, keys: Keys, settings: Settings
) -> None:
    """Two generations of one session on two models count into separate fields, which add up."""
    producer = StreamProducer(redis, keys, settings)
    for rid, model, n in (("g1", "a", 3), ("g2", "b", 2), ("g3", "a", 4)):
        await redis.hset(keys.generation(rid), mapping={"epoch": 7, "status": "running", "seq": 0})
        events = [StreamEvent(EventType.TOKEN, rid, i, 1.0, content="x") for i in range(1, n + 1)]
        await producer.append(session=SESSION, model=model, request_id=rid, epoch=7, events=events)
    assert await redis.hgetall(keys.usage(SESSION)) == {b"a": b"7", b"b": b"2", b"*": b"9"}


async def test_terminal_event_sets_the_stream_expiry(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """The terminal append sets EXPIRE stream_ttl_s on the stream and the generation hash."""
    settings = msgspec.structs.replace(settings, stream_ttl_s=1234)
    producer = StreamProducer(redis, keys, settings)
    await _append(producer, [_token(1)])
    await _append(producer, [_token(2), _terminal(3)])
    stream_ttl = await redis.ttl(keys.stream(SESSION, MODEL))
    assert 1230 <= stream_ttl <= 1234
    assert 1230 <= await redis.ttl(generation) <= 1234


async def test_stream_of_a_running_generation_still_expires_eventually(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """A non-terminal append leaves the stream with the deadline-plus-ttl expiry, not none."""
    producer = StreamProducer(redis, keys, settings)
    await _append(producer, [_token(1)])
    expected = int(settings.generation_deadline_s) + settings.stream_ttl_s
    assert 0 < await redis.ttl(keys.stream(SESSION, MODEL)) <= expected


async def test_writer_batches_tokens_and_finish_waits_for_all(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """Tokens queued during a round trip share script calls, and finish() returns once all land."""
    producer = StreamProducer(redis, keys, settings)
    calls = _appends(producer, len)
    n = 300
    writer = await _write_all(producer, [f"w{i} " for i in range(n)])
    assert sum(calls) == n + 1
    assert len(calls) < n
    stored = await _stored(redis, keys)
    assert len(stored) == n + 1
    assert [e.seq for _, e in stored] == list(range(1, n + 2))
    assert "".join(e.content for _, e in stored) == "".join(f"w{i} " for i in range(n))
    assert stored[-1][1].type is EventType.COMPLETE
    assert await redis.hget(generation, "status") == b"complete"
    assert writer.tokens == n
    assert await _usage(redis, keys) == n


async def test_an_append_holds_about_256_kib_of_content_however_fast_tokens_come(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """Large tokens queued during a round trip are split across appends of about 256 KiB (the
    script call, its published message and every reader's decoding stay bounded), in order."""
    producer = StreamProducer(redis, keys, settings)
    calls = _appends(producer, lambda events: sum(len(e.content) for e in events))
    texts = [f"{i:04d}" + "x" * 4092 for i in range(400)]  # 4 KiB each, 1.6 MiB in all
    await _write_all(producer, texts)
    assert max(calls) <= 256 * 1024
    assert max(calls) >= 128 * 1024  # tokens still share appends
    stored = await _stored(redis, keys)
    assert [e.content for _, e in stored[:-1]] == texts


async def test_a_writer_that_outruns_redis_holds_at_most_512_events(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """Tokens written faster than appends land make token() wait once 512 are queued: no
    append carries more, memory stays bounded, and every token lands once, in order."""
    producer = StreamProducer(redis, keys, settings)
    calls = _appends(producer, len)
    n = 3000
    await _write_all(producer, [f"{i} " for i in range(n)])
    assert max(calls) <= 512
    assert sum(calls) == n + 1
    stored = await _stored(redis, keys)
    assert [e.content for _, e in stored[:-1]] == [f"{i} " for i in range(n)]


async def test_writer_continues_after_last_seq(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """A writer created with last_seq continues numbering after it (a takeover's resume)."""
    producer = StreamProducer(redis, keys, settings)
    await _append(producer, [_token(1), _token(2)])
    writer = producer.writer(GenerationContext(SESSION, MODEL, RID, "w", 1), last_seq=2)
    await writer.token("more")
    await writer.finish(EventType.COMPLETE, {"finishReason": "stop"})
    assert [e.seq for _, e in await _stored(redis, keys)] == [1, 2, 3, 4]


async def test_fenced_writer_raises_on_finish_and_writes_nothing(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """A writer whose epoch was taken over raises Fenced in finish() and stores nothing."""
    await redis.hset(generation, "epoch", 2)
    producer = StreamProducer(redis, keys, settings)
    writer = producer.writer(GenerationContext(SESSION, MODEL, RID, "w", 1))
    await writer.token("stale")
    await writer.token("worker")
    with pytest.raises(Fenced):
        await writer.finish(EventType.COMPLETE, {"finishReason": "stop"})
    assert await redis.exists(keys.stream(SESSION, MODEL)) == 0
    assert await _usage(redis, keys) is None


async def test_maxlen_trimming_keeps_the_stream_near_its_cap(
    redis: aioredis.Redis, keys: Keys, settings: Settings, generation: str
) -> None:
    """With stream_maxlen=100, 1000 tokens leave roughly 100 entries (approximate trimming)."""
    small = msgspec.structs.replace(settings, stream_maxlen=100)
    producer = StreamProducer(redis, keys, small)
    writer = producer.writer(GenerationContext(SESSION, MODEL, RID, "w", 1))
    for i in range(1000):
        await writer.token(f"{i}")
    await writer.finish(EventType.COMPLETE, {"finishReason": "stop"})
    length = await redis.xlen(keys.stream(SESSION, MODEL))
    assert 100 <= length < 300
    stored = await _stored(redis, keys)
    assert stored[-1][1].type is EventType.COMPLETE
    assert stored[-1][1].seq == 1001
    assert await _usage(redis, keys) == 1000  # trimming never touches accounting
