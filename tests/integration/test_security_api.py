"""Security through a real `bridge serve` process: API keys, stream tokens, limits, CORS.

One server runs with API keys, rotated stream secrets and small limits. Each test that starts
chats uses a tenant of its own, so the per-key request limit of one test never touches another.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.access import StreamTokens
from bridge.auth import hash_key
from bridge.redis_select import make_client
from bridge.settings import Settings
from tests.servers import (
    BridgeProcess,
    bridge_env,
    open_stream,
    payloads,
    serving,
    tokens,
)

pytestmark = pytest.mark.integration

TENANT_KEYS = {f"t{i}": f"bk_test_{i}_{uuid.uuid4().hex}" for i in range(64)}
SIGNING, RETIRED = b"new-secret", b"test-secret"
RPM_PER_KEY = 5
TPM_PER_SESSION = 10
CORS_ORIGIN = "https://app.example"
_tenants = itertools.count()


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="module")
def server(
    redis_url: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    """One `bridge serve` with API keys, two stream secrets (new signs) and small limits."""
    env = bridge_env(
        redis_url,
        prefix,
        BRIDGE_API_KEYS=",".join(f"{t}:{hash_key(k)}" for t, k in TENANT_KEYS.items()),
        BRIDGE_STREAM_SECRET=f"{SIGNING.decode()},{RETIRED.decode()}",
        BRIDGE_RATE_KEY_RPM=str(RPM_PER_KEY),
        BRIDGE_RATE_SESSION_TPM=str(TPM_PER_SESSION),
        BRIDGE_MAX_GENERATIONS_PER_SESSION="2",
        BRIDGE_MAX_SSE_PER_SESSION="2",
        BRIDGE_MAX_SSE_PER_ADDRESS="5",
        BRIDGE_CORS_ORIGINS=CORS_ORIGIN,
    )
    log = str(tmp_path_factory.mktemp("logs") / "guarded.log")
    with serving(["serve"], env, log, redis_url, prefix) as process:
        yield process


@pytest.fixture
async def api(server: BridgeProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the server with the API key of a tenant no other test uses."""
    key = TENANT_KEYS[f"t{next(_tenants) % len(TENANT_KEYS)}"]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10, headers=headers) as http:
        yield http


@pytest.fixture
async def reader(server: BridgeProcess) -> AsyncIterator[httpx.AsyncClient]:
    """A client with no credentials of its own (a browser tab holding only a stream token)."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        yield http


@pytest.fixture
async def store(redis_url: str, settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = make_client(redis_url, settings)
    yield client
    await client.aclose()


def new_session() -> str:
    return f"s_{uuid.uuid4().hex[:10]}"


async def start(http: httpx.AsyncClient, session: str, **params: Any) -> httpx.Response:
    body = {"sessionId": session, "modelId": "mock", "prompt": "hi", "params": params}
    return await http.post("/api/chat/start", json=body)


async def started(http: httpx.AsyncClient, session: str, **params: Any) -> dict[str, Any]:
    response = await start(http, session, **params)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def status_of(http: httpx.AsyncClient, path: str, **headers: str) -> int:
    """The status of a GET; a stream that opens (200) is closed at once."""
    async with http.stream("GET", path, headers=headers) as response:
        return response.status_code


async def test_producer_routes_need_an_api_key(
    api: httpx.AsyncClient, server: BridgeProcess
) -> None:
    """chat/start without a key or with a wrong one is 401 (problem+json, WWW-Authenticate);
    health, metrics and the OpenAPI document stay public."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as anonymous:
        missing = await start(anonymous, new_session())
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.headers["content-type"].startswith("application/problem+json")
        wrong = await anonymous.post(
            "/api/chat/start",
            json={"sessionId": "a", "modelId": "mock", "prompt": "hi"},
            headers={"Authorization": f"Bearer {TENANT_KEYS['t0']}x"},
        )
        assert wrong.status_code == 401
        hostile = await anonymous.post(
            "/api/chat/start", content=b"{", headers={"Authorization": b"Bearer \xe9\xff"}
        )
        assert hostile.status_code == 401  # refused before the body is even parsed
        assert (await anonymous.get("/health/live")).status_code == 200
        assert (await anonymous.get("/schema/openapi.json")).status_code == 200
        assert (await anonymous.get("/metrics")).status_code == 200
    assert (await start(api, new_session())).status_code == 202


