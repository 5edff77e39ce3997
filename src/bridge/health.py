"""The health monitor: liveness, readiness, a report of every component, and housekeeping.

- Liveness fails slow: only when the event loop has not run the monitor's tick for
  `LIVE_STALL_S` (blocked or starved), never because of Redis or workers, so an outage
  elsewhere does not make Kubernetes restart healthy processes.
- Readiness fails fast: Redis must answer within `READY_REDIS_TIMEOUT_S`, this process's
  background tasks must be running, a worker heartbeat must exist, and the process must not
  be shutting down. Failing checks are named.
- Its periodic tick measures event-loop lag and closes connections whose writer has been
  stuck in a send for too long (the client stopped reading), and removes any closed
  connection that its writer failed to unregister.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from redis.exceptions import RedisError, ResponseError

from bridge import metrics
from bridge.errors import CloseReason

if TYPE_CHECKING:
    from bridge.runtime import Runtime

log = structlog.get_logger("bridge.health")

READY_REDIS_TIMEOUT_S = 0.5
REPORT_REDIS_TIMEOUT_S = 1.0
TICK_S = 1.0
LIVE_STALL_S = 30.0
MIN_STALL_S = 30.0


class Check(msgspec.Struct, frozen=True):
    """One named health condition."""

    name: str
    ok: bool
    detail: str = ""


class HealthMonitor:
    """Answers the probes from the state of one runtime and keeps its connections tidy."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self.last_tick = time.monotonic()
        self.loop_lag_s = 0.0
        # a healthy writer asks for more at least once per heartbeat
        self.stall_after_s = max(3 * runtime.settings.sse_heartbeat_s, MIN_STALL_S)

    async def run(self) -> None:
        """Tick every `TICK_S` until cancelled: measure loop lag, sweep connections."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            self.loop_lag_s = max(loop.time() - expected, 0.0)
            metrics.EVENT_LOOP_LAG.set(self.loop_lag_s)
            self.last_tick = time.monotonic()
            self.sweep(self.last_tick)

    def sweep(self, now: float) -> int:
        """Close stalled connections and drop leaked ones; returns how many were closed."""
        manager = self._runtime.manager
        closed = 0
        for sub in manager.connections():
            idle = now - sub.last_progress
            if idle <= self.stall_after_s:
                continue
            if sub.closed is None:
                log.info("connection_stalled", connection_id=sub.id, idle_s=round(idle, 1))
                sub.close(CloseReason.STALLED)
                closed += 1
            elif idle > 2 * self.stall_after_s:  # its writer should have unregistered it
                log.warning("connection_leaked", connection_id=sub.id, reason=sub.closed.value)
                manager.disconnect(sub)
        return closed

    def liveness(self) -> list[Check]:
        """The event loop runs the monitor's tick (fails only after `LIVE_STALL_S`)."""
        since = time.monotonic() - self.last_tick
        detail = f"last tick {since:.1f} s ago, lag {self.loop_lag_s * 1000:.1f} ms"
        return [Check("event_loop", since < LIVE_STALL_S, detail)]

    async def readiness(self) -> list[Check]:
        """Everything that must hold for this process to take traffic; fails fast."""
        return self._checks(await self.cluster_state(READY_REDIS_TIMEOUT_S))

    def _checks(self, cluster: dict[str, Any]) -> list[Check]:
        runtime = self._runtime
        checks = [
            Check("accepting", not runtime.stopping, "shutting down" if runtime.stopping else "")
        ]
        if "error" in cluster:
            checks.append(Check("redis", False, cluster["error"]))
            checks.append(Check("workers", False, "unknown: Redis did not answer"))
        else:
            live = len(cluster["workers"])
            checks.append(Check("redis", True, f"{cluster['latencyMs']} ms"))
            checks.append(Check("workers", live > 0, f"{live} live"))
        for task in runtime.tasks:
            detail = f"{task.restarts} restarts" + (
                f", last error: {task.last_error}" if task.last_error else ""
            )
            checks.append(Check(task.name, task.alive, detail))
        return checks

    async def refresh_metrics(self) -> None:
        """Update the gauges read from Redis and from this process, before a scrape."""
        runtime = self._runtime
        cluster = await self.cluster_state(READY_REDIS_TIMEOUT_S)
        metrics.READY.set(1 if all(c.ok for c in self._checks(cluster)) else 0)
        if runtime.worker is not None:
            metrics.GENERATIONS_ACTIVE.set(runtime.worker.active)
        workers = cluster.get("workers")
        metrics.WORKERS_LIVE.set(len(workers) if workers is not None else math.nan)
        group = cluster.get("requests") or {}
        for gauge, field in (
            (metrics.CONSUMER_GROUP_LAG, "lag"),
            (metrics.CONSUMER_GROUP_PENDING, "pending"),
        ):
            value = group.get(field)
            gauge.set(value if isinstance(value, int) else math.nan)

    async def cluster_state(self, timeout_s: float) -> dict[str, Any]:
        """Redis latency, live worker heartbeats and the request group's lag and pending
        count; `{"error": ...}` when Redis does not answer within `timeout_s`."""
        runtime, keys = self._runtime, self._runtime.keys
        state: dict[str, Any] = {}
        try:
            async with asyncio.timeout(timeout_s):
                started = time.perf_counter()
                await runtime.redis.ping()
                state["latencyMs"] = round((time.perf_counter() - started) * 1000, 3)
                beats: list[Any] = await runtime.redis.zrangebyscore(
                    keys.workers, time.time(), "+inf", withscores=True
                )
                now = time.time()
                state["workers"] = [
                    {"name": name.decode(), "expiresInS": round(expiry - now, 2)}
                    for name, expiry in beats
                ]
                state["requests"] = await self._group_state()
        except (TimeoutError, RedisError, OSError) as exc:
            state["error"] = type(exc).__name__
        return state

    async def report(self) -> dict[str, Any]:
        """A JSON-able report of every component (for humans and dashboards)."""
        runtime = self._runtime
        cluster = await self.cluster_state(REPORT_REDIS_TIMEOUT_S)
        checks = [*self.liveness(), *self._checks(cluster)]
        report: dict[str, Any] = {
            "status": "ok" if all(c.ok for c in checks) else "degraded",
            "stopping": runtime.stopping,
            "checks": msgspec.to_builtins(checks),
            "redis": {
                "source": runtime.redis_choice.source,
                "server": runtime.redis_choice.server,
                "version": runtime.redis_choice.version,
                **{k: cluster[k] for k in ("latencyMs", "error") if k in cluster},
            },
            "workers": cluster.get("workers"),
            "requests": cluster.get("requests"),
            "connections": {
                "open": runtime.manager.connection_count,
                "sessions": runtime.manager.session_count,
                "lingeringSessions": runtime.manager.lingering_count,
                "slowConsumerCloses": runtime.manager.overflows,
            },
            "eventLoop": {"lagMs": round(self.loop_lag_s * 1000, 3)},
            "tasks": {
                t.name: {"alive": t.alive, "restarts": t.restarts, "lastError": t.last_error}
                for t in runtime.tasks
            },
        }
        if runtime.batcher is not None:
            report["batching"] = runtime.batcher.stats.report()
        if runtime.worker is not None:
            report["localWorker"] = {
                "name": runtime.worker.name,
                "active": runtime.worker.active,
                "accepting": runtime.worker.accepting,
                "completed": runtime.worker.completed,
            }
        return report

    async def _group_state(self) -> dict[str, Any]:
        keys = self._runtime.keys
        try:
            groups = await self._runtime.redis.xinfo_groups(keys.requests)
        except ResponseError:  # no request stream yet
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
