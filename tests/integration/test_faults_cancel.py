"""Cancel, with real processes: the API and the worker are different processes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis

from tests.fakes.openai_upstream import FakeUpstream
from tests.faults import Fleet, fleet, new_session, request_events
from tests.servers import bridge_env, open_stream, start_chat, tokens

pytestmark = pytest.mark.integration

MODELS = "long=openai:long?tokens=100000&delay_ms=10,mock=mock:mock"


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    """The fake upstream inside the test process, so the test sees its connections drop."""
    async with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def processes(
    redis_url: str, key_prefix: str, upstream: FakeUpstream, tmp_path: Path
) -> Iterator[Fleet]:
    env = bridge_env(
        redis_url,
        key_prefix,
        OPENAI_BASE_URL=upstream.base_url,
        BRIDGE_MODELS=MODELS,
        BRIDGE_RECLAIM_IDLE_MS="3000",
    )
    with fleet(env, tmp_path) as running:
        yield running


async def cancel(http: httpx.AsyncClient, started: dict[str, Any], **body: str) -> httpx.Response:
    url = f"/api/chat/{started['sessionId']}/cancel?token={quote(started['streamToken'])}"
    return await http.post(url, json=body or None)


async def test_cancel_aborts_the_upstream_call_and_ends_the_stream(
    processes: Fleet, upstream: FakeUpstream, redis: aioredis.Redis, key_prefix: str
) -> None:
    """A cancel sent to the API process stops the upstream HTTP request run by the worker
    process, ends the stream with `cancelled` carrying the partial usage, and records it."""
    api, worker = processes.serve(), processes.worker()
    await processes.ready(worker, api)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=15) as http:
        started = await start_chat(http, new_session(), "long")
        async with open_stream(api.base_url + started["streamUrl"]) as tab:
            await tab.wait_for(lambda evs: len(tokens(evs)) >= 20)
            cancelled_at = time.monotonic()
            answer = await cancel(http, started)
            assert answer.status_code == 202, answer.text
            assert [t["requestId"] for t in answer.json()["cancelling"]] == [started["requestId"]]
            await asyncio.wait_for(upstream.requests[0].disconnected.wait(), 10)
            abort_s = time.monotonic() - cancelled_at
            await tab.wait_terminal(timeout=30)
        again = await cancel(http, started)
    events = request_events(tab.events, started["requestId"])
    assert events[-1][0] == "cancelled"
    received = len(tokens(tab.events))
    assert events[-1][1]["usage"]["completionTokens"] == received
    usage: Any = await redis.hgetall(f"{key_prefix}usage:{started['sessionId']}")
    assert int(usage[b"long"]) == received
    assert again.status_code == 409
    assert again.json()["alreadyEnded"][0]["status"] == "cancelled"
    print(f"upstream aborted {abort_s * 1000:.0f} ms after the cancel was sent")


async def test_cancelling_what_is_unknown_or_not_yours_gets_a_clear_answer(
    processes: Fleet,
) -> None:
    """404 when no generation of the session matches, 401/403 without the session's token,
    400 for a malformed id."""
    api, worker = processes.serve(), processes.worker()
    await processes.ready(worker, api)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=15) as http:
        mine = await start_chat(http, new_session(), "mock", params={"mockTokens": 1})
        theirs = await start_chat(http, new_session(), "mock", params={"mockTokens": 1})
        unknown = await cancel(http, mine, requestId="f" * 32)
        assert unknown.status_code == 404
        assert unknown.headers["content-type"].startswith("application/problem+json")
        assert (await cancel(http, mine, modelId="long")).status_code == 404
        foreign = await http.post(
            f"/api/chat/{mine['sessionId']}/cancel?token={quote(theirs['streamToken'])}"
        )
        assert foreign.status_code == 403
        assert (await http.post(f"/api/chat/{mine['sessionId']}/cancel")).status_code == 401
        assert (await cancel(http, mine, requestId="a:b")).status_code == 400


async def test_a_queued_request_cancelled_before_it_starts_never_reaches_the_upstream(
    processes: Fleet, upstream: FakeUpstream
) -> None:
    """With the only worker busy, a queued request is cancelled; when the worker gets to it,
    it writes `cancelled` at once and never calls the upstream."""
    api, worker = processes.serve(), processes.worker(BRIDGE_WORKER_CONCURRENCY="1")
    await processes.ready(worker, api)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=15) as http:
        busy = await start_chat(http, new_session(), "long")
        queued = await start_chat(http, new_session(), "long")
        async with open_stream(api.base_url + busy["streamUrl"]) as tab:
            await tab.wait_for(lambda evs: len(tokens(evs)) >= 1)
        answer = await cancel(http, queued)
        assert answer.json()["cancelling"][0]["status"] == "queued"
        assert (await cancel(http, busy)).status_code == 202
        async with open_stream(api.base_url + queued["streamUrl"]) as tab:
            await tab.wait_terminal(timeout=30)
    assert [name for name, _ in request_events(tab.events, queued["requestId"])] == ["cancelled"]
    assert len(upstream.requests) == 1  # the busy one only


async def test_a_request_cancelled_while_its_worker_is_frozen_ends_when_reclaimed(
    processes: Fleet, upstream: FakeUpstream
) -> None:
    """SIGSTOP the worker mid-generation, cancel: the request's flag outlives the lost message,
    so the worker that reclaims it ends it with `cancelled` instead of restarting it."""
    api, frozen = processes.serve(), processes.worker()
    await processes.ready(frozen, api)
    async with httpx.AsyncClient(base_url=api.base_url, timeout=15) as http:
        started = await start_chat(http, new_session(), "long")
        async with open_stream(api.base_url + started["streamUrl"]) as tab:
            await tab.wait_for(lambda evs: len(tokens(evs)) >= 10)
            frozen.kill(signal.SIGSTOP)
            assert (await cancel(http, started)).status_code == 202
            rescuer = processes.worker()
            await processes.ready(rescuer)
            await tab.wait_terminal(timeout=60)
        frozen.kill(signal.SIGCONT)
    names = [name for name, _ in request_events(tab.events, started["requestId"])]
    assert names[-1] == "cancelled"
    assert "seam" not in names
    assert len(upstream.requests) == 1
