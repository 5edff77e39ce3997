"""`POST /api/chat/start`: validate, enqueue a generation, answer where to read it."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import quote

import structlog
from litestar import Controller, Request, post
from litestar.exceptions import ServiceUnavailableException
from msgspec import to_builtins

from bridge.api.schemas import ChatStarted, StartChat
from bridge.auth import principal
from bridge.errors import BadRequest, RedisUnavailable
from bridge.providers.base import Message
from bridge.runtime import Runtime
from bridge.settings import Settings
from bridge.streams.codec import now_ms
from bridge.streams.jobs import GenerationJob, enqueue
from bridge.streams.keys import check_id

log = structlog.get_logger("bridge.api")


class ChatController(Controller):
    """Starting generations."""

    path = "/api/chat"
    tags = ["chat"]

    @post("/start", status_code=202, summary="Start a generation in a session")
    async def start(
        self, data: StartChat, runtime: Runtime, request: Request[Any, Any, Any]
    ) -> ChatStarted:
        """Queue a generation; read it at `streamUrl` (hand it to EventSource as it is)."""
        if runtime.stopping:
            raise ServiceUnavailableException("this process is shutting down")
        if not await runtime.watch.available():
            raise RedisUnavailable("Redis is away")
        session = check_id("sessionId", data.session_id)
        model = check_id("modelId", data.model_id)
        runtime.providers.resolve(model)  # unknown model: 400 naming the known ones
        messages = build_messages(data, runtime.settings)
        tenant = principal(request)
        request_id = uuid.uuid4().hex
        await runtime.limits.admit_generation(tenant, session, request_id)
        job = GenerationJob(
            request_id=request_id,
            session_id=session,
            model_id=model,
            messages=messages,
            params=data.params.for_provider() if data.params else {},
            created_ms=now_ms(),
            tenant=tenant,
        )
        structlog.contextvars.bind_contextvars(session_id=session, request_id=job.request_id)
        try:
            # Bounded: a paused Redis must not hold the client for every retry's timeout.
            async with asyncio.timeout(runtime.settings.redis_timeout_s):
                await enqueue(runtime.redis, runtime.keys, runtime.settings, job)
        except TimeoutError:
            raise RedisUnavailable("Redis did not answer in time") from None
        # what users wrote is logged only when the operator opted in
        text = {"messages": to_builtins(job.messages)} if runtime.settings.log_prompts else {}
        log.info(
            "generation_queued",
            model=model,
            message_count=len(job.messages),
            prompt_chars=sum(len(m.content) for m in job.messages),
            **text,
        )
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


def build_messages(data: StartChat, settings: Settings) -> tuple[Message, ...]:
    """The conversation to send: `messages`, then `prompt` as the last user message."""
    messages = [Message(m.role, m.content) for m in data.messages or ()]
    if data.prompt is not None:
        messages.append(Message("user", data.prompt))
    return check_messages(messages, settings)


def check_messages(messages: list[Message], settings: Settings) -> tuple[Message, ...]:
    """Enforce the limits on a conversation: not empty, not too many messages or characters."""
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
