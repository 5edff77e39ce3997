"""Fleet-wide rate limits in Redis: requests and tokens per minute, concurrent generations."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.errors import RateLimited
from bridge.providers.base import Message
from bridge.providers.registry import ProviderRegistry
from bridge.ratelimit import TOKEN_BLOCK, WINDOW_MS, RateLimiter
from bridge.redis_select import make_client
from bridge.settings import Settings
from bridge.streams.codec import from_fields
from bridge.streams.jobs import GenerationJob, enqueue
from bridge.streams.keys import Keys
from bridge.worker import Worker

pytestmark = pytest.mark.integration


def limited(settings: Settings, **limits: int) -> Settings:
    base = {
        "rate_key_rpm": 0,
        "rate_key_tpm": 0,
        "rate_session_rpm": 0,
        "rate_session_tpm": 0,
        "max_generations_per_session": 0,
    }
    return msgspec.structs.replace(settings, **{**base, **limits})


@pytest.fixture
async def other_client(settings: Settings, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A second connection, standing for another process of the fleet."""
    client = make_client(redis_url, settings)
    yield client
    await client.aclose()


async def test_requests_per_minute_per_key_and_per_session(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """The 4th request of a key over a limit of 3 is refused, naming the limit; others pass."""
    limiter = RateLimiter(redis, Keys(settings.key_prefix), limited(settings, rate_key_rpm=3))
    for index in range(3):
        await limiter.admit_request("alpha", f"s{index}")
    with pytest.raises(RateLimited) as refused:
        await limiter.admit_request("alpha", "s9")
    assert refused.value.limit == "requests per minute per API key"
    # at most: the rest of this window, then a third of the next while 3 counted requests
    # weigh in from the previous one (3 * (1 - t/60) + 1 <= 3 once t >= 20 s)
    assert 1 <= refused.value.retry_after_s <= 81
    await limiter.admit_request("beta", "s9")  # another tenant has its own budget

    keys = Keys(settings.key_prefix)
    by_session = RateLimiter(redis, keys, limited(settings, rate_session_rpm=2))
    await by_session.admit_request("alpha", "chatty")
    await by_session.admit_request("beta", "chatty")
    with pytest.raises(RateLimited) as refused:
        await by_session.admit_request("gamma", "chatty")
    assert refused.value.limit == "requests per minute per session"


async def test_limits_are_shared_by_every_process_and_counted_atomically(
    settings: Settings, redis: aioredis.Redis, other_client: aioredis.Redis
) -> None:
    """Two limiters on two connections, 40 concurrent requests, a limit of 7: exactly 7 pass."""
    config = limited(settings, rate_key_rpm=7)
    keys = Keys(settings.key_prefix)
    limiters = [RateLimiter(redis, keys, config), RateLimiter(other_client, keys, config)]
    results = await asyncio.gather(
        *(limiters[i % 2].admit_request("fleet", f"s{i}") for i in range(40)),
        return_exceptions=True,
    )
    assert sum(result is None for result in results) == 7
    assert all(isinstance(r, RateLimited) for r in results if r is not None)


async def test_a_refused_request_counts_against_no_limit(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """All or nothing: when the session limit refuses, the key's counter does not move."""
    keys = Keys(settings.key_prefix)
    limiter = RateLimiter(redis, keys, limited(settings, rate_key_rpm=100, rate_session_rpm=1))
    await limiter.admit_request("alpha", "one")
    with pytest.raises(RateLimited):
        await limiter.admit_request("alpha", "one")
    assert await redis.hget(keys.rate("requests", "k:alpha"), "c") == b"1"


async def window_position(redis: aioredis.Redis) -> tuple[int, int]:
    seconds, micros = await redis.time()
    now = seconds * 1000 + micros // 1000
    return now // WINDOW_MS, now % WINDOW_MS


async def away_from_window_edge(redis: aioredis.Redis, margin_ms: int = 3000) -> tuple[int, int]:
    """Wait out the end of the current window if it is near, so a check sees one window."""
    index, elapsed = await window_position(redis)
    if elapsed > WINDOW_MS - margin_ms:
        await asyncio.sleep((WINDOW_MS - elapsed) / 1000 + 0.1)  # a wall-clock boundary
        index, elapsed = await window_position(redis)
    return index, elapsed


async def test_the_previous_window_weighs_in_and_old_windows_are_forgotten(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Sliding window: a full previous minute still refuses, with a Retry-After inside the
    window; a counter from long ago is ignored."""
    keys = Keys(settings.key_prefix)
    limiter = RateLimiter(redis, keys, limited(settings, rate_key_rpm=10))
    counter = keys.rate("requests", "k:alpha")
    index, elapsed = await away_from_window_edge(redis)
    await redis.hset(counter, mapping={"w": index - 1, "c": 1000, "p": 0})
    with pytest.raises(RateLimited) as refused:
        await limiter.admit_request("alpha", "s")
    remaining_s = (WINDOW_MS - elapsed) / 1000
    assert 1 <= refused.value.retry_after_s <= math.ceil(remaining_s) + 1
    await redis.hset(counter, mapping={"w": index - 2, "c": 1000, "p": 1000})
    await limiter.admit_request("alpha", "s")
    assert await redis.hget(counter, "c") == b"1"
    assert await redis.pttl(counter) > 0  # counters expire by themselves


async def test_concurrent_generations_per_session(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A third running generation is refused; one that ended (or vanished) frees its place."""
    keys = Keys(settings.key_prefix)
    limiter = RateLimiter(redis, keys, limited(settings, max_generations_per_session=2))
    await limiter.admit_generation("alpha", "busy", "r1")
    await limiter.admit_generation("alpha", "busy", "r2")
    with pytest.raises(RateLimited) as refused:
        await limiter.admit_generation("alpha", "busy", "r3")
    assert refused.value.limit == "concurrent generations per session"
    await limiter.admit_generation("alpha", "other", "r4")  # other sessions are not affected

    await redis.hset(keys.generation("r1"), "status", "complete")
    await limiter.admit_generation("alpha", "busy", "r3")
    with pytest.raises(RateLimited):
        await limiter.admit_generation("alpha", "busy", "r5")
    # a generation whose state never appeared (its enqueue failed) is forgotten after the grace
    await redis.zadd(keys.active_generations("busy"), {"r2": 1})
    await redis.hset(keys.generation("r3"), "status", "running")
    await limiter.admit_generation("alpha", "busy", "r5")
    assert await redis.zrange(keys.active_generations("busy"), 0, -1) == [b"r3", b"r5"]


async def test_token_meter_reserves_in_blocks_refunds_the_rest_and_records_usage(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Tokens are charged up to the limit; settling leaves exactly the tokens spent counted."""
    keys = Keys(settings.key_prefix)
    limiter = RateLimiter(redis, keys, limited(settings, rate_session_tpm=20, rate_key_tpm=1000))
    await away_from_window_edge(redis)
    first = limiter.meter("alpha", "s1")
    assert all([await first.take() for _ in range(5)])
    assert await redis.hget(keys.rate("tokens", "s:s1"), "c") == str(TOKEN_BLOCK).encode()
    await first.settle()
    assert await redis.hget(keys.rate("tokens", "s:s1"), "c") == b"5"
    assert await redis.hget(keys.rate("tokens", "k:alpha"), "c") == b"5"

    second = limiter.meter("alpha", "s1")
    taken = [await second.take() for _ in range(20)]
    assert taken == [True] * 15 + [False] * 5
    payload = second.exceeded()
    assert payload["code"] == "rate_limited"
    assert payload["limit"] == "tokens per minute per session"
    assert payload["usage"] == {"completionTokens": 15}
    await second.settle()
    assert await redis.hget(keys.rate("tokens", "s:s1"), "c") == b"20"
    with pytest.raises(RateLimited) as refused:
        await limiter.admit_generation("alpha", "s1", "r9")  # no budget left to start
    assert refused.value.limit == "tokens per minute per session"
    usage = await redis.hgetall(keys.tenant_usage("alpha"))
    assert usage == {b"generations": b"2", b"completionTokens": b"20"}


async def read_until_terminal(redis: aioredis.Redis, key: str) -> list[Any]:
    """Events of `key` until a terminal one, waiting with blocking reads."""
    events: list[Any] = []
    last = "0-0"
    async with asyncio.timeout(30):
        while not events or not events[-1].terminal:
            result: Any = await redis.xread({key: last}, block=1000, count=100)
            for _, entries in result or ():
                for entry_id, fields in entries:
                    last = entry_id
                    events.append(from_fields(fields))
    return events


async def test_the_worker_stops_a_generation_at_the_token_limit(
    settings: Settings, redis: aioredis.Redis, other_client: aioredis.Redis
) -> None:
    """Over the tokens-per-minute limit mid-answer, the stream ends with a `rate_limited`
    error carrying the partial usage, and the tokens written equal the limit."""
    config = limited(settings, rate_session_tpm=10, rate_key_tpm=1000, mock_delay_ms=0)
    keys = Keys(config.key_prefix)
    providers = ProviderRegistry.from_settings(config)
    worker = Worker(
        redis=redis, reader=other_client, keys=keys, settings=config, providers=providers
    )
    running = asyncio.create_task(worker.run())
    try:
        session = f"s_{uuid.uuid4().hex[:8]}"
        job = GenerationJob(
            request_id=uuid.uuid4().hex,
            session_id=session,
            model_id="mock",
            messages=(Message("user", "hello"),),
            params={"mock_tokens": 30},
            tenant="alpha",
        )
        await enqueue(redis, keys, config, job)
        events = await read_until_terminal(redis, keys.stream(session, "mock"))
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await providers.aclose()
    assert [e.type.value for e in events] == ["token"] * 10 + ["error"]
    error = events[-1].data
    assert error["code"] == "rate_limited"
    assert error["usage"] == {"completionTokens": 10}
    assert error["retryAfter"] >= 1
    assert await redis.hget(keys.usage(session), "mock") == b"10"
    assert await redis.hget(keys.tenant_usage("alpha"), "completionTokens") == b"10"
