"""`GET /api/sse/stream/{sessionId}`: every event of every generation of a session, resumable."""

from __future__ import annotations

from functools import partial
from typing import Any

from litestar import Request, get
from litestar.params import Parameter

from bridge.auth import bearer
from bridge.connections.sse import SSEResponse
from bridge.runtime import Runtime
from bridge.streams.codec import parse_cursor
from bridge.streams.history import replay
from bridge.streams.keys import check_id

TOKEN_COOKIE = "bridge_stream_token"


def stream_token(request: Request[Any, Any, Any], query_token: str | None) -> str | None:
    """The token from the query (EventSource), an `Authorization: Bearer` header, or a cookie."""
    return query_token or bearer(request) or request.cookies.get(TOKEN_COOKIE)


@get(
    "/api/sse/stream/{session_id:str}",
    media_type="text/event-stream",
    summary="Stream a session's events (Server-Sent Events)",
    tags=["chat"],
    opt={"auth": "stream_token"},
)
async def sse_stream(
    session_id: str,
    request: Request[Any, Any, Any],
    runtime: Runtime,
    token: str | None = None,
    last_event_id: str | None = Parameter(query="last_event_id", default=None),
    last_event_id_header: str | None = Parameter(header="Last-Event-ID", default=None),
) -> SSEResponse:
    """Replay the session's retained events after the cursor, then stream live ones.

    The cursor comes from the `Last-Event-ID` header (EventSource sends it on reconnect) or
    the `last_event_id` query parameter. Without one, the whole retained stream is replayed.
    """
    session = check_id("sessionId", session_id)
    runtime.tokens.verify(session, stream_token(request, token))
    cursor = parse_cursor(last_event_id_header or last_event_id or "")
    if runtime.stopping:
        from litestar.exceptions import ServiceUnavailableException

        raise ServiceUnavailableException("this process is shutting down")
    client = request.client
    sub = await runtime.manager.connect(session, cursor, address=client.host if client else None)
    return SSEResponse(
        sub=sub,
        manager=runtime.manager,
        history=partial(replay, runtime.redis, runtime.keys, session),
        heartbeat_s=runtime.settings.sse_heartbeat_s,
        retry_ms=runtime.settings.sse_retry_ms,
    )
