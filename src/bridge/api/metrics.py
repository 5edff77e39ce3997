"""`GET /metrics`: this process's metrics in Prometheus text format."""

from __future__ import annotations

from litestar import Response, get

from bridge import metrics
from bridge.runtime import Runtime


# public like the probes: scrapers carry no API key; restrict it at the network if needed
@get(
    "/metrics",
    summary="Prometheus metrics of this process",
    tags=["operations"],
    opt={"auth": "public"},
)
async def metrics_endpoint(runtime: Runtime) -> Response[bytes]:
    """Refresh the gauges read from Redis (bounded by a short timeout), then render."""
    await runtime.monitor.refresh_metrics()
    return Response(metrics.render(), media_type=metrics.CONTENT_TYPE)
