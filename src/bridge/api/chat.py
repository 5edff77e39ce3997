"""`POST /api/chat/start`: validate, enqueue a generation, answer where to read it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import quote

import msgspec
from litestar import Controller, Request, Response, post
from litestar.exceptions import ServiceUnavailableException

from bridge.api.problems import problem
from bridge.api.schemas import CancelChat, CancelStarted, ChatStarted, StartChat
from bridge.api.stream import stream_token
from bridge.errors import BadRequest, RedisUnavailable
from bridge.providers.base import Message
from bridge.runtime import Runtime
from bridge.settings import Settings
from bridge.streams.codec import now_ms
from bridge.streams.jobs import GenerationJob, enqueue
from bridge.streams.keys import check_id


class ChatController(Controller):
    """Starting generations."""

    path = "/api/chat"
    tags = ["chat"]

    @post("/start", status_code=202, summary="Start a generation in a session")
    async def start(self, data: StartChat, runtime: Runtime) -> ChatStarted:
        """Queue a generation; read it at `streamUrl` (hand it to EventSource as it is)."""
        if runtime.stopping:
            raise ServiceUnavailableException("this process is shutting down")
        if not await runtime.watch.available():
            raise RedisUnavailable("Redis is away")
        session = check_id("sessionId", data.session_id)
        model = check_id("modelId", data.model_id)
        runtime.providers.resolve(model)  # unknown model: 400 naming the known ones
        job = GenerationJob(
            request_id=uuid.uuid4().hex,
            session_id=session,
            model_id=model,
            messages=build_messages(data, runtime.settings),
            params=data.params.for_provider() if data.params else {},
            created_ms=now_ms(),
        )
        try:
            # Bounded: a paused Redis must not hold the client for every retry's timeout.
            async with asyncio.timeout(runtime.settings.redis_timeout_s):
                await enqueue(runtime.redis, runtime.keys, runtime.settings, job)
        except TimeoutError:
            raise RedisUnavailable("Redis did not answer in time") from None
        token = runtime.tokens.issue(session)
        return ChatStarted(
            connection_id=f"sse_{int(time.time() * 1000)}_{uuid.uuid4().hex[:6]}",
            session_id=session,
            model_id=model,
            request_id=job.request_id,
            status="queued",
            stream_url=f"/api/sse/stream/{session}?token={quote(token)}",
            stream_key=runtime.keys.stream(session, model),
            stream_token=token,
        )

    @post(
        "/{session_id:str}/cancel",
        status_code=202,
        summary="Cancel the session's running generations (or one model's, or one request)",
    )
    async def cancel(
        self,
        session_id: str,
        request: Request[Any, Any, Any],
        runtime: Runtime,
        data: CancelChat | None = None,
        token: str | None = None,
    ) -> Response[Any]:
        """Abort matching generations: each stream then ends with a `cancelled` event.

        Needs the session's stream token, like reading it. 404: no generation matches;
        409: every matching generation had already ended.
        """
        session = check_id("sessionId", session_id)
        runtime.tokens.verify(session, stream_token(request, token))
        data = data or CancelChat()
        model = check_id("modelId", data.model_id) if data.model_id is not None else None
        request_id = check_id("requestId", data.request_id) if data.request_id is not None else None
        if not await runtime.watch.available():
            raise RedisUnavailable("Redis is away")
        outcome = await runtime.canceller.cancel(session, model=model, request_id=request_id)
        if outcome.cancelling:
            body = CancelStarted(session, outcome.cancelling, outcome.ended)
            return Response(msgspec.to_builtins(body), status_code=202)
        if outcome.ended:
            ended = msgspec.to_builtins(outcome.ended)
            statuses = ", ".join(sorted({target.status for target in outcome.ended}))
            detail = f"nothing to cancel: the matching generations already ended ({statuses})"
            return problem(409, "Conflict", detail, alreadyEnded=ended)
        return problem(404, "Not Found", "no generation of this session matches")


def build_messages(data: StartChat, settings: Settings) -> tuple[Message, ...]:
    """The conversation to send: `messages`, then `prompt` as the last user message."""
    messages = [Message(m.role, m.content) for m in data.messages or ()]
    if data.prompt is not None:
        messages.append(Message("user", data.prompt))
    if not messages or not any(m.content.strip() for m in messages):
        raise BadRequest("prompt or messages is required and must not be empty")
    if len(messages) > settings.max_messages:
        raise BadRequest(f"at most {settings.max_messages} messages are allowed", status_code=413)
    size = sum(len(m.content) for m in messages)
    if size > settings.max_prompt_chars:
        raise BadRequest(
            f"the prompt holds {size} characters; at most {settings.max_prompt_chars} are allowed",
            status_code=413,
        )
    return tuple(messages)
