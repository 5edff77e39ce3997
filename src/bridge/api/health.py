"""Probes for load balancers and Kubernetes: `/health/live`, `/health/ready`, `/health`."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get

from bridge.health import HealthMonitor
from bridge.runtime import Runtime


class HealthController(Controller):
    """Liveness, readiness and the detailed report."""

    path = "/health"
    tags = ["health"]
    opt = {"auth": "public"}

    @get("/live", summary="The process and its event loop answer")
    async def live(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", summary="Redis, background tasks and workers are usable (503 otherwise)")
    async def ready(self, runtime: Runtime) -> Response[dict[str, Any]]:
        checks = await HealthMonitor(runtime).readiness()
        failing = [c.name for c in checks if not c.ok]
        body = {
            "status": "fail" if failing else "ok",
            "failing": failing,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in checks},
        }
        return Response(body, status_code=503 if failing else 200)

    @get("/", summary="A report of every component")
    async def report(self, runtime: Runtime) -> dict[str, Any]:
        return await HealthMonitor(runtime).report()
