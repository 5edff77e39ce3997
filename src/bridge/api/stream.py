"""`GET /api/sse/stream/{sessionId}`: every event of every generation of a session, resumable."""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import structlog
from litestar import Request, get
from litestar.params import HeaderParameter, QueryParameter
from litestar.response.base import ASGIResponse
from redis.exceptions import RedisError

from bridge.api.observability import STREAMING
from bridge.auth import bearer
from bridge.connections.sse import SSEResponse, SSEStream, closed_stream
from bridge.errors import CloseReason, RedisUnavailable
from bridge.runtime import Runtime
from bridge.streams.codec import parse_cursor
from bridge.streams.keys import check_id

TOKEN_COOKIE = "bridge_stream_token"


def stream_token(request: Request[Any, Any, Any], query_token: str | None) -> str | None:
    """The token from the query (EventSource), an `Authorization: Bearer` header, or a cookie."""
    return query_token or bearer(request) or request.cookies.get(TOKEN_COOKIE)


STREAM_PATH = "/api/sse/stream/"


@get(
    STREAM_PATH + "{session_id:str}",
    media_type="text/event-stream",
    summary="Stream a session's events (Server-Sent Events)",
    tags=["chat"],
    opt={"auth": "stream_token", STREAMING: True},
)
async def sse_stream(
    session_id: str,
    request: Request[Any, Any, Any],
    runtime: Runtime,
    token: str | None = None,
    last_event_id: Annotated[str | None, QueryParameter(name="last_event_id")] = None,
    last_event_id_header: Annotated[str | None, HeaderParameter(name="Last-Event-ID")] = None,
) -> ASGIResponse:
    """Replay the session's retained events after the cursor, then stream live ones.

    The cursor comes from the `Last-Event-ID` header (EventSource sends it on reconnect) or
    the `last_event_id` query parameter. Without one, the whole retained stream is replayed.
    A process that is shutting down, or that cannot reach Redis, answers with only a
    `reconnect` event, never an error status: EventSource gives up for good on those, but
    reconnects (elsewhere, or once Redis is back) after a stream ends.
    """
    stream = await open_session_stream(
        runtime,
        session_id,
        stream_token(request, token),
        last_event_id_header or last_event_id,
        address=request.client.host if request.client else None,
    )
    return stream if isinstance(stream, ASGIResponse) else SSEResponse(stream)


async def open_session_stream(
    runtime: Runtime,
    session_id: str,
    token: str | None,
    last_event_id: str | None,
    *,
    address: str | None,
) -> SSEStream | ASGIResponse:
    """Check the request and register the connection; the stream to send, or a refusal.

    Raises `BridgeError`s for bad requests (problem+json answers); answers a `reconnect`-only
    stream when shutting down or without Redis. Shared by the Litestar route and the direct
    path (`stream_direct`).
    """
    session = check_id("sessionId", session_id)
    runtime.tokens.verify(session, token)
    cursor = parse_cursor(last_event_id or "")
    if runtime.stopping:
        return closed_stream(CloseReason.SHUTDOWN, runtime.settings.sse_retry_ms)
    try:
        if not await runtime.watch.available():
            raise RedisUnavailable("Redis is away")
        sub = await runtime.manager.connect(session, cursor, address=address)
    except (RedisUnavailable, RedisError, OSError):
        return closed_stream(CloseReason.REDIS_UNAVAILABLE, runtime.settings.sse_retry_ms)
    structlog.contextvars.bind_contextvars(session_id=session, connection_id=sub.id)
    if runtime.stopping:  # shutdown began while connecting: end at once with `reconnect`
        sub.close(CloseReason.SHUTDOWN)
    return SSEStream(
        sub=sub,
        manager=runtime.manager,
        history=partial(runtime.catch_up, session),
        heartbeat_s=runtime.settings.sse_heartbeat_s,
        retry_ms=runtime.settings.sse_retry_ms,
    )
