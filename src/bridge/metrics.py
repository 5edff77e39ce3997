"""Every Prometheus metric of bridge, declared in one place.

Conventions: the `bridge_` namespace, base units (seconds), `_total` on counters, and labels
with a small fixed set of values only (transport, reason, outcome, configured model or
provider, Redis command name, route template): never a session, request or connection id.

Each process keeps its own registry and is scraped on its own (`/metrics` of `bridge serve`,
the `BRIDGE_METRICS_PORT` listener of `bridge worker`); Prometheus adds the `instance` label.
Metrics that describe the fleet rather than the process (consumer-group lag, live workers)
are read from Redis when scraped, so every process reports the same value: aggregate them
with `max`, not `sum`.

Hot paths use label children bound once (`SSE`, `WEBSOCKET`, the per-command Redis timers)
so a token costs one counter increment and one histogram observation.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from bridge import __version__

# `_created` series would double every counter and serve no query here
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DELIVERY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FIRST_TOKEN = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
_PROVIDER = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_HTTP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

BUILD = Info("bridge_build", "Version and role of this bridge process.", registry=REGISTRY)

# --- tokens -------------------------------------------------------------------------------
TOKENS_PRODUCED = Counter(
    "bridge_tokens_produced_total",
    "Token deltas received from providers and handed to the stream writer, by model.",
    ["model"],
    registry=REGISTRY,
)
TOKENS_DELIVERED = Counter(
    "bridge_tokens_delivered_total",
    "Token events written to client connections (each connection counts once).",
    ["transport"],
    registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "bridge_time_to_first_token_seconds",
    "From the request's creation (chat/start) to its first token from the provider.",
    ["model"],
    buckets=_FIRST_TOKEN,
    registry=REGISTRY,
)
DELIVERY_LATENCY = Histogram(
    "bridge_token_delivery_latency_seconds",
    "From a token's producer timestamp (StreamEvent.ts) to its write on a client connection.",
    ["transport"],
    buckets=_DELIVERY,
    registry=REGISTRY,
)

# --- connections --------------------------------------------------------------------------
CONNECTIONS_OPEN = Gauge(
    "bridge_connections_open",
    "Client connections (SSE, WebSocket) open on this process.",
    ["transport"],
    registry=REGISTRY,
)
CONNECTIONS_CLOSED = Counter(
    "bridge_connections_closed_total",
    "Client connections ended, by reason; reason=slow_consumer counts slow-client disconnects.",
    ["transport", "reason"],
    registry=REGISTRY,
)

# --- generations and providers ------------------------------------------------------------
GENERATIONS = Counter(
    "bridge_generations_total",
    "Generation attempts that ended on this worker, by outcome: complete, error, cancelled, "
    "taken_over (another worker fenced this one off) or interrupted (Redis failed; the "
    "request stays pending for reclaim).",
    ["outcome"],
    registry=REGISTRY,
)
GENERATIONS_ACTIVE = Gauge(
    "bridge_generations_active", "Generations running on this worker.", registry=REGISTRY
)
PROVIDER_REQUEST_DURATION = Histogram(
    "bridge_provider_request_duration_seconds",
    "One streaming provider call, from the request to its last chunk or its failure.",
    ["provider", "outcome"],
    buckets=_PROVIDER,
    registry=REGISTRY,
)
PROVIDER_ERRORS = Counter(
    "bridge_provider_errors_total",
    "Failed provider calls, by provider and error code (the code clients see).",
    ["provider", "code"],
    registry=REGISTRY,
)

# --- work queue ---------------------------------------------------------------------------
REQUESTS_RECLAIMED = Counter(
    "bridge_requests_reclaimed_total",
    "Requests this worker took over from a silent worker (XAUTOCLAIM).",
    registry=REGISTRY,
)
REQUESTS_DEAD_LETTERED = Counter(
    "bridge_requests_dead_lettered_total",
    "Requests moved to the dead-letter stream, by reason.",
    ["reason"],
    registry=REGISTRY,
)
MALFORMED_ENTRIES = Counter(
    "bridge_malformed_entries_total",
    "Stream entries skipped because they did not decode, by the component that read them "
    "(worker: requests, dead-lettered; fanout and history: events).",
    ["component"],
    registry=REGISTRY,
)
CONSUMER_GROUP_LAG = Gauge(
    "bridge_consumer_group_lag",
    "Requests not yet delivered to any worker (XINFO GROUPS lag); read from Redis when scraped.",
    registry=REGISTRY,
)
CONSUMER_GROUP_PENDING = Gauge(
    "bridge_consumer_group_pending",
    "Requests delivered to a worker and not yet acknowledged; read from Redis when scraped.",
    registry=REGISTRY,
)
WORKERS_LIVE = Gauge(
    "bridge_workers_live",
    "Workers with an unexpired heartbeat in Redis; read when scraped.",
    registry=REGISTRY,
)

# --- Redis --------------------------------------------------------------------------------
REDIS_COMMAND_DURATION = Histogram(
    "bridge_redis_command_duration_seconds",
    "Round trip of one Redis command or pipeline (blocking reads are not timed).",
    ["command"],
    buckets=_FAST,
    registry=REGISTRY,
)
REDIS_ERRORS = Counter(
    "bridge_redis_errors_total",
    "Redis commands that failed, by command and error class.",
    ["command", "error"],
    registry=REGISTRY,
)

# --- this process -------------------------------------------------------------------------
READY = Gauge(
    "bridge_ready",
    "1 when this process's readiness checks pass (evaluated when scraped), else 0.",
    registry=REGISTRY,
)
BACKGROUND_TASK_RESTARTS = Counter(
    "bridge_background_task_restarts_total",
    "Restarts of crashed background tasks (fan-out reader, worker, monitor).",
    ["task"],
    registry=REGISTRY,
)
EVENT_LOOP_LAG = Gauge(
    "bridge_event_loop_lag_seconds",
    "How late the health monitor's last periodic tick ran: a busy or blocked event loop.",
    registry=REGISTRY,
)
HTTP_REQUEST_DURATION = Histogram(
    "bridge_http_request_duration_seconds",
    "Non-streaming HTTP requests by method, route template and status (SSE and /metrics "
    "are excluded: a stream's duration is its lifetime).",
    ["method", "route", "status"],
    buckets=_HTTP,
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "bridge_batch_size_requests",
    "Requests per batch run by the micro-batching /generate backend.",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
    registry=REGISTRY,
)
BATCH_QUEUE_WAIT = Histogram(
    "bridge_batch_queue_wait_seconds",
    "How long a /generate request waited before its batch started.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)


class TransportMeter:
    """Children of the per-transport metrics, bound once."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.open = CONNECTIONS_OPEN.labels(transport)
        self._delivered = TOKENS_DELIVERED.labels(transport)
        self._latency = DELIVERY_LATENCY.labels(transport)

    def opened(self) -> None:
        """Count a connection that opened."""
        self.open.inc()

    def delivered(self, timestamps_ms: Iterable[float], *, live: bool = True) -> None:
        """Count token events just written to a client, observing each live one's latency.

        Replayed history (`live=False`) is counted but not timed: its age is not a delay.
        Producer and server clocks may differ by a little; a negative latency counts as 0.
        """
        if not live:
            count = sum(1 for _ in timestamps_ms)
        else:
            now_ms = time.time() * 1000.0
            count = 0
            for ts in timestamps_ms:
                count += 1
                self._latency.observe(max(now_ms - ts, 0.0) / 1000.0)
        if count:
            self._delivered.inc(count)

    def closed(self, reason: str) -> None:
        """Count a connection that ended, and one fewer open."""
        self.open.dec()
        CONNECTIONS_CLOSED.labels(self.transport, reason).inc()


SSE = TransportMeter("sse")
WEBSOCKET = TransportMeter("websocket")
_METERS = {"sse": SSE, "ws": WEBSOCKET, "websocket": WEBSOCKET}


def transport_meter(transport: str) -> TransportMeter:
    """The meter of a connection's transport (`Subscriber.transport`)."""
    return _METERS[transport]


GENERATION_OUTCOMES = ("complete", "error", "cancelled", "taken_over", "interrupted")
for _outcome in GENERATION_OUTCOMES:  # present at 0 from the start, so rate() and alerts work
    GENERATIONS.labels(_outcome)


def set_build_info(role: str) -> None:
    """Record this process's version and role (`api`, `api+worker` or `worker`)."""
    BUILD.info({"version": __version__, "role": role})


#: the classic text format, which every Prometheus 2.x and 3.x scrapes (the server adds charset)
CONTENT_TYPE = "text/plain; version=0.0.4"


def render() -> bytes:
    """The registry in Prometheus text format (`CONTENT_TYPE`)."""
    return generate_latest(REGISTRY)
