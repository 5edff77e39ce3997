"""`POST /api/chat/{sessionId}/cancel`: stop a session's queued and running generations.

Cancelling a session needs what reading it needs, the stream token, and (once API keys are
configured) an API key like every producer action; it counts against the request rate
limits. The optional body narrows the cancel to one model or one request; without it, every
unfinished generation of the session is cancelled. Each ends with a `cancelled` event that
records its partial usage (see `streams.cancel`).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from bridge.api.problems import problem
from bridge.api.schemas import CancelChat, CancelStarted
from bridge.api.stream import stream_token
from bridge.auth import principal
from bridge.errors import RedisUnavailable
from bridge.runtime import Runtime
from bridge.streams.cancel import cancel_session
from bridge.streams.keys import check_id


@post(
    "/api/chat/{session_id:str}/cancel",
    status_code=202,
    tags=["chat"],
    summary="Cancel the session's generations (or one model's, or one request)",
)
async def cancel_chat(
    session_id: str,
    request: Request[Any, Any, Any],
    runtime: Runtime,
    data: CancelChat | None = None,
    token: str | None = None,
) -> Response[Any]:
    """Abort matching generations: each stream then ends with a `cancelled` event.

    202 `{sessionId, cancelling, alreadyEnded}`; 409 when every matching generation had
    already ended (`alreadyEnded` names them); 404 when no generation of the session matches.
    """
    session = check_id("sessionId", session_id)
    runtime.tokens.verify(session, stream_token(request, token))
    wanted = data or CancelChat()
    await runtime.limits.admit_request(principal(request), session)
    if not await runtime.watch.available():
        raise RedisUnavailable("Redis is away")
    outcome = await cancel_session(
        runtime.redis, runtime.keys, session, model=wanted.model_id, request_id=wanted.request_id
    )
    if outcome.cancelling:
        body = CancelStarted(session, outcome.cancelling, outcome.ended)
        return Response(msgspec.to_builtins(body), status_code=202)
    if outcome.ended:
        ended = msgspec.to_builtins(outcome.ended)
        statuses = ", ".join(sorted({target.status for target in outcome.ended}))
        detail = f"nothing to cancel: the matching generations already ended ({statuses})"
        return problem(409, "Conflict", detail, alreadyEnded=ended)
    return problem(404, "Not Found", "no generation of this session matches")
