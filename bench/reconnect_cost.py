"""What a reconnect costs the bridge, without the noise of a stream running beside it.

`python -m bench.reconnect_cost` starts the bench's stack (private Redis, fake upstream,
`bridge serve --no-worker` + `bridge worker`), finishes one generation in each of `--sessions`
sessions, and notes every session's cursor a few tokens before the end (a tab that dropped
just before the answer finished). Then it reconnects with `Last-Event-ID`:

- one at a time, `--rounds` times per session: first token after the reconnect, and serve CPU
  per reconnect (the catch-up, the route, the access log);
- in bursts of all sessions at once, `--rounds` times: the same figures when every tab comes
  back together (S4's shape, after a network blip or a deploy).

S4 reports the burst while 2,400 tokens/s stream, which makes its figure swing by a factor of
three from run to run; this one isolates what the reconnect itself costs.

`--recent-s` sets the bridge's `BRIDGE_SSE_RECENT_S`: `0` makes every catch-up read Redis, a
window longer than the run makes every one come from memory (the generations finished before
the reconnects start, so the default 5 s covers only the first of them). The table says how
many catch-ups each source answered (`bridge_catch_ups_total`).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import httpx

from bench.loadgen import ClientStats, SSEConnection, get_request, now_us, open_stream, post_json
from bench.stack import HOST, Meter, Stack, model_name
from bench.stats import summarize_us

TOKENS = 200
RATE = 2000.0  # tokens per second: the generations only set the scene


async def _stream(
    stack: Stack, session: str, *, resume: str = "", stop_after: int | None
) -> SSEConnection:
    headers = {"Last-Event-ID": resume} if resume else None
    request = get_request(f"{HOST}:{stack.bridge_port}", stack.stream_path(session), headers)
    stats = ClientStats(TOKENS)
    conn = await open_stream(
        HOST, stack.bridge_port, lambda: SSEConnection(request, stats, stop_after=stop_after)
    )
    assert isinstance(conn, SSEConnection)
    return conn


async def _finish_generation(stack: Stack, session: str) -> None:
    conn = await _stream(stack, session, stop_after=None)
    body = {"sessionId": session, "modelId": model_name(TOKENS, RATE), "prompt": "bench"}
    status, answer = await post_json(HOST, stack.bridge_port, "/api/chat/start", body)
    if status != 202:
        raise RuntimeError(f"chat/start answered {status}: {answer}")
    async with asyncio.timeout(60):
        await conn.stats.done.wait()
    conn.close()


async def _cursor(stack: Stack, session: str, behind: int) -> str:
    conn = await _stream(stack, session, stop_after=TOKENS - behind)
    async with asyncio.timeout(30):
        await conn.closed
    cursor: str = conn.last_event_id
    return cursor


async def _reconnect(stack: Stack, session: str, cursor: str) -> int:
    """Microseconds from opening the connection to the first token it receives."""
    started = now_us()
    conn = await _stream(stack, session, resume=cursor, stop_after=1)
    async with asyncio.timeout(30):
        await conn.closed
    if conn.first_token_us is None:
        raise RuntimeError(f"no token after reconnecting {session}: HTTP {conn.status}")
    return conn.first_token_us - started


async def _catch_ups(stack: Stack) -> dict[str, int]:
    """bridge_catch_ups_total by source, from the bridge's /metrics."""
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{stack.bridge_port}") as client:
        text = (await client.get("/metrics")).text
    found = {}
    for line in text.splitlines():
        if line.startswith('bridge_catch_ups_total{source="'):
            labels, value = line.rsplit(" ", 1)
            found[labels.split('"')[1]] = int(float(value))
    return found


def _since(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {source: count - before.get(source, 0) for source, count in now.items()}


async def measure(
    sessions: int, rounds: int, behind: int, recent_s: float | None = None
) -> dict[str, dict[str, Any]]:
    settings = {} if recent_s is None else {"BRIDGE_SSE_RECENT_S": str(recent_s)}
    with tempfile.TemporaryDirectory(prefix="bench-reconnect-") as logs:
        stack = Stack(log_dir=Path(logs), shapes=[(TOKENS, RATE)], settings=settings)
        await stack.start()
        try:
            names = [f"rc-{i}" for i in range(sessions)]
            await asyncio.gather(*(_finish_generation(stack, s) for s in names))
            cursors = {s: await _cursor(stack, s, behind) for s in names}
            figures = {}
            before = await _catch_ups(stack)
            meter = Meter(stack.processes())
            waits = [await _reconnect(stack, s, cursors[s]) for _ in range(rounds) for s in names]
            cpu, _ = meter.stop()
            figures["one at a time"] = _figures(waits, cpu["serve"])
            after = await _catch_ups(stack)
            figures["one at a time"]["catch_ups"] = _since(after, before)
            meter = Meter(stack.processes())
            waits = []
            for _ in range(rounds):
                waits += await asyncio.gather(*(_reconnect(stack, s, cursors[s]) for s in names))
            cpu, _ = meter.stop()
            burst = figures[f"bursts of {sessions}"] = _figures(waits, cpu["serve"])
            burst["catch_ups"] = _since(await _catch_ups(stack), after)
            return figures
        finally:
            await stack.stop()


def _figures(waits_us: list[int], serve_cpu_s: float) -> dict[str, Any]:
    return {
        "first_token_ms": summarize_us(waits_us),
        "serve_cpu_us_per_reconnect": round(serve_cpu_s * 1e6 / len(waits_us)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconnect_cost", description=__doc__)
    parser.add_argument("--sessions", type=int, default=50, help="sessions (the burst size)")
    parser.add_argument("--rounds", type=int, default=4, help="reconnects per session and mode")
    parser.add_argument("--behind", type=int, default=5, help="tokens the reconnect catches up")
    parser.add_argument(
        "--recent-s", type=float, default=None, help="BRIDGE_SSE_RECENT_S (default: the bridge's)"
    )
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.sessions, args.rounds, args.behind, args.recent_s))
    print("| reconnects | first token p50 ms | p99 ms | serve CPU us per reconnect | catch-ups |")
    print("|---|---|---|---|---|")
    for mode, row in figures.items():
        latency, cpu = row["first_token_ms"], row["serve_cpu_us_per_reconnect"]
        counts = sorted(row["catch_ups"].items())
        sources = ", ".join(f"{n} {source}" for source, n in counts if n)
        print(f"| {mode} | {latency['p50']} | {latency['p99']} | {cpu} | {sources} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
