"""The direct path of the SSE route: live streams skip the framework, everything else does not.

The app runs under uvicorn in this process, so the tests can see which path answered
(`bridge.app.serve_directly` is wrapped) and compare the two paths' answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
import uvicorn
from structlog.testing import capture_logs

import bridge.api.stream_front
import bridge.app
from bridge.api.stream_direct import ROUTE
from bridge.api.stream_front import stream_front
from bridge.app import create_app
from bridge.connections.push import PushStream
from bridge.runtime import Runtime
from bridge.settings import Settings
from bridge.sse_client import SSEEvent, SSEParser
from tests.redis_fixtures import free_port
from tests.servers import TERMINAL, payloads, start_chat

pytestmark = [
    pytest.mark.integration,
    # the handlers' inferred `runtime` dependency is deprecated for Litestar 3 (not ours here)
    pytest.mark.filterwarnings("ignore::litestar.exceptions.LitestarDeprecationWarning"),
]

CAPTURE = [structlog.contextvars.merge_contextvars]


class Served:
    """A running app, and what the direct path answered (True) or declined (False).

    `fronted` counts the streams `stream_front` served, when it runs (they never reach the
    ASGI app, so they are not in `outcomes`).
    """

    def __init__(
        self, base_url: str, runtime: Runtime, outcomes: list[bool], fronted: list[PushStream]
    ) -> None:
        self.base_url = base_url
        self.runtime = runtime
        self.outcomes = outcomes
        self.fronted = fronted

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, timeout=10.0)

    async def settled(self, requests: int) -> list[bool]:
        """The outcomes once `requests` stream requests have ended on the server's side."""
        async with asyncio.timeout(5):
            while len(self.outcomes) < requests:  # noqa: ASYNC110 - the server has no event
                await asyncio.sleep(0.01)
        return self.outcomes


@contextlib.asynccontextmanager
async def serving(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    *,
    direct: bool = True,
    with_api: bool = True,
    front: bool = False,
) -> AsyncIterator[Served]:
    outcomes: list[bool] = []
    fronted: list[PushStream] = []

    class SpiedPushStream(PushStream):
        __slots__ = ()

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            fronted.append(self)

    monkeypatch.setattr(bridge.api.stream_front, "PushStream", SpiedPushStream)
    serve_directly = bridge.app.serve_directly

    async def spy(*args: Any) -> bool:
        outcome = await serve_directly(*args) if direct else False
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(bridge.app, "serve_directly", spy)
    app = create_app(settings, with_api=with_api, with_worker=with_api)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="on",
            http=stream_front(app) if front else "auto",  # type: ignore[arg-type]
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(30):
            while not server.started:  # noqa: ASYNC110 - uvicorn offers no start event
                await asyncio.sleep(0.02)
        yield Served(f"http://127.0.0.1:{port}", app.state.runtime, outcomes, fronted)
    finally:
        server.should_exit = True
        await task


async def chat(served: Served, session: str) -> dict[str, Any]:
    async with served.http() as http:
        return await start_chat(http, session)


async def read_until(response: httpx.Response, done: Callable[[SSEEvent], bool]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    async for chunk in response.aiter_bytes():
        for event in parser.feed(chunk):
            events.append(event)
            if done(event):
                return events
    return events


async def unregistered(served: Served) -> None:
    """Until the server saw every stream end."""
    async with asyncio.timeout(5):
        while served.runtime.manager.connection_count:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.01)


async def answer(served: Served, session: str) -> tuple[Any, ...]:
    """A stream of a new answer read to its end: status, headers (but `date` and `server`),
    event shapes, and the access-log routes of the request."""
    started = await chat(served, session)
    with capture_logs(CAPTURE) as logs:
        async with (
            served.http() as http,
            http.stream("GET", started["streamUrl"], headers={"X-Request-ID": "rid-1"}) as resp,
        ):
            events = await read_until(resp, terminal)
        await unregistered(served)
    headers = {k: v for k, v in resp.headers.items() if k not in {"date", "server"}}
    routes = [e["route"] for e in logs if e["event"] == "http_request"]
    shapes = [(e.event, msgspec.json.decode(e.data).get("sequence")) for e in events]
    return resp.status_code, headers, shapes, routes


async def resumed(served: Served, session: str) -> tuple[list[SSEEvent], list[SSEEvent]]:
    """A stream read to its first token, then one resumed after it to the answer's end."""
    started = await chat(served, session)
    async with served.http() as http:
        async with http.stream("GET", started["streamUrl"]) as resp:
            first = await read_until(resp, lambda e: e.event == "token")
        async with http.stream(
            "GET", started["streamUrl"], headers={"Last-Event-ID": first[-1].id}
        ) as resp:
            rest = await read_until(resp, terminal)
    return first, rest


def terminal(event: SSEEvent) -> bool:
    return event.event in TERMINAL


def tokens_of(events: list[SSEEvent]) -> list[int]:
    return [token["sequence"] for token in payloads(events)]


@pytest.fixture
def quick(settings: Settings) -> Settings:
    return msgspec.structs.replace(settings, mock_tokens=6, mock_delay_ms=2.0)


