"""One real `bridge serve` process configured for the seed systems, shared by a test module.

Import the `seed_server` fixture into a module (`from tests.seed_server import seed_server`).
The server's OpenAI-compatible upstream is a fixed port where a test may run
`FakeUpstream(port=server.upstream_port)` in-process, to see exactly what the bridge sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
import websockets

from bridge.redis_select import make_client
from bridge.settings import Settings
from tests.redis_fixtures import delete_prefixed, free_port
from tests.servers import BridgeProcess, bridge_env, start_bridge, wait_ready

BATCH_WINDOW_MS = 1500
MODELS = "gpt-3.5-turbo=openai:gpt-3.5-turbo,chatgpt=mock:gpt-4o,mock=mock:mock,backup=mock:mock"


@dataclass
class SeedServer:
    """The running server and what tests need to reach around it."""

    process: BridgeProcess
    prefix: str
    upstream_port: int
    redis_url: str

    @property
    def base_url(self) -> str:
        return self.process.base_url

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/ws/"

    def stream(self, name: str) -> str:
        """A seed-000 stream name under the test's prefix."""
        return f"{self.prefix}{name}"

    @contextlib.asynccontextmanager
    async def redis(self) -> AsyncIterator[aioredis.Redis]:
        settings = Settings.from_env({})
        client = make_client(self.redis_url, settings, socket_timeout=30)
        try:
            yield client
        finally:
            await client.aclose()


@pytest.fixture(scope="module")
def seed_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeedServer]:
    """`bridge serve` with a worker, the mock batch model, and seed-000 streams under a prefix."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    upstream_port = free_port()
    env = bridge_env(
        redis_url,
        prefix,
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
        BRIDGE_MODELS=MODELS,
        BRIDGE_SUMMARY_STREAM=f"{prefix}summary_requests",
        BRIDGE_QUESTION_STREAM=f"{prefix}question_requests",
        BRIDGE_RESULTS_STREAM=f"{prefix}llm_results",
        BRIDGE_BATCH_WINDOW_MS=str(BATCH_WINDOW_MS),
        BRIDGE_BATCH_COMMAND=f"{sys.executable} -m bridge.batching.mock_model --delay-ms 100-200",
        BRIDGE_RECLAIM_IDLE_MS="500",
        BRIDGE_JOB_MAX_ATTEMPTS="3",
        BRIDGE_JOB_RESULT_TTL_S="600",
    )
    log_path = tmp_path_factory.mktemp("seed-server") / "serve.log"
    process = start_bridge(["serve"], env, str(log_path))
    try:
        asyncio.run(wait_ready(process))
        yield SeedServer(process, prefix, upstream_port, redis_url)
    finally:
        process.stop()

        async def clean() -> None:
            client = aioredis.Redis.from_url(redis_url)
            await delete_prefixed(client, prefix)  # the seed-000 streams are prefixed too
            await client.aclose()

        asyncio.run(clean())


async def recv(ws: websockets.ClientConnection, timeout: float = 20.0) -> dict[str, Any]:
    """The next message of a WebSocket, decoded; TimeoutError if none comes in time."""
    raw = await asyncio.wait_for(ws.recv(), timeout)
    message: dict[str, Any] = json.loads(raw)
    return message


async def recv_until(
    ws: websockets.ClientConnection, types: set[str], timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Messages up to and including the first whose type is in `types`."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            seen.append(await recv(ws, timeout))
            if seen[-1]["type"] in types:
                return seen
