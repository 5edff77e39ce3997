"""`GET /api/sse/stream/{sessionId}`: every event of every generation of a session, resumable."""

from __future__ import annotations

import contextlib
from functools import partial
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl

from litestar import asgi
from litestar.exceptions import MethodNotAllowedException, ServiceUnavailableException
from litestar.types import Receive, Scope, Send

from bridge.connections.sse import SSEResponse
from bridge.runtime import Runtime
from bridge.streams.codec import parse_cursor
from bridge.streams.history import replay
from bridge.streams.keys import check_id

TOKEN_COOKIE = "bridge_stream_token"
_WANTED = (b"authorization", b"cookie", b"last-event-id")


def stream_token(headers: dict[bytes, str], query_token: str | None) -> str | None:
    """The token from the query (EventSource), an `Authorization: Bearer` header, or a cookie."""
    if query_token:
        return query_token
    scheme, _, value = headers.get(b"authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    cookie = SimpleCookie()
    with contextlib.suppress(CookieError):
        cookie.load(headers.get(b"cookie", ""))
    morsel = cookie.get(TOKEN_COOKIE)
    return morsel.value if morsel is not None else None


# A mount, not `{session_id}`: Litestar 2 does not route path parameters to ASGI handlers.
@asgi("/api/sse/stream", is_mount=True, copy_scope=False)
async def sse_stream(scope: Scope, receive: Receive, send: Send) -> None:
    """Replay the session's retained events after the cursor, then stream live ones.

    The cursor comes from the `Last-Event-ID` header (EventSource sends it on reconnect) or
    the `last_event_id` query parameter. Without one, the whole retained stream is replayed.
    A plain ASGI handler: an SSE connection is opened by the thousand when tabs reconnect,
    and Litestar's request parsing and dependency injection were most of its cost (py-spy,
    S5); errors still go through the app's exception handlers.
    """
    if scope.get("method") != "GET":
        raise MethodNotAllowedException(headers={"Allow": "GET"})
    runtime: Runtime = scope["app"].state.runtime
    session = check_id("sessionId", scope["path"].strip("/"))
    query = dict(parse_qsl(scope["query_string"].decode("latin-1")))
    headers = {name: value.decode("latin-1") for name, value in scope["headers"] if name in _WANTED}
    runtime.tokens.verify(session, stream_token(headers, query.get("token")))
    cursor = parse_cursor(headers.get(b"last-event-id") or query.get("last_event_id") or "")
    if runtime.stopping:
        raise ServiceUnavailableException("this process is shutting down")
    sub = await runtime.manager.connect(session, cursor)
    response = SSEResponse(
        sub=sub,
        manager=runtime.manager,
        history=partial(
            replay,
            runtime.redis,
            runtime.keys,
            session,
            known_models=runtime.fanout.models if runtime.fanout is not None else None,
        ),
        heartbeat_s=runtime.settings.sse_heartbeat_s,
        retry_ms=runtime.settings.sse_retry_ms,
    )
    await response(scope, receive, send)
