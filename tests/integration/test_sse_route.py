"""The SSE route refuses bad requests with problem+json errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.servers import BridgeProcess, bridge_env, start_bridge, wait_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    """One `bridge serve --no-worker` (errors need no worker)."""
    env = bridge_env(redis_url, f"test:{uuid.uuid4().hex[:12]}:")
    log = tmp_path_factory.mktemp("sse") / "serve.log"
    process = start_bridge(["serve", "--no-worker"], env, str(log))
    try:
        asyncio.run(wait_ready(process, path="/health/live"))
        yield process
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/api/sse/stream/abc", 401, "a stream token is required"),
        ("/api/sse/stream/abc?token=123.bad", 403, "invalid stream token"),
        ("/api/sse/stream/bad!id?token=x", 400, "sessionId must match"),
    ],
)
async def test_bad_stream_requests_get_problem_details(
    server: BridgeProcess, path: str, status: int, detail: str
) -> None:
    """Missing or wrong tokens and malformed session ids are refused with a clear JSON error."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
        response = await http.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"].startswith(detail)


async def test_other_methods_are_not_allowed(server: BridgeProcess) -> None:
    """Only GET reads a stream; anything else is 405 with GET in Allow."""
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as http:
        response = await http.post("/api/sse/stream/abc")
    assert response.status_code == 405
    assert "GET" in response.headers["allow"].split(", ")
