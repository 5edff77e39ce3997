"""The health monitor: liveness, readiness, and a detailed report of every component."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from redis.exceptions import RedisError

from bridge.runtime import Runtime
from bridge.worker import live_workers

READY_REDIS_TIMEOUT_S = 0.5


class Check(msgspec.Struct, frozen=True):
    """One named readiness condition."""

    name: str
    ok: bool
    detail: str = ""


class HealthMonitor:
    """Answers the probes from the state of one runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def readiness(self) -> list[Check]:
        """Everything that must hold for this process to take traffic; fails fast."""
        runtime = self._runtime
        checks = [
            Check("accepting", not runtime.stopping, "shutting down" if runtime.stopping else "")
        ]
        try:
            async with asyncio.timeout(READY_REDIS_TIMEOUT_S):
                await runtime.redis.ping()
                workers = await live_workers(runtime.redis, runtime.keys)
            checks.append(Check("redis", True))
            checks.append(Check("workers", bool(workers), f"{len(workers)} live"))
        except (TimeoutError, RedisError, OSError) as exc:
            checks.append(Check("redis", False, type(exc).__name__))
        for task in runtime.tasks:
            checks.append(Check(task.name, task.alive, f"{task.restarts} restarts"))
        return checks

    async def report(self) -> dict[str, Any]:
        """A JSON-able report of every component (for humans and dashboards)."""
        runtime = self._runtime
        checks = await self.readiness()
        report: dict[str, Any] = {
            "status": "ok" if all(c.ok for c in checks) else "degraded",
            "checks": msgspec.to_builtins(checks),
            "redis": {
                "source": runtime.redis_choice.source,
                "server": runtime.redis_choice.server,
                "version": runtime.redis_choice.version,
            },
            "connections": {
                "open": runtime.manager.connection_count,
                "sessions": runtime.manager.session_count,
                "slowConsumerCloses": runtime.manager.overflows,
            },
            "tasks": {t.name: {"alive": t.alive, "restarts": t.restarts} for t in runtime.tasks},
        }
        try:
            async with asyncio.timeout(READY_REDIS_TIMEOUT_S * 2):
                started = time.perf_counter()
                await runtime.redis.ping()
                report["redis"]["latencyMs"] = round((time.perf_counter() - started) * 1000, 3)
                report["workers"] = await live_workers(runtime.redis, runtime.keys)
                report["requests"] = await self._group_state()
        except (TimeoutError, RedisError, OSError) as exc:
            report["redis"]["error"] = type(exc).__name__
        if runtime.batcher is not None:
            report["batching"] = runtime.batcher.stats.report()
        if runtime.worker is not None:
            report["localWorker"] = {
                "name": runtime.worker.name,
                "active": runtime.worker.active,
                "completed": runtime.worker.completed,
            }
        return report

    async def _group_state(self) -> dict[str, Any]:
        keys = self._runtime.keys
        try:
            groups = await self._runtime.redis.xinfo_groups(keys.requests)
        except RedisError:
            return {"group": None}
        for group in groups:
            if group["name"].decode() == keys.worker_group:
                return {
                    "group": keys.worker_group,
                    "pending": group["pending"],
                    "lag": group.get("lag"),
                    "consumers": group["consumers"],
                }
        return {"group": None}
