"""`POST /api/chat/{sessionId}/cancel`: stop a session's running generations.

Reading and cancelling a session need the same stream token. The optional body narrows the
cancel to one model or one request; without it, every running generation of the session
is cancelled. Each ends with a `cancelled` event that records its partial usage.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, post

from bridge.api.schemas import Id
from bridge.api.stream import stream_token
from bridge.errors import BadRequest
from bridge.runtime import Runtime
from bridge.streams.cancel import request_cancel
from bridge.streams.keys import check_id


class CancelChat(msgspec.Struct, frozen=True, rename="camel", forbid_unknown_fields=True):
    """Which generations to cancel (all running ones of the session by default)."""

    model_id: Id | None = None
    request_id: Id | None = None


class ChatCancelled(msgspec.Struct, frozen=True, rename="camel"):
    session_id: str
    cancelled: list[str]


@post("/api/chat/{session_id:str}/cancel", status_code=202, tags=["chat"], summary="Cancel")
async def cancel_chat(
    session_id: str,
    request: Request[Any, Any, Any],
    runtime: Runtime,
    data: CancelChat | None = None,
    token: str | None = None,
) -> ChatCancelled:
    """Cancel the session's running generations; 409 when none is running."""
    session = check_id("sessionId", session_id)
    runtime.tokens.verify(session, stream_token(request, token))
    wanted = data or CancelChat()
    entries: Any = await runtime.redis.xrange(runtime.keys.session_index(session))
    cancelled = []
    for _, fields in entries:
        model, request_id = fields[b"m"].decode(), fields[b"r"].decode()
        if wanted.model_id not in (None, model) or wanted.request_id not in (None, request_id):
            continue
        if await request_cancel(runtime.redis, runtime.keys, request_id) == "cancelling":
            cancelled.append(request_id)
    if not cancelled:
        raise BadRequest("no running generation matches; nothing was cancelled", status_code=409)
    return ChatCancelled(session_id=session, cancelled=cancelled)
