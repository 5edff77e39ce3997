"""The entries each tailed stream delivered in the last seconds, kept for reconnects.

A client that dropped a moment ago (a network blip, a slow consumer closed, a tab woken up)
comes back with a cursor a few entries behind. The fan-out reader delivered those entries to
this process already; serving its catch-up from here spares a Redis round trip and the
decoding of its reply, the bulk of a reconnect's cost after the socket's own.

Exactly once, as with Redis. The reader hands over each stream's entries in order, each batch
with the position it continues (`after`, the reader's position before it). A stream's memory
holds what came since `since`, nothing skipped: a batch that does not continue it starts it
anew. A catch-up is answered from memory only when every stream the session has is held from
at or before the client's cursor and the cursor is not past what was delivered; anything else
(an older cursor, a stream not delivered since it was tailed, a cursor from a process ahead
of this one) reads Redis as before. A session's memory goes when its tailing stops: tailed
again, the reader starts from the streams' ends, which need not continue it. All of it goes
when the reader's connection to Redis is lost: Redis may have restarted without the entries,
and the catch-up must then report the `gap` a read of Redis would. For the same reason a
run begun after such a loss does not answer a cursor at its very start: the reader read on
from the position it had, and whether the entries after it continue the stream Redis had
is what only Redis can say (a `gap`); a cursor past that start has had an entry since.

Bounded twice: `most` entries per stream (a fast answer's burst), and `window_s` seconds
(memory in proportion to the token rate, not to how many sessions are open).

Held as objects the cycle collector stops tracking (ids, events and stamps in deques, not
envelopes in lists): tens of thousands of objects that live for seconds would otherwise
reach its oldest generation, and its full collections, walking them all, stalled the event
loop for tens of milliseconds (S3 of the bench fell from 400 sessions to 200).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable

from bridge.streams.codec import Batch, Cursor, EntryId, StreamEvent

from .subscriber import Envelope

_START: EntryId = (0, 0)  # before every entry: a stream held from its first one


class _Stream:
    """One stream's delivered entries after `since`, in order, and when each batch came."""

    __slots__ = ("doubtful", "events", "ids", "model", "since", "stamps")

    def __init__(self, model: str, since: EntryId, *, doubtful: bool) -> None:
        self.model = model
        self.since = since
        self.doubtful = doubtful  # begun after a lost connection: `since` may be pre-restart
        self.ids: deque[EntryId] = deque()
        self.events: deque[StreamEvent] = deque()
        self.stamps: deque[tuple[float, int]] = deque()  # (when, entries) per batch

    @property
    def last(self) -> EntryId:
        return self.ids[-1] if self.ids else self.since

    def holds_after(self, position: EntryId) -> bool:
        """Whether every entry after `position` is held."""
        if self.doubtful:
            return self.since < position <= self.last
        return self.since <= position <= self.last

    def add(self, now: float, batch: Batch, most: int, oldest: float) -> None:
        ids, events, stamps = self.ids, self.events, self.stamps
        for entry_id, event in batch:  # a loop, not two generators: most batches hold one
            ids.append(entry_id)
            events.append(event)
        stamps.append((now, len(batch)))
        while stamps and (len(ids) > most or stamps[0][0] < oldest):
            _, count = stamps.popleft()
            for _ in range(count):
                self.since = ids.popleft()
                events.popleft()

    def after(self, entry_id: EntryId) -> list[Envelope]:
        held = zip(self.ids, self.events, strict=True)
        return [Envelope(self.model, i, event) for i, event in held if i > entry_id]


class Recent:
    """Per session and model, the entries delivered in the last `window_s` seconds."""

    def __init__(
        self, *, window_s: float, most: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window_s = window_s
        self._most = most
        self._clock = clock
        # session -> model -> stream; in the order sessions last received an entry, so the
        # sweep finds the stale ones at the front
        self._sessions: dict[str, dict[str, _Stream]] = {}
        self._updated: dict[str, float] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._lost = False  # the reader lost Redis once: runs begun since are doubtful

    @property
    def entries(self) -> int:
        """Entries held, all sessions together."""
        return sum(len(s.ids) for streams in self._sessions.values() for s in streams.values())

    def record(self, session: str, model: str, after: EntryId, batch: Batch) -> None:
        """Keep `batch`, the entries of `session`'s `model` stream after `after`."""
        if self._window_s <= 0 or not batch:
            return
        now = self._clock()
        streams = self._sessions.get(session)
        if streams is None:
            streams = self._sessions[session] = {}
        else:
            del self._updated[session]  # re-inserted below: the most recently updated is last
        self._updated[session] = now
        stream = streams.get(model)
        if stream is None or stream.last != after:
            stream = streams[model] = _Stream(model, after, doubtful=self._lost)
        stream.add(now, batch, self._most, now - self._window_s)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self._window_s, self._swept)

    def forget(self, session: str) -> None:
        """Drop `session`'s entries (its tailing stopped)."""
        if self._sessions.pop(session, None) is not None:
            del self._updated[session]

    def clear(self) -> None:
        """Drop everything: Redis may have lost what was delivered (a restart without
        persistence), and a catch-up must then say so (a `gap`), as a read of Redis would."""
        self._sessions.clear()
        self._updated.clear()
        self._lost = True

    def after(self, session: str, cursor: Cursor, models: Iterable[str]) -> list[Envelope] | None:
        """Every entry of `models` after `cursor`, model by model; None unless all are held.

        A model missing from the cursor needs its stream held from its first entry; no models
        at all (a new session) need nothing.
        """
        if self._window_s <= 0:
            return None  # turned off: Redis answers every catch-up
        streams = self._sessions.get(session, {})
        found: list[Envelope] = []
        for model in sorted(models):
            stream = streams.get(model)
            position = cursor.get(model, _START)
            if stream is None or not stream.holds_after(position):
                return None
            found.extend(stream.after(position))
        return found

    def expire(self) -> None:
        """Drop the sessions that received nothing for `window_s` (a timer calls this)."""
        oldest = self._clock() - self._window_s
        for session, updated in list(self._updated.items()):
            if updated >= oldest:
                break  # in the order of their last update: the rest are newer
            self.forget(session)

    def _swept(self) -> None:
        self.expire()
        self._sweep = None
        if self._updated:  # come back when the least recently updated session is due
            due = next(iter(self._updated.values())) + self._window_s - self._clock()
            self._sweep = asyncio.get_running_loop().call_later(max(due, 0.0), self._swept)

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
