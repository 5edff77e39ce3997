"""End to end through real `bridge serve` processes, a fake OpenAI-compatible upstream and Redis."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.providers.mock import mock_answer
from tests.faults import upstream_process
from tests.redis_fixtures import delete_prefixed
from tests.servers import (
    BridgeProcess,
    bridge_env,
    open_stream,
    payloads,
    start_bridge,
    start_chat,
    tokens,
    wait_ready,
)

pytestmark = pytest.mark.integration

UPSTREAM_TOKENS = 40
MODELS = (
    f"gpt-4=openai:gpt-4?tokens={UPSTREAM_TOKENS}&delay_ms=5,"
    "slow=openai:slow?tokens=200&delay_ms=10,"
    "broken=openai:broken?tokens=10&break_after=4,"
    "mock=mock:mock"
)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A fake OpenAI-compatible upstream in its own process."""
    with upstream_process() as base_url:
        yield base_url


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="module")
def servers(
    redis_url: str, upstream: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[BridgeProcess]]:
    """Two `bridge serve` processes on one Redis; only the first runs a worker."""
    env = bridge_env(redis_url, prefix, OPENAI_BASE_URL=upstream, BRIDGE_MODELS=MODELS)
    logs = tmp_path_factory.mktemp("logs")
    first = start_bridge(["serve"], env, str(logs / "a.log"))
    second = start_bridge(["serve", "--no-worker"], env, str(logs / "b.log"))
    try:
        asyncio.run(_ready(first, second))
        yield [first, second]
    finally:
        for server in (first, second):
            server.stop()


async def _ready(*servers: BridgeProcess) -> None:
    for server in servers:
        await wait_ready(server)


@pytest.fixture
async def store(redis_url: str, prefix: str, settings: object) -> AsyncIterator[aioredis.Redis]:
    from bridge.redis_select import make_client

    client = make_client(redis_url, settings)  # type: ignore[arg-type]
    yield client
    await client.aclose()


@pytest.fixture(scope="module", autouse=True)
def _cleanup(redis_url: str, prefix: str) -> Iterator[None]:
    yield

    async def clean() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await delete_prefixed(client, prefix)
        await client.aclose()

    asyncio.run(clean())


@pytest.fixture
async def api(servers: list[BridgeProcess]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=10) as http:
        yield http


def session_id() -> str:
    return f"s_{uuid.uuid4().hex[:10]}"


async def test_two_tabs_receive_the_identical_full_answer(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """Two connections of one session get every token of the answer, in order, exactly once."""
    session = session_id()
    started = await start_chat(api, session, "gpt-4")
    url = servers[0].base_url + started["streamUrl"]
    async with open_stream(url) as tab1, open_stream(url) as tab2:
        await tab1.wait_terminal()
        await tab2.wait_terminal()
    expected = [(started["requestId"], i + 1, f"t{i} ") for i in range(UPSTREAM_TOKENS)]
    assert tokens(tab1.events) == expected, tab1.summary()
    assert tokens(tab2.events) == expected
    complete = payloads(tab1.events, "complete")
    assert complete[0]["finishReason"] == "stop"
    assert complete[0]["usage"]["completionTokens"] == UPSTREAM_TOKENS
    ids = [e.id for e in tab1.events if e.event == "token"]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("gpt-4:") for i in ids)


