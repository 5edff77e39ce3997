"""The floor: what the same machine does without the bridge, measured in the same run.

- `upstream_floor`: the load generator reads the fake upstream directly, as many streams at
  the same rate as the scenario delivers; its added latency is the cost of the fake, the
  loopback and the load generator, which every bridge figure also contains.
- `redis_floor`: XADD -> blocking XREAD wake-up latency with the client library the bridge
  uses (redis-py, asyncio, hiredis), one multiplexed reader over many streams, like the
  bridge's fan-out reader.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from bench.loadgen import ClientStats, UpstreamConnection, now_us, open_stream, post_request
from bench.progress import Progress
from bench.stack import HOST, KEY_PREFIX, Meter, Stack
from bench.stats import curve_us, summarize_us
from bridge.redis_select import make_client
from bridge.settings import Settings

FLOOR_TOKENS = 50  # latency does not depend on the length of a stream: keep the floor short
_SLACK_S = 30.0


async def upstream_floor(
    stack: Stack, streams: int, rate: float, progress: Progress
) -> dict[str, Any]:
    """Added latency reading `streams` stamped upstream streams directly at `rate` tok/s."""
    body = {
        "model": f"bench?tokens={FLOOR_TOKENS}&delay_ms={1000.0 / rate:g}&stamp=1",
        "stream": True,
        "messages": [{"role": "user", "content": "floor"}],
    }
    request = post_request(f"{HOST}:{stack.upstream_port}", "/v1/chat/completions", body)
    clients = [ClientStats(FLOOR_TOKENS) for _ in range(streams)]
    progress.watch(clients)
    progress.phase = "floor: upstream"
    meter = Meter(stack.processes())
    limit = asyncio.Semaphore(256)

    async def read(stats: ClientStats) -> None:
        async with limit:
            await open_stream(HOST, stack.upstream_port, lambda: UpstreamConnection(request, stats))

    await asyncio.gather(*(read(c) for c in clients))
    async with asyncio.timeout(FLOOR_TOKENS / rate + _SLACK_S):
        await asyncio.gather(*(c.done.wait() for c in clients))
    cpu, _ = meter.stop()
    latencies = [us for c in clients for us in c.latencies_us]
    delivered = sum(c.received for c in clients)
    return {
        "streams": streams,
        "added_ms": summarize_us(latencies),
        "lost": sum(c.lost for c in clients),
        "cpu_us_per_token": {
            name: round(cpu[name] * 1e6 / max(delivered, 1), 1) for name in ("upstream", "loadgen")
        },
        "curve": curve_us(latencies),
    }


async def redis_floor(
    stack: Stack, streams: int, rate: float, progress: Progress, seconds: float = 2.0
) -> dict[str, Any]:
    """XADD -> XREAD BLOCK wake-up latency: `streams` writers at `rate`/s, one reader."""
    assert stack.redis_server is not None
    progress.phase = "floor: redis"
    progress.watch([])
    settings = Settings.from_env({})
    writer = make_client(stack.redis_server.url, settings)
    reader = make_client(stack.redis_server.url, settings, socket_timeout=10.0)
    run = uuid.uuid4().hex[:8]
    keys = [f"{KEY_PREFIX}floor:{run}:{i}" for i in range(streams)]
    per_stream = max(int(seconds * rate), 1)
    total = per_stream * streams
    latencies: list[int] = []

    async def read() -> None:
        positions: dict[Any, Any] = dict.fromkeys((k.encode() for k in keys), b"0-0")
        while len(latencies) < total:
            result: Any = await reader.xread(positions, count=500, block=2000)
            received = now_us()
            for key, entries in result or ():
                positions[key] = entries[-1][0]
                latencies.extend(received - int(fields[b"w"]) for _, fields in entries)

    async def write(key: str, offset: float) -> None:
        start = time.monotonic() + offset
        for i in range(per_stream):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await writer.xadd(key, {"w": now_us()})

    try:
        reading = asyncio.create_task(read())
        await asyncio.sleep(0.05)  # let the reader block first
        async with asyncio.timeout(seconds + _SLACK_S):
            await asyncio.gather(*(write(k, i / rate / streams) for i, k in enumerate(keys)))
            await reading
    finally:
        reading.cancel()
        await writer.delete(*keys)
        await writer.aclose()
        await reader.aclose()
    return {"streams": streams, "added_ms": summarize_us(latencies), "curve": curve_us(latencies)}
