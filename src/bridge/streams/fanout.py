"""The fan-out reader: one blocking read per process, whatever the number of sessions.

Every append (the producer's script) also adds `(session, model)` to one activity stream.
The reader blocks on that stream alone; when it names a session this process tails, the
reader fetches that session's new entries with a non-blocking `XREAD` from its own
positions and hands them to `deliver`. Delivery stays cursor-based (no consumer group: a
group would split the entries among readers, and every connection needs every entry).

Why not one blocking `XREAD` over every tailed stream (the first design, and DESIGN.md's):
Redis registers a blocked reader on every key it names and re-scans them all at each
wake-up, so each token cost Redis time in proportion to the open sessions: 0.3 ms per entry
with 100 sessions, 5.2 ms with 2,000 (`python -m bench.fanout_cost`). Here a wake-up costs
the activity entry and the keys that had news: 30-45 us at any count.

Nothing is missed: an activity entry is written in the same script as the entries it
announces, and positions are per stream, so a stream read after its announcement returns
everything after the reader's position. Tracking a session reads its streams' current ends
first; anything appended later is announced later. Where announcements may have been
missed (at start, after a Redis error, or if the reader fell further behind than the
activity stream keeps), the reader re-reads every stream it tails before going on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge import metrics
from bridge.backoff import Backoff, raise_if_cancelling
from bridge.errors import MalformedEntry
from bridge.redis_raw import RawConnection, bulk, pack
from bridge.streams.codec import EntryId, StreamEvent, from_fields, parse_entry_id
from bridge.streams.keys import Keys, indexed_model, is_safe_id

log = structlog.get_logger("bridge.fanout")

Deliver = Callable[[str, str, list[tuple[EntryId, StreamEvent]]], None]
"""deliver(session, model, [(entry id, event), ...]) is called in stream order."""

_RESYNC_KEYS = 1000  # streams per non-blocking read when re-reading everything


class FanoutReader:
    """Tails the streams of tracked sessions and hands each new entry to `deliver`."""

    def __init__(
        self,
        reader: RawConnection,
        redis: Redis,
        keys: Keys,
        deliver: Deliver,
        *,
        block_ms: int = 5000,
        count: int = 500,
    ) -> None:
        self._reader = reader  # a dedicated connection: it spends its life blocked
        self._redis = redis
        self._keys = keys
        self._deliver = deliver
        self._count = count
        self._activity = keys.activity.encode()
        # `XREAD COUNT c BLOCK b STREAMS <activity>` (8 arguments), then the position
        self._activity_read = (
            b"*8\r\n"
            + b"".join(bulk(arg) for arg in ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS"))
            + bulk(self._activity)
        )
        self._streams_read = bulk("XREAD") + bulk("COUNT") + bulk(count) + bulk("STREAMS")
        # where the reader is in the activity stream; None: re-read every stream first
        self._activity_position: bytes | None = None
        self._blocked = False  # a blocking activity read was sent and not yet answered
        self._backlog: dict[bytes, None] = {}  # streams with more to read than one read gave
        self._positions: dict[bytes, bytes] = {}  # stream key -> last entry id handled
        self._session_keys: dict[str, set[bytes]] = {}
        self._ready: set[str] = set()  # sessions whose tracking finished
        self._stream_owner: dict[bytes, tuple[str, str]] = {}  # stream key -> (session, model)
        self.malformed = 0
        self.connected = False

    @property
    def tracked_sessions(self) -> int:
        return len(self._session_keys)

    def models(self, session: str) -> set[str] | None:
        """Models of `session` whose streams are tailed, or None until its tracking finished.

        Complete up to the last activity read: a model whose first entry is announced later
        is tailed from its stream's first entry as soon as the announcement is read, so a
        catch-up may skip it (it arrives live, from its start).
        """
        if session not in self._ready:
            return None
        return {self._stream_owner[key][1] for key in self._session_keys[session]}

    async def track(self, session: str) -> None:
        """Start tailing `session`: every model stream it has, from their ends."""
        if session in self._session_keys:
            return
        self._session_keys[session] = set()
        index = self._keys.session_index(session)
        try:
            entries: Any = await self._redis.xrange(index)
            models = sorted({model for _, fields in entries if (model := indexed_model(fields))})
            async with self._redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.xrevrange(self._keys.stream(session, model), count=1)
                last_entries: list[Any] = await pipe.execute()
        except BaseException:
            self._session_keys.pop(session, None)
            raise
        if session not in self._session_keys:  # untracked while we were reading
            return
        for model, last in zip(models, last_entries, strict=True):
            self._add_stream(session, model, last[0][0] if last else b"0-0")
        self._ready.add(session)

    def untrack(self, session: str) -> None:
        """Stop tailing `session` (its last local listener left)."""
        self._ready.discard(session)
        for key in self._session_keys.pop(session, set()):
            self._positions.pop(key, None)
            self._stream_owner.pop(key, None)

    async def run(self) -> None:
        """Read until cancelled; ride out Redis outages with capped backoff."""
        backoff = Backoff()
        while True:
            raise_if_cancelling()
            try:
                await self._read_once()
                backoff.reset()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if self.connected:
                    log.warning("fanout_redis_error", error=str(exc))
                self.connected = False
                self._blocked = False  # the connection was dropped with whatever it awaited
                self._activity_position = None  # announcements may be missed meanwhile
                await backoff.wait()

    async def _read_once(self) -> None:
        if not self._blocked:
            if self._activity_position is None:
                await self._resync()
            await self._reader.send(self._activity_command())
            self._blocked = True
        reply = await self._reader.read()
        self._blocked = False
        if isinstance(reply, Exception):
            raise reply
        self.connected = True
        news = self._take_backlog()
        if reply:
            entries = reply[0][1]
            self._activity_position = entries[-1][0]
            news.extend(self._announced(entries))
            if len(entries) >= self._count:
                # Behind by a full read: if the activity stream was trimmed past this
                # reader's position, announcements are gone; re-read everything next.
                self._activity_position = None
        news = self._tailed(news)
        if not news:
            return
        if self._activity_position is None:
            await self._read_streams(news)
            return
        # One write: the read of the announced streams, and already the next blocking read.
        await self._reader.send(self._streams_command(news) + self._activity_command())
        self._blocked = True
        full = self._on_streams(await self._reader.read())
        if full:
            # More than one read's worth on some stream, and the connection is blocked:
            # note them, and announce to this reader that there is more to read.
            self._backlog.update(dict.fromkeys(full))
            await self._redis.xadd(self._keys.activity, {"s": "", "m": ""})

    def _announced(self, entries: list[list[Any]]) -> list[bytes]:
        """Stream keys the activity entries name, of the sessions tailed here."""
        keys: list[bytes] = []
        for _, flat in entries:
            fields = _pairs(flat)
            session = fields.get(b"s", b"").decode("utf-8", "replace")
            if session not in self._session_keys:
                continue  # not tailed here (most activity, with many API processes)
            model = fields.get(b"m", b"").decode("utf-8", "replace")
            if not is_safe_id(model):
                continue
            key = self._keys.stream(session, model).encode()
            if key not in self._stream_owner:
                self._add_stream(session, model, b"0-0")  # a new stream: all of it is news
            keys.append(key)
        return keys

    def _take_backlog(self) -> list[bytes]:
        backlog, self._backlog = list(self._backlog), {}
        return backlog

    async def _resync(self) -> None:
        """Re-read every tailed stream from its position; then follow the activity from now."""
        (last,) = await self._call(pack("XREVRANGE", self._activity, "+", "-", "COUNT", 1))
        position = last[0][0] if last else b"0-0"
        keys = list(self._positions)
        for start in range(0, len(keys), _RESYNC_KEYS):
            await self._read_streams(keys[start : start + _RESYNC_KEYS])
        self._activity_position = position

    async def _read_streams(self, keys: Iterable[bytes]) -> None:
        """Deliver everything after the positions of `keys`, however many reads it takes."""
        pending = self._tailed(keys)
        while pending:
            (reply,) = await self._call(self._streams_command(pending))
            pending = self._tailed(self._on_streams(reply))

    def _activity_command(self) -> bytes:
        assert self._activity_position is not None
        return self._activity_read + bulk(self._activity_position)

    def _tailed(self, keys: Iterable[bytes]) -> list[bytes]:
        """`keys` still tailed, each once."""
        return [key for key in dict.fromkeys(keys) if key in self._positions]

    def _streams_command(self, keys: list[bytes]) -> bytes:
        """A non-blocking `XREAD` of `keys` (tailed, at least one) from their positions."""
        packed = [bulk(key) for key in keys] + [bulk(self._positions[key]) for key in keys]
        return b"".join((b"*%d\r\n" % (len(packed) + 4), self._streams_read, *packed))

    def _on_streams(self, reply: Any) -> list[bytes]:
        """Deliver a streams read's entries; return the keys that may have more."""
        if isinstance(reply, Exception):
            raise reply
        full: list[bytes] = []
        for key, entries in reply or ():
            if key not in self._positions or not entries:
                continue  # untracked while the read was in flight
            self._positions[key] = entries[-1][0]
            session, model = self._stream_owner[key]
            self._on_stream(session, model, entries)
            if len(entries) >= self._count:
                full.append(key)
        return full

    async def _call(self, command: bytes) -> list[Any]:
        replies = await self._reader.call(command)
        if isinstance(replies[0], Exception):
            raise replies[0]
        return replies

    def _on_stream(self, session: str, model: str, entries: list[list[Any]]) -> None:
        batch: list[tuple[EntryId, StreamEvent]] = []
        for entry_id, flat in entries:
            try:
                batch.append((parse_entry_id(entry_id), from_fields(_pairs(flat))))
            except MalformedEntry as exc:
                self.malformed += 1
                metrics.MALFORMED_ENTRIES.labels("fanout").inc()
                log.warning("malformed_entry_skipped", model=model, entry=entry_id, error=str(exc))
        if batch:
            self._deliver(session, model, batch)

    def _add_stream(self, session: str, model: str, position: bytes) -> None:
        key = self._keys.stream(session, model).encode()
        self._positions.setdefault(key, position)
        self._stream_owner[key] = (session, model)
        self._session_keys[session].add(key)


def _pairs(flat: list[bytes] | None) -> dict[bytes, bytes]:
    """A raw entry's `[field, value, ...]` as a dict (an entry deleted meanwhile has none)."""
    if not flat:
        return {}
    it = iter(flat)
    return dict(zip(it, it, strict=False))
