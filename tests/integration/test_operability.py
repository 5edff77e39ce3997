"""Metrics, health and logs of a real fleet: `bridge serve --no-worker` plus `bridge worker`."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.settings import Settings
from tests.faults import upstream_process
from tests.redis_fixtures import delete_prefixed, free_port
from tests.servers import (
    BridgeProcess,
    bridge_env,
    delta,
    open_stream,
    payloads,
    scrape,
    start_bridge,
    start_chat,
    tokens,
    value,
    wait_ready,
)

pytestmark = pytest.mark.integration

API_KEY = "sk-test-0123456789abcdefghij"
MODELS = "gpt-4=openai:gpt-4?tokens=40&delay_ms=2,limited=openai:limited?status=429,mock=mock:mock"
FORBIDDEN_LABELS = {"session", "session_id", "request_id", "connection_id", "user", "path"}


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """A fake OpenAI-compatible upstream in its own process."""
    with upstream_process() as base_url:
        yield base_url


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="module")
def fleet(
    redis_url: str, upstream: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[BridgeProcess, BridgeProcess]]:
    """An API-only process and a worker process with its metrics listener."""
    env = bridge_env(
        redis_url, prefix, OPENAI_BASE_URL=upstream, OPENAI_API_KEY=API_KEY, BRIDGE_MODELS=MODELS
    )
    logs = tmp_path_factory.mktemp("logs")
    api = start_bridge(["serve", "--no-worker"], env, str(logs / "api.log"))
    port = free_port()
    worker = start_bridge(
        ["worker", "--metrics-port", str(port)], env, str(logs / "worker.log"), port=port
    )
    try:
        asyncio.run(_ready(api, worker))
        yield api, worker
    finally:
        codes = [process.stop() for process in (api, worker)]
    assert codes == [0, 0], api.log() + worker.log()

    async def clean() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await delete_prefixed(client, prefix)
        await client.aclose()

    asyncio.run(clean())


async def _ready(*servers: BridgeProcess) -> None:
    for server in servers:
        await wait_ready(server)


@pytest.fixture
async def http(fleet: tuple[BridgeProcess, BridgeProcess]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fleet[0].base_url, timeout=10) as client:
        yield client


def promtool_check(text: str, tmp_path: Path) -> None:
    """`promtool check metrics` accepts the exposition (where promtool is installed)."""
    if shutil.which("promtool") is None:
        return
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


async def test_metrics_after_a_generation(
    fleet: tuple[BridgeProcess, BridgeProcess], http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """One live generation shows up exactly in both processes' metrics, scraped and parsed."""
    api, worker = fleet
    session = f"s_{uuid.uuid4().hex[:10]}"
    warmup = await start_chat(http, session, "mock", params={"mockTokens": 1})
    async with open_stream(api.base_url + warmup["streamUrl"]) as tab:
        await tab.wait_terminal()
        _, api_before = await scrape(api)
        _, worker_before = await scrape(worker)
        started = await start_chat(http, session, "gpt-4")
        await tab.wait_terminal(2)
        api_text, api_after = await scrape(api)
        worker_text, worker_after = await scrape(worker)
    assert len([t for t in tokens(tab.events) if t[0] == started["requestId"]]) == 40

    produced = delta(worker_before, worker_after, "bridge_tokens_produced_total", model="gpt-4")
    assert produced == 40
    assert delta(api_before, api_after, "bridge_tokens_delivered_total", transport="sse") == 40
    latency = "bridge_token_delivery_latency_seconds_count"
    assert delta(api_before, api_after, latency, transport="sse") == 40
    ttft = "bridge_time_to_first_token_seconds_count"
    assert delta(worker_before, worker_after, ttft, model="gpt-4") == 1
    assert delta(worker_before, worker_after, "bridge_generations_total", outcome="complete") == 1
    provider = "bridge_provider_request_duration_seconds_count"
    assert delta(worker_before, worker_after, provider, provider="openai", outcome="ok") == 1
    assert value(api_after, "bridge_connections_open", transport="sse") == 1
    for samples in (api_after, worker_after):
        assert value(samples, "bridge_ready") == 1
        assert value(samples, "bridge_workers_live") >= 1
        assert value(samples, "bridge_consumer_group_lag") == 0
        assert value(samples, "bridge_redis_command_duration_seconds_count", command="PING") > 0
    assert value(worker_after, "bridge_build_info", role="worker", version="0.1.0") == 1

    timed_routes = {
        dict(labels)["route"]
        for name, labels in api_after
        if name == "bridge_http_request_duration_seconds_count"
    }
    assert "/api/chat/start" in timed_routes
    assert not {r for r in timed_routes if r.startswith(("/api/sse", "/metrics"))}
    for name, labels in [*api_after, *worker_after]:
        assert not {key for key, _ in labels} & FORBIDDEN_LABELS, name
        assert session not in {v for _, v in labels}, name
    promtool_check(api_text, tmp_path)
    promtool_check(worker_text, tmp_path)


