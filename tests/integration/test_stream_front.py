"""`stream_front`: live SSE streams served in front of uvicorn's protocol, the rest handed over.

The app runs under uvicorn in this process with `bridge serve`'s protocol, so the tests see
which streams the front served (`Served.fronted`) and which reached the ASGI app
(`Served.outcomes`), and compare the answers with the Litestar route's.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

import bridge.api.stream_front
from bridge.api.stream_direct import ROUTE
from bridge.settings import Settings
from tests.integration.test_sse_direct import (
    CAPTURE,
    Served,
    answer,
    chat,
    read_until,
    resumed,
    serving,
    terminal,
    tokens_of,
    unregistered,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::litestar.exceptions.LitestarDeprecationWarning"),
]


@pytest.fixture
def quick(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, mock_tokens=6, mock_delay_ms=2.0)


async def test_a_live_stream_is_served_in_front_of_uvicorn(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every token once, in order, with the route's headers and access-log line; the
    connection unregisters when the client leaves. Other requests (`chat/start`) pass."""
    async with serving(quick, monkeypatch, front=True) as served:
        started = await chat(served, "front-1")
        with capture_logs(CAPTURE) as logs:
            async with served.http() as http, http.stream("GET", started["streamUrl"]) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert resp.headers["cache-control"] == "no-cache"
                assert resp.headers["x-accel-buffering"] == "no"
                assert resp.headers["transfer-encoding"] == "chunked"
                assert "date" in resp.headers
                assert len(resp.headers["x-request-id"]) == 32
                events = await read_until(resp, terminal)
            await unregistered(served)
        assert len(served.fronted) == 1
        assert served.outcomes == []
        assert tokens_of(events) == list(range(1, 7))
        assert events[-1].event == "complete"
        access = [e for e in logs if e["event"] == "http_request"]
        assert [(e["route"], e["status"], e["streaming"]) for e in access] == [(ROUTE, 200, True)]
        assert access[0]["http_request_id"] == resp.headers["x-request-id"]
        assert access[0]["session_id"] == "front-1"


