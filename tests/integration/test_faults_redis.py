"""Redis outages mid-generation, with real processes: a pause, a cut network, a restart.

The fleet (one API process, one worker process) talks to its own Redis through a TCP proxy,
so the test can pause Redis, cut it off, or kill and restart it without touching anyone else.
The same processes live through every test of the module: none is ever restarted.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.providers.mock import mock_answer
from tests.faults import (
    Fleet,
    RedisProcess,
    TcpProxy,
    answer_text,
    fleet,
    new_session,
    request_events,
    strictly_increasing,
    wait_until,
)
from tests.servers import bridge_env, open_stream, start_chat, tokens, wait_ready

pytestmark = pytest.mark.integration

PAUSE_MS = 10_000
PREFIX = "faults:"


class Setup:
    """The module's Redis, the proxy in front of it, and the processes using it."""

    def __init__(self, redis: RedisProcess, proxy: TcpProxy, processes: Fleet) -> None:
        self.redis = redis
        self.proxy = proxy
        self.processes = processes
        self.api, self.worker = processes.processes


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    directory = tmp_path_factory.mktemp("redis")
    server = RedisProcess(directory, persistent=True).start()
    try:
        with TcpProxy(server.port) as proxy:
            env = bridge_env(
                proxy.url, PREFIX, BRIDGE_RECLAIM_IDLE_MS="3000", BRIDGE_REDIS_TIMEOUT_S="2"
            )
            with fleet(env, tmp_path_factory.mktemp("logs")) as processes:
                processes.serve()
                processes.worker()
                asyncio.run(processes.ready(*reversed(processes.processes)))
                yield Setup(server, proxy, processes)
    finally:
        server.kill()


@pytest.fixture
async def http(setup: Setup) -> AsyncIterator[httpx.AsyncClient]:
    await wait_ready(setup.api, timeout=60)  # an earlier test's outage is over
    async with httpx.AsyncClient(base_url=setup.api.base_url, timeout=30) as client:
        yield client


@pytest.fixture
async def direct(setup: Setup) -> AsyncIterator[aioredis.Redis]:
    """A client of the test's Redis that bypasses the proxy."""
    client = aioredis.Redis.from_url(setup.redis.url)
    yield client
    await client.aclose()


async def readiness_is(http: httpx.AsyncClient, status: int) -> bool:
    try:
        return (await http.get("/health/ready")).status_code == status
    except httpx.HTTPError:
        return False


async def ride_out(
    setup: Setup,
    http: httpx.AsyncClient,
    fault: Callable[[], Awaitable[None]],
    heal: Callable[[], Awaitable[None]],
) -> tuple[list[Any], dict[str, Any]]:
    """Start a generation, inject `fault` midway, check the outage behaviour, `heal`, resume.

    Returns every event the client received (before and after) and the chat/start answer.
    """
    session = new_session()
    started = await start_chat(http, session, params={"mockTokens": 400, "mockDelayMs": 10})
    url = setup.api.base_url + started["streamUrl"]
    async with open_stream(url) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 30)
        await fault()
        # the open connection is told to reconnect, and ends
        await tab.wait_for(lambda evs: any(e.event == "reconnect" for e in evs), timeout=30)
        await tab.wait_closed()
    assert '"reason":"redis_unavailable"' in tab.events[-1].data
    await wait_until(lambda: readiness_is(http, 503), 30, "readiness failing")
    refused = await http.post(
        "/api/chat/start", json={"sessionId": session, "modelId": "mock", "prompt": "hi"}
    )
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert refused.headers["content-type"].startswith("application/problem+json")
    # what EventSource gets if it reconnects now: a stream that asks it to retry later
    async with open_stream(url) as during:
        await during.wait_closed()
    assert during.status == 200
    assert [e.event for e in during.events] == ["reconnect"]
    assert during.parser.retry_ms is not None
    await heal()
    await wait_ready(setup.api, timeout=60)
    cursor = tab.parser.last_event_id
    async with open_stream(url, **{"Last-Event-ID": cursor}) as resumed:
        await resumed.wait_terminal(timeout=60)
    assert all(p.proc.poll() is None for p in setup.processes.processes), "a process died"
    return tab.events + resumed.events, started


