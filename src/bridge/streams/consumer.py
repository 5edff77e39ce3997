"""Work distribution: the request stream read by the worker consumer group.

A request is read once by one worker (`XREADGROUP >`), acknowledged in batches when its
generation has ended, renewed while it runs (so a live worker's long generation is never
stolen), and reclaimed with `XAUTOCLAIM` once its worker has been silent for
`reclaim_idle_ms`. The reclaim scan follows XAUTOCLAIM's cursor instead of restarting at 0.

Renewal only touches entries this worker still owns, so a worker that wakes up after a pause
cannot steal back what another took over; it learns instead which requests it lost. The
request stream is trimmed below the oldest entry the group still needs. A group that vanished
(a Redis restart without persistence) is created again on the next read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from bridge import metrics
from bridge.backoff import Backoff, raise_if_cancelling
from bridge.settings import Settings
from bridge.streams.codec import format_entry_id, parse_entry_id
from bridge.streams.keys import Keys

log = structlog.get_logger("bridge.consumer")

IDLE_SCRIPT = """
-- KEYS: request stream. ARGV: group, consumer, idle ms, entry ids...
-- Set the idle time of the entries this consumer still owns; return the ones it does not.
local lost = {}
for i = 4, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if entry and entry[2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""


def _no_group(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class Delivery(msgspec.Struct):
    """One request-stream entry handed to this worker, and how often it was delivered."""

    entry_id: str
    fields: dict[bytes, bytes]
    times_delivered: int = 1


class WorkQueue:
    """This worker's handle on the request stream's consumer group."""

    def __init__(
        self,
        redis: Redis,
        reader: Redis,
        keys: Keys,
        settings: Settings,
        name: str,
        *,
        stream: str | None = None,
        dead_letters: str | None = None,
    ):
        self._redis = redis
        self._reader = reader  # a dedicated connection for the blocking read
        self._keys = keys
        # the chat request stream by default; the seed request streams reuse this class
        self.stream = stream or keys.requests
        self.dead_letters = dead_letters or keys.dead_letters
        self._settings = settings
        self.name = name
        self._reclaim_cursor = "0-0"
        self._acks: list[str] = []
        self._ack_ready = asyncio.Event()
        self._idle_script = redis.register_script(IDLE_SCRIPT)
        self.trimmed = 0

    async def ensure_group(self) -> None:
        """Create the group at id 0 (so requests queued before any worker are served)."""
        try:
            await self._redis.xgroup_create(
                self.stream, self._keys.worker_group, id="0", mkstream=True
            )
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def read(self, count: int, block_ms: int) -> list[Delivery]:
        """New requests for this worker, waiting up to `block_ms` for the first one."""
        try:
            result: Any = await self._reader.xreadgroup(
                self._keys.worker_group,
                self.name,
                {self.stream: ">"},
                count=count,
                block=block_ms,
            )
        except ResponseError as exc:
            if not _no_group(exc):
                raise
            log.warning("worker_group_missing", stream=self.stream)
            await self.ensure_group()
            return []
        deliveries = []
        for _key, entries in result or ():
            for entry_id, fields in entries:
                if fields:  # an entry deleted while pending comes back empty
                    deliveries.append(Delivery(entry_id.decode(), fields))
        return deliveries

    async def reclaim(self, count: int = 50) -> list[Delivery]:
        """Take over requests whose worker has been idle for `reclaim_idle_ms` (one scan step)."""
        try:
            cursor, claimed, _deleted = await self._redis.xautoclaim(
                self.stream,
                self._keys.worker_group,
                self.name,
                min_idle_time=self._settings.reclaim_idle_ms,
                start_id=self._reclaim_cursor,
                count=count,
            )
        except ResponseError as exc:
            if not _no_group(exc):
                raise
            self._reclaim_cursor = "0-0"
            return []
        self._reclaim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
        entries = [(eid.decode(), fields) for eid, fields in claimed if fields]
        if not entries:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(self.stream, self._keys.worker_group, entry_id, entry_id, 1)
            pending = await pipe.execute()
        deliveries = []
        for (entry_id, fields), info in zip(entries, pending, strict=True):
            times = int(info[0]["times_delivered"]) if info else 1
            deliveries.append(Delivery(entry_id, fields, times))
        return deliveries

    @property
    def reclaim_scan_done(self) -> bool:
        """True when the last reclaim step reached the end of the pending list."""
        return self._reclaim_cursor == "0-0"

    async def renew(self, entry_ids: Iterable[str]) -> list[str]:
        """Reset the idle time of requests this worker runs; return those it no longer owns."""
        return await self._set_idle(entry_ids, 0)

    async def release(self, entry_ids: Iterable[str]) -> None:
        """Hand back requests this worker stops running: other workers reclaim them at once."""
        await self._set_idle(entry_ids, self._settings.reclaim_idle_ms)

    async def _set_idle(self, entry_ids: Iterable[str], idle_ms: int) -> list[str]:
        ids = list(entry_ids)
        if not ids:
            return []
        lost: list[bytes] = await self._idle_script(
            keys=[self.stream], args=[self._keys.worker_group, self.name, idle_ms, *ids]
        )
        return [entry_id.decode() for entry_id in lost]

    def ack(self, entry_id: str) -> None:
        """Acknowledge later, together with others (see `run_acks`)."""
        self._acks.append(entry_id)
        self._ack_ready.set()

    async def run_acks(self) -> None:
        """Flush acknowledgements in batches until cancelled; keep them across Redis errors."""
        backoff = Backoff()
        while True:
            raise_if_cancelling()
            await self._ack_ready.wait()
            try:
                await self.flush_acks()
                backoff.reset()
            except (RedisError, OSError) as exc:
                log.warning("ack_failed", pending=len(self._acks), error=str(exc))
                await backoff.wait()

    async def flush_acks(self) -> None:
        """Acknowledge everything buffered in one XACK."""
        self._ack_ready.clear()
        batch, self._acks = self._acks, []
        if not batch:
            return
        try:
            await self._redis.xack(self.stream, self._keys.worker_group, *batch)
        except BaseException:
            self._acks[:0] = batch  # retried on the next flush; XACK is idempotent
            self._ack_ready.set()
            raise

    async def trim(self) -> int:
        """Trim the request stream below the oldest entry the group still needs.

        Entries up to the group's last delivered one, and before its oldest pending one, were
        acknowledged; the others are pending or not read yet, and are kept.
        """
        try:
            groups: Any = await self._redis.xinfo_groups(self.stream)
            pending: Any = await self._redis.xpending(self.stream, self._keys.worker_group)
        except ResponseError:
            return 0  # no stream or no group yet: nothing to trim
        group = next((g for g in groups if g["name"].decode() == self._keys.worker_group), None)
        if group is None:
            return 0
        delivered_ms, delivered_seq = parse_entry_id(group["last-delivered-id"])
        keep_from = (delivered_ms, delivered_seq + 1)
        if pending["pending"]:
            keep_from = min(keep_from, parse_entry_id(pending["min"]))
        trimmed: int = await self._redis.xtrim(
            self.stream, minid=format_entry_id(keep_from), approximate=False
        )
        self.trimmed += trimmed
        return trimmed

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move a request that cannot be served to the dead-letter stream, and acknowledge it."""
        fields: dict[Any, Any] = dict(delivery.fields)
        fields.update(
            {
                "dead_reason": reason,
                "origin_id": delivery.entry_id,
                "times_delivered": str(delivery.times_delivered),
            }
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_letters, fields, maxlen=10_000, approximate=True)
            pipe.xack(self.stream, self._keys.worker_group, delivery.entry_id)
            await pipe.execute()
        log.warning("request_dead_lettered", entry=delivery.entry_id, reason=reason)
        metrics.REQUESTS_DEAD_LETTERED.labels(reason).inc()
