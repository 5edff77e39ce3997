"""Cancelling generations: a flag in the generation's hash, and a wake-up on a pub/sub channel.

`request_cancel` sets the flag and publishes the request id, in one script and only while
the generation has not ended. The flag is the truth and the message only a wake-up: a
worker checks the flag before it calls a provider, and `CancelWatch` re-reads the flags of
everything it runs whenever its subscription (re)starts, so a message lost in a Redis outage
delays a cancel but never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.streams.keys import Keys

log = structlog.get_logger("bridge.cancel")

T = TypeVar("T")

REQUEST_SCRIPT = """
-- KEYS: generation hash. ARGV: channel, request id
-- Returns 'cancelling', the status of a generation that already ended, or 'unknown'.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'unknown' end
if status == 'complete' or status == 'error' or status == 'cancelled' then return status end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 'cancelling'
"""

_POLL_S = 1.0  # longest wait for one pub/sub read; well under the client's socket timeout


async def request_cancel(redis: Redis, keys: Keys, request_id: str) -> str:
    """Ask for a generation to stop: `cancelling`, its final status if it ended, or `unknown`."""
    result: Any = await redis.eval(
        REQUEST_SCRIPT, 1, keys.generation(request_id), keys.cancel_channel, request_id
    )
    return result.decode() if isinstance(result, bytes) else str(result)


class CancelWatch:
    """Runs generations of this process so that a cancel request can stop them."""

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
        self._requested.add(request_id)
        task.cancel()
        log.info("generation_cancel_requested", request_id=request_id)
        return True

    async def watch(self) -> None:
        """Follow the cancel channel until cancelled; resubscribe after Redis errors."""
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.cancel_channel)
                self.subscribed = True
                self.ready.set()
                await self._recheck()
                backoff = 0.05
                while True:
                    message = await pubsub.get_message(timeout=_POLL_S)
                    if message is not None and message.get("type") == "message":
                        data = message["data"]
                        self.cancel_local(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                if self.subscribed:
                    log.warning("cancel_watch_redis_error", error=str(exc))
                self.subscribed = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _recheck(self) -> None:
        """Apply flags set while this process was not subscribed."""
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
