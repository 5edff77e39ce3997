"""`/ws/`: seed 001's WebSocket protocol on the core streams.

An `add` becomes a generation whose request id is the job id (a uuid4, the capability to
listen) in a session of its own (`ws-<job_id>`), so a job is read exactly like a chat:
catch-up from Redis, then live events from the hub. Every update carries a `cursor`; a
client that reconnects sends `listen` with the last one and continues after it.

Errors never drop the connection: they are answered with `failed` (about an `add` or a job)
or `error` (about a message that could not be read at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, cast

import msgspec
import structlog
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from redis.exceptions import RedisError

from bridge import metrics
from bridge.auth import principal
from bridge.client_limits import MessageLimiter
from bridge.connections.subscriber import Closed, Envelope, Subscriber
from bridge.errors import BadRequest, CloseReason, RateLimited
from bridge.runtime import Runtime
from bridge.streams.cancel import request_cancel
from bridge.streams.codec import EventType, format_cursor, now_ms, parse_cursor
from bridge.streams.history import Gap
from bridge.streams.jobs import enqueue
from bridge.ws_protocol import (
    AddRequest,
    CancelRequest,
    InvalidMessage,
    ListenRequest,
    build_job,
    parse_message,
)

log = structlog.get_logger("bridge.ws")

_encode = msgspec.json.Encoder().encode


def session_of(job_id: str) -> str:
    """The synthetic session that carries a WebSocket job's token stream."""
    return f"ws-{job_id}"


def update(job_id: str, envelope: Envelope, cursor: str) -> dict[str, Any]:
    """The protocol message for one stream event."""
    event = envelope.event
    data = event.data or {}
    base = {"job_id": job_id, "cursor": cursor}
    if event.type is EventType.TOKEN:
        return {"type": "running", **base, "message": event.content}
    if event.type is EventType.COMPLETE:
        return {"type": "done", **base, "usage": data.get("usage")}
    if event.type is EventType.ERROR:
        return {
            "type": "failed",
            **base,
            "message": data.get("message", ""),
            "code": data.get("code"),
        }
    if event.type is EventType.CANCELLED:
        return {"type": "failed", **base, "message": "cancelled", "code": "cancelled"}
    return {"type": "restart", **base, **data}  # a seam: the text so far is discarded


