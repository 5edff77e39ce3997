"""Every Prometheus metric of bridge, declared in one place.

Conventions: the `bridge_` namespace, base units (seconds), `_total` on counters, and labels
with a small fixed set of values only (transport, reason, outcome, configured model or
provider, Redis command name, route template): never a session, request or connection id.

Each process keeps its own registry and is scraped on its own (`/metrics` of `bridge serve`,
the `BRIDGE_METRICS_PORT` listener of `bridge worker`); Prometheus adds the `instance` label.
Metrics that describe the fleet rather than the process (consumer-group lag, live workers)
are read from Redis when scraped, so every process reports the same value: aggregate them
with `max`, not `sum`.

Hot paths use label children bound once (the per-command Redis timers); the per-token
delivery figures of `SSE` and `WEBSOCKET` are plain numbers exported by a collector (see
`TransportMeter`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable
from itertools import accumulate

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from bridge import __version__

# `_created` series would double every counter and serve no query here
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_DELIVERY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_DELIVERY_LE = (*map(str, _DELIVERY), "+Inf")  # as prometheus_client writes them
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
TIME_TO_FIRST_TOKEN = Histogram(
    "bridge_time_to_first_token_seconds",
    "From the request's creation (chat/start) to its first token from the provider.",
    ["model"],
    buckets=_FIRST_TOKEN,
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
CATCH_UPS = Counter(
    "bridge_catch_ups_total",
    "Catch-up reads of stream connections (a push stream reads again when entries arrived "
    "during its read), by source: memory (the entries this process holds of the session's "
    "recent past cover the cursor: no Redis read) or redis.",
    ["source"],
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
    """The per-transport connection metrics, and the delivery figures kept as plain numbers.

    `delivered` runs once per token per connection (10,000 times a second in S2), and
    prometheus_client's metric children take a lock per update: 2.2 us per token against
    0.4 us with plain numbers, which `DeliveryCollector` turns into
    `bridge_tokens_delivered_total` and `bridge_token_delivery_latency_seconds` when scraped.
    Every update runs on the event loop's thread, so nothing is lost without the lock.
    """

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.open = CONNECTIONS_OPEN.labels(transport)
        self.delivered_total = 0
        self.latency_buckets = [0] * (len(_DELIVERY) + 1)  # per bucket; the last is +Inf
        self.latency_sum = 0.0

    def opened(self) -> None:
        """Count a connection that opened."""
        self.open.inc()

    def delivered(self, timestamps_ms: Iterable[float], *, live: bool = True) -> None:
        """Count token events just written to a client, observing each live one's latency.

        Replayed history (`live=False`) is counted but not timed: its age is not a delay.
        Producer and server clocks may differ by a little; a negative latency counts as 0.
        """
        if not live:
            self.delivered_total += sum(1 for _ in timestamps_ms)
            return
        now_ms = time.time() * 1000.0
        buckets = self.latency_buckets
        count = 0
        total = 0.0
        for ts in timestamps_ms:
            seconds = max(now_ms - ts, 0.0) / 1000.0
            buckets[bisect_left(_DELIVERY, seconds)] += 1
            total += seconds
            count += 1
        self.latency_sum += total
        self.delivered_total += count

    def closed(self, reason: str) -> None:
        """Count a connection that ended, and one fewer open."""
        self.open.dec()
        CONNECTIONS_CLOSED.labels(self.transport, reason).inc()


SSE = TransportMeter("sse")
WEBSOCKET = TransportMeter("websocket")


class DeliveryCollector(Collector):
    """Exports the delivery figures of the transport meters (see `TransportMeter`)."""

    def __init__(self, meters: Iterable[TransportMeter]) -> None:
        self._meters = tuple(meters)

    def collect(self) -> Iterable[Metric]:
        delivered = CounterMetricFamily(
            "bridge_tokens_delivered",
            "Token events written to client connections (each connection counts once).",
            labels=["transport"],
        )
        latency = HistogramMetricFamily(
            "bridge_token_delivery_latency_seconds",
            "From a token's producer timestamp (StreamEvent.ts) to its write on a client "
            "connection.",
            labels=["transport"],
        )
        for meter in self._meters:
            delivered.add_metric([meter.transport], meter.delivered_total)
            counts = list(meter.latency_buckets)  # one copy: the loop may add meanwhile
            latency.add_metric(
                [meter.transport],
                list(zip(_DELIVERY_LE, accumulate(counts), strict=True)),
                meter.latency_sum,
            )
        yield delivered
        yield latency


REGISTRY.register(DeliveryCollector((SSE, WEBSOCKET)))
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
