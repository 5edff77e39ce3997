"""Cancelling generations, whichever process runs them.

A cancel sets a `cancel` flag in the generation's state hash (atomically with checking that it
has not ended) and then publishes the request id on `keys.cancel_channel`. The worker running
the generation hears the message and aborts the upstream call at once. The flag covers every
case the message cannot: a request still queued, one reclaimed later by another worker, and a
worker whose subscription was down when the message went out (it checks the flags of its
running generations on every renewal pass).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.backoff import Backoff, raise_if_cancelling
from bridge.streams.keys import Keys

log = structlog.get_logger("bridge.cancel")

CANCEL_SCRIPT = """
-- KEYS: generation hash. ARGV: session
-- Returns the status the generation had ('' if there is none in this session); flags it
-- for cancelling unless it had already ended.
local status = redis.call('HGET', KEYS[1], 'status')
if not status or redis.call('HGET', KEYS[1], 'session') ~= ARGV[1] then return '' end
if status == 'complete' or status == 'error' or status == 'cancelled' then return status end
redis.call('HSET', KEYS[1], 'cancel', '1')
return status
"""

_LISTEN_TIMEOUT_S = 5.0


class Target(msgspec.Struct, frozen=True, rename="camel"):
    """One generation a cancel request matched, and the status it had."""

    request_id: str
    model_id: str
    status: str


class CancelOutcome(msgspec.Struct, frozen=True):
    """What a cancel request found: generations now being cancelled, and ones already ended."""

    cancelling: list[Target]
    ended: list[Target]


class Canceller:
    """Flags generations for cancelling and tells the workers (the API side)."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._script = redis.register_script(CANCEL_SCRIPT)

    async def cancel(
        self, session: str, *, model: str | None = None, request_id: str | None = None
    ) -> CancelOutcome:
        """Cancel the session's generations that match `model` and `request_id` (both optional)."""
        index: Any = await self._redis.xrange(self._keys.session_index(session))
        candidates: dict[str, str] = {}
        for _, fields in index:
            rid, mid = fields.get(b"r", b"").decode(), fields.get(b"m", b"").decode()
            if rid and (model is None or mid == model) and request_id in (None, rid):
                candidates[rid] = mid
        async with self._redis.pipeline(transaction=False) as pipe:
            for rid in candidates:
                await self._script(keys=[self._keys.generation(rid)], args=[session], client=pipe)
            statuses: list[bytes] = await pipe.execute() if candidates else []
        outcome = CancelOutcome(cancelling=[], ended=[])
        for (rid, mid), raw in zip(candidates.items(), statuses, strict=True):
            status = raw.decode()
            if status in ("queued", "running"):
                outcome.cancelling.append(Target(rid, mid, status))
            elif status:
                outcome.ended.append(Target(rid, mid, status))
        for target in outcome.cancelling:
            await self._redis.publish(self._keys.cancel_channel, target.request_id)
        return outcome


class CancelListener:
    """Hands every request id published on the cancel channel to `on_cancel` (the worker side).

    Survives Redis outages: the subscription is made again after any connection error.
    """

    def __init__(self, redis: Redis, keys: Keys, on_cancel: Callable[[str], None]) -> None:
        self._redis = redis
        self._channel = keys.cancel_channel
        self._on_cancel = on_cancel
        self.subscribed = asyncio.Event()

    async def run(self) -> None:
        """Listen until cancelled."""
        backoff = Backoff()
        while True:
            try:
                await self._listen(backoff)
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                log.warning("cancel_listener_reconnecting", error=str(exc))
                await backoff.wait()

    async def _listen(self, backoff: Backoff) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self.subscribed.set()
            backoff.reset()
            while True:
                raise_if_cancelling()
                message = await pubsub.get_message(timeout=_LISTEN_TIMEOUT_S)
                if message is not None and message["type"] == "message":
                    self._on_cancel(message["data"].decode())
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