class WSConnection:
    """One WebSocket client: its requests, and one forwarding task per job it listens to."""

    def __init__(self, socket: WebSocket[Any, Any, Any], runtime: Runtime) -> None:
        self._socket = socket
        self._runtime = runtime
        self._listens: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self._open = True
        self._limiter = MessageLimiter.from_settings(runtime.settings)
        self._tenant = principal(socket)

    async def serve(self) -> None:
        """Answer messages until the client leaves."""
        await self._socket.accept()
        try:
            while self._open:
                event = await self._socket.receive()
                if event["type"] == "websocket.disconnect":
                    break
                payload = cast("str | bytes", event.get("text") or event.get("bytes") or b"")
                await self._handle(payload)
        except WebSocketDisconnect:
            pass
        finally:
            self._open = False
            for task in self._listens.values():
                task.cancel()
            await asyncio.gather(*self._listens.values(), return_exceptions=True)

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message; a client that is gone ends the connection quietly."""
        if not self._open:
            return
        try:
            async with self._send_lock:
                await self._socket.send_text(_encode(message).decode())
        except (WebSocketDisconnect, OSError, RuntimeError):
            self._open = False

    async def _handle(self, payload: str | bytes) -> None:
        try:
            self._limiter.check(len(payload))
        except (BadRequest, RateLimited) as exc:
            await self.send({"type": "error", "message": exc.detail, **_retry_after(exc)})
            return
        try:
            message = parse_message(payload)
        except InvalidMessage as exc:
            # about a request or job the client named: `failed`; about nothing known: `error`
            kind = "failed" if exc.about else "error"
            await self.send({"type": kind, **exc.about, "message": exc.detail})
            return
        try:
            if isinstance(message, AddRequest):
                await self._add(message)
            elif isinstance(message, ListenRequest):
                await self._listen(message.job_id, message.cursor)
            else:
                await self._cancel(message)
        except (BadRequest, RateLimited, RedisError, OSError) as exc:
            if isinstance(exc, BadRequest | RateLimited):
                detail = exc.detail
            else:
                detail = "Redis is unavailable; retry"
            reply: dict[str, Any] = {"type": "failed", "message": detail, **_retry_after(exc)}
            if isinstance(message, AddRequest):
                reply["id"] = message.id
            else:
                reply["job_id"] = message.job_id
            await self.send(reply)

    async def _add(self, add: AddRequest) -> None:
        runtime = self._runtime
        if runtime.stopping:
            raise BadRequest("this server is shutting down; retry on another", status_code=503)
        job_id = str(uuid.uuid4())
        session = session_of(job_id)
        job = build_job(add, job_id, session, runtime.providers, runtime.settings, now_ms())
        job = msgspec.structs.replace(job, tenant=self._tenant)
        await runtime.limits.admit_generation(self._tenant, session, job_id)
        await enqueue(runtime.redis, runtime.keys, runtime.settings, job)
        await self.send({"type": "resp_add", "id": add.id, "job_id": job_id})
        await self._listen(job_id, None)

    async def _listen(self, job_id: str, cursor_text: str | None) -> None:
        runtime = self._runtime
        cursor = parse_cursor(cursor_text or "")
        if not await runtime.redis.exists(runtime.keys.generation(job_id)):
            raise BadRequest("unknown job (or it expired)")
        previous = self._listens.pop(job_id, None)
        if previous is not None:
            previous.cancel()
        client = self._socket.client
        sub = await runtime.manager.connect(
            session_of(job_id), cursor, transport="ws", address=client.host if client else None
        )
        task = asyncio.create_task(self._forward(job_id, sub), name=f"ws-listen-{job_id}")
        self._listens[job_id] = task
        task.add_done_callback(lambda done: self._forgotten(job_id, done))

    def _forgotten(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._listens.get(job_id) is task:
            del self._listens[job_id]

    async def _cancel(self, request: CancelRequest) -> None:
        outcome = await request_cancel(self._runtime.redis, self._runtime.keys, request.job_id)
        if outcome == "unknown":
            raise BadRequest("unknown job (or it expired)")
        if outcome != "cancelling":
            raise BadRequest(f"the job already ended ({outcome})")

    async def _forward(self, job_id: str, sub: Subscriber) -> None:
        """Catch up, then relay live events, until the job's terminal event."""
        runtime = self._runtime
        try:
            async for item in runtime.catch_up(sub.session, sub.cursor):
                if isinstance(item, Gap):
                    if item.reason == "reset":
                        sub.cursor.pop(item.model, None)
                    await self.send({"type": "gap", "job_id": job_id, "reason": item.reason})
                elif await self._relay(job_id, sub, item, live=False):
                    return
            while self._open:
                batch = await sub.next_batch(runtime.settings.sse_heartbeat_s)
                if batch and await self._relay(job_id, sub, batch, live=True):
                    return
        except Closed as closed:
            if closed.reason is not CloseReason.CLIENT_GONE:
                await self.send(
                    {
                        "type": "interrupted",
                        "job_id": job_id,
                        "reason": closed.reason.value,
                        "cursor": format_cursor(sub.cursor),
                    }
                )
        finally:
            runtime.manager.disconnect(sub)

    async def _relay(
        self, job_id: str, sub: Subscriber, batch: list[Envelope], *, live: bool
    ) -> bool:
        """Send the new events of `batch`; True once the terminal event was sent."""
        for envelope in batch:
            if sub.accept(envelope.model, envelope.entry_id):
                await self.send(update(job_id, envelope, sub.cursor_text))
                if envelope.event.type is EventType.TOKEN:
                    metrics.WEBSOCKET.delivered((envelope.event.ts,), live=live)
                if envelope.event.terminal:
                    return True
        return False


def _retry_after(exc: Exception) -> dict[str, int]:
    return {"retryAfter": exc.retry_after_s} if isinstance(exc, RateLimited) else {}


@websocket("/ws/", name="ws")
async def ws_endpoint(socket: WebSocket[Any, Any, Any], runtime: Runtime) -> None:
    """Seed 001's protocol: `add`, `listen` (and `cancel`); see docs/seeds.md."""
    connection = WSConnection(socket, runtime)
    with contextlib.suppress(WebSocketDisconnect):
        await connection.serve()
