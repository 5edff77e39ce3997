"""`GET /generate?context=...` (seed 004): one request of the micro-batched slow model, as SSE.

The request is a generation in the `batch` mode with a task id (uuid4 hex) and a session of
its own. The response is request-scoped: it starts with a `task` event (the task id and its
cancel URL), carries the `token` events, and ends after the terminal event. A client that
disconnects before the end cancels its task (the rest of its batch carries on). A reconnect
(a request with `Last-Event-ID`) gets 204, which tells EventSource to stop: a new task is
only ever started on purpose.
"""

from __future__ import annotations

import contextlib
import uuid
from functools import partial
from typing import Annotated, Any

from litestar import Request, get, post
from litestar.exceptions import ServiceUnavailableException
from litestar.params import QueryParameter
from litestar.response.base import ASGIResponse
from litestar.types import HTTPResponseStartEvent, Receive, Send
from redis.exceptions import RedisError

from bridge import metrics
from bridge.auth import principal
from bridge.connections.sse import (
    SSEResponse,
    SSEStream,
    control_frame,
    encode_batch,
    gap_frame,
)
from bridge.connections.subscriber import Closed, Subscriber
from bridge.errors import BadRequest, CloseReason
from bridge.providers.base import Message
from bridge.runtime import Runtime
from bridge.streams.cancel import request_cancel
from bridge.streams.codec import now_ms
from bridge.streams.history import Gap, replay
from bridge.streams.jobs import GenerationJob, enqueue
from bridge.streams.keys import check_id

BATCH_MODEL = "batch"


def session_of(task_id: str) -> str:
    """The synthetic session that carries a `/generate` task's token stream."""
    return f"gen-{task_id}"


class GenerateStream(SSEStream):
    """The SSE stream of one task: ends after its terminal event, cancels it if cut short."""

    __slots__ = ("_ended", "_runtime", "_task_id")

    def __init__(self, *, task_id: str, runtime: Runtime, sub: Subscriber) -> None:
        super().__init__(
            sub=sub,
            manager=runtime.manager,
            history=partial(replay, runtime.redis, runtime.keys, sub.session),
            heartbeat_s=runtime.settings.sse_heartbeat_s,
            retry_ms=runtime.settings.sse_retry_ms,
        )
        self._task_id = task_id
        self._runtime = runtime
        self._ended = False

    async def __call__(self, send: Send, receive: Receive, start: HTTPResponseStartEvent) -> None:
        try:
            await super().__call__(send, receive, start)
        finally:
            if not self._ended:
                with contextlib.suppress(RedisError, OSError):
                    await request_cancel(self._runtime.redis, self._runtime.keys, self._task_id)

    async def _write(self, send: Send) -> None:
        task: dict[str, object] = {
            "taskId": self._task_id,
            "cancelUrl": f"/generate/{self._task_id}/cancel",
        }
        head = f": \nretry: {self._retry_ms}\n\n".encode()
        await _body(send, head + control_frame("task", task))
        try:
            async for item in self.history(self.sub.cursor):
                if isinstance(item, Gap):
                    await _body(send, gap_frame(item))
                elif await self._send_batch(send, item):
                    return
            while True:
                batch = await self.sub.next_batch(self._heartbeat_s)
                if not batch:
                    await _body(send, b": ping\n\n")
                elif await self._send_batch(send, batch):
                    return
        except Closed as closed:
            if closed.reason is not CloseReason.CLIENT_GONE:
                await _body(send, control_frame("reconnect", {"reason": closed.reason.value}))
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_batch(self, send: Send, batch: list[Any]) -> bool:
        chunk, token_ts = encode_batch(self.sub, batch)
        if chunk:
            await _body(send, chunk)
            metrics.SSE.delivered(token_ts)
        if any(envelope.event.terminal for envelope in batch):
            self._ended = True
        return self._ended


def _address(connection: Request[Any, Any, Any]) -> str | None:
    return connection.client.host if connection.client else None


async def _body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


@get(
    "/generate",
    media_type="text/event-stream",
    summary="Generate from a context with the micro-batched slow model (SSE)",
    tags=["generate"],
)
async def generate(
    request: Request[Any, Any, Any],
    runtime: Runtime,
    context: Annotated[str, QueryParameter(name="context", min_length=1)],
) -> ASGIResponse:
    """Queue a task and stream its answer; see the module docstring for the lifecycle."""
    if request.headers.get("last-event-id") is not None:
        return ASGIResponse(status_code=204, body=b"")
    if runtime.stopping:
        raise ServiceUnavailableException("this process is shutting down")
    limit = runtime.settings.max_prompt_chars
    if len(context) > limit:
        raise BadRequest(
            f"the context holds {len(context)} characters; at most {limit} allowed", status_code=413
        )
    task_id = uuid.uuid4().hex
    session = session_of(task_id)
    tenant = principal(request)
    await runtime.limits.admit_generation(tenant, session, task_id)
    # listen first, then enqueue: not one event can pass before the subscription
    sub = await runtime.manager.connect(session, {}, address=_address(request))
    try:
        job = GenerationJob(
            request_id=task_id,
            session_id=session,
            model_id=BATCH_MODEL,
            messages=(Message("user", context),),
            created_ms=now_ms(),
            mode="batch",
            tenant=tenant,
        )
        await enqueue(runtime.redis, runtime.keys, runtime.settings, job)
    except BaseException:
        runtime.manager.disconnect(sub)
        raise
    return SSEResponse(GenerateStream(task_id=task_id, runtime=runtime, sub=sub))


@post("/generate/{task_id:str}/cancel", status_code=202, tags=["generate"], summary="Cancel a task")
async def cancel_generate(task_id: str, runtime: Runtime) -> dict[str, str]:
    """Stop one task; the other requests of its batch are not disturbed."""
    task_id = check_id("task_id", task_id)
    outcome = await request_cancel(runtime.redis, runtime.keys, task_id)
    if outcome == "unknown":
        raise BadRequest(f"task {task_id} not found", status_code=404)
    if outcome != "cancelling":
        raise BadRequest(f"the task already ended ({outcome})", status_code=409)
    return {"taskId": task_id, "status": outcome}
