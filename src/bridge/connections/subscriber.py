"""One client connection's view of its session: a bounded queue and a resume cursor.

Overflow policy: close with `CloseReason.SLOW_CONSUMER`. The client resumes from Redis with
its last cursor, so nothing is lost and the server's memory per connection stays bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

from bridge.errors import CloseReason
from bridge.streams.codec import Cursor, EntryId, StreamEvent, format_cursor, sse_data, sse_frame

_ids = itertools.count(1)


class Envelope:
    """An event delivered to many connections; its wire encodings are computed once."""

    __slots__ = ("_frame", "_sse_data", "entry_id", "event", "model")

    def __init__(self, model: str, entry_id: EntryId, event: StreamEvent) -> None:
        self.model = model
        self.entry_id = entry_id
        self.event = event
        self._sse_data: bytes | None = None
        self._frame: bytes | None = None

    @property
    def sse_data(self) -> bytes:
        if self._sse_data is None:
            self._sse_data = sse_data(self.event, self.model)
        return self._sse_data

    @property
    def frame(self) -> bytes:
        """The whole SSE event for a connection whose cursor holds this model only.

        That is every connection of a one-model session, so the bytes are shared by all
        of them (encode once, write to many); other cursors need their own `id:` line.
        """
        if self._frame is None:
            cursor = format_cursor({self.model: self.entry_id})
            self._frame = sse_frame(self.event.type.value, self.sse_data, cursor)
        return self._frame


class Closed(Exception):
    """The subscriber was closed; `reason` says why."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


class Subscriber:
    """A connection's queue of envelopes, and the cursor of what it has already sent.

    Lean on purpose (thousands are held open per process): slots, a plain list as the queue
    (swapped out whole by `next_batch`), and a future only while the writer waits.
    """

    __slots__ = (
        "_heartbeat",
        "_heartbeat_due",
        "_queue",
        "_queue_size",
        "_waiter",
        "closed",
        "cursor",
        "id",
        "last_progress",
        "on_close",
        "session",
        "sink",
        "transport",
    )

    def __init__(
        self, session: str, cursor: Cursor, *, queue_size: int, transport: str = "sse"
    ) -> None:
        self.session = session
        self.transport = transport
        self.id = f"{transport}_{int(time.time() * 1000)}_{next(_ids)}"
        self.cursor: Cursor = dict(cursor)
        self.closed: CloseReason | None = None
        self._queue: list[Envelope] = []
        self._queue_size = queue_size
        self._waiter: asyncio.Future[None] | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._heartbeat_due = False
        # when the writer last asked for more: a writer stuck in send() stops asking
        self.last_progress = time.monotonic()
        self.on_close: Callable[[CloseReason], None] | None = None
        # set once a connection writes live events as they come (`connections.push`)
        self.sink: Callable[[list[Envelope]], None] | None = None

    def offer(self, envelopes: list[Envelope]) -> bool:
        """Queue live envelopes (or hand them to the sink); on overflow close. False if closed."""
        if self.closed is not None:
            return False
        if self.sink is not None:
            self.sink(envelopes)
            return self.closed is None
        if len(self._queue) + len(envelopes) > self._queue_size:
            self.close(CloseReason.SLOW_CONSUMER)
            return False
        self._queue.extend(envelopes)
        self._wake()
        return True

    def close(self, reason: CloseReason) -> None:
        """Stop delivering; the writer sees `Closed(reason)` at its next wait."""
        if self.closed is None:
            self.closed = reason
            self._queue = []
            self._wake()
            if self._heartbeat is not None:
                self._heartbeat.cancel()
            if self.on_close is not None:
                self.on_close(reason)

    async def next_batch(self, wait_s: float) -> list[Envelope]:
        """Everything queued; an empty list when `wait_s` seconds passed without a batch.

        The heartbeat timer is armed once per period, not per wait: a timeout per wait was
        a sixth of the SSE path's CPU under load (py-spy, S2).
        """
        self.last_progress = time.monotonic()
        if not self._queue and self.closed is None and not self._heartbeat_due:
            loop = asyncio.get_running_loop()
            if self._heartbeat is None:
                self._heartbeat = loop.call_later(wait_s, self._beat)
            self._waiter = waiter = loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self.closed is not None:
            raise Closed(self.closed)
        if self._heartbeat_due:
            self._heartbeat_due = False
            if not self._queue:
                return []
        batch = self._queue
        self._queue = []
        return batch

    def take(self) -> list[Envelope]:
        """Everything queued, without waiting."""
        batch = self._queue
        self._queue = []
        return batch

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _beat(self) -> None:
        self._heartbeat = None
        self._heartbeat_due = True
        self._wake()

    def accept(self, model: str, entry_id: EntryId) -> bool:
        """True if the entry is new to this connection (and record it as sent)."""
        last = self.cursor.get(model)
        if last is not None and entry_id <= last:
            return False
        self.cursor[model] = entry_id
        return True

    @property
    def cursor_text(self) -> str:
        return format_cursor(self.cursor)

    @property
    def queued(self) -> int:
        return len(self._queue)
