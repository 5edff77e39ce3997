"""The scenarios S1-S5 and the runs they are made of.

A token run opens every SSE connection first (tokens are minted with the bench's stream
secret, as `chat/start` would), then starts one generation per session and reads until every
client saw `complete`. CPU is metered from the first `chat/start` to the last `complete`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from dataclasses import dataclass, replace
from typing import Any

from bench.loadgen import (
    ClientStats,
    SSEConnection,
    get_request,
    now_us,
    open_stream,
    post_json,
)
from bench.progress import Progress
from bench.stack import HOST, WARM_UP, Meter, Stack, model_name
from bench.stats import curve_us, summarize_us

P99_LIMIT_MS = 250.0  # S3: a step passes with p99 added latency at most this, and no loss
# S3: ... and with the answers generated at 90% of their rate or more. Added latency starts at
# the upstream's write, so an upstream starved of CPU (it shares the machine) lowers the load
# it offers without raising the latency: a step that ran slower than asked did not pass.
PACE_LIMIT = 0.9
# S3: ... and with nearly all its sessions streaming at once (the starts take time too).
CONCURRENT_LIMIT = 0.9
_OPEN_CONCURRENCY = 256
_START_CONCURRENCY = 64
_SLACK_S = 30.0


@dataclass(frozen=True)
class Shape:
    """Sessions x connections, each generation `tokens` long at `rate` tokens per second."""

    sessions: int
    connections: int
    tokens: int
    rate: float
    drop_after: int | None = None  # resume: each connection leaves after this many tokens
    pause_s: float = 0.1  # resume: how long a dropped client stays away


@dataclass(frozen=True)
class Scenario:
    """One named scenario: a token run, a ramp of token runs, or idle connections."""

    name: str
    title: str
    kind: str  # "tokens" | "ramp" | "idle"
    shape: Shape
    steps: tuple[int, ...] = ()
    idle_connections: int = 0
    hold_s: float = 0.0


SCENARIOS = {
    "S1": Scenario("S1", "latency", "tokens", Shape(50, 1, 200, 50)),
    "S2": Scenario("S2", "fan-out", "tokens", Shape(20, 25, 200, 20)),
    "S3": Scenario("S3", "ramp", "ramp", Shape(50, 1, 100, 50), steps=(50, 100, 200, 400, 800)),
    "S4": Scenario("S4", "resume", "tokens", Shape(50, 1, 200, 50, drop_after=50)),
    "S5": Scenario("S5", "idle", "idle", Shape(0, 1, 1, 1), idle_connections=2000, hold_s=16.0),
}

#: a few sessions and tokens per scenario: seconds, for CI
SMOKE = {
    "S1": replace(SCENARIOS["S1"], shape=Shape(2, 1, 5, 100)),
    "S2": replace(SCENARIOS["S2"], shape=Shape(2, 3, 5, 100)),
    "S3": replace(SCENARIOS["S3"], shape=Shape(2, 1, 5, 100), steps=(2, 4)),
    "S4": replace(SCENARIOS["S4"], shape=Shape(2, 1, 10, 100, drop_after=3)),
    "S5": replace(SCENARIOS["S5"], idle_connections=20, hold_s=1.0),
}


def shapes_of(scenarios: list[Scenario]) -> list[tuple[int, float]]:
    """Every (tokens, rate) the bridge needs a model for."""
    return [(s.shape.tokens, s.shape.rate) for s in scenarios if s.kind != "idle"]


async def run_tokens(stack: Stack, shape: Shape, progress: Progress) -> dict[str, Any]:
    """One token run; returns its latency, correctness and CPU figures."""
    run = uuid.uuid4().hex[:8]
    sessions = [f"bench-{run}-{i}" for i in range(shape.sessions)]
    clients = {s: [ClientStats(shape.tokens) for _ in range(shape.connections)] for s in sessions}
    everyone = list(itertools.chain.from_iterable(clients.values()))
    progress.watch(everyone)
    progress.phase = "connect"
    limit = asyncio.Semaphore(_OPEN_CONCURRENCY)

    async def connect(session: str, stats: ClientStats, resume: str = "") -> SSEConnection:
        headers = {"Last-Event-ID": resume} if resume else None
        request = get_request(f"{HOST}:{stack.bridge_port}", stack.stream_path(session), headers)
        async with limit:
            conn = await open_stream(
                HOST,
                stack.bridge_port,
                lambda: SSEConnection(
                    request, stats, stop_after=None if resume else shape.drop_after
                ),
            )
        assert isinstance(conn, SSEConnection)
        if conn.status != 200:
            stats.finish(False, f"HTTP {conn.status} on connect")
        return conn

    pairs = [(s, c) for s in sessions for c in clients[s]]
    first = await asyncio.gather(*(connect(s, c) for s, c in pairs))
    reconnects: list[tuple[int, SSEConnection]] = []

    async def resume(session: str, conn: SSEConnection) -> None:
        await conn.closed
        if conn.stats.done.is_set():
            return
        await asyncio.sleep(shape.pause_s)  # the tab stays away a moment, as after a drop
        started = now_us()
        reconnects.append((started, await connect(session, conn.stats, conn.last_event_id)))

    resumers = (
        [asyncio.create_task(resume(s, c)) for (s, _), c in zip(pairs, first, strict=True)]
        if shape.drop_after
        else []
    )
    meter = Meter(stack.processes())
    progress.phase = "stream"
    posted: dict[str, int] = {}
    starts = asyncio.Semaphore(_START_CONCURRENCY)

    async def start(session: str) -> None:
        body = {"sessionId": session, "modelId": model_name(shape.tokens, shape.rate)}
        async with starts:
            posted[session] = now_us()
            status, answer = await post_json(
                HOST, stack.bridge_port, "/api/chat/start", body | {"prompt": "bench"}
            )
        if status != 202:
            for stats in clients[session]:
                stats.finish(False, f"chat/start HTTP {status}: {answer}")

    await asyncio.gather(*(start(s) for s in sessions))
    timeout = shape.tokens / shape.rate + shape.sessions * 0.02 + _SLACK_S
    with contextlib.suppress(TimeoutError):  # whoever did not finish counts as incomplete
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(c.done.wait() for c in everyone))
    cpu, wall = meter.stop()
    for task in resumers:
        task.cancel()
    for conn in [*first, *(c for _, c in reconnects)]:
        conn.close()
    return _token_figures(shape, clients, posted, reconnects, cpu, wall)


def _token_figures(
    shape: Shape,
    clients: dict[str, list[ClientStats]],
    posted: dict[str, int],
    reconnects: list[tuple[int, SSEConnection]],
    cpu: dict[str, float],
    wall: float,
) -> dict[str, Any]:
    everyone = [c for group in clients.values() for c in group]
    delivered = sum(c.received for c in everyone)
    latencies = [us for c in everyone for us in c.latencies_us]
    ttft = [
        c.first_token_us - posted[s]
        for s, group in clients.items()
        for c in group
        if c.first_token_us is not None and s in posted
    ]
    anomalies = sorted({a for c in everyone for a in c.anomalies})
    figures: dict[str, Any] = {
        "sessions": shape.sessions,
        "connections": shape.sessions * shape.connections,
        "expected": shape.tokens * len(everyone),
        "delivered": delivered,
        "lost": sum(c.lost for c in everyone),
        "duplicates": sum(c.duplicates for c in everyone),
        "out_of_order": sum(c.out_of_order for c in everyone),
        "incomplete": sum(1 for c in everyone if not c.complete),
        "added_ms": summarize_us(latencies),
        # where the time went: after the Redis append (fan-out + SSE), the rest is before it
        "after_append_ms": summarize_us(us for c in everyone for us in c.after_append_us),
        "ttft_ms": summarize_us(ttft),
        "wall_s": round(wall, 3),
        "tokens_per_s": round(delivered / wall, 1) if wall else 0.0,
        "pace": _pace(shape, everyone),
        "concurrent": _concurrent(clients),
        "cpu_us_per_token": _per_token(cpu, delivered),
        "curve": curve_us(latencies),
        "anomalies": anomalies[:10],
    }
    if shape.drop_after:
        firsts = [c.first_token_us - started for started, c in reconnects if c.first_token_us]
        figures["reconnects"] = len(reconnects)
        figures["reconnect_first_token_ms"] = summarize_us(firsts)
    return figures


def _pace(shape: Shape, everyone: list[ClientStats]) -> float:
    """The rate the answers were generated at, as a fraction of the asked rate (the median
    over clients of the nominal time from first to last token over the stamped time)."""
    paces = sorted(
        (c.received - 1) / shape.rate / ((c.last_stamp_us - c.first_stamp_us) / 1e6)
        for c in everyone
        if c.first_stamp_us is not None and c.last_stamp_us > c.first_stamp_us
    )
    return round(paces[len(paces) // 2], 3) if paces else 0.0


def _concurrent(clients: dict[str, list[ClientStats]]) -> int:
    """The most sessions streaming at once (from their first token to their last)."""
    edges: list[tuple[int, int]] = []
    for group in clients.values():
        firsts = [c.first_token_us for c in group if c.first_token_us is not None]
        if firsts:
            edges += [(min(firsts), 1), (max(c.last_token_us for c in group), -1)]
    peak = streaming = 0
    for _, change in sorted(edges):  # at the same instant an end counts before a start
        streaming += change
        peak = max(peak, streaming)
    return peak


def _per_token(cpu: dict[str, float], delivered: int) -> dict[str, float]:
    per = {
        name: round(seconds * 1e6 / delivered, 1) if delivered else 0.0
        for name, seconds in cpu.items()
    }
    per["bridge"] = round(per.get("serve", 0.0) + per.get("worker", 0.0), 1)
    return per


async def warm_up(stack: Stack, progress: Progress) -> None:
    """One short generation through a fresh stack: imports, pools and caches get going."""
    label = progress.phase
    figures = await run_tokens(stack, Shape(2, 1, *WARM_UP), progress)
    if figures["incomplete"]:
        raise RuntimeError(f"the warm-up generation did not complete: {figures['anomalies']}")
    progress.phase = label


def passes_step(figures: dict[str, Any]) -> bool:
    """S3's limit: p99 added latency within the limit, the answers generated at their rate
    with nearly every session streaming at once, nothing lost, repeated or left over."""
    return bool(
        figures["added_ms"]["p99"] <= P99_LIMIT_MS
        and figures["pace"] >= PACE_LIMIT
        and figures["concurrent"] >= CONCURRENT_LIMIT * figures["sessions"]
        and figures["lost"] == 0
        and figures["duplicates"] == 0
        and figures["incomplete"] == 0
    )


async def run_ramp(stack: Stack, scenario: Scenario, progress: Progress) -> dict[str, Any]:
    """S3: grow the session count until a step fails; then try halfway, once."""
    steps: list[dict[str, Any]] = []
    passed, failed = 0, 0
    for sessions in scenario.steps:
        progress.label_step(f"{sessions} sessions")
        figures = await run_tokens(stack, replace(scenario.shape, sessions=sessions), progress)
        ok = passes_step(figures)
        steps.append({"sessions": sessions, "passed": ok, **_step_view(figures)})
        if not ok:
            failed = sessions
            break
        passed = sessions
    if failed and passed and failed - passed > 1:
        middle = (passed + failed) // 2
        progress.label_step(f"{middle} sessions (between)")
        figures = await run_tokens(stack, replace(scenario.shape, sessions=middle), progress)
        ok = passes_step(figures)
        steps.append({"sessions": middle, "passed": ok, **_step_view(figures)})
        passed = middle if ok else passed
    return {"capacity_sessions": passed, "steps": steps}


def _step_view(figures: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "added_ms",
        "lost",
        "duplicates",
        "incomplete",
        "tokens_per_s",
        "pace",
        "concurrent",
        "ttft_ms",
        "cpu_us_per_token",
    )
    return {key: figures[key] for key in keep} | {"curve": figures["curve"]}


async def run_idle(stack: Stack, scenario: Scenario, progress: Progress) -> dict[str, Any]:
    """S5: open many SSE connections with nothing to say, hold them, measure the cost."""
    serve = stack.processes()["serve"]
    rss_before = serve.memory_info().rss
    redis_before = await stack.redis_clients()
    run = uuid.uuid4().hex[:8]
    count = scenario.idle_connections
    stats = [ClientStats(0) for _ in range(count)]
    progress.watch(stats)
    progress.phase = "open"
    opening = Meter(stack.processes())
    started = now_us()

    async def connect(index: int) -> SSEConnection:
        session = f"idle-{run}-{index}"
        request = get_request(f"{HOST}:{stack.bridge_port}", stack.stream_path(session))
        conn = await open_stream(
            HOST, stack.bridge_port, lambda: SSEConnection(request, stats[index])
        )
        assert isinstance(conn, SSEConnection)
        return conn

    results = await asyncio.gather(*(connect(i) for i in range(count)), return_exceptions=True)
    opened = [c for c in results if isinstance(c, SSEConnection) and c.status == 200]
    open_times = [c.opened_us - started for c in opened]
    open_cpu, _ = opening.stop()
    progress.phase = "hold"
    meter = Meter(stack.processes())
    await asyncio.sleep(scenario.hold_s)
    cpu, wall = meter.stop()
    rss_after = serve.memory_info().rss
    redis_during = await stack.redis_clients()
    alive = sum(1 for c in opened if not c.closed.done())
    for conn in opened:
        conn.close()
    return {
        "connections": count,
        "opened": len(opened),
        "refused": count - len(opened),
        "alive_after_hold": alive,
        "open_all_s": round(max(open_times, default=0) / 1e6, 3),
        "open_ms": summarize_us(open_times),
        "open_cpu_us_per_connection": {
            name: round(seconds * 1e6 / max(len(opened), 1), 1)
            for name, seconds in open_cpu.items()
        },
        "memory_kib_per_connection": round(
            (rss_after - rss_before) / 1024 / max(len(opened), 1), 2
        ),
        "redis_clients_before": redis_before,
        "redis_clients_during": redis_during,
        "idle_cpu_percent": {k: round(v / wall * 100, 2) for k, v in cpu.items()},
        "curve": curve_us(open_times),
        "errors": sorted({repr(e)[:120] for e in results if isinstance(e, BaseException)})[:5],
    }