async def test_a_second_sessions_token_cannot_read_the_first(
    api: httpx.AsyncClient, reader: httpx.AsyncClient
) -> None:
    """Session B's token opens B but not A, whether sent in the query, a Bearer header or a
    cookie; A's own token opens A; the refusal is the same for a session that never existed."""
    first, second = new_session(), new_session()
    a = await started(api, first, mockTokens=1)
    b = await started(api, second, mockTokens=1)
    read_a = f"/api/sse/stream/{first}"
    assert await status_of(reader, f"{read_a}?token={b['streamToken']}") == 403
    assert await status_of(reader, read_a, Authorization=f"Bearer {b['streamToken']}") == 403
    assert await status_of(reader, read_a, Cookie=f"bridge_stream_token={b['streamToken']}") == 403
    assert await status_of(reader, read_a) == 401
    assert await status_of(reader, f"{read_a}?token={a['streamToken']}") == 200
    assert await status_of(reader, read_a, Authorization=f"Bearer {a['streamToken']}") == 200
    assert await status_of(reader, read_a, Cookie=f"bridge_stream_token={a['streamToken']}") == 200
    assert await status_of(reader, f"/api/sse/stream/{second}?token={b['streamToken']}") == 200
    wrong = await reader.get(f"{read_a}?token={b['streamToken']}")
    ghost = await reader.get(f"/api/sse/stream/never_used?token={b['streamToken']}")
    assert (wrong.status_code, wrong.json()) == (ghost.status_code, ghost.json())


async def test_expired_tampered_and_rotated_tokens(
    api: httpx.AsyncClient, reader: httpx.AsyncClient
) -> None:
    """Expired: 401; tampered or signed by an unknown secret: 403; signed by the retired
    secret still configured for verification: 200 (rotation)."""
    session = new_session()
    own = (await started(api, session, mockTokens=1))["streamToken"]
    path = f"/api/sse/stream/{session}?token="
    expired = StreamTokens([SIGNING], ttl_s=60).issue(session, now=time.time() - 120)
    assert await status_of(reader, path + expired) == 401
    tampered = own[:-1] + ("A" if own[-1] != "A" else "B")
    assert await status_of(reader, path + tampered) == 403
    longer_life = str(int(own.partition(".")[0]) + 10**6) + "." + own.partition(".")[2]
    assert await status_of(reader, path + longer_life) == 403
    assert await status_of(reader, path + StreamTokens([b"unknown"], 60).issue(session)) == 403
    assert await status_of(reader, path + StreamTokens([RETIRED], 60).issue(session)) == 200
    assert await status_of(reader, path + own) == 200


async def test_requests_per_minute_per_key_get_429_with_retry_after(
    api: httpx.AsyncClient, store: aioredis.Redis, prefix: str
) -> None:
    """Past the per-key limit, chat/start is 429 with Retry-After and a JSON body, and
    nothing is queued."""
    for _ in range(RPM_PER_KEY):
        await started(api, new_session(), mockTokens=1)
    queued = await store.xlen(f"{prefix}requests")
    refused = await start(api, new_session(), mockTokens=1)
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    problem = refused.json()
    assert problem["status"] == 429
    assert problem["limit"] == "requests per minute per API key"
    assert problem["retryAfter"] == int(refused.headers["retry-after"])
    assert await store.xlen(f"{prefix}requests") == queued


