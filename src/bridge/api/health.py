"""Probes for load balancers and Kubernetes: `/health/live`, `/health/ready`, `/health`."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get

from bridge.health import Check
from bridge.runtime import Runtime


def probe(checks: list[Check]) -> Response[dict[str, Any]]:
    """200 when every check passes, else 503 naming the failing ones."""
    failing = [c.name for c in checks if not c.ok]
    body = {
        "status": "fail" if failing else "ok",
        "failing": failing,
        "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
    }
    return Response(body, status_code=503 if failing else 200)


class HealthController(Controller):
    """Liveness, readiness and the detailed report."""

    path = "/health"
    tags = ["operations"]
    opt = {"auth": "public"}

    @get("/live", summary="The process and its event loop are responsive (fails slow)")
    async def live(self, runtime: Runtime) -> Response[dict[str, Any]]:
        return probe(runtime.monitor.liveness())

    @get("/ready", summary="Redis, background tasks and workers are usable (503 otherwise)")
    async def ready(self, runtime: Runtime) -> Response[dict[str, Any]]:
        return probe(await runtime.monitor.readiness())

    @get("/", summary="A report of every component")
    async def report(self, runtime: Runtime) -> dict[str, Any]:
        return await runtime.monitor.report()
