"""The SSE adaptor: catch-up from Redis, then live events from the hub, on one HTTP response.

Order of operations (why nothing is lost or repeated): the connection registers with the hub
first, so live events queue up while it replays retained history from Redis; then it drains
the queue. Every entry passes `Subscriber.accept`, which drops what the cursor already covers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import msgspec
import structlog
from litestar.response.base import ASGIResponse
from litestar.types import HTTPResponseStartEvent, Receive, Scope, Send
from redis.exceptions import RedisError

from bridge import metrics
from bridge.errors import CloseReason
from bridge.streams.codec import Cursor, EventType, format_entry_id, sse_frame
from bridge.streams.history import Gap

from .manager import ConnectionManager
from .subscriber import Closed, Envelope, Subscriber

log = structlog.get_logger("bridge.sse")

History = Callable[[Cursor], AsyncIterator[list[Envelope] | Gap]]
Write = Callable[[bytes], Awaitable[None]]

SSE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx and friends: do not buffer the stream
}
_SLOW_CLIENT_GRACE_S = 5.0
_encode = msgspec.json.Encoder().encode


def control_frame(event: str, payload: dict[str, object]) -> bytes:
    """A server-generated event (not from a stream), without an id: it moves no cursor."""
    return sse_frame(event, _encode(payload))


def gap_frame(gap: Gap) -> bytes:
    return control_frame(
        "gap",
        {
            "modelId": gap.model,
            "reason": gap.reason,
            "after": format_entry_id(gap.after) if gap.after else None,
        },
    )


def closed_stream(reason: CloseReason, retry_ms: int) -> ASGIResponse:
    """A stream that ends at once with `reconnect`: EventSource retries after `retry_ms`.

    Used when Redis is away: a 5xx would make EventSource give up for good.
    """
    body = f": \nretry: {retry_ms}\n\n".encode() + control_frame(
        "reconnect", {"reason": reason.value}
    )
    return ASGIResponse(
        body=body, headers=SSE_HEADERS, media_type="text/event-stream", status_code=200
    )


def encode_batch(sub: Subscriber, batch: list[Envelope]) -> tuple[bytes, list[float]]:
    """SSE frames of the envelopes not sent yet, and the producer timestamps of their tokens."""
    out = []
    token_ts = []
    for env in batch:
        if sub.accept(env.model, env.entry_id):
            if len(sub.cursor) == 1:  # the cursor is this entry's id: the shared bytes
                out.append(env.frame)
            else:
                out.append(sse_frame(env.event.type.value, env.sse_data, sub.cursor_text))
            if env.event.type is EventType.TOKEN:
                token_ts.append(env.event.ts)
    return b"".join(out), token_ts


async def catch_up(sub: Subscriber, history: History, write: Write) -> None:
    """Replay what Redis retains after the subscriber's cursor, through `write`."""
    async for item in history(sub.cursor):
        if isinstance(item, Gap):
            if item.reason == "reset":
                sub.cursor.pop(item.model, None)
            await write(gap_frame(item))
        else:
            chunk, token_ts = encode_batch(sub, item)
            if chunk:
                await write(chunk)
                metrics.SSE.delivered(token_ts, live=False)


class SSEStream:
    """The body of one connection's `text/event-stream`; unregisters it however it ends.

    Served by `SSEResponse` on the Litestar route, or sent straight to the server by
    `bridge.api.stream_direct` (the common case: no framework objects per connection).
    """

    __slots__ = ("_deadline", "_heartbeat_s", "_manager", "_retry_ms", "history", "sub")

    def __init__(
        self,
        *,
        sub: Subscriber,
        manager: ConnectionManager,
        history: History,
        heartbeat_s: float,
        retry_ms: int,
    ) -> None:
        self.sub = sub
        self._manager = manager
        self.history = history
        self._heartbeat_s = heartbeat_s
        self._retry_ms = retry_ms
        self._deadline: asyncio.Timeout | None = None

    async def __call__(self, send: Send, receive: Receive, start: HTTPResponseStartEvent) -> None:
        """Send the response: `start`, then the events until the stream ends."""
        # One task per connection besides the response's own: it waits for the client to go.
        # The response writes; a deadline (armed when the subscriber closes) bounds a writer
        # stuck in send() by a client that stopped reading.
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(self._on_disconnect)
        try:
            async with asyncio.timeout(None) as self._deadline:
                self.sub.on_close = self._on_close
                if self.sub.closed is not None:
                    self._on_close(self.sub.closed)
                await send(start)
                await self._write(send)
        except TimeoutError:
            pass  # the client is gone, or stuck: it resumes from its cursor when it returns
        finally:
            self.sub.on_close = None
            self._deadline = None
            watcher.remove_done_callback(self._on_disconnect)
            watcher.cancel()
            self._manager.disconnect(self.sub)

    def _on_disconnect(self, watcher: asyncio.Future[None]) -> None:
        if not watcher.cancelled():
            self.sub.close(CloseReason.CLIENT_GONE)

    def _on_close(self, reason: CloseReason) -> None:
        # A client that went away needs nothing more; one that stopped reading may leave the
        # writer blocked in send(): give it a grace period to take the `reconnect` event.
        if self._deadline is not None:
            grace = 0.0 if reason is CloseReason.CLIENT_GONE else _SLOW_CLIENT_GRACE_S
            self._deadline.reschedule(asyncio.get_running_loop().time() + grace)

    async def _write(self, send: Send) -> None:
        # Flush the headers with a first comment so proxies and browsers see the stream open.
        await _body(send, f": \nretry: {self._retry_ms}\n\n".encode())
        try:
            try:
                await catch_up(self.sub, self.history, partial(_body, send))
            except (RedisError, OSError) as exc:
                log.warning("sse_catch_up_failed", connection_id=self.sub.id, error=str(exc))
                self.sub.close(CloseReason.REDIS_UNAVAILABLE)
            while True:
                batch = await self.sub.next_batch(self._heartbeat_s)
                chunk, token_ts = encode_batch(self.sub, batch) if batch else (b": ping\n\n", [])
                if chunk:
                    await _body(send, chunk)
                    metrics.SSE.delivered(token_ts)
        except Closed as closed:
            if closed.reason is not CloseReason.CLIENT_GONE:
                log.info("sse_closed", connection_id=self.sub.id, reason=closed.reason.value)
                await _body(send, control_frame("reconnect", {"reason": closed.reason.value}))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class SSEResponse(ASGIResponse):
    """An `SSEStream` as a Litestar response."""

    _should_set_content_length = False

    def __init__(self, stream: SSEStream) -> None:
        super().__init__(
            headers=SSE_HEADERS, media_type="text/event-stream", status_code=200, body=b""
        )
        self._stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The stream sends the start too: registered, it must see every way the response ends.
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": self.status_code,
            "headers": self.encode_headers(),
        }
        await self._stream(send, receive, start)


async def _body(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
