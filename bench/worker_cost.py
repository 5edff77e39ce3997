"""What the worker's per-token path costs, without the API process, the consumer or a client.

`python -m bench.worker_cost` runs the fake upstream as a process and a private Redis, then
streams `--sessions` answers of `--tokens` tokens at once, each paced at `--delay-ms`, through
what a worker runs per token: `OpenAIProvider` (the lean transport, the SSE parsing), the
provider metrics (`metered`) and a `GenerationWriter` whose appends go through the append
script. The figure is this process's CPU per token (user + system): the upstream read, the
parsing, the writer, the appends' round trips, and the event loop's share. Each round starts
fresh generations; the best round is reported (the machine's noise only adds).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.stack import free_port
from bridge.logging import configure_logging
from bridge.providers.base import Delta, Message, ProviderRequest
from bridge.providers.metered import metered
from bridge.providers.openai import OpenAIProvider
from bridge.redis_select import make_client
from bridge.redis_server import EmbeddedRedis
from bridge.settings import Settings
from bridge.streams.codec import EventType
from bridge.streams.keys import Keys
from bridge.streams.processor import GenerationContext
from bridge.streams.producer import StreamProducer


async def _measure(
    base_url: str, sessions: int, tokens: int, delay_ms: float, rounds: int
) -> list[float]:
    server = await EmbeddedRedis().astart()
    settings = Settings.from_env({})
    redis = make_client(server.url, settings)
    provider = OpenAIProvider(base_url, "", 2, 10, max_connections=4096)
    keys = Keys(f"worker-cost-{uuid.uuid4().hex[:8]}:")
    producer = StreamProducer(redis, keys, settings)

    async def answer(session: int, count: int) -> None:
        request_id = uuid.uuid4().hex
        await redis.hset(keys.generation(request_id), mapping={"epoch": 1})
        writer = producer.writer(GenerationContext(f"s{session}", "m", request_id, "w", 1))
        model = f"m?tokens={count}&delay_ms={delay_ms}"
        request = ProviderRequest(model=model, messages=(Message("user", "x"),), params={})
        stream = metered(provider.stream(request), provider="openai", model="m", created_ms=None)
        async for item in stream:
            if isinstance(item, Delta) and item.text:
                await writer.token(item.text)
        await writer.finish(EventType.COMPLETE, {"finishReason": "stop"})
        if writer.tokens != count:  # a figure over lost tokens would flatter
            raise RuntimeError(f"{writer.tokens} of {count} tokens were written")

    try:
        await asyncio.gather(*(answer(s, 3) for s in range(sessions)))  # connections, script
        figures = []
        for _ in range(rounds):
            began = time.process_time()
            await asyncio.gather(*(answer(s, tokens) for s in range(sessions)))
            figures.append((time.process_time() - began) * 1e6 / (sessions * tokens))
        return figures
    finally:
        await provider.aclose()
        await redis.aclose()
        await server.astop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=50, help="answers at once (S1: 50)")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="between tokens (S1: 20)")
    parser.add_argument("--rounds", type=int, default=3, help="the best round is reported")
    args = parser.parse_args()
    configure_logging("json", "info")
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    upstream = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(free_port())],
        stdout=subprocess.PIPE,
    )
    try:
        assert upstream.stdout is not None
        ready = upstream.stdout.readline().decode().strip()
        if not ready.startswith("READY "):
            raise SystemExit(f"the fake upstream did not start: {ready!r}")
        base_url = ready.removeprefix("READY ")
        figures = run(_measure(base_url, args.sessions, args.tokens, args.delay_ms, args.rounds))
    finally:
        upstream.terminate()
        upstream.wait()
    rounds = " / ".join(f"{figure:.1f}" for figure in figures)
    print(f"worker CPU per token: {min(figures):.1f} us (best of {rounds})")


if __name__ == "__main__":
    main()