async def a_new_chat_completes(setup: Setup, http: httpx.AsyncClient) -> None:
    started = await start_chat(http, new_session(), params={"mockTokens": 5})
    async with open_stream(setup.api.base_url + started["streamUrl"]) as tab:
        await tab.wait_terminal(timeout=60)
    assert answer_text(tab.events, started["requestId"]) == mock_answer(5)


def assert_exact(events: list[Any], request_id: str) -> None:
    assert answer_text(events, request_id) == mock_answer(400)
    assert strictly_increasing([p["sequence"] for _, p in request_events(events, request_id)])


async def test_a_paused_redis_fails_readiness_and_everything_recovers(
    setup: Setup, http: httpx.AsyncClient, direct: aioredis.Redis
) -> None:
    """CLIENT PAUSE ALL mid-generation: readiness fails, chat/start gets 503 with Retry-After,
    the open stream gets `reconnect`; once the pause ends the same processes serve again and
    the resumed tab has the exact answer."""

    async def pause() -> None:
        await direct.execute_command("CLIENT", "PAUSE", PAUSE_MS, "ALL")

    async def pause_ends() -> None:
        pass  # the pause is timed; waiting for readiness waits for its end

    events, started = await ride_out(setup, http, pause, pause_ends)
    assert_exact(events, started["requestId"])
    await a_new_chat_completes(setup, http)


async def test_an_unreachable_redis_fails_readiness_and_everything_recovers(
    setup: Setup, http: httpx.AsyncClient
) -> None:
    """The network to Redis is cut (every connection reset, new ones refused) mid-generation:
    the same outage behaviour, and full recovery without a restart once it is back."""

    async def cut() -> None:
        setup.proxy.cut()

    async def restore() -> None:
        setup.proxy.restore()

    events, started = await ride_out(setup, http, cut, restore)
    assert_exact(events, started["requestId"])
    await a_new_chat_completes(setup, http)


async def test_a_redis_restart_with_persistence_keeps_every_acknowledged_token(
    setup: Setup, http: httpx.AsyncClient, direct: aioredis.Redis
) -> None:
    """kill -9 of a Redis with an fsync-always append-only file, then a restart: every token a
    client had received (so Redis had acknowledged) is still there, and the answer completes."""

    async def crash() -> None:
        setup.redis.kill(signal.SIGKILL)

    async def restart() -> None:
        await setup.redis.astart()

    events, started = await ride_out(setup, http, crash, restart)
    assert_exact(events, started["requestId"])
    session, rid = started["sessionId"], started["requestId"]
    entries: Any = await direct.xrange(f"{PREFIX}stream:{session}:mock")
    stored = {(f[b"r"].decode(), int(f[b"s"])) for _, f in entries}
    received = {(p["requestId"], p["sequence"]) for _, p in request_events(events, rid)}
    assert received <= stored
    await a_new_chat_completes(setup, http)


async def test_a_redis_restart_without_persistence_loses_data_but_recovers(
    setup: Setup, http: httpx.AsyncClient, direct: aioredis.Redis
) -> None:
    """A restart that loses every key (persistence off): the in-flight answer is gone and a
    resuming client is told so with a `gap` (expired), never a silent jump; the processes
    recreate the consumer group by themselves and serve new chats."""

    async def crash() -> None:
        setup.redis.kill(signal.SIGKILL)
        for path in setup.redis.directory.iterdir():
            if path.name.startswith("appendonly"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    async def restart() -> None:
        await setup.redis.astart()

    session = new_session()
    started = await start_chat(http, session, params={"mockTokens": 400, "mockDelayMs": 10})
    url = setup.api.base_url + started["streamUrl"]
    async with open_stream(url) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 30)
        await crash()
        await tab.wait_closed(timeout=30)
    await restart()
    await wait_ready(setup.api, timeout=60)
    async with open_stream(url, **{"Last-Event-ID": tab.parser.last_event_id}) as resumed:
        await resumed.wait_for(lambda evs: any(e.event == "gap" for e in evs), timeout=30)
    gap = next(e for e in resumed.events if e.event == "gap")
    assert '"reason":"expired"' in gap.data
    assert await direct.exists(f"{PREFIX}stream:{session}:mock") == 0
    await a_new_chat_completes(setup, http)