async def test_the_token_limit_stops_a_generation_with_a_clear_terminal_event(
    api: httpx.AsyncClient, server: BridgeProcess
) -> None:
    """Over the session's tokens per minute, the answer stops with a `rate_limited` error
    holding the partial usage; the next start on that session is refused with 429."""
    session = new_session()
    chat = await started(api, session, mockTokens=30)
    async with open_stream(server.base_url + chat["streamUrl"]) as tab:
        await tab.wait_terminal()
    assert len(tokens(tab.events)) == TPM_PER_SESSION
    error = payloads(tab.events, "error")[0]
    assert error["code"] == "rate_limited"
    assert error["usage"] == {"completionTokens": TPM_PER_SESSION}
    refused = await start(api, session, mockTokens=1)
    assert refused.status_code == 429
    assert refused.json()["limit"] == "tokens per minute per session"


async def test_concurrent_generations_per_session(
    api: httpx.AsyncClient, server: BridgeProcess
) -> None:
    """A third simultaneous generation in a session is 429; when they end, starting works."""
    session = new_session()
    first = await started(api, session, mockTokens=2, mockDelayMs=300)
    await started(api, session, mockTokens=2, mockDelayMs=300)
    refused = await start(api, session, mockTokens=1)
    assert refused.status_code == 429
    assert refused.json()["limit"] == "concurrent generations per session"
    async with open_stream(server.base_url + first["streamUrl"]) as tab:
        await tab.wait_terminal(2)
    await started(api, session, mockTokens=1)