async def test_a_live_stream_is_served_directly_with_every_token_once(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream with a valid token takes the direct path; it delivers the whole answer, in
    order, logs the route's access line and unregisters the connection when it ends."""
    async with serving(quick, monkeypatch) as served:
        started = await chat(served, "direct-1")
        with capture_logs(CAPTURE) as logs:
            async with served.http() as http, http.stream("GET", started["streamUrl"]) as resp:
                assert resp.status_code == 200
                assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
                assert resp.headers["cache-control"] == "no-cache"
                assert resp.headers["x-accel-buffering"] == "no"
                assert len(resp.headers["x-request-id"]) == 32
                events = await read_until(resp, terminal)
            assert await served.settled(1) == [True]
        assert served.runtime.manager.connection_count == 0
        assert tokens_of(events) == list(range(1, 7))
        assert events[-1].event == "complete"
        access = [e for e in logs if e["event"] == "http_request"]
        assert [(e["route"], e["status"], e["streaming"]) for e in access] == [(ROUTE, 200, True)]
        assert access[0]["http_request_id"] == resp.headers["x-request-id"]


async def test_the_direct_path_answers_as_the_route_does(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same status, headers and events, and the same access-log route, both ways."""
    answers = []
    for direct in (True, False):
        with monkeypatch.context() as patch:
            async with serving(quick, patch, direct=direct) as served:
                answers.append((*await answer(served, f"same-{direct}"), served.outcomes))
    (direct_answer, route_answer) = answers
    assert direct_answer[4] == [True]
    assert route_answer[4] == [False]
    assert direct_answer[:4] == route_answer[:4]


async def test_a_reconnect_resumes_after_its_cursor(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Last-Event-ID` on the direct path: the rest of the answer, nothing twice."""
    async with serving(quick, monkeypatch) as served:
        first, rest = await resumed(served, "direct-resume")
        assert await served.settled(2) == [True, True]
        assert tokens_of(first) + tokens_of(rest) == list(range(1, 7))


@pytest.mark.parametrize(
    ("request_kw", "status", "detail"),
    [
        ({"params": {}}, 401, "a stream token is required"),
        ({"params": {"token": "123.bad"}}, 403, "invalid stream token"),
        ({"params": {"token": ["a", "b"]}}, 403, "invalid stream token"),
        ({"params": {"last_event_id": "not-an-id"}, "with_token": True}, 400, None),
        ({"headers": {"X-Big": "x" * 20_000}, "with_token": True}, 431, None),
    ],
)
async def test_what_the_direct_path_declines_the_route_answers(
    quick: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    request_kw: dict[str, Any],
    status: int,
    detail: str | None,
) -> None:
    """Bad tokens, bad cursors, repeated parameters, oversized headers: the route's errors."""
    async with serving(quick, monkeypatch) as served:
        token = served.runtime.tokens.issue("declined")
        params = dict(request_kw.get("params", {}))
        if request_kw.get("with_token"):
            params["token"] = token
        async with served.http() as http:
            response = await http.get(
                "/api/sse/stream/declined", params=params, headers=request_kw.get("headers")
            )
        assert response.status_code == status
        assert response.headers["content-type"].startswith("application/problem+json")
        if detail is not None:
            assert response.json()["detail"].startswith(detail)
        assert await served.settled(1) == [False]
        assert served.runtime.manager.connection_count == 0


async def test_a_session_at_its_connection_limit_gets_the_routes_429(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is checked on the direct path; the refusal is the route's 429."""
    limited = msgspec.structs.replace(quick, max_sse_per_session=1)
    async with serving(limited, monkeypatch) as served:
        url = f"/api/sse/stream/full?token={served.runtime.tokens.issue('full')}"
        async with served.http() as http, http.stream("GET", url) as first:
            assert first.status_code == 200
            second = await http.get(url)
        assert second.status_code == 429
        assert second.headers["content-type"].startswith("application/problem+json")
        assert sorted(await served.settled(2)) == [False, True]  # the refusal ends first


async def test_cross_origin_streams_go_through_the_route_for_their_cors_headers(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With CORS configured, a request with an Origin is the route's (it adds the headers)."""
    cors = msgspec.structs.replace(quick, cors_origins=("https://chat.example",))
    async with serving(cors, monkeypatch) as served:
        url = f"/api/sse/stream/cors?token={served.runtime.tokens.issue('cors')}"
        async with served.http() as http:
            async with http.stream("GET", url, headers={"Origin": "https://chat.example"}) as a:
                assert a.status_code == 200
                assert a.headers["access-control-allow-origin"] == "https://chat.example"
            async with http.stream("GET", url) as same_origin:
                assert same_origin.status_code == 200
        assert await served.settled(2) == [False, True]


async def test_a_stopping_process_declines_and_the_route_sends_reconnect(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutting down: the route's `reconnect`-only stream, never a live one."""
    async with serving(quick, monkeypatch) as served:
        served.runtime.begin_shutdown()
        url = f"/api/sse/stream/stop?token={served.runtime.tokens.issue('stop')}"
        async with served.http() as http, http.stream("GET", url) as resp:
            events = await read_until(resp, lambda e: e.event == "reconnect")
        assert resp.status_code == 200
        assert [e.event for e in events] == ["reconnect"]
        assert msgspec.json.decode(events[0].data) == {"reason": "shutdown"}
        assert await served.settled(1) == [False]


async def test_the_workers_listener_serves_no_streams(
    quick: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bridge worker`'s listener (health and metrics only) has no stream route, direct or not:
    a valid stream token still gets 404 there."""
    async with serving(quick, monkeypatch, with_api=False) as served:
        url = f"/api/sse/stream/w?token={served.runtime.tokens.issue('w')}"
        async with served.http() as http:
            response = await http.get(url)
        assert response.status_code == 404
        assert served.runtime.manager.connection_count == 0