async def test_the_front_answers_as_the_route_does(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same status, headers (but `date` and `server`), events and access-log route."""
    answers = []
    for front in (True, False):
        with monkeypatch.context() as patch:
            async with serving(quick, patch, direct=False, front=front) as served:
                answers.append((*await answer(served, f"same-{front}"), len(served.fronted)))
    (front_answer, route_answer) = answers
    assert front_answer[4] == 1
    assert route_answer[4] == 0
    assert front_answer[:4] == route_answer[:4]


async def test_a_reconnect_resumes_after_its_cursor(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Last-Event-ID` through the front: the rest of the answer, nothing twice."""
    async with serving(quick, monkeypatch, front=True) as served:
        first, rest = await resumed(served, "front-resume")
        assert len(served.fronted) == 2
        assert tokens_of(first) + tokens_of(rest) == list(range(1, 7))


@pytest.mark.parametrize(
    ("request_kw", "status"),
    [
        ({"params": {}}, 401),
        ({"params": {"token": "123.bad"}}, 403),
        ({"params": {"token": ["a", "b"]}}, 403),
        ({"params": {"last_event_id": "not-an-id"}, "with_token": True}, 400),
        ({"headers": {"X-Big": "x" * 20_000}, "with_token": True}, 431),
    ],
)
async def test_what_the_front_declines_the_route_answers(
    quick: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    request_kw: dict[str, Any],
    status: int,
) -> None:
    async with serving(quick, monkeypatch, front=True) as served:
        params = dict(request_kw.get("params", {}))
        if request_kw.get("with_token"):
            params["token"] = served.runtime.tokens.issue("declined")
        async with served.http() as http:
            response = await http.get(
                "/api/sse/stream/declined", params=params, headers=request_kw.get("headers")
            )
        assert response.status_code == status
        assert response.headers["content-type"].startswith("application/problem+json")
        assert served.fronted == []
        assert await served.settled(1) == [False]
        assert served.runtime.manager.connection_count == 0


def raw_exchange(port: int, *pieces: bytes, until: bytes, pause_s: float = 0.0) -> bytes:
    """Send `pieces` (pausing between them) on a new connection; read until `until`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause_s)
        received = b""
        while until not in received:
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return received


def port_of(served: Served) -> int:
    return int(served.base_url.rsplit(":", 1)[1])


async def test_a_head_that_arrives_in_pieces_is_served(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(quick, monkeypatch, front=True) as served:
        token = served.runtime.tokens.issue("pieces")
        head = f"GET /api/sse/stream/pieces?token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        pieces = [head[i : i + 7] for i in range(0, len(head), 7)]
        answer = await asyncio.to_thread(
            raw_exchange, port_of(served), *pieces, until=b"retry:", pause_s=0.01
        )
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\ntransfer-encoding: chunked\r\n" in answer
        await unregistered(served)
        assert len(served.fronted) == 1


@pytest.mark.parametrize(
    ("head", "status", "direct"),
    [
        # HTTP/1.0 has no chunked bodies: uvicorn's to answer
        (b"GET /api/sse/stream/other?token={token} HTTP/1.0\r\n\r\n", b"200", True),
        # a body, and a method the route does not take
        (
            b"POST /api/sse/stream/other?token={token} HTTP/1.1\r\ncontent-length: 2\r\n\r\n{{}}",
            b"405",
            None,
        ),
        # a client address given by a trusted proxy (uvicorn's proxy headers)
        (
            b"GET /api/sse/stream/other?token={token} HTTP/1.1\r\n"
            b"X-Forwarded-For: 10.1.2.3\r\n\r\n",
            b"200",
            True,
        ),
        # a second request pipelined behind the first (refused: no token)
        (
            b"GET /api/sse/stream/other HTTP/1.1\r\n\r\nGET /health/live HTTP/1.1\r\n\r\n",
            b"401",
            False,
        ),
        # a header the front cannot read as simply as it needs (obsolete line folding)
        (
            b"GET /api/sse/stream/other?token={token} HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n",
            b"400",
            None,
        ),
    ],
)
async def test_requests_the_front_does_not_read_are_uvicorns(
    quick: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    head: bytes,
    status: bytes,
    direct: bool | None,
) -> None:
    """Handed over with the bytes read so far, they get exactly uvicorn's and the app's answer."""
    async with serving(quick, monkeypatch, front=True) as served:
        token = served.runtime.tokens.issue("other").encode()
        request = head.replace(b"{token}", token).replace(b"{{}}", b"{}")
        pipelined = b"/health/live" in request
        until = b"HTTP/1.1 200" if pipelined else b"\r\n\r\n"
        answer = await asyncio.to_thread(raw_exchange, port_of(served), request, until=until)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        if pipelined:  # the second request is answered too
            assert b"HTTP/1.1 200" in answer
        assert served.fronted == []
        if direct is not None:
            assert await served.settled(1) == [direct]


async def test_a_stream_behind_a_trusted_proxy_counts_the_forwarded_address(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-address limit applies to the address the proxy gives, not to the proxy's."""
    limited = msgspec.structs.replace(quick, max_sse_per_address=1)
    async with serving(limited, monkeypatch, front=True) as served:
        url = f"/api/sse/stream/fwd?token={served.runtime.tokens.issue('fwd')}"
        async with (
            served.http() as http,
            http.stream("GET", url, headers={"X-Forwarded-For": "10.0.0.1"}) as one,
            http.stream("GET", url, headers={"X-Forwarded-For": "10.0.0.2"}) as two,
        ):
            assert (one.status_code, two.status_code) == (200, 200)
            third = await http.get(url, headers={"X-Forwarded-For": "10.0.0.1"})
        assert third.status_code == 429
        assert served.fronted == []


async def test_shutdown_ends_live_streams_with_reconnect(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime's shutdown closes the front's streams as the ASGI path's: `reconnect`."""
    async with serving(quick, monkeypatch, front=True) as served:
        url = f"/api/sse/stream/bye?token={served.runtime.tokens.issue('bye')}"
        async with served.http() as http, http.stream("GET", url) as resp:
            await asyncio.sleep(0.1)
            served.runtime.begin_shutdown()
            events = await read_until(resp, lambda e: False)  # to the body's end
        assert [e.event for e in events] == ["reconnect"]
        assert msgspec.json.decode(events[-1].data) == {"reason": "shutdown"}
        await unregistered(served)
        assert len(served.fronted) == 1


async def test_the_server_stopping_ends_live_streams(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's own shutdown asks each connection to end: the front's streams do at once."""
    with capture_logs(CAPTURE):
        async with serving(quick, monkeypatch, front=True) as served:
            url = (
                f"{served.base_url}/api/sse/stream/stop?token={served.runtime.tokens.issue('stop')}"
            )
            http = served.http()
            resp = await http.send(http.build_request("GET", url), stream=True)
            assert resp.status_code == 200
    # the server's exit (the context's end) returned: the stream did not hold it
    events = await asyncio.wait_for(read_until(resp, lambda e: e.event == "reconnect"), 5)
    assert events[-1].event == "reconnect"
    await resp.aclose()
    await http.aclose()


async def test_streams_register_a_bounded_number_at_a_time(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of streams registers `OPENING_LIMIT` at a time, and every one is served."""
    monkeypatch.setattr(bridge.api.stream_front, "OPENING_LIMIT", 2)
    opening = bridge.api.stream_front.open_session_stream
    now = peak = 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal now, peak
        now += 1
        peak = max(peak, now)
        try:
            await asyncio.sleep(0.02)  # a registration's round trips
            return await opening(*args, **kwargs)
        finally:
            now -= 1

    monkeypatch.setattr(bridge.api.stream_front, "open_session_stream", counted)
    async with serving(quick, monkeypatch, front=True) as served:
        heads = [
            f"GET /api/sse/stream/burst-{i}?token={served.runtime.tokens.issue(f'burst-{i}')}"
            " HTTP/1.1\r\n\r\n".encode()
            for i in range(6)
        ]
        answers = await asyncio.gather(
            *(asyncio.to_thread(raw_exchange, port_of(served), h, until=b"retry:") for h in heads)
        )
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
        assert len(served.fronted) == 6
        assert peak == 2


async def test_a_client_that_sends_on_while_its_stream_opens_is_closed(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What arrives while a stream opens is kept for uvicorn (in case it is declined), up to
    `MAX_HEAD_BYTES`: past that the connection closes, and nothing stays registered."""
    opening = bridge.api.stream_front.open_session_stream
    slow = asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        await slow.wait()
        return await opening(*args, **kwargs)

    monkeypatch.setattr(bridge.api.stream_front, "open_session_stream", held)
    async with serving(quick, monkeypatch, front=True) as served:
        token = served.runtime.tokens.issue("flood")
        head = f"GET /api/sse/stream/flood?token={token} HTTP/1.1\r\n\r\n".encode()
        flood = b"x" * (bridge.api.stream_front.MAX_HEAD_BYTES + 1)
        answer = await asyncio.to_thread(
            raw_exchange, port_of(served), head, flood, until=b"\r\n", pause_s=0.2
        )
        slow.set()
        assert answer == b""
        await asyncio.sleep(0.1)
        assert served.fronted == []
        assert served.runtime.manager.connection_count == 0
