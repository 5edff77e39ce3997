"""Seed 004 end to end: `/generate` through the micro-batcher and the slow mock model, the
test page, and cancelling a chat, through a real `bridge serve` process."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.batching.mock_model import answer
from tests.seed_server import BATCH_WINDOW_MS, SeedServer, seed_server
from tests.servers import StreamReader, payloads, start_chat, tokens

pytestmark = pytest.mark.integration
__all__ = ["seed_server"]

#: Contexts that would break a shell, a JSON encoder or a line protocol if escaped wrongly.
AWKWARD = [
    'He said "hi" and left',
    "two\nlines\tand a tab",
    "$(echo pwned) `id` ; rm -rf / \\ {query} %s",
    "unicode: été, 日本語, emoji 🚀",
]


@pytest.fixture
async def api(seed_server: SeedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=seed_server.base_url, timeout=10) as http:
        yield http


@contextlib.asynccontextmanager
async def open_all(readers: list[StreamReader]) -> AsyncIterator[list[StreamReader]]:
    """Open several SSE readers at once, so their requests arrive together."""
    async with contextlib.AsyncExitStack() as stack:
        for reader in readers:
            await stack.enter_async_context(reader)
        yield readers


def generate_url(server: SeedServer, context: str) -> str:
    return f"{server.base_url}/generate?context={quote(context)}"


def text_of(reader: StreamReader) -> list[str]:
    return [p["content"] for p in payloads(reader.events)]


def task_of(reader: StreamReader) -> dict[str, Any]:
    task: dict[str, Any] = payloads(reader.events, "task")[0]
    return task


async def test_four_requests_share_one_batch_and_get_their_own_answers(
    seed_server: SeedServer,
) -> None:
    """Four concurrent requests run as one batch of 4; each streams its own answer (its context
    arrived through a file intact, however awkward), then `complete`, then the response ends."""
    readers = [StreamReader(generate_url(seed_server, context)) for context in AWKWARD]
    async with open_all(readers):
        for reader in readers:
            await reader.wait_terminal(timeout=30)
            await reader.wait_for(lambda _events, r=reader: r.ended)
    for reader, context in zip(readers, AWKWARD, strict=True):
        assert reader.status == 200
        assert reader.events[0].event == "task"
        assert re.fullmatch(r"[0-9a-f]{32}", task_of(reader)["taskId"])
        assert text_of(reader) == answer(context)
        complete = payloads(reader.events, "complete")[0]
        assert complete["batch"]["size"] == 4
        assert complete["usage"]["completionTokens"] == len(answer(context))
        assert reader.events[-1].event == "complete"


async def test_a_lone_request_waits_for_the_window_then_runs_alone(
    seed_server: SeedServer,
) -> None:
    """With nobody to batch with, a request runs when the window closes, in a batch of 1."""
    async with StreamReader(generate_url(seed_server, "alone")) as reader:
        await reader.wait_terminal(timeout=30)
    batch = payloads(reader.events, "complete")[0]["batch"]
    assert batch["size"] == 1
    assert batch["queueWaitMs"] >= BATCH_WINDOW_MS * 0.9


async def test_cancelling_one_request_does_not_disturb_its_batch(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """One request of a batch of three is cancelled after its first chunk: it ends
    `cancelled`; the other two get their whole answers."""
    contexts = ["first", "second", "third"]
    readers = [StreamReader(generate_url(seed_server, context)) for context in contexts]
    async with open_all(readers):
        victim = readers[0]
        await victim.wait_for(lambda events: any(e.event == "token" for e in events))
        cancel = await api.post(task_of(victim)["cancelUrl"])
        assert cancel.status_code == 202
        for reader in readers:
            await reader.wait_terminal(timeout=30)
    assert victim.events[-1].event == "cancelled"
    assert len(text_of(victim)) < len(answer("first"))
    for reader, context in zip(readers[1:], contexts[1:], strict=True):
        assert text_of(reader) == answer(context)
        assert payloads(reader.events, "complete")[0]["batch"]["size"] == 3
    again = await api.post(task_of(victim)["cancelUrl"])
    assert again.status_code == 409


async def test_a_client_that_disconnects_cancels_only_its_own_request(
    seed_server: SeedServer,
) -> None:
    """Closing one connection mid-answer cancels that task; its batch-mate completes."""
    leaver = StreamReader(generate_url(seed_server, "leaving"))
    stayer = StreamReader(generate_url(seed_server, "staying"))
    async with stayer:
        async with leaver:
            await leaver.wait_for(lambda events: any(e.event == "token" for e in events))
        task_id = task_of(leaver)["taskId"]
        await stayer.wait_terminal(timeout=30)
    assert text_of(stayer) == answer("staying")
    async with seed_server.redis() as redis:
        key = f"{seed_server.prefix}stream:gen-{task_id}:batch"
        kinds: list[str] = []
        position = "0-0"
        async with asyncio.timeout(30):
            while "cancelled" not in kinds:
                reply: Any = await redis.xread({key: position}, block=1000)
                for _, entries in reply or ():
                    position = entries[-1][0]
                    kinds += [fields[b"t"].decode() for _, fields in entries]
    assert kinds[-1] == "cancelled"


async def test_a_reconnect_gets_204_so_eventsource_stops(api: httpx.AsyncClient) -> None:
    """A request carrying Last-Event-ID (EventSource reconnecting) starts no new task."""
    response = await api.get("/generate?context=x", headers={"Last-Event-ID": "batch:1-0"})
    assert response.status_code == 204


@pytest.mark.parametrize(
    ("query", "status"), [("", 400), ("?context=", 400), ("?context=" + "x" * 40_000, 413)]
)
async def test_bad_generate_requests(api: httpx.AsyncClient, query: str, status: int) -> None:
    """A missing, empty or oversized context is a 4xx problem, not a task."""
    response = await api.get("/generate" + query)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_the_health_report_has_batch_sizes_and_latency_quantiles(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """`/health` reports batch sizes, queue wait and latency p50/p95/p99 and the slowest;
    `/metrics` has batch-size and queue-wait histograms."""
    async with StreamReader(generate_url(seed_server, "measure me")) as reader:
        await reader.wait_terminal(timeout=30)
    batching = (await api.get("/health")).json()["batching"]
    families = {f.name: f for f in text_string_to_metric_families((await api.get("/metrics")).text)}
    for name in ("bridge_batch_size_requests", "bridge_batch_queue_wait_seconds"):
        count = next(s.value for s in families[name].samples if s.name == f"{name}_count")
        assert count >= 1
    for series in ("queueWaitMs", "latencyMs", "firstChunkMs"):
        assert set(batching[series]) == {"count", "p50", "p95", "p99", "max"}
        assert 0 < batching[series]["p50"] <= batching[series]["p95"] <= batching[series]["p99"]
    assert batching["batchSize"]["count"] >= 1
    assert batching["slowest"][0]["latencyMs"] == batching["latencyMs"]["max"]


async def test_the_test_page_is_self_contained(api: httpx.AsyncClient) -> None:
    """`GET /` serves one HTML page using EventSource, chat start, cancel and /generate, with
    no external assets."""
    response = await api.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    for needle in ("new EventSource(", "/api/chat/start", "/cancel", "/generate?context="):
        assert needle in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)


async def test_cancel_a_chat_ends_its_stream_with_partial_usage(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """`POST /api/chat/{session}/cancel` with the stream token: the stream ends `cancelled`,
    recording the tokens written; a second cancel is 409; no token is 401."""
    session = f"s_{uuid.uuid4().hex[:10]}"
    started = await start_chat(api, session, "mock", params={"mockTokens": 500, "mockDelayMs": 20})
    token = started["streamToken"]
    async with StreamReader(seed_server.base_url + started["streamUrl"]) as tab:
        await tab.wait_for(lambda events: len(tokens(events)) >= 5)
        cancel = await api.post(f"/api/chat/{session}/cancel?token={quote(token)}")
        assert cancel.status_code == 202, cancel.text
        assert cancel.json()["sessionId"] == session
        assert [t["requestId"] for t in cancel.json()["cancelling"]] == [started["requestId"]]
        await tab.wait_terminal()
    cancelled = payloads(tab.events, "cancelled")[0]
    assert cancelled["usage"]["completionTokens"] == len(tokens(tab.events)) < 500
    again = await api.post(f"/api/chat/{session}/cancel?token={quote(token)}")
    assert again.status_code == 409
    anonymous = await api.post(f"/api/chat/{session}/cancel")
    assert anonymous.status_code == 401
