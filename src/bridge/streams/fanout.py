"""The fan-out reader: appends pushed by Redis pub/sub; the streams read only to fill gaps.

Every append (the producer's script) publishes what it wrote on its session's channel
(`Keys.live_channel`): the model, the stream's last entry id before the append (`prev`), and
the new entries with their ids. The reader subscribes to the channels of the sessions it
tails, on one connection, and delivers an append straight from its message when the message
continues the stream from where the reader is: one pushed message per append, and no command
per wake-up.

Nothing is missed or repeated. Positions are per stream; a message is used only when its
`prev` is at or before the reader's position in that stream (the entries after the position
are then exactly the message's ones after it). Otherwise (a message lost with a dropped
connection, an entry written by anything but the script, a stream met mid-way) the reader
reads the stream from its position with `XREAD`, which returns all the message named and
more. Tracking a session subscribes first, and reads its streams' ends only once Redis
confirmed the subscription, so every later append is announced. After a connection loss the
reader subscribes again and re-reads every stream it tails before going on.

Why not what came before. DESIGN.md's reader blocked in one `XREAD` over every tailed stream:
Redis re-scans them all at each wake-up (0.3 ms per entry with 100 sessions, 5.2 ms with 2,000;
`python -m bench.fanout_cost`). The next design blocked on one activity stream naming every
append, then read the named streams: two commands per wake-up, and every API process read
every session's activity. Here Redis pushes each process its own sessions' appends, entries
included.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge import metrics
from bridge.backoff import Backoff, raise_if_cancelling
from bridge.errors import MalformedEntry
from bridge.redis_raw import RawConnection, bulk, pack
from bridge.streams.codec import (
    Batch,
    EntryId,
    StreamEvent,
    from_fields,
    from_text_fields,
    parse_entry_id,
)
from bridge.streams.keys import Keys, indexed_model, is_safe_id

log = structlog.get_logger("bridge.fanout")

Deliver = Callable[[str, str, EntryId, Batch], None]
"""deliver(session, model, after, [(entry id, event), ...]) is called in stream order; the
entries are every one of the stream's after `after` (the reader's position before them) up to
the last, but for malformed ones skipped."""

T = TypeVar("T")
_GAPS = object()  # queued by `_on_reply` in a message's place: (_GAPS, stream keys to read)
_RESYNC_KEYS = 1000  # streams per non-blocking read when re-reading everything
_SUBSCRIBE_CHANNELS = 1000  # channels per SUBSCRIBE when subscribing again
_decode_entries = msgspec.json.Decoder(list[list[Any]]).decode


class FanoutReader:
    """Tails the streams of tracked sessions and hands each new entry to `deliver`."""

    def __init__(
        self,
        subscriber: RawConnection,
        reader: RawConnection,
        redis: Redis,
        keys: Keys,
        deliver: Deliver,
        *,
        keepalive_s: float = 5.0,
        timeout_s: float = 5.0,
        count: int = 500,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self._subscriber = subscriber  # pub/sub: SUBSCRIBE, UNSUBSCRIBE and PING only
        self._reader = reader  # the streams' reads that fill gaps
        self._redis = redis
        self._keys = keys
        self._deliver = deliver
        self._keepalive_s = keepalive_s  # a PING this often: a silent connection is a dead one
        self._timeout_s = timeout_s
        self._count = count
        self._on_lost = on_lost  # what was delivered may be gone from Redis (a restart)
        self._streams_read = bulk("XREAD") + bulk("COUNT") + bulk(count) + bulk("STREAMS")
        self._channel_prefix = keys.live_channel("").encode()
        # the reader's own channel: subscribed from the start, so the connection always is
        self._own_channel = f"{keys.prefix}fanout:{uuid.uuid4().hex}".encode()
        self._positions: dict[bytes, EntryId] = {}  # stream key -> last entry id handled
        self._session_keys: dict[str, set[bytes]] = {}
        self._ready: set[str] = set()  # sessions whose tracking finished
        self._stream_owner: dict[bytes, tuple[str, str]] = {}  # stream key -> (session, model)
        self._live = False  # subscribed on the current connection: track() may add channels
        self._pongs: dict[bytes, list[asyncio.Future[None]]] = {}  # PING token -> waiters
        self._deferred: list[asyncio.Future[None]] = []  # waiters for the next subscribing
        self._tokens = itertools.count(1)
        self._unsubscribe: set[bytes] = set()  # channels of sessions no longer tailed
        self.malformed = 0
        self.connected = False
        subscriber.listen(self._on_reply)

    @property
    def tracked_sessions(self) -> int:
        return len(self._session_keys)

    def models(self, session: str) -> set[str] | None:
        """Models of `session` whose streams are tailed, or None until its tracking finished.

        Complete up to the last message read: a model whose first entry is announced later
        is tailed from its stream's first entry, so a catch-up may skip it (it arrives live,
        from its start).
        """
        if session not in self._ready:
            return None
        return {self._stream_owner[key][1] for key in self._session_keys[session]}

    async def track(self, session: str) -> None:
        """Start tailing `session`: every model stream it has, from their ends."""
        if session in self._session_keys:
            return
        mine: set[bytes] = set()
        self._session_keys[session] = mine
        try:
            await self._subscribe(session)
            index = self._keys.session_index(session)
            entries: Any = await self._redis.xrange(index)
            models = sorted({model for _, fields in entries if (model := indexed_model(fields))})
            async with self._redis.pipeline(transaction=False) as pipe:
                for model in models:
                    pipe.xrevrange(self._keys.stream(session, model), count=1)
                last_entries: list[Any] = await pipe.execute()
        except BaseException:
            if self._session_keys.get(session) is mine:
                self.untrack(session)
            raise
        if self._session_keys.get(session) is not mine:  # untracked while we were reading
            return
        for model, last in zip(models, last_entries, strict=True):
            self._add_stream(session, model, parse_entry_id(last[0][0]) if last else (0, 0))
        self._ready.add(session)

    def untrack(self, session: str) -> None:
        """Stop tailing `session` (its last local listener left)."""
        self._ready.discard(session)
        for key in self._session_keys.pop(session, set()):
            self._positions.pop(key, None)
            self._stream_owner.pop(key, None)
        self._unsubscribe.add(self._channel(session))  # sent with the next keepalive

    async def run(self) -> None:
        """Read until cancelled; ride out Redis outages with capped backoff."""
        backoff = Backoff()
        keepalive = asyncio.create_task(self._keepalive(), name="fanout-keepalive")
        try:
            while True:
                raise_if_cancelling()
                try:
                    await self._follow(backoff)
                except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                    if self.connected:
                        log.warning("fanout_redis_error", error=str(exc))
                    self._lost()
                    await backoff.wait()
        finally:
            keepalive.cancel()
            self._lost()

    async def _subscribe(self, session: str) -> None:
        """Subscribe to `session`'s channel; return once Redis confirmed it."""
        channel = self._channel(session)
        self._unsubscribe.discard(channel)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._live and self._subscriber.connected:
            # A PING after it: its answer comes once the SUBSCRIBE (and all before) took effect.
            token = self._token()
            self._pongs[token] = [waiter]
            # if this fails, the reader reconnects and subscribes every tracked session again
            with contextlib.suppress(RedisError, OSError):
                await self._subscriber.send([pack("SUBSCRIBE", channel), pack("PING", token)])
        else:
            self._deferred.append(waiter)  # the reader's next subscribing includes this one
        try:
            async with asyncio.timeout(self._timeout_s):
                await waiter
        except TimeoutError:
            raise RedisTimeoutError("Redis did not confirm a subscription in time") from None

    async def _follow(self, backoff: Backoff) -> None:
        """Subscribe to every tracked session, re-read their streams, then follow messages."""
        await self._subscriber.connect()
        channels = [self._own_channel, *map(self._channel, self._session_keys)]
        token = self._token()
        self._pongs[token], self._deferred = self._deferred, []
        self._live = True
        await self._subscriber.send(
            [
                pack("SUBSCRIBE", *channels[start : start + _SUBSCRIBE_CHANNELS])
                for start in range(0, len(channels), _SUBSCRIBE_CHANNELS)
            ]
            + [pack("PING", token)]
        )
        while True:
            reply = await self._subscriber.read()
            if isinstance(reply, Exception):
                raise reply
            kind = reply[0]
            if kind is _GAPS:
                await self._read_streams(reply[1])
            elif kind == b"message":  # it came while replies before it waited to be read
                gaps = self._on_message(reply[1], reply[2])
                if gaps:
                    await self._read_streams(gaps)
            elif kind == b"pong":
                for waiter in self._pongs.pop(reply[1], ()):
                    if not waiter.done():
                        waiter.set_result(None)
                if reply[1] == token:  # everything subscribed: what was missed is in the streams
                    await self._resync()
                    self.connected = True
                    backoff.reset()

    async def _keepalive(self) -> None:
        """PING the subscription now and then (with any UNSUBSCRIBE due)."""
        while True:
            await asyncio.sleep(self._keepalive_s)
            if not (self._live and self._subscriber.connected):
                continue
            commands = [pack("PING")]
            if self._unsubscribe:
                commands.insert(0, pack("UNSUBSCRIBE", *self._unsubscribe))
                self._unsubscribe.clear()
            with contextlib.suppress(RedisError, OSError):  # the reader's read fails too
                await self._subscriber.send(commands)

    def _on_reply(self, reply: Any) -> Any:
        """The subscription's replies as they arrive: an append's message is delivered from
        the connection's callback, which wakes no task; what needs the follow loop (streams to
        read, confirmations, pongs, errors) is queued for it.

        A message delivered while the loop awaits a read of the streams is safe: the read
        delivers only the entries past the position the message moved."""
        if type(reply) is list and reply[0] == b"message":
            gaps = self._on_message(reply[1], reply[2])
            return (_GAPS, gaps) if gaps else None
        return reply

    def _lost(self) -> None:
        """The subscription is gone: waiters move on to the next subscribing."""
        self.connected = False
        self._live = False
        if self._on_lost is not None:
            self._on_lost()
        for waiters in self._pongs.values():
            self._deferred.extend(waiter for waiter in waiters if not waiter.done())
        self._pongs.clear()

    def _on_message(self, channel: bytes, payload: bytes) -> list[bytes]:
        """Deliver an append from its message if it continues the stream; else the keys to read.

        The message (see the producer's script) is five lines: model, `prev`, the indexes of
        the written entries in the entries argument, their ids, and the entries argument.
        """
        session = channel[len(self._channel_prefix) :].decode("utf-8", "replace")
        if session not in self._session_keys:
            return []  # untracked; its UNSUBSCRIBE is on its way
        try:
            model_raw, prev_raw, indexes_raw, ids_raw, entries_raw = payload.split(b"\n", 4)
            model = model_raw.decode()
            raw_ids = ids_raw.split(b" ")
            ids = [parse_entry_id(raw_id) for raw_id in raw_ids]
            indexes = [int(index) for index in indexes_raw.split(b" ")]
            prev = parse_entry_id(prev_raw)
            last = ids[-1]
            if not is_safe_id(model) or len(indexes) != len(ids) or min(indexes) < 1:
                raise ValueError("not the append script's message")
        except (ValueError, UnicodeDecodeError) as exc:
            return self._malformed(session, exc)
        key = self._keys.stream(session, model).encode()
        if key not in self._stream_owner:
            # New to this reader: while the session's tracking is under way its catch-up covers
            # what came before this message; once tracked, a new stream is read from its start.
            self._add_stream(session, model, (0, 0) if session in self._ready else prev)
        position = self._positions[key]
        if prev > position:
            return [key]  # entries between the position and this append: read the stream
        if last <= position:
            return []
        try:
            entries = _decode_entries(entries_raw)
            picked = [entries[index - 1] for index in indexes]
        except (msgspec.DecodeError, IndexError) as exc:
            return self._malformed(session, exc)
        batch: Batch = []
        for raw_id, entry_id, entry in zip(raw_ids, ids, picked, strict=True):
            if entry_id <= position:
                continue
            try:
                batch.append((entry_id, _event(entry)))
            except MalformedEntry as exc:
                self._skip_entry(model, raw_id, exc)
        self._positions[key] = last
        if batch:
            self._deliver(session, model, position, batch)
        return []

    def _malformed(self, session: str, exc: Exception) -> list[bytes]:
        """An unreadable message: count it, and read the session's streams instead."""
        self._count_malformed("malformed_message_skipped", exc, session_id=session)
        return list(self._session_keys[session])

    async def _resync(self) -> None:
        """Re-read every tailed stream from its position."""
        keys = list(self._positions)
        for start in range(0, len(keys), _RESYNC_KEYS):
            await self._read_streams(keys[start : start + _RESYNC_KEYS])

    async def _read_streams(self, keys: Iterable[bytes]) -> None:
        """Deliver everything after the positions of `keys`, however many reads it takes."""
        pending = self._tailed(keys)
        while pending:
            (reply,) = await self._reader.call(self._streams_command(pending))
            pending = self._tailed(self._on_streams(reply))

    def _tailed(self, keys: Iterable[bytes]) -> list[bytes]:
        """`keys` still tailed, each once."""
        return [key for key in dict.fromkeys(keys) if key in self._positions]

    def _streams_command(self, keys: list[bytes]) -> bytes:
        """A non-blocking `XREAD` of `keys` (tailed, at least one) from their positions."""
        packed = [bulk(key) for key in keys]
        packed += [bulk(b"%d-%d" % self._positions[key]) for key in keys]
        return b"".join((b"*%d\r\n" % (len(packed) + 4), self._streams_read, *packed))

    def _on_streams(self, reply: Any) -> list[bytes]:
        """Deliver a streams read's entries; return the keys that may have more."""
        if isinstance(reply, Exception):
            raise reply
        full: list[bytes] = []
        for key, entries in reply or ():
            if key not in self._positions or not entries:
                continue  # untracked while the read was in flight
            position = self._positions[key]
            newest = parse_entry_id(entries[-1][0])
            if newest > position:
                self._positions[key] = newest
            session, model = self._stream_owner[key]
            self._on_stream(session, model, entries, position)
            if len(entries) >= self._count:
                full.append(key)
        return full

    def _on_stream(
        self, session: str, model: str, entries: list[list[Any]], position: EntryId
    ) -> None:
        batch: Batch = []
        for raw_id, flat in entries:
            entry_id = parse_entry_id(raw_id)
            if entry_id <= position:
                continue  # delivered from a message while this read was in flight
            try:
                batch.append((entry_id, from_fields(_pairs(flat))))
            except MalformedEntry as exc:
                self._skip_entry(model, raw_id, exc)
        if batch:
            self._deliver(session, model, position, batch)

    def _skip_entry(self, model: str, entry_id: bytes, exc: MalformedEntry) -> None:
        self._count_malformed("malformed_entry_skipped", exc, model=model, entry=entry_id)

    def _count_malformed(self, event: str, exc: Exception, **fields: Any) -> None:
        self.malformed += 1
        metrics.MALFORMED_ENTRIES.labels("fanout").inc()
        log.warning(event, error=str(exc), **fields)

    def _add_stream(self, session: str, model: str, position: EntryId) -> None:
        key = self._keys.stream(session, model).encode()
        self._positions.setdefault(key, position)
        self._stream_owner[key] = (session, model)
        self._session_keys[session].add(key)

    def _channel(self, session: str) -> bytes:
        return self._channel_prefix + session.encode()

    def _token(self) -> bytes:
        return b"%d" % next(self._tokens)


def _pairs(flat: list[T] | None) -> dict[T, T]:
    """An entry's `[field, value, ...]` as a dict (an entry deleted meanwhile has none)."""
    if not flat:
        return {}
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _event(entry: list[Any]) -> StreamEvent:
    """An entry of the append script's argument: `[seq, is_token, field, value, ...]`."""
    parts = entry[2:]
    if not all(isinstance(part, str) for part in parts):
        raise MalformedEntry("entry fields are not all strings")
    return from_text_fields(_pairs(parts))
