"""Poison: requests whose workers keep dying, and stream entries written by hand."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.providers.mock import mock_answer
from tests.faults import (
    Fleet,
    answer_text,
    fleet,
    logged_events,
    new_session,
    request_events,
    wait_until,
)
from tests.servers import bridge_env, open_stream, start_chat, tokens

pytestmark = pytest.mark.integration


@pytest.fixture
def processes(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    env = bridge_env(
        redis_url, key_prefix, BRIDGE_RECLAIM_IDLE_MS="2000", BRIDGE_MAX_DELIVERIES="2"
    )
    with fleet(env, tmp_path) as running:
        yield running


async def test_a_request_whose_workers_keep_dying_is_dead_lettered(
    processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """Two workers killed in turn while serving one request (max_deliveries=2): the third
    delivery moves it to the dead-letter stream and the session gets an `error` saying so."""
    api, first = processes.serve(), processes.worker()
    await processes.ready(first, api)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=15) as http:
        started = await start_chat(
            http, new_session(), params={"mockTokens": 2000, "mockDelayMs": 10}
        )
    rid = started["requestId"]
    async with open_stream(api.base_url + started["streamUrl"]) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 20)
        first.kill(signal.SIGKILL)
        second = processes.worker()
        await tab.wait_for(lambda evs: any(e.event == "seam" for e in evs), timeout=60)
        seen = len(tokens(tab.events))
        await tab.wait_for(lambda evs: len(tokens(evs)) >= seen + 20)
        second.kill(signal.SIGKILL)
        processes.worker()
        await tab.wait_terminal(timeout=60)
    name, error = request_events(tab.events, rid)[-1]
    assert name == "error"
    assert error["code"] == "max_deliveries"
    dead: Any = await redis.xrange(f"{key_prefix}requests:dead")
    assert len(dead) == 1
    fields = dead[0][1]
    assert fields[b"dead_reason"] == b"max_deliveries"
    assert fields[b"times_delivered"] == b"3"
    assert json.loads(fields[b"job"])["request_id"] == rid
    summary: Any = await redis.xpending(f"{key_prefix}requests", "workers")
    assert summary["pending"] == 0


async def test_malformed_entries_are_skipped_and_never_crash_a_reader_or_a_worker(
    processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """Garbage written by hand into a live token stream and into the request stream: readers
    (live and catch-up) skip it with a log line, the worker dead-letters the bad requests,
    and every real answer still arrives exactly."""
    server = processes.serve(worker=True)
    await processes.ready(server)
    session = new_session()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=15) as http:
        started = await start_chat(http, session, params={"mockTokens": 200, "mockDelayMs": 10})
        url = server.base_url + started["streamUrl"]
        stream = f"{key_prefix}stream:{session}:mock"
        async with open_stream(url) as live:
            await live.wait_for(lambda evs: len(tokens(evs)) >= 10)
            for garbage in (
                {"t": "bogus", "r": "x", "s": "1", "ts": "1"},
                {"no": "fields"},
                {"t": "token", "r": "x", "s": "NaN?", "ts": "1"},
                {"t": "complete", "r": "x", "s": "9", "ts": "1", "d": "{not json"},
            ):
                await redis.xadd(stream, garbage)
            for bad in (
                {"job": "not json"},
                {"unrelated": "1"},
                {
                    "job": json.dumps(
                        {"request_id": "r", "session_id": "a:b", "model_id": "m", "messages": []}
                    )
                },
            ):
                await redis.xadd(f"{key_prefix}requests", bad)
            await live.wait_terminal(timeout=60)
            after = await start_chat(http, session, params={"mockTokens": 5})
            await live.wait_terminal(2, timeout=60)
        async with open_stream(url) as late:
            await late.wait_terminal(2, timeout=60)
    for tab in (live, late):
        assert answer_text(tab.events, started["requestId"]) == mock_answer(200)
        assert answer_text(tab.events, after["requestId"]) == mock_answer(5)
        assert not [e for e in tab.events if '"requestId":"x"' in e.data]

    async def dead_lettered() -> bool:
        return int(await redis.xlen(f"{key_prefix}requests:dead")) == 3

    await wait_until(dead_lettered, 30, "three dead letters")
    dead: Any = await redis.xrange(f"{key_prefix}requests:dead")
    assert {fields[b"dead_reason"] for _, fields in dead} == {b"malformed"}
    logged = [e.get("event") for e in logged_events(server)]
    assert logged.count("malformed_request_skipped") == 3
    assert logged.count("malformed_entry_skipped") >= 8  # 4 live, 4 in the late replay
    assert server.proc.poll() is None
