"""Cancelling generations, whichever process runs them: a flag, and a wake-up on pub/sub.

A cancel sets a `cancel` flag in the generation's hash and publishes the request id on
`keys.cancel_channel`, in one script and only while the generation has not ended. The flag
is the truth and the message only a wake-up:

- a request still queued, or one reclaimed later by another worker, finds the flag when it
  is claimed and ends with `cancelled` without calling a provider;
- a running one is stopped by the `CancelWatch` of the process that runs it, which hears the
  message and cancels its task at once (the upstream call is closed);
- a message lost while the watch was not subscribed delays a cancel but never loses it: the
  watch re-reads the flags of everything it runs whenever its subscription (re)starts, and
  every `RECHECK_S` while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.backoff import Backoff, raise_if_cancelling
from bridge.streams.keys import Keys

log = structlog.get_logger("bridge.cancel")

T = TypeVar("T")

CANCEL_SCRIPT = """
-- KEYS: generation hash. ARGV: channel, request id, session ('': any session)
-- Returns the status the generation had ('unknown' if there is none, or none in that
-- session); flags it and publishes the wake-up unless it had already ended.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'session') ~= ARGV[3] then
  return 'unknown'
end
if status == 'complete' or status == 'error' or status == 'cancelled' then return status end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return status
"""

ENDED = frozenset({"complete", "error", "cancelled"})
RECHECK_S = 5.0  # a backstop for a message that raced a generation's start
_POLL_S = 1.0  # longest wait for one pub/sub read; well under the client's socket timeout


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def request_cancel(redis: Redis, keys: Keys, request_id: str) -> str:
    """Ask for a generation to stop: `cancelling`, its final status if it ended, or `unknown`."""
    status = _text(
        await redis.eval(
            CANCEL_SCRIPT, 1, keys.generation(request_id), keys.cancel_channel, request_id, ""
        )
    )
    return status if status in ENDED or status == "unknown" else "cancelling"


class Target(msgspec.Struct, frozen=True, rename="camel"):
    """One generation a cancel request matched, and the status it had."""

    request_id: str
    model_id: str
    status: str


class CancelOutcome(msgspec.Struct, frozen=True):
    """What a session cancel found: generations now being cancelled, and ones already ended."""

    cancelling: list[Target]
    ended: list[Target]


async def cancel_session(
    redis: Redis,
    keys: Keys,
    session: str,
    *,
    model: str | None = None,
    request_id: str | None = None,
) -> CancelOutcome:
    """Cancel the session's generations that match `model` and `request_id` (both optional)."""
    index: Any = await redis.xrange(keys.session_index(session))
    candidates: dict[str, str] = {}
    for _, fields in index:
        rid, mid = fields.get(b"r", b"").decode(), fields.get(b"m", b"").decode()
        if rid and model in (None, mid) and request_id in (None, rid):
            candidates[rid] = mid
    statuses: list[Any] = []
    if candidates:
        async with redis.pipeline(transaction=False) as pipe:
            for rid in candidates:
                pipe.eval(CANCEL_SCRIPT, 1, keys.generation(rid), keys.cancel_channel, rid, session)
            statuses = await pipe.execute()
    outcome = CancelOutcome(cancelling=[], ended=[])
    for (rid, mid), raw in zip(candidates.items(), statuses, strict=True):
        status = _text(raw)
        if status in ENDED:
            outcome.ended.append(Target(rid, mid, status))
        elif status != "unknown":
            outcome.cancelling.append(Target(rid, mid, status))
    return outcome


class CancelWatch:
    """Runs generations of this process so that a cancel request can stop them.

    One per process, shared by all its workers; `watch()` runs as a background task.
    """

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._requested: set[str] = set()
        self.subscribed = False
        self.ready = asyncio.Event()  # set once the first subscription is in place

    async def requested(self, request_id: str) -> bool:
        """Whether a cancel of `request_id` was asked for (checked before it starts)."""
        flag: Any = await self._redis.hget(self._keys.generation(request_id), "cancel")
        return flag is not None

    async def run(self, request_id: str, work: Coroutine[Any, Any, T]) -> T | None:
        """Await `work`; None if a cancel request stopped it."""
        task = asyncio.ensure_future(work)
        self._running[request_id] = task
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if request_id in self._requested and (current is None or not current.cancelling()):
                return None
            raise
        finally:
            self._running.pop(request_id, None)
            self._requested.discard(request_id)

    def cancel_local(self, request_id: str) -> bool:
        """Stop `request_id` if it runs in this process; True if it did."""
        task = self._running.get(request_id)
        if task is None or task.done():
            return False
        if request_id in self._requested:
            return True  # already stopping: a second cancel could cut its clean-up short
        self._requested.add(request_id)
        task.cancel()
        log.info("generation_cancel_requested", request_id=request_id)
        return True

    async def watch(self) -> None:
        """Follow the cancel channel until cancelled; resubscribe after Redis errors."""
        backoff = Backoff()
        while True:
            # Any: redis-py's PubSub gained annotations only in 8.x, and we support 7.x too
            pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel)
                self.subscribed = True
                self.ready.set()
                backoff.reset()
                await self._listen(pubsub)
            except (RedisError, OSError) as exc:
                if self.subscribed:
                    log.warning("cancel_watch_redis_error", error=str(exc))
                self.subscribed = False
                await backoff.wait()
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        recheck_at = loop.time()  # at once: apply flags set while not subscribed
        while True:
            raise_if_cancelling()
            if loop.time() >= recheck_at:
                await self._recheck()
                recheck_at = loop.time() + RECHECK_S
            message = await pubsub.get_message(timeout=_POLL_S)
            if message is not None and message.get("type") == "message":
                self.cancel_local(_text(message["data"]))

    async def _recheck(self) -> None:
        """Apply flags set while this process was not subscribed (or raced a start)."""
        ids = list(self._running)
        if not ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hget(self._keys.generation(request_id), "cancel")
            flags = await pipe.execute()
        for request_id, flag in zip(ids, flags, strict=True):
            if flag is not None:
                self.cancel_local(request_id)
