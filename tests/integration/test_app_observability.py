"""Observability inside one app: request logs and ids, readiness failures, Redis metrics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
from litestar.testing import AsyncTestClient
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from bridge import metrics, supervisor
from bridge.app import create_app
from bridge.redis_select import make_client
from bridge.runtime import Runtime
from bridge.settings import Settings
from bridge.streams.fanout import FanoutReader
from tests.redis_fixtures import free_port

pytestmark = [
    pytest.mark.integration,
    # the handlers' inferred `runtime` dependency is deprecated for Litestar 3 (not ours here)
    pytest.mark.filterwarnings("ignore::litestar.exceptions.LitestarDeprecationWarning"),
]

CAPTURE = [structlog.contextvars.merge_contextvars]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def client(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


async def test_chat_start_logs_one_line_bound_to_the_request(
    client: AsyncTestClient[Any],
) -> None:
    """chat/start logs the queued generation with the request, session and generation ids."""
    with capture_logs(CAPTURE) as logs:
        response = await client.post(
            "/api/chat/start",
            json={"sessionId": "s1", "modelId": "mock", "prompt": "private words"},
            headers={"X-Request-ID": "req-7"},
        )
    assert response.status_code == 202
    assert response.headers["x-request-id"] == "req-7"
    queued = [e for e in logs if e["event"] == "generation_queued"]
    assert queued[0]["http_request_id"] == "req-7"
    assert queued[0]["session_id"] == "s1"
    assert queued[0]["request_id"] == response.json()["requestId"]
    assert "messages" not in queued[0]
    access = [e for e in logs if e["event"] == "http_request"]
    assert access[0]["route"] == "/api/chat/start"
    assert access[0]["status"] == 202
    assert "private words" not in repr(logs)


async def test_prompts_are_logged_only_when_opted_in(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """With BRIDGE_LOG_PROMPTS the queued generation's messages are in its log line."""
    app = create_app(msgspec.structs.replace(settings, log_prompts=True))
    async with AsyncTestClient(app=app) as client:
        with capture_logs(CAPTURE) as logs:
            await client.post(
                "/api/chat/start", json={"sessionId": "s1", "modelId": "mock", "prompt": "hi"}
            )
    queued = [e for e in logs if e["event"] == "generation_queued"]
    assert list(queued[0]["messages"]) == [{"role": "user", "content": "hi"}]


async def test_a_bad_request_id_is_replaced_and_errors_are_timed(
    client: AsyncTestClient[Any],
) -> None:
    """A malformed X-Request-ID gets a fresh one; a 400 is timed under its route template."""
    before = sample(
        "bridge_http_request_duration_seconds_count",
        method="POST",
        route="/api/chat/start",
        status="400",
    )
    response = await client.post(
        "/api/chat/start", content=b"{nope", headers={"X-Request-ID": "bad id with spaces"}
    )
    assert response.status_code == 400
    assert response.headers["x-request-id"] != "bad id with spaces"
    assert len(response.headers["x-request-id"]) == 32
    after = sample(
        "bridge_http_request_duration_seconds_count",
        method="POST",
        route="/api/chat/start",
        status="400",
    )
    assert after == before + 1


async def test_readiness_names_the_failing_checks_when_redis_is_gone(
    client: AsyncTestClient[Any], settings: Settings
) -> None:
    """Redis not answering: readiness is 503 and names redis and workers; liveness stays 200."""
    runtime: Runtime = client.app.state.runtime
    assert (await client.get("/health/ready")).status_code == 200
    healthy = runtime.redis
    runtime.redis = make_client(f"redis://127.0.0.1:{free_port()}/0", settings, retries=0)
    try:
        ready = await client.get("/health/ready")
        live = await client.get("/health/live")
        scraped = await client.get("/metrics")
    finally:
        await runtime.redis.aclose()
        runtime.redis = healthy
    assert ready.status_code == 503
    assert set(ready.json()["failing"]) == {"redis", "workers"}
    assert live.status_code == 200
    assert "bridge_ready 0.0" in scraped.text
    assert "bridge_consumer_group_lag NaN" in scraped.text


async def test_readiness_names_a_crashed_background_task(
    settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fan-out reader that crashed (and waits to restart) makes readiness 503, naming it."""
    crashed = threading.Event()

    async def crash(self: FanoutReader) -> None:
        crashed.set()
        raise RuntimeError("reader broke")

    monkeypatch.setattr(FanoutReader, "run", crash)
    monkeypatch.setattr(supervisor, "INITIAL_BACKOFF_S", 60.0)
    async with AsyncTestClient(app=create_app(settings)) as client:
        assert await asyncio.to_thread(crashed.wait, 10)
        ready = await client.get("/health/ready")
        report = (await client.get("/health")).json()
    assert ready.status_code == 503
    assert ready.json()["failing"] == ["fanout-reader"]
    assert "RuntimeError: reader broke" in ready.json()["checks"]["fanout-reader"]["detail"]
    assert report["status"] == "degraded"
    assert report["tasks"]["fanout-reader"]["alive"] is False


async def test_redis_commands_are_timed_and_failures_counted_by_command(
    settings: Settings, redis: aioredis.Redis, key_prefix: str
) -> None:
    """Every client times commands and pipelines; errors count, expected replies do not."""
    key = f"{key_prefix}k"
    before = sample("bridge_redis_command_duration_seconds_count", command="SET")
    before_pipe = sample("bridge_redis_command_duration_seconds_count", command="PIPELINE")
    before_err = sample("bridge_redis_errors_total", command="LPUSH", error="ResponseError")
    before_busy = sample(
        "bridge_redis_errors_total", command="XGROUP CREATE", error="ResponseError"
    )
    await redis.set(key, "v")
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(key)
        pipe.get(key)
        await pipe.execute()
    with pytest.raises(ResponseError):
        await redis.lpush(key, "x")  # WRONGTYPE
    await redis.xgroup_create(f"{key}:s", "g", id="0", mkstream=True)
    with pytest.raises(ResponseError, match="BUSYGROUP"):
        await redis.xgroup_create(f"{key}:s", "g", id="0")
    await redis.xread({f"{key}:s": "$"}, block=1)
    assert sample("bridge_redis_command_duration_seconds_count", command="SET") == before + 1
    assert sample("bridge_redis_command_duration_seconds_count", command="PIPELINE") == (
        before_pipe + 1
    )
    assert sample("bridge_redis_errors_total", command="LPUSH", error="ResponseError") == (
        before_err + 1
    )
    assert sample("bridge_redis_errors_total", command="XGROUP CREATE", error="ResponseError") == (
        before_busy
    )
    assert sample("bridge_redis_command_duration_seconds_count", command="XREAD") == 0
