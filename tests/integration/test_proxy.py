"""deploy/nginx/nginx.conf in front of a real `bridge serve` (where nginx is installed)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.redis_fixtures import free_port
from tests.servers import bridge_env, open_stream, start_bridge, start_chat, tokens, wait_ready

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]

CONF = Path(__file__).parents[2] / "deploy/nginx/nginx.conf"


def local_config(api_port: int, proxy_port: int, tmp: Path) -> Path:
    """The deploy config with the compose host names and paths swapped for local ones."""
    text = CONF.read_text()
    swaps = {
        "set $api http://api:8000;": f"set $api http://127.0.0.1:{api_port};",
        "listen 8080;": f"listen 127.0.0.1:{proxy_port};",
        "pid /tmp/nginx.pid;": f"pid {tmp}/nginx.pid;",
        "/tmp/nginx-": f"{tmp}/nginx-",
    }
    for old, new in swaps.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


async def wait_listening(url: str, proc: asyncio.subprocess.Process, timeout: float = 20) -> None:
    """Wait for nginx to answer (polling an outside process, with a deadline)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            assert proc.returncode is None, "nginx exited"
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise TimeoutError("nginx did not start")


@pytest.fixture
async def proxy_url(redis_url: str, key_prefix: str, tmp_path: Path) -> AsyncIterator[str]:
    """A bridge server and nginx in front of it; yields the proxy's base URL."""
    server = start_bridge(["serve"], bridge_env(redis_url, key_prefix), str(tmp_path / "b.log"))
    proxy_port = free_port()
    config = local_config(int(server.base_url.rsplit(":", 1)[1]), proxy_port, tmp_path)
    nginx = await asyncio.create_subprocess_exec(
        "nginx", "-c", str(config), "-g", "daemon off;", stderr=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_ready(server)
        base = f"http://127.0.0.1:{proxy_port}"
        await wait_listening(base + "/proxy-health", nginx)
        yield base
    finally:
        nginx.terminate()
        await asyncio.wait_for(nginx.wait(), 10)
        server.stop()


async def test_streams_flow_through_the_proxy_live(proxy_url: str) -> None:
    """Through nginx, a stream opens at once and carries every token; ops routes stay inside."""
    async with httpx.AsyncClient(base_url=proxy_url, timeout=10) as http:
        started = await start_chat(http, f"s_{uuid.uuid4().hex[:8]}", "mock")
        async with open_stream(proxy_url + started["streamUrl"]) as tab:
            await tab.wait_terminal()
        assert tab.status == 200
        assert len(tokens(tab.events)) == 24
        assert (await http.get("/metrics")).status_code == 404
        assert (await http.get("/health/ready")).status_code == 404
        forwarded = await http.get("/schema/openapi.json")
    assert len(forwarded.headers["x-request-id"]) == 32  # nginx's $request_id, echoed
