"""Worker deaths, with real processes: takeover with an explicit seam, fencing, exact accounting."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.providers.mock import mock_answer
from bridge.streams.keys import Keys
from bridge.worker import live_workers
from tests.faults import (
    Fleet,
    answer_text,
    fleet,
    logged_events,
    new_session,
    request_events,
    strictly_increasing,
    upstream_process,
    wait_for_log,
    wait_until,
)
from tests.servers import bridge_env, open_stream, start_chat, tokens

pytestmark = pytest.mark.integration

RECLAIM_MS = 3000
UPSTREAM_TOKENS = 150
MODELS = f"mock=mock:mock,slowup=openai:slow?tokens={UPSTREAM_TOKENS}&delay_ms=20"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with upstream_process() as base_url:
        yield base_url


@pytest.fixture
def processes(redis_url: str, key_prefix: str, upstream: str, tmp_path: Path) -> Iterator[Fleet]:
    env = bridge_env(
        redis_url,
        key_prefix,
        OPENAI_BASE_URL=upstream,
        BRIDGE_MODELS=MODELS,
        BRIDGE_RECLAIM_IDLE_MS=str(RECLAIM_MS),
    )
    with fleet(env, tmp_path) as running:
        yield running


@pytest.fixture
async def api(processes: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an API process (started, not waited for: it is ready once a worker is)."""
    server = processes.serve()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=15) as http:
        yield http


async def owner_of(redis: aioredis.Redis, key_prefix: str, request_id: str) -> bytes:
    worker: Any = await redis.hget(f"{key_prefix}gen:{request_id}", "worker")
    assert worker, "the generation has no owner yet"
    return bytes(worker)


async def stream_entries(
    redis: aioredis.Redis, key_prefix: str, session: str, model: str
) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries: Any = await redis.xrange(f"{key_prefix}stream:{session}:{model}")
    return list(entries)


async def no_pending(redis: aioredis.Redis, key_prefix: str) -> bool:
    summary: Any = await redis.xpending(f"{key_prefix}requests", "workers")
    return int(summary["pending"]) == 0


async def test_a_killed_worker_is_taken_over_and_the_answer_continues_exactly(
    api: httpx.AsyncClient, processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """kill -9 of the worker mid-answer: the other worker continues it after a `continue` seam;
    the text equals the uninterrupted answer, sequences increase, usage equals tokens written."""
    first, second = processes.worker(), processes.worker()
    await processes.ready(*processes.processes)
    session = new_session()
    started = await start_chat(api, session, "mock", params={"mockTokens": 300, "mockDelayMs": 10})
    rid = started["requestId"]
    async with open_stream(str(api.base_url) + started["streamUrl"]) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 30)
        owner = await owner_of(redis, key_prefix, rid)
        victim = processes.owner(owner)
        victim.kill(signal.SIGKILL)
        await tab.wait_terminal(timeout=60)
    events = request_events(tab.events, rid)
    seams = [payload for name, payload in events if name == "seam"]
    assert len(seams) == 1, tab.summary()
    assert seams[0]["mode"] == "continue"
    seam_at = events.index(("seam", seams[0]))
    before_seam = [n for n, _ in events[:seam_at] if n == "token"]
    assert seams[0]["keptTokens"] == len(before_seam)
    silence_ms = seams[0]["timestamp"] - events[seam_at - 1][1]["timestamp"]
    print(f"takeover: {silence_ms:.0f} ms from the last token before the kill to the seam")
    assert answer_text(tab.events, rid) == mock_answer(300)
    assert strictly_increasing([payload["sequence"] for _, payload in events])
    assert events[-1][0] == "complete"
    assert events[-1][1]["usage"]["completionTokens"] == 300
    usage: Any = await redis.hgetall(f"{key_prefix}usage:{session}")
    assert usage == {b"mock": b"300", b"*": b"300"}
    entries = await stream_entries(redis, key_prefix, session, "mock")
    assert sum(1 for _, fields in entries if fields[b"t"] == b"token") == 300
    survivor = second if victim is first else first
    assert any(e.get("event") == "request_reclaimed" for e in logged_events(survivor))
    await wait_until(lambda: no_pending(redis, key_prefix), 20, "acknowledgement")
    # the heartbeat tells the health monitor the victim is dead and the survivor alive
    victim_name = owner.decode()

    async def victim_expired() -> bool:
        return victim_name not in await live_workers(redis, Keys(key_prefix))

    await wait_until(victim_expired, 20, "the dead worker's heartbeat to expire")
    live = await live_workers(redis, Keys(key_prefix))
    # one process left: its chat worker and its seed request-stream workers (`<name>-<kind>`)
    assert len({name.removesuffix("-summary").removesuffix("-question") for name in live}) == 1


async def test_a_provider_without_continuation_restarts_visibly(
    api: httpx.AsyncClient, processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """kill -9 mid-answer from an OpenAI-compatible upstream: a `restart` seam, after which the
    answer starts over; a client following the seam rule shows it exactly once."""
    processes.worker(), processes.worker()
    await processes.ready(*processes.processes)
    session = new_session()
    started = await start_chat(api, session, "slowup")
    rid = started["requestId"]
    async with open_stream(str(api.base_url) + started["streamUrl"]) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 20)
        processes.owner(await owner_of(redis, key_prefix, rid)).kill(signal.SIGKILL)
        await tab.wait_terminal(timeout=60)
    events = request_events(tab.events, rid)
    seams = [payload for name, payload in events if name == "seam"]
    assert [seam["mode"] for seam in seams] == ["restart"], tab.summary()
    discarded = [n for n, _ in events[: events.index(("seam", seams[0]))] if n == "token"]
    assert seams[0]["discardedTokens"] == len(discarded)
    assert answer_text(tab.events, rid) == "".join(f"t{i} " for i in range(UPSTREAM_TOKENS))
    assert strictly_increasing([payload["sequence"] for _, payload in events])
    written = UPSTREAM_TOKENS + len(discarded)
    usage: Any = await redis.hgetall(f"{key_prefix}usage:{session}")
    assert usage == {b"slowup": str(written).encode(), b"*": str(written).encode()}


