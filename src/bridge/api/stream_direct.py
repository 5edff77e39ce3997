"""The direct path of `GET /api/sse/stream/{sessionId}`: a live stream without the framework.

Thousands of SSE connections stay open per process. Served through Litestar, each one keeps
its request, scope state and a dozen middleware frames alive for its whole life (4.8 KiB of
the 21 KiB of Python objects an idle connection holds, tracemalloc), and every event it is
sent passes two middleware `send` wrappers. So `BridgeApp` offers a stream request to
`serve_directly` first, which does what the route and its middleware do for a request that
gets a live stream: the header size limit, the stream token, the cursor, the connection
limits, the request id, the access-log line.

It declines, and the Litestar route answers instead, whenever the answer is anything else:
an error (problem+json), a `reconnect`-only stream (stopping, Redis away), a cross-origin
request when CORS is configured (the route adds its headers), a query or header given twice.
The route stays the one source of those answers and of the OpenAPI entry, and every check
runs again there, so declining is always safe.
"""

from __future__ import annotations

import time
from typing import NamedTuple
from urllib.parse import parse_qsl

import structlog
from litestar import Litestar
from litestar.types import HTTPResponseStartEvent, HTTPScope, Receive, Send

from bridge.api.observability import REQUEST_ID_HEADER, log_request, request_id
from bridge.api.stream import STREAM_PATH, TOKEN_COOKIE, open_session_stream
from bridge.auth import bearer_credentials
from bridge.client_limits import header_bytes
from bridge.connections.sse import SSE_HEADERS, SSEStream
from bridge.runtime import Runtime

#: the route's template, as the access log names it
ROUTE = STREAM_PATH + "{session_id}"

_START_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    *((name.lower().encode(), value.encode()) for name, value in SSE_HEADERS.items()),
]
_READ_HEADERS = frozenset(
    {b"authorization", b"cookie", b"last-event-id", b"origin", REQUEST_ID_HEADER.encode()}
)


class StreamRequest(NamedTuple):
    """What a stream request carries: session id, token, cursor."""

    session_id: str
    token: str | None
    last_event_id: str | None


def parse_stream_request(
    scope: HTTPScope, *, max_header_bytes: int, cors: bool
) -> StreamRequest | None:
    """The request's parts, or None when the Litestar route must answer it (see above)."""
    session_id = scope["path"][len(STREAM_PATH) :]
    if not session_id or "/" in session_id:
        return None
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _READ_HEADERS:
            if name in headers:
                return None
            headers[name] = value
    if max_header_bytes and header_bytes(scope["headers"]) > max_header_bytes:
        return None
    if cors and b"origin" in headers:
        return None
    query: dict[str, str] = {}
    for key, text in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
        if key in query:
            return None
        query[key] = text
    token = (
        query.get("token")
        or bearer_credentials(headers.get(b"authorization", b"").decode("latin-1"))
        or _cookie(headers.get(b"cookie", b"").decode("latin-1"), TOKEN_COOKIE)
    )
    last_event_id = headers.get(b"last-event-id", b"").decode("latin-1") or query.get(
        "last_event_id"
    )
    return StreamRequest(session_id, token, last_event_id)


def _cookie(header: str, name: str) -> str | None:
    for pair in header.split(";"):
        key, _, value = pair.partition("=")
        if key.strip() == name:
            return value.strip() or None
    return None


async def serve_directly(app: Litestar, scope: HTTPScope, receive: Receive, send: Send) -> bool:
    """Serve a stream request that gets a live stream; False if the route must answer it."""
    runtime: Runtime | None = app.state.get("runtime")
    if runtime is None:
        return False
    request = parse_stream_request(
        scope,
        max_header_bytes=runtime.settings.max_header_bytes,
        cors=app.cors_config is not None,
    )
    if request is None:
        return False
    rid = request_id(scope)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(http_request_id=rid)
    client = scope.get("client")
    started = time.perf_counter()
    try:
        stream = await open_session_stream(
            runtime,
            request.session_id,
            request.token,
            request.last_event_id,
            address=client[0] if client else None,
        )
    except Exception:  # a BridgeError, or a bug: the route meets it again, and answers it
        return False
    if not isinstance(stream, SSEStream):
        return False
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 200,
        "headers": [*_START_HEADERS, (REQUEST_ID_HEADER.encode(), rid.encode())],
    }
    try:
        await stream(send, receive, start)
    finally:
        log_request("GET", ROUTE, scope["path"], 200, time.perf_counter() - started, True)
    return True
