"""SSE streams written straight to their sockets: once live, no task and no queue.

`bridge.api.stream_front` serves live streams under uvicorn without ASGI. Each one is a
`PushStream`: a short task writes the head and the catch-up (pacing itself by the
transport's flow control), then the stream goes live, and from then on the fan-out's callback
writes every event to the socket as it is delivered. No task waits per connection, no queue
is kept, no future is made per event, and one timer (`Pulse`) beats the heart of all of them.

Nothing is lost or repeated at the switch. The subscriber's sink is set from the start: what
is delivered during the catch-up is dropped (Redis has it) and makes the catch-up read again
from the cursor once it reaches the end, until a pass meets no delivery; then the stream goes
live, in the same step. Every entry passes `Subscriber.accept`. A catch-up slower than the
answer being written thus never fills a queue, and never closes a client that reads.

A client that stops reading: past the transport's high water mark, at most `max_behind`
more events are delivered (written, or dropped while catching up); then the stream closes
as a slow consumer with a `reconnect` event, and the socket closes once the client has read
what was written (as uvicorn closes an ASGI response's): whatever it got is a gap-free
prefix it resumes after.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from redis.exceptions import RedisError

from bridge import metrics
from bridge.errors import CloseReason

from .manager import ConnectionManager
from .sse import History, catch_up, control_frame, encode_batch
from .subscriber import Envelope, Subscriber

log = structlog.get_logger("bridge.sse")

_END = b"0\r\n\r\n"  # the last chunk of a chunked body


def chunk(data: bytes) -> bytes:
    """`data` as one chunk of a chunked HTTP/1.1 body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Pulse:
    """The heartbeat of every live `PushStream`: one timer for all of them.

    Each beat writes a comment to the streams that wrote nothing since the last one, and
    notes progress for those whose client reads (the health monitor closes the others).
    """

    def __init__(self, period_s: float) -> None:
        self._period_s = period_s
        self._streams: set[PushStream] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: PushStream) -> None:
        self._streams.add(stream)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._period_s, self._beat)

    def discard(self, stream: PushStream) -> None:
        self._streams.discard(stream)

    def __len__(self) -> int:
        return len(self._streams)

    def _beat(self) -> None:
        now = time.monotonic()
        for stream in list(self._streams):
            stream.beat(now)
        self._timer = (
            asyncio.get_running_loop().call_later(self._period_s, self._beat)
            if self._streams
            else None
        )


class PushStream:
    """One connection's SSE body, after its head: catch-up, then live events as they come."""

    __slots__ = (
        "_behind",
        "_live",
        "_manager",
        "_max_behind",
        "_missed",
        "_paused",
        "_pulse",
        "_resumed",
        "_task",
        "_transport",
        "_wrote",
        "sub",
    )

    def __init__(
        self,
        sub: Subscriber,
        transport: asyncio.Transport,
        *,
        manager: ConnectionManager,
        pulse: Pulse,
        max_behind: int,
    ) -> None:
        self.sub = sub
        self._transport = transport
        self._manager = manager
        self._pulse = pulse
        self._max_behind = max_behind
        self._paused = False
        self._resumed: asyncio.Future[None] | None = None
        self._behind = 0  # events delivered while the transport is over its high water mark
        self._live = False
        self._missed = False  # an event was delivered during this pass of the catch-up
        self._wrote = False  # since the last beat
        self._task: asyncio.Task[None] | None = None

    async def run(self, head: bytes, history: History, retry_ms: int) -> None:
        """Write `head` and the catch-up, then go live; returns once live (or closed)."""
        sub = self.sub
        self._task = asyncio.current_task()
        sub.on_close = self._on_close
        sub.sink = self._push
        sub.take()  # delivered since the registration: the catch-up reads them
        try:
            self._write(head + chunk(f": \nretry: {retry_ms}\n\n".encode()))
            if sub.closed is not None:
                self._on_close(sub.closed)
                return
            try:
                self._missed = True
                while self._missed:
                    self._missed = False
                    await catch_up(sub, history, self._write_paced)
            except (RedisError, OSError) as exc:
                log.warning("sse_catch_up_failed", connection_id=sub.id, error=str(exc))
                sub.close(CloseReason.REDIS_UNAVAILABLE)
                return
        finally:
            self._task = None
        if sub.closed is None:
            self._live = True
            self._pulse.add(self)

    def lost(self) -> None:
        """The connection is gone: unregister."""
        self.sub.close(CloseReason.CLIENT_GONE)
        self._pulse.discard(self)
        self._manager.disconnect(self.sub)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._behind = 0
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def beat(self, now: float) -> None:
        if self._paused:
            return  # no progress: a client that reads nothing for long is closed as stalled
        self.sub.last_progress = now
        if not self._wrote:
            self._write(chunk(b": ping\n\n"))
        self._wrote = False

    def _push(self, envelopes: list[Envelope]) -> None:
        if self._live:
            data, token_ts = encode_batch(self.sub, envelopes)
            if data:
                self._write(chunk(data))
                metrics.SSE.delivered(token_ts)
        else:
            self._missed = True
        if self._paused:
            self._behind += len(envelopes)
            if self._behind > self._max_behind:  # the manager counts and logs the close
                self.sub.close(CloseReason.SLOW_CONSUMER)

    async def _write_paced(self, data: bytes) -> None:
        self._write(chunk(data))
        while self._paused:
            self._resumed = asyncio.get_running_loop().create_future()
            try:
                await self._resumed
            finally:
                self._resumed = None

    def _write(self, data: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.write(data)
            self._wrote = True

    def _on_close(self, reason: CloseReason) -> None:
        task = self._task
        if task is not None and task is not asyncio.current_task():
            task.cancel()  # the catch-up: it has nothing more to write
        self._pulse.discard(self)
        transport = self._transport
        if reason is CloseReason.CLIENT_GONE:
            transport.abort()
            return
        log.info("sse_closed", connection_id=self.sub.id, reason=reason.value)
        self._write(chunk(control_frame("reconnect", {"reason": reason.value})) + _END)
        transport.close()  # once what is buffered is written