async def test_provider_errors_are_counted_by_provider_and_code(
    fleet: tuple[BridgeProcess, BridgeProcess], http: httpx.AsyncClient
) -> None:
    """An upstream 429 counts as a provider error with its code (each attempt: the call and
    its retries before the first token) and as one generation error."""
    api, worker = fleet
    _, before = await scrape(worker)
    started = await start_chat(http, f"s_{uuid.uuid4().hex[:10]}", "limited")
    async with open_stream(api.base_url + started["streamUrl"]) as tab:
        await tab.wait_terminal()
    assert payloads(tab.events, "error")[0]["code"] == "provider_rate_limited"
    _, after = await scrape(worker)
    errors = "bridge_provider_errors_total"
    attempts = 1 + Settings().provider_retries
    assert delta(before, after, errors, provider="openai", code="provider_rate_limited") == attempts
    assert delta(before, after, "bridge_generations_total", outcome="error") == 1


async def test_health_report_names_every_component(
    fleet: tuple[BridgeProcess, BridgeProcess],
) -> None:
    """`/health` reports Redis latency, heartbeats, group state, connections and tasks."""
    api, worker = fleet
    async with httpx.AsyncClient(timeout=10) as client:
        api_report = (await client.get(api.base_url + "/health")).json()
        worker_report = (await client.get(worker.base_url + "/health")).json()
        live = await client.get(worker.base_url + "/health/live")
    assert live.status_code == 200
    assert api_report["status"] == "ok"
    assert api_report["redis"]["latencyMs"] >= 0
    assert any(w["expiresInS"] > 0 for w in api_report["workers"])
    assert api_report["requests"]["group"] == "workers"
    assert {"pending", "lag", "consumers"} <= set(api_report["requests"])
    assert set(api_report["tasks"]) == {"fanout-reader", "redis-watch", "health-monitor"}
    assert api_report["tasks"]["fanout-reader"]["restarts"] == 0
    assert "open" in api_report["connections"]
    assert set(worker_report["tasks"]) == {
        "worker",
        "summary-worker",
        "question-worker",
        "cancel-watch",
        "batcher",
        "health-monitor",
    }
    assert worker_report["localWorker"]["accepting"] is True


async def test_logs_are_json_bound_to_the_request_and_free_of_secrets(
    fleet: tuple[BridgeProcess, BridgeProcess], http: httpx.AsyncClient
) -> None:
    """Log lines are JSON with the ids bound; no per-token lines, no prompt, no API key."""
    api, worker = fleet
    session = f"s_{uuid.uuid4().hex[:10]}"
    response = await http.post(
        "/api/chat/start",
        json={"sessionId": session, "modelId": "gpt-4", "prompt": "my secret question"},
        headers={"X-Request-ID": "trace-42"},
    )
    assert response.headers["x-request-id"] == "trace-42"
    started = response.json()
    async with open_stream(api.base_url + started["streamUrl"]) as tab:
        await tab.wait_terminal()
    await _stopped_logging(worker, started["requestId"])

    api_lines = [json.loads(line) for line in api.log().splitlines()]
    worker_lines = [json.loads(line) for line in worker.log().splitlines()]
    queued = [e for e in api_lines if e["event"] == "generation_queued"]
    mine = [e for e in queued if e.get("request_id") == started["requestId"]]
    assert mine[0]["http_request_id"] == "trace-42"
    assert mine[0]["session_id"] == session
    assert "messages" not in mine[0]
    finished = [e for e in worker_lines if e.get("request_id") == started["requestId"]]
    assert [e["event"] for e in finished] == ["generation_finished"]
    assert finished[0]["session_id"] == session
    everything = api.log() + worker.log()
    assert API_KEY not in everything
    assert "my secret question" not in everything
    assert '"t17 "' not in everything  # no token content, so no per-token lines
    assert len([e for e in api_lines if e.get("session_id") == session]) <= 3


async def _stopped_logging(worker: BridgeProcess, request_id: str, timeout: float = 20) -> None:
    """Wait until the worker's log holds the generation's last line (an outside process)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while request_id not in worker.log():
        assert asyncio.get_running_loop().time() < deadline, worker.log()
        await asyncio.sleep(0.05)


def test_bridge_probe_exits_0_for_a_live_process_and_1_otherwise(
    fleet: tuple[BridgeProcess, BridgeProcess],
) -> None:
    """`bridge probe` (the containers' health check) reflects the endpoint's answer."""
    worker_port = fleet[1].base_url.rsplit(":", 1)[1]
    probe = [sys.executable, "-m", "bridge.cli", "probe", "--port"]
    ok = subprocess.run([*probe, worker_port], capture_output=True, timeout=30, check=False)
    assert ok.returncode == 0, ok.stderr
    closed = subprocess.run(
        [*probe, str(free_port())], capture_output=True, timeout=30, check=False
    )
    assert closed.returncode == 1
    assert b"ConnectError" in closed.stderr
    missing = subprocess.run(
        [*probe, worker_port, "--path", "/nope"], capture_output=True, timeout=30, check=False
    )
    assert missing.returncode == 1
    assert b"HTTP 404" in missing.stderr