async def open_connections(server: BridgeProcess, wanted: int = 0, timeout: float = 20) -> None:
    """Wait until the server counts `wanted` open connections (it notices closes async)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
        while time.monotonic() < deadline:
            report = (await http.get("/health")).json()
            if report["connections"]["open"] == wanted:
                return
            await asyncio.sleep(0.05)  # waiting on another process's bookkeeping
    raise TimeoutError(f"the server still counts {report['connections']['open']} connections")


async def test_open_connections_are_limited_per_session_and_per_address(
    api: httpx.AsyncClient, server: BridgeProcess
) -> None:
    """A third SSE connection to one session, or a sixth from one address, is 429."""
    await open_connections(server, 0)
    sessions = [new_session() for _ in range(3)]
    urls = []
    for session in sessions:
        chat = await started(api, session, mockTokens=1)
        urls.append(server.base_url + chat["streamUrl"])
    async with open_stream(urls[0]) as one, open_stream(urls[0]) as two:
        await one.wait_terminal()
        await two.wait_terminal()
        third = await api.get(urls[0])
        assert third.status_code == 429
        assert third.json()["limit"] == "open connections per session"
        async with (
            open_stream(urls[1]) as three,
            open_stream(urls[1]) as four,
            open_stream(urls[2]) as five,
        ):
            for tab in (three, four, five):
                await tab.wait_terminal()
            sixth = await api.get(urls[2])
            assert sixth.status_code == 429
            assert sixth.json()["limit"] == "open connections per client address"
            assert int(sixth.headers["retry-after"]) >= 1
    await open_connections(server, 0)
    async with open_stream(urls[2]) as again:
        await again.wait_terminal()


async def test_cors_allows_only_the_configured_origin(api: httpx.AsyncClient) -> None:
    """A preflight from the configured origin is allowed; other origins get no CORS grant."""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x"}
    allowed = await api.options("/api/chat/start", headers={"Origin": CORS_ORIGIN, **preflight})
    assert allowed.headers.get("access-control-allow-origin") == CORS_ORIGIN
    other = await api.options(
        "/api/chat/start", headers={"Origin": "https://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    simple = await api.get("/health/live", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


async def test_oversized_headers_are_refused(api: httpx.AsyncClient) -> None:
    """Headers past the configured total get 431 problem+json; far larger ones are refused by
    the HTTP server before they are buffered; the process keeps serving."""
    big = await api.get("/health/live", headers={"X-Filler": "a" * 20_000})
    assert big.status_code == 431
    assert big.json()["status"] == 431
    try:
        huge = await api.get("/health/live", headers={"X-Filler": "a" * 200_000})
    except httpx.HTTPError:
        pass  # the server dropped the connection: refused as well
    else:
        assert huge.status_code in (400, 431)
    assert (await api.get("/health/live")).status_code == 200


@pytest.mark.parametrize(
    "session",
    ["%2A", "a%2A", "a%3Ab", "%7Bx%7D", "..", "..%2F..", "a%0Ab", "a%0D", "x" * 129, "%C3%A9"],
)
async def test_hostile_session_ids_in_the_path_are_400(
    api: httpx.AsyncClient, session: str
) -> None:
    """Ids that could reach other keys (glob, separator, hash tag, path, newline, long,
    non-ASCII) are refused before any token check or Redis read."""
    response = await api.get(f"/api/sse/stream/{session}?token=1.x")
    assert response.status_code in (400, 404)
    assert response.headers["content-type"].startswith("application/problem+json")


@pytest.mark.parametrize(
    "session_id",
    ["*", "a:b", "{a}", "../etc", "a\nb", "a\r", "x" * 129, "é", "a b", "", "\u0000"],
)
async def test_hostile_session_ids_in_the_body_write_nothing(
    api: httpx.AsyncClient, store: aioredis.Redis, prefix: str, session_id: str
) -> None:
    """chat/start refuses hostile ids with 400 and queues nothing."""
    before = await store.xlen(f"{prefix}requests")
    response = await start(api, session_id, mockTokens=1)
    assert response.status_code == 400, response.text
    assert await store.xlen(f"{prefix}requests") == before


async def test_hostile_prompts_are_accepted_or_refused_cleanly(api: httpx.AsyncClient) -> None:
    """Unicode edge cases in prompts (NUL, RTL marks, combining marks, emoji, lone
    surrogate escapes, oversize in characters vs bytes) never cause a 5xx."""
    cases: list[tuple[bytes, set[int]]] = [
        (b'"\\u0000\\u202e\\u0301\\ufeff\xf0\x9f\x99\x82 \xe2\x80\xae"', {202}),
        (b'"\\ud800"', {202, 400}),
        (b'"\\udfff\\ud800"', {202, 400}),
        (('"' + "🙂" * 32_000 + '"').encode(), {202}),  # 128 kB of UTF-8, 32,000 characters
        (('"' + "🙂" * 32_001 + '"').encode(), {413}),
    ]
    for prompt, allowed in cases:
        body = b'{"sessionId": "%s", "modelId": "mock", "prompt": %s, "params": {"mockTokens": 1}}'
        response = await api.post(
            "/api/chat/start",
            content=body % (new_session().encode(), prompt),
            headers={"content-type": "application/json"},
        )
        assert response.status_code in allowed, (prompt[:40], response.text)


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "mock:1-1,",
        "mock:18446744073709551616-0",
        "mock:1-1\x01",
        "mock:1-1" * 2000,
        "*:1-1",
        "mock:1-1,{x}:1-1",
    ],
)
async def test_garbage_last_event_ids_are_400(api: httpx.AsyncClient, cursor: str) -> None:
    """A `Last-Event-ID` the server could not have sent is 400, in the header or the query."""
    session = new_session()
    chat = await started(api, session, mockTokens=1)
    response = await api.get(chat["streamUrl"], headers={"Last-Event-ID": cursor})
    assert response.status_code == 400, response.text
    response = await api.get(f"{chat['streamUrl']}&last_event_id={quote(cursor)}")
    assert response.status_code == 400, response.text


async def test_the_keys_never_reach_the_log(api: httpx.AsyncClient, server: BridgeProcess) -> None:
    """After every test above, no API key appears in the server's log, and a server with keys
    does not announce that it runs open."""
    await start(api, new_session(), mockTokens=1)
    log = server.log()
    assert "worker_started" in log  # the log is the real one
    for key in TENANT_KEYS.values():
        assert key not in log
    assert "running_open_without_api_keys" not in log
