"""Watching Redis: is it answering now, and who must know when it stops.

One cheap PING per interval, cut short by a timeout (so a paused Redis counts as away, not just
slow). After `FAILURES_TO_DOWN` failed pings in a row Redis is marked away: `on_down` runs once
(the runtime closes every SSE connection with `redis_unavailable` so EventSource reconnects),
and `chat/start` answers 503 at once instead of waiting for timeouts. The first good PING marks
it back; nothing else needs restarting, since every reader and worker loop retries on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge.backoff import raise_if_cancelling

log = structlog.get_logger("bridge.redis_watch")

FAILURES_TO_DOWN = 2


class RedisWatch:
    """Tracks whether Redis answers; `up` is what request handlers consult."""

    def __init__(
        self, redis: Redis, *, interval_s: float, timeout_s: float, on_down: Callable[[], None]
    ) -> None:
        self._redis = redis
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._on_down = on_down
        self.up = True
        self.outages = 0
        self._failures = 0

    async def run(self) -> None:
        """Ping until cancelled."""
        while True:
            await self.check()
            raise_if_cancelling()
            await asyncio.sleep(self._interval_s)

    async def available(self) -> bool:
        """True if Redis is up; while it is marked away, ping again rather than trust that."""
        return self.up or await self.check()

    async def check(self) -> bool:
        """Ping once and update `up`; returns whether Redis answered."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()
        except (TimeoutError, RedisError, OSError) as exc:
            self._failures += 1
            if self.up and self._failures >= FAILURES_TO_DOWN:
                self.up = False
                self.outages += 1
                log.warning("redis_down", error=type(exc).__name__)
                self._on_down()
            return False
        self._failures = 0
        if not self.up:
            self.up = True
            log.info("redis_back")
        return True