async def test_a_paused_worker_woken_after_takeover_writes_nothing(
    api: httpx.AsyncClient, processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """SIGSTOP a worker past the reclaim time, let another finish its request, SIGCONT it:
    its next append is refused by the fence in the append script, and the stream does not
    change by one entry. (Its own renewal pass is slowed down so that the append, not the
    renewal's lost-claim check, is what meets the takeover.)"""
    stale = processes.worker(BRIDGE_RECLAIM_IDLE_MS="120000")
    await processes.ready(*processes.processes)
    session = new_session()
    started = await start_chat(api, session, "mock", params={"mockTokens": 300, "mockDelayMs": 10})
    rid = started["requestId"]
    async with open_stream(str(api.base_url) + started["streamUrl"]) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 30)
        stale.kill(signal.SIGSTOP)
        fresh = processes.worker()
        await processes.ready(fresh)
        await tab.wait_terminal(timeout=60)
    assert processes.owner(await owner_of(redis, key_prefix, rid)) is fresh
    settled = await stream_entries(redis, key_prefix, session, "mock")
    usage_before: Any = await redis.hgetall(f"{key_prefix}usage:{session}")
    stale.kill(signal.SIGCONT)
    fenced = await wait_for_log(stale, "generation_fenced")
    assert "FENCED owner epoch is 2" in fenced["error"]
    assert await stream_entries(redis, key_prefix, session, "mock") == settled
    assert await redis.hgetall(f"{key_prefix}usage:{session}") == usage_before
    assert answer_text(tab.events, rid) == mock_answer(300)
    # the woken worker is healthy again: it serves new requests
    again = await start_chat(api, new_session(), "mock", params={"mockTokens": 5})
    async with open_stream(str(api.base_url) + again["streamUrl"]) as tab2:
        await tab2.wait_terminal(timeout=30)
    assert answer_text(tab2.events, again["requestId"]) == mock_answer(5)


async def test_usage_equals_tokens_written_across_two_apis_two_workers_and_a_kill(
    processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """2 API processes, 2 workers, 10 connections over 3 sessions, one worker killed midway:
    every connection of a session sees the same events, and each session's recorded usage
    equals the token entries in its stream and the tokens each of its connections received."""
    apis = [processes.serve(), processes.serve()]
    workers = [processes.worker(), processes.worker()]
    await processes.ready(*apis, *workers)
    sessions = [new_session() for _ in range(3)]
    async with httpx.AsyncClient(base_url=apis[0].base_url, timeout=15) as http:
        chats = [
            await start_chat(http, s, "mock", params={"mockTokens": 400, "mockDelayMs": 10})
            for s in sessions
        ]
    readers = [open_stream(apis[i % 2].base_url + chats[i % 3]["streamUrl"]) for i in range(10)]
    tabs = [await reader.__aenter__() for reader in readers]
    try:
        await tabs[0].wait_for(lambda evs: len(tokens(evs)) >= 40)
        owner = await owner_of(redis, key_prefix, chats[0]["requestId"])
        processes.owner(owner).kill(signal.SIGKILL)
        for tab in tabs:
            await tab.wait_terminal(timeout=90)
    finally:
        for reader in readers:
            await reader.__aexit__(None, None, None)
    for index, (session, chat) in enumerate(zip(sessions, chats, strict=True)):
        mine = tabs[index::3]
        seen = [[(e.event, e.data, e.id) for e in tab.events if e.event != "gap"] for tab in mine]
        assert all(events == seen[0] for events in seen[1:]), f"tabs of {session} differ"
        received = len(tokens(mine[0].events))
        entries = await stream_entries(redis, key_prefix, session, "mock")
        written = sum(1 for _, fields in entries if fields[b"t"] == b"token")
        usage: Any = await redis.hgetall(f"{key_prefix}usage:{session}")
        assert int(usage[b"*"]) == int(usage[b"mock"]) == written == received
        assert answer_text(mine[0].events, chat["requestId"]) == mock_answer(400)
        sequences = [p["sequence"] for _, p in request_events(mine[0].events, chat["requestId"])]
        assert strictly_increasing(sequences)
    await wait_until(lambda: no_pending(redis, key_prefix), 20, "acknowledgement")


async def test_a_worker_stopped_gracefully_hands_its_request_back_at_once(
    api: httpx.AsyncClient, processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """SIGTERM to a worker mid-answer, with a shutdown deadline shorter than the answer: it
    exits cleanly and marks the request still running idle for the whole reclaim time, so
    the next worker's scan takes it without waiting."""
    worker = processes.worker(BRIDGE_RECLAIM_IDLE_MS="600000", BRIDGE_SHUTDOWN_TIMEOUT_S="0.5")
    await processes.ready(*processes.processes)
    started = await start_chat(
        api, new_session(), "mock", params={"mockTokens": 1000, "mockDelayMs": 10}
    )
    async with open_stream(str(api.base_url) + started["streamUrl"]) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 10)
    assert worker.stop() == 0
    pending: Any = await redis.xpending_range(f"{key_prefix}requests", "workers", "-", "+", 10)
    assert len(pending) == 1
    assert pending[0]["time_since_delivered"] >= 600_000
