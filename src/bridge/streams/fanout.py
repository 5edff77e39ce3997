"""The fan-out reader: ONE multiplexed blocking XREAD per process.

It tails every token stream of every session that has a local listener, plus each such
session's index (to learn of new model streams), plus a wake-up stream of its own. Changing
the set of streams appends to the wake-up stream: because the blocking XREAD includes that
stream at its last seen id, the wake-up cannot be missed, whether it lands before or during
the read. No sleep-polling anywhere.

Delivery is cursor-based (plain XREAD, no consumer group): a consumer group would split the
entries among readers, and every connection needs every entry.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge import metrics
from bridge.backoff import Backoff, raise_if_cancelling
from bridge.errors import MalformedEntry
from bridge.redis_raw import RawConnection, bulk
from bridge.streams.codec import EntryId, StreamEvent, from_fields, parse_entry_id
from bridge.streams.keys import Keys, indexed_model

log = structlog.get_logger("bridge.fanout")

Deliver = Callable[[str, str, list[tuple[EntryId, StreamEvent]]], None]
"""deliver(session, model, [(entry id, event), ...]) is called in stream order."""


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
        self._xread_head = b"".join(
            bulk(arg) for arg in ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS")
        )
        self._redis = redis
        self._keys = keys
        self._deliver = deliver
        self._block_ms = block_ms
        self._count = count
        self._wake_key = f"{keys.prefix}fanout:{uuid.uuid4().hex}"
        self._positions: dict[bytes, bytes] = {}
        # key -> its XREAD arguments (key, position), packed once per change, not per read
        self._packed: dict[bytes, tuple[bytes, bytes]] = {}
        self._set_position(self._wake_key.encode(), b"0-0")
        self._session_keys: dict[str, set[bytes]] = {}
        self._stream_owner: dict[bytes, tuple[str, str]] = {}  # stream key -> (session, model)
        self._index_owner: dict[bytes, str] = {}  # session index key -> session
        self.malformed = 0
        self.connected = False
        # a wake-up is on its way: the next XREAD includes every key added until it is sent
        self._wake_pending = False

    @property
    def tracked_sessions(self) -> int:
        return len(self._session_keys)

    def models(self, session: str) -> set[str] | None:
        """Models of `session` whose streams are tailed, or None if the session is not tracked.

        Complete up to the last index entry read: a model announced later is tailed from
        its stream's first entry as soon as its index entry is read.
        """
        tailed = self._session_keys.get(session)
        if not tailed:  # not tracked, or its tracking has not finished
            return None
        return {self._stream_owner[key][1] for key in tailed if key in self._stream_owner}

    async def track(self, session: str) -> None:
        """Start tailing `session`: its index and every model stream it has, from their ends."""
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
        index_key = index.encode()
        self._add(session, index_key, entries[-1][0] if entries else b"0-0")
        self._index_owner[index_key] = session
        for model, last in zip(models, last_entries, strict=True):
            self._add_stream(session, model, last[0][0] if last else b"0-0")
        await self._wake()

    def untrack(self, session: str) -> None:
        """Stop tailing `session` (its last local listener left)."""
        for key in self._session_keys.pop(session, set()):
            self._positions.pop(key, None)
            self._packed.pop(key, None)
            self._stream_owner.pop(key, None)
            self._index_owner.pop(key, None)

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
                await backoff.wait()

    def _set_position(self, key: bytes, position: bytes) -> None:
        self._positions[key] = position
        self._packed[key] = (
            self._packed[key][0] if key in self._packed else bulk(key),
            bulk(position),
        )

    def _xread_command(self) -> bytes:
        """`XREAD COUNT c BLOCK b STREAMS key... id...`, from the packed parts."""
        packed = self._packed.values()
        return b"".join(
            (
                b"*%d\r\n" % (2 * len(packed) + 6),
                self._xread_head,
                *(key for key, _ in packed),
                *(position for _, position in packed),
            )
        )

    async def _read_once(self) -> None:
        self._wake_pending = False  # keys added from here on need a wake-up of their own
        (result,) = await self._reader.call(self._xread_command())
        if isinstance(result, Exception):
            raise result
        self.connected = True
        for key, entries in result or ():
            if key not in self._positions or not entries:
                continue  # untracked while the read was in flight
            self._set_position(key, entries[-1][0])
            if key in self._index_owner:
                self._on_index(self._index_owner[key], entries)
            elif key in self._stream_owner:
                session, model = self._stream_owner[key]
                self._on_stream(session, model, entries)

    def _on_index(self, session: str, entries: list[list[Any]]) -> None:
        for _, flat in entries:
            model = indexed_model(_pairs(flat))
            if model and self._keys.stream(session, model).encode() not in self._stream_owner:
                self._add_stream(session, model, b"0-0")  # new stream: all of it is news

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
        self._add(session, key, position)
        self._stream_owner[key] = (session, model)

    def _add(self, session: str, key: bytes, position: bytes) -> None:
        if key not in self._positions:
            self._set_position(key, position)
        self._session_keys[session].add(key)

    async def _wake(self) -> None:
        # Coalesced: a burst of new sessions (thousands of tabs reconnecting) would otherwise
        # re-issue the whole multiplexed XREAD once per session.
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xadd(self._wake_key, {"w": 1}, maxlen=10, approximate=False)
                pipe.expire(self._wake_key, 3600)
                await pipe.execute()
        except BaseException:
            self._wake_pending = False
            raise

    async def aclose(self) -> None:
        """Remove this reader's wake-up stream."""
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
            await self._redis.delete(self._wake_key)


def _pairs(flat: list[bytes] | None) -> dict[bytes, bytes]:
    """A raw entry's `[field, value, ...]` as a dict (an entry deleted meanwhile has none)."""
    if not flat:
        return {}
    it = iter(flat)
    return dict(zip(it, it, strict=False))
