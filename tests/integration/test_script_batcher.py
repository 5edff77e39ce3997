"""ScriptBatcher: calls of one script from many tasks share pipelines, each keeps its own result."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from structlog.testing import capture_logs

from bridge.redis_select import make_client
from bridge.settings import Settings
from bridge.streams.batching import ScriptBatcher
from tests.faults import RedisProcess, TcpProxy
from tests.redis_fixtures import free_port

pytestmark = pytest.mark.integration


def _script() -> str:
    # a comment unique to this test: the server has never seen this script (NOSCRIPT path)
    return f"""
-- {uuid.uuid4().hex}
if ARGV[1] == 'bad' then return redis.error_reply('BAD ' .. KEYS[1]) end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""


async def test_concurrent_calls_share_round_trips_and_get_their_own_results(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Fifty calls made at once need far fewer round trips, and each sees its own reply."""
    batcher = ScriptBatcher(redis, _script())
    keys = [f"{key_prefix}n{i}" for i in range(50)]
    results = await asyncio.gather(
        *(batcher(keys=[key], args=[i + 1]) for i, key in enumerate(keys))
    )
    assert results == list(range(1, 51))
    assert batcher.round_trips <= 3  # NOSCRIPT: the first pipeline, the reload, the resend


async def test_an_error_reply_fails_only_its_own_call(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A call whose script answers with an error raises it; the calls beside it succeed."""
    batcher = ScriptBatcher(redis, _script())
    good = batcher(keys=[f"{key_prefix}a"], args=[5])
    bad = batcher(keys=[f"{key_prefix}b"], args=["bad"])
    other = batcher(keys=[f"{key_prefix}c"], args=[7])
    results = await asyncio.gather(good, bad, other, return_exceptions=True)
    assert results[0] == 5
    assert isinstance(results[1], ResponseError)
    assert str(results[1]).startswith("BAD ")
    assert results[2] == 7


async def test_calls_made_while_a_pipeline_is_in_flight_go_in_the_next_one(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Calls keep their order per caller: a caller awaiting each call sees them applied in turn."""
    batcher = ScriptBatcher(redis, _script())
    key = f"{key_prefix}seq"

    async def caller(step: int) -> list[int]:
        return [await batcher(keys=[key], args=[step]) for _ in range(20)]

    ones, hundreds = await asyncio.gather(caller(1), caller(100))
    assert ones == sorted(ones)
    assert hundreds == sorted(hundreds)
    assert int(await redis.get(key)) == 20 * 1 + 20 * 100


async def test_a_connection_failure_fails_every_call_of_the_batch(settings: Settings) -> None:
    """When Redis cannot be reached, every waiting call raises the connection error."""
    client = make_client(f"redis://127.0.0.1:{free_port()}", settings, retries=0)
    try:
        batcher = ScriptBatcher(client, _script())
        results = await asyncio.gather(
            *(batcher(keys=["k"], args=[1]) for _ in range(3)), return_exceptions=True
        )
    finally:
        await client.aclose()
    assert all(isinstance(r, RedisConnectionError) for r in results), results


async def test_a_head_packed_once_serves_calls_that_add_the_last_arguments(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """`head` packs the keys and leading arguments once; each `call` appends its own."""
    batcher = ScriptBatcher(redis, "return {KEYS[1], ARGV[1], ARGV[2], ARGV[3], #ARGV}")
    head = batcher.head([f"{key_prefix}k"], ["lead"], more=2)
    first, second = await asyncio.gather(batcher.call(head, ["a", 1]), batcher.call(head, ["b", 2]))
    assert first == [f"{key_prefix}k".encode(), b"lead", b"a", b"1", 3]
    assert second == [f"{key_prefix}k".encode(), b"lead", b"b", b"2", 3]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A Redis of this test's own, to stop and kill."""
    server = RedisProcess(tmp_path, persistent=False).start()
    yield server
    os.kill(server.pid, signal.SIGCONT)  # a test that failed may have left it stopped
    server.kill()


async def test_a_pipeline_left_unanswered_times_out_and_the_next_call_reconnects(
    own_redis: RedisProcess, settings: Settings
) -> None:
    """A Redis that stops answering fails the calls in flight with TimeoutError once the
    connection's timeout passed (their connection closed under them); once it answers
    again, the next call reconnects and gets its result."""
    client = make_client(own_redis.url, settings, socket_timeout=0.3, retries=0)
    try:
        batcher = ScriptBatcher(client, _script())
        assert await batcher(keys=["n"], args=[1]) == 1
        os.kill(own_redis.pid, signal.SIGSTOP)
        results = await asyncio.gather(
            *(batcher(keys=["n"], args=[1]) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        os.kill(own_redis.pid, signal.SIGCONT)
        assert await batcher(keys=["m"], args=[5]) == 5
    finally:
        await client.aclose()


async def test_a_connection_lost_in_flight_fails_its_calls_at_once_and_the_next_reconnects(
    own_redis: RedisProcess, settings: Settings
) -> None:
    """Calls whose connection is reset before their replies fail with the connection error
    at once, not a TimeoutError at the (30 s) timeout; later calls connect again."""
    with TcpProxy(own_redis.port) as proxy:
        client = make_client(proxy.url, settings, socket_timeout=30, retries=0)
        try:
            batcher = ScriptBatcher(client, _script())
            assert await batcher(keys=["n"], args=[1]) == 1
            os.kill(own_redis.pid, signal.SIGSTOP)  # the calls below stay in flight
            calls = asyncio.gather(
                *(batcher(keys=["n"], args=[1]) for _ in range(3)), return_exceptions=True
            )
            await asyncio.sleep(0.2)
            proxy.cut()
            results = await calls
            assert all(type(r) is RedisConnectionError for r in results), results
            os.kill(own_redis.pid, signal.SIGCONT)
            proxy.restore()
            assert await batcher(keys=["m"], args=[5]) == 5
        finally:
            await client.aclose()


async def test_a_callback_that_raises_is_logged_and_the_replies_after_it_still_arrive(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A failing `done` callback is the caller's bug: it must not stop the connection's
    other replies from reaching their callers."""
    batcher = ScriptBatcher(redis, _script())
    await batcher(keys=[f"{key_prefix}warm"], args=[1])  # the script is loaded
    heard: list[Any] = []

    def broken(reply: Any) -> None:
        heard.append(reply)
        raise RuntimeError("a caller's bug")

    batcher.submit(batcher.head([f"{key_prefix}a"], [2]), (), broken)
    with capture_logs() as logs:
        after = await batcher(keys=[f"{key_prefix}b"], args=[3])
        assert await batcher(keys=[f"{key_prefix}c"], args=[4]) == 4
    assert heard == [2]
    assert after == 3
    assert [entry["event"] for entry in logs] == ["script_callback_failed"]


async def test_a_failed_script_load_fails_the_calls_that_needed_it_and_the_next_retries(
    redis: aioredis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls answered NOSCRIPT whose reload fails raise the load's error; a later call loads
    the script and runs."""
    batcher = ScriptBatcher(redis, _script())
    original = redis.script_load

    async def unreachable(*args: Any) -> Any:
        raise RedisConnectionError("Redis went away")

    monkeypatch.setattr(redis, "script_load", unreachable)
    results = await asyncio.gather(
        *(batcher(keys=[f"{key_prefix}n"], args=[1]) for _ in range(2)), return_exceptions=True
    )
    assert [str(r) for r in results] == ["Redis went away"] * 2
    monkeypatch.setattr(redis, "script_load", original)
    assert await batcher(keys=[f"{key_prefix}n"], args=[2]) == 2