async def test_a_late_tab_replays_the_finished_answer(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """A connection opened after the generation ended replays it all, then stays open."""
    session = session_id()
    started = await start_chat(api, session, "gpt-4")
    url = servers[0].base_url + started["streamUrl"]
    async with open_stream(url) as first:
        await first.wait_terminal()
    async with open_stream(url) as late:
        await late.wait_terminal()
        assert tokens(late.events) == tokens(first.events)
        assert late.parser.retry_ms is not None


async def test_reconnect_with_last_event_id_continues_exactly(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """A tab dropped midway resumes with Last-Event-ID: nothing lost, nothing repeated."""
    session = session_id()
    started = await start_chat(api, session, "slow")
    url = servers[0].base_url + started["streamUrl"]
    async with open_stream(url) as tab:
        await tab.wait_for(lambda evs: len(tokens(evs)) >= 20)
    before = tokens(tab.events)
    cursor = tab.parser.last_event_id
    async with open_stream(url, **{"Last-Event-ID": cursor}) as resumed:
        await resumed.wait_terminal(timeout=30)
    after = tokens(resumed.events)
    assert before + after == [(started["requestId"], i + 1, f"t{i} ") for i in range(200)]


async def test_reconnects_within_the_linger_lose_and_repeat_nothing(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """A tab that drops and comes back again and again, while the session lingers tailed
    and tokens keep coming with nobody listening, still gets every token exactly once."""
    session = session_id()
    started = await start_chat(api, session, "slow")
    url = servers[0].base_url + started["streamUrl"]
    received: list[tuple[str, int, str]] = []
    cursor = ""
    lingered = False
    while True:
        headers = {"Last-Event-ID": cursor} if cursor else {}
        async with open_stream(url, **headers) as tab:
            await tab.wait_for(
                lambda evs: len(tokens(evs)) >= 15 or any(e.event == "complete" for e in evs),
                timeout=30,
            )
        received += tokens(tab.events)
        cursor = tab.parser.last_event_id or cursor
        if any(e.event == "complete" for e in tab.events):
            break
        await asyncio.sleep(0.05)  # away while tokens arrive (10 ms apart)
        details = (await api.get("/health")).json()
        lingered |= details["connections"]["lingeringSessions"] >= 1
    assert received == [(started["requestId"], i + 1, f"t{i} ") for i in range(200)]
    assert lingered


async def test_resume_by_query_parameter(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """`last_event_id` in the query works like the header (for clients that cannot set it)."""
    session = session_id()
    started = await start_chat(api, session, "gpt-4")
    url = servers[0].base_url + started["streamUrl"]
    async with open_stream(url) as tab:
        await tab.wait_terminal()
    cursor = next(e.id for e in tab.events if e.event == "token" and '"sequence":10,' in e.data)
    async with open_stream(f"{url}&last_event_id={cursor}") as resumed:
        await resumed.wait_terminal()
    assert [seq for _, seq, _ in tokens(resumed.events)] == list(range(11, UPSTREAM_TOKENS + 1))


async def test_two_processes_deliver_to_tabs_on_either(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """Chat started on one process; tabs on both processes receive everything."""
    session = session_id()
    started = await start_chat(api, session, "slow")
    path = started["streamUrl"]
    async with (
        open_stream(servers[0].base_url + path) as on_a,
        open_stream(servers[1].base_url + path) as on_b,
    ):
        await on_a.wait_terminal(timeout=30)
        await on_b.wait_terminal(timeout=30)
    assert len(tokens(on_a.events)) == 200
    assert tokens(on_a.events) == tokens(on_b.events)


async def test_a_tab_waiting_before_the_chat_gets_it_live(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """A tab open on the second process before the chat starts learns of the new stream."""
    session = session_id()
    first = await start_chat(api, session, "mock", params={"mockTokens": 3})
    url = servers[1].base_url + first["streamUrl"]
    async with open_stream(url) as tab:
        await tab.wait_terminal()
        second = await start_chat(api, session, "gpt-4")
        await tab.wait_terminal(2)
    requests = [rid for rid, _, _ in tokens(tab.events)]
    assert requests.count(first["requestId"]) == 3
    assert requests.count(second["requestId"]) == UPSTREAM_TOKENS


async def test_one_stream_carries_several_models_and_resumes_across_them(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """A session with two models: one SSE stream names each event's model; resume covers both."""
    session = session_id()
    a = await start_chat(api, session, "gpt-4")
    b = await start_chat(api, session, "mock", params={"mockTokens": 30})
    url = servers[0].base_url + a["streamUrl"]
    async with open_stream(url) as tab:
        await tab.wait_terminal(2)
    models = {p["modelId"] for p in payloads(tab.events)}
    assert models == {"gpt-4", "mock"}
    half = len(tab.events) // 2
    index = next(i for i, e in enumerate(tab.events) if i >= half and "," in e.id)
    cursor = tab.events[index].id
    assert cursor.startswith("gpt-4:")
    assert ",mock:" in cursor
    before = tokens(tab.events[: index + 1])
    rest = len(tokens(tab.events)) - len(before)
    async with open_stream(url, **{"Last-Event-ID": cursor}) as resumed:
        await resumed.wait_for(lambda evs: len(tokens(evs)) >= rest)
    combined = sorted(before + tokens(resumed.events))
    assert combined == sorted(tokens(tab.events))
    assert {a["requestId"], b["requestId"]} == {rid for rid, _, _ in combined}


async def test_provider_failure_midway_keeps_tokens_and_ends_with_error(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """An upstream that breaks after 4 tokens: the 4 stay, then an `error` event with a code."""
    session = session_id()
    started = await start_chat(api, session, "broken")
    async with open_stream(servers[0].base_url + started["streamUrl"]) as tab:
        await tab.wait_terminal()
    assert [c for _, _, c in tokens(tab.events)] == ["t0 ", "t1 ", "t2 ", "t3 "]
    error = payloads(tab.events, "error")[0]
    assert error["code"] == "provider_stream_broken"
    assert error["message"]


async def test_reading_needs_the_sessions_token(
    api: httpx.AsyncClient, servers: list[BridgeProcess]
) -> None:
    """No token: 401; another session's token: 403; neither reveals whether the session exists."""
    mine, other = session_id(), session_id()
    started = await start_chat(api, mine, "mock", params={"mockTokens": 1})
    theirs = await start_chat(api, other, "mock", params={"mockTokens": 1})
    no_token = await api.get(f"/api/sse/stream/{mine}")
    assert no_token.status_code == 401
    assert no_token.headers["content-type"].startswith("application/problem+json")
    wrong = await api.get(f"/api/sse/stream/{mine}?token={theirs['streamToken']}")
    assert wrong.status_code == 403
    ghost = await api.get(f"/api/sse/stream/nobody?token={started['streamToken']}")
    assert ghost.status_code == 403
    assert ghost.json()["detail"] == wrong.json()["detail"]
    async with api.stream(
        "GET",
        f"/api/sse/stream/{other}",
        headers={"Authorization": f"Bearer {theirs['streamToken']}"},
    ) as bearer:
        assert bearer.status_code == 200
        assert bearer.headers["content-type"].startswith("text/event-stream")
        assert bearer.headers["x-accel-buffering"] == "no"


async def test_a_cursor_older_than_retention_is_reported(
    api: httpx.AsyncClient, servers: list[BridgeProcess], store: aioredis.Redis, prefix: str
) -> None:
    """Resuming after entries that were trimmed away yields an explicit `gap` event first.

    The resume goes to the other process: the first one may still hold the whole answer in
    its memory of recent entries (`BRIDGE_SSE_RECENT_S`) and would rightly serve it all,
    while this test is about what Redis retains.
    """
    session = session_id()
    started = await start_chat(api, session, "gpt-4")
    async with open_stream(servers[0].base_url + started["streamUrl"]) as tab:
        await tab.wait_terminal()
    cursor = tab.events[2].id
    await store.xtrim(f"{prefix}stream:{session}:gpt-4", maxlen=5, approximate=False)
    url = servers[1].base_url + started["streamUrl"]
    async with open_stream(url, **{"Last-Event-ID": cursor}) as resumed:
        await resumed.wait_terminal()
    assert resumed.events[0].event == "gap"
    gap = payloads(resumed.events, "gap")[0]
    assert gap["reason"] == "trimmed"
    assert gap["modelId"] == "gpt-4"
    assert len(tokens(resumed.events)) == 4  # the 4 last tokens; the terminal is the 5th entry
    async with open_stream(url, **{"Last-Event-ID": "gpt-4:99999999999999-0"}) as future:
        await future.wait_terminal()
    assert payloads(future.events, "gap")[0]["reason"] == "reset"


async def test_bridge_chat_prints_the_mock_answer(servers: list[BridgeProcess]) -> None:
    """`bridge chat "hello"` against a running server prints the mock's answer and exits 0."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "chat",
        "hello",
        "--url",
        servers[0].base_url,
        "--model",
        "mock",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == mock_answer(24).strip()
    assert "stream: " in err.decode()


async def entries_added(store: aioredis.Redis, key: str) -> int:
    """Entries ever added to a stream: unlike its length, trimming does not lower it."""
    if not await store.exists(key):
        return 0
    info: Any = await store.xinfo_stream(key)
    return int(info["entries-added"])


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, ""),
        (b'{"sessionId": 5, "modelId": "mock", "prompt": "x"}', 400, "sessionId"),
        (b'{"modelId": "mock", "prompt": "x"}', 400, "sessionId"),
        (b'{"sessionId": "a", "modelId": "nope", "prompt": "x"}', 400, "known models: "),
        (b'{"sessionId": "a:b", "modelId": "mock", "prompt": "x"}', 400, "sessionId"),
        (b'{"sessionId": "..", "modelId": "mock", "prompt": "x"}', 400, "sessionId"),
        (b'{"sessionId": "a", "modelId": "mock"}', 400, "prompt"),
        (b'{"sessionId": "a", "modelId": "mock", "prompt": "x", "params": {"temp": 1}}', 400, ""),
        (b'{"sessionId": "a", "modelId": "mock", "prompt": "' + b"x" * 40_000 + b'"}', 413, ""),
        (b'{"sessionId": "a", "modelId": "mock", "prompt": "' + b"x" * 300_000 + b'"}', 413, ""),
    ],
)
async def test_bad_input_gets_a_clear_error_and_touches_nothing(
    api: httpx.AsyncClient,
    store: aioredis.Redis,
    prefix: str,
    body: bytes,
    status: int,
    needle: str,
) -> None:
    """Malformed or invalid requests get a problem+json 4xx and write nothing to Redis."""
    before = await entries_added(store, f"{prefix}requests")
    response = await api.post(
        "/api/chat/start", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status
    assert problem["detail"]
    assert needle in response.text
    assert await entries_added(store, f"{prefix}requests") == before
    assert await store.exists(f"{prefix}session:a") == 0
