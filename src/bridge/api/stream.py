"""`GET /api/sse/stream/{sessionId}`: every event of every generation of a session, resumable."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import Request, get
from litestar.params import Parameter
from litestar.response.base import ASGIResponse
from redis.exceptions import RedisError

from bridge.connections.sse import SSEResponse, closed_stream
from bridge.errors import CloseReason, RedisUnavailable
from bridge.runtime import Runtime
from bridge.streams.codec import parse_cursor
from bridge.streams.history import replay
from bridge.streams.keys import check_id

TOKEN_COOKIE = "bridge_stream_token"


def stream_token(request: Request[Any, Any, Any], query_token: str | None) -> str | None:
    """The token from the query (EventSource), an `Authorization: Bearer` header, or a cookie."""
    if query_token:
        return query_token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value:
        return value.strip()
    return request.cookies.get(TOKEN_COOKIE)


@get(
    "/api/sse/stream/{session_id:str}",
    media_type="text/event-stream",
    summary="Stream a session's events (Server-Sent Events)",
    tags=["chat"],
)
async def sse_stream(
    session_id: str,
    request: Request[Any, Any, Any],
    runtime: Runtime,
    token: str | None = None,
    last_event_id: str | None = Parameter(query="last_event_id", default=None),
) -> ASGIResponse:
    """Replay the session's retained events after the cursor, then stream live ones.

    The cursor comes from the `Last-Event-ID` header (EventSource sends it on reconnect) or
    the `last_event_id` query parameter. Without one, the whole retained stream is replayed.
    While Redis is away the stream ends at once with a `reconnect` event (EventSource
    retries), never a 5xx (after which EventSource would give up).
    """
    session = check_id("sessionId", session_id)
    runtime.tokens.verify(session, stream_token(request, token))
    cursor = parse_cursor(request.headers.get("last-event-id") or last_event_id or "")
    if runtime.stopping:
        from litestar.exceptions import ServiceUnavailableException

        raise ServiceUnavailableException("this process is shutting down")
    try:
        if not await runtime.watch.available():
            raise RedisUnavailable("Redis is away")
        sub = await runtime.manager.connect(session, cursor)
    except (RedisUnavailable, RedisError, OSError):
        return closed_stream(CloseReason.REDIS_UNAVAILABLE, runtime.settings.sse_retry_ms)
    return SSEResponse(
        sub=sub,
        manager=runtime.manager,
        history=partial(replay, runtime.redis, runtime.keys, session, stats=runtime.history_stats),
        heartbeat_s=runtime.settings.sse_heartbeat_s,
        retry_ms=runtime.settings.sse_retry_ms,
    )
