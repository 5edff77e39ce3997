"""Graceful shutdown of a real `bridge serve` process with open streams, on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.redis_select import make_client
from bridge.settings import Settings
from tests.servers import (
    BridgeProcess,
    bridge_env,
    open_stream,
    start_bridge,
    start_chat,
    tokens,
    wait_ready,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis whose blocking reads may wait long."""
    client = make_client(settings.redis_url or "", settings, socket_timeout=30)
    yield client
    await client.aclose()


async def exit_code(server: BridgeProcess, timeout: float = 60) -> int:
    """Wait for the process to exit by itself (polling an outside process, with a deadline)."""
    return await asyncio.to_thread(server.proc.wait, timeout)


async def stream_entries(
    store: aioredis.Redis, key: str, until: str, timeout: float = 60
) -> list[dict[bytes, bytes]]:
    """Entries of `key` read with blocking XREAD until one of type `until` arrives."""
    seen: list[dict[bytes, bytes]] = []
    last = "0-0"
    async with asyncio.timeout(timeout):
        while not any(fields[b"t"] == until.encode() for fields in seen):
            reply: Any = await store.xread({key: last}, count=500, block=5000)
            for _key, entries in reply or ():
                for entry_id, fields in entries:
                    last = entry_id.decode()
                    seen.append(fields)
    return seen


async def pending(store: aioredis.Redis, prefix: str) -> int:
    summary: Any = await store.xpending(f"{prefix}requests", "workers")
    return int(summary["pending"])


async def test_sigterm_closes_streams_refuses_work_and_finishes_generations(
    redis_url: str, key_prefix: str, store: aioredis.Redis, tmp_path: Path
) -> None:
    """SIGTERM: readiness 503, chat/start 503, streams told to reconnect, generation completes."""
    env = bridge_env(
        redis_url, key_prefix, BRIDGE_SHUTDOWN_DELAY_S="5", BRIDGE_SHUTDOWN_TIMEOUT_S="60"
    )
    server = start_bridge(["serve"], env, str(tmp_path / "serve.log"))
    try:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            session = f"s_{uuid.uuid4().hex[:8]}"
            params = {"mockTokens": 300, "mockDelayMs": 15}
            started = await start_chat(http, session, "mock", params=params)
            async with open_stream(server.base_url + started["streamUrl"]) as tab:
                await tab.wait_for(lambda evs: len(tokens(evs)) >= 5)
                server.kill(signal.SIGTERM)
                await tab.wait_for(lambda _: tab.ended)
            assert tab.events[-1].event == "reconnect", tab.summary()
            assert json.loads(tab.events[-1].data) == {"reason": "shutdown"}
            ready = await http.get("/health/ready")
            refused = await http.post(
                "/api/chat/start", json={"sessionId": session, "modelId": "mock", "prompt": "x"}
            )
            new_stream = await http.get(started["streamUrl"])
        assert ready.status_code == 503
        assert ready.json()["failing"] == ["accepting"]
        assert refused.status_code == 503
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert new_stream.status_code == 200  # EventSource would give up for good on a 503
        assert new_stream.text.endswith('event: reconnect\ndata: {"reason":"shutdown"}\n\n')
        assert await exit_code(server) == 0, server.log()
    finally:
        server.stop()
    entries = await stream_entries(store, f"{key_prefix}stream:{session}:mock", "complete")
    assert [f[b"t"] for f in entries].count(b"token") == 300
    assert await pending(store, key_prefix) == 0
    shutdown = [
        json.loads(line) for line in server.log().splitlines() if "shutdown_started" in line
    ]
    assert shutdown[0]["connections_closed"] == 1
    assert shutdown[0]["generations_running"] == 1


async def test_a_generation_past_the_deadline_is_left_for_another_worker(
    redis_url: str, key_prefix: str, store: aioredis.Redis, tmp_path: Path
) -> None:
    """A generation still running at the deadline stays pending; another worker reclaims it."""
    env = bridge_env(
        redis_url,
        key_prefix,
        BRIDGE_SHUTDOWN_DELAY_S="0",
        BRIDGE_SHUTDOWN_TIMEOUT_S="0.5",
        BRIDGE_RECLAIM_IDLE_MS="1000",
    )
    server = start_bridge(["serve"], env, str(tmp_path / "serve.log"))
    worker: BridgeProcess | None = None
    try:
        await wait_ready(server)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            session = f"s_{uuid.uuid4().hex[:8]}"
            params = {"mockTokens": 300, "mockDelayMs": 10}
            started = await start_chat(http, session, "mock", params=params)
            async with open_stream(server.base_url + started["streamUrl"]) as tab:
                await tab.wait_for(lambda evs: len(tokens(evs)) >= 5)
                server.kill(signal.SIGTERM)
                assert await exit_code(server) == 0, server.log()
        assert await pending(store, key_prefix) == 1
        assert "shutdown_deadline_passed" in server.log()

        worker = start_bridge(["worker"], env, str(tmp_path / "worker.log"))
        key = f"{key_prefix}stream:{session}:mock"
        entries = await stream_entries(store, key, "complete")
    finally:
        server.stop()
        if worker is not None:
            assert worker.stop() == 0, worker.log()
    kinds = [f[b"t"] for f in entries]
    assert b"seam" in kinds
    # the mock continues the answer after the seam: the tokens before and after it make one
    assert kinds.count(b"token") == 300
