"""A Redis client that times every command and pipeline and counts their failures.

`redis_select.make_client` builds every client of bridge from this class, so no call site
needs to know about metrics. The label is the command name (a small set fixed by the code);
blocking reads (`XREAD`/`XREADGROUP ... BLOCK`) are not timed, since their duration is the
wait. Replies the code expects and handles are not errors: `BUSYGROUP` (the group exists),
`FENCED` (the append script refused a stale worker) and `NOSCRIPT` (reloaded at once).
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import ResponseError

from bridge import metrics

_EXPECTED_REPLIES = ("BUSYGROUP", "FENCED", "NOSCRIPT")
_BLOCKING = frozenset({"XREAD", "XREADGROUP"})
_timers: dict[str, Any] = {}  # command -> its histogram child, bound once


def observe_command(command: str, seconds: float) -> None:
    timer = _timers.get(command)
    if timer is None:
        timer = _timers[command] = metrics.REDIS_COMMAND_DURATION.labels(command)
    timer.observe(seconds)


def record_failure(command: str, exc: Exception) -> None:
    if isinstance(exc, ResponseError) and str(exc).startswith(_EXPECTED_REPLIES):
        return
    metrics.REDIS_ERRORS.labels(command, type(exc).__name__).inc()


class ObservedRedis(Redis):
    """`redis.asyncio.Redis` with `bridge_redis_*` metrics."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        command = name.decode() if isinstance(name, bytes) else str(name)
        started = time.perf_counter()
        try:
            result = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except Exception as exc:
            record_failure(command, exc)
            raise
        if command not in _BLOCKING or b"BLOCK" not in args:
            observe_command(command, time.perf_counter() - started)
        return result

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return ObservedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )


class ObservedPipeline(Pipeline):
    """A pipeline timed as one `PIPELINE` (or `MULTI` when transactional) command."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self.command_stack:
            return await super().execute(raise_on_error)
        command = "MULTI" if self.is_transaction or self.explicit_transaction else "PIPELINE"
        started = time.perf_counter()
        try:
            result = await super().execute(raise_on_error)
        except Exception as exc:
            record_failure(command, exc)
            raise
        observe_command(command, time.perf_counter() - started)
        return result
