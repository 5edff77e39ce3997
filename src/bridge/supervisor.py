"""Supervised background tasks: restarted with capped backoff when they crash, and counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from bridge import metrics

_STOP_RETRY_S = 0.5

log = structlog.get_logger("bridge.supervisor")

INITIAL_BACKOFF_S = 0.1
MAX_BACKOFF_S = 10.0
#: a run that lasted this long was healthy: the next crash starts from the initial backoff
HEALTHY_RUN_S = 60.0


class BackgroundTask:
    """A coroutine that must run for the life of the process (fan-out reader, worker, monitor).

    If it raises, or returns although it never should, it is restarted after a backoff that
    doubles up to `MAX_BACKOFF_S`; every restart is logged and counted in
    `bridge_background_task_restarts_total`. `alive` is False while it waits to restart, so
    readiness fails for a task that keeps crashing.
    """

    def __init__(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._factory = factory
        self.restarts = 0
        self.last_error: str | None = None
        self._running = False
        self._task: asyncio.Task[None] | None = None
        self._restarts_metric = metrics.BACKGROUND_TASK_RESTARTS.labels(name)

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=self.name)

    @property
    def alive(self) -> bool:
        """Running now (not stopped, not waiting to restart after a crash)."""
        return self._running and self._task is not None and not self._task.done()

    async def _supervise(self) -> None:
        backoff = INITIAL_BACKOFF_S
        while True:
            started = time.monotonic()
            self._running = True
            try:
                await self._factory()
                self.last_error = "returned"
                log.error("background_task_returned", task=self.name)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("background_task_crashed", task=self.name)
            self._running = False
            if time.monotonic() - started >= HEALTHY_RUN_S:
                backoff = INITIAL_BACKOFF_S
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            self.restarts += 1
            self._restarts_metric.inc()
            log.warning("background_task_restarted", task=self.name, restarts=self.restarts)

    async def stop(self) -> None:
        """Cancel the task and wait for it to end."""
        self._running = False
        task = self._task
        if task is None:
            return
        # Cancel again until it ends: a library may swallow one cancellation (redis-py's
        # pub/sub read does, when the cancel lands while it reconnects), which would hang stop.
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_RETRY_S)
        with contextlib.suppress(asyncio.CancelledError):
            await task
