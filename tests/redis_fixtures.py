"""Helpers behind the Redis fixtures of conftest.py, usable from tests directly.

The test Redis is, in order: `TEST_REDIS_URL`; a testcontainers Redis where a Docker engine
answers; a private server spawned by `EmbeddedRedis` for the session. Tests never flush a
server: each test writes under its own key prefix, and only those keys are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
from collections.abc import AsyncIterator, Iterator

import redis.asyncio as aioredis

from bridge.redis_server import EmbeddedRedis

_DOCKER_IMAGE = "redis:7.4-alpine"
_DELETE_BATCH = 500


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def docker_available(timeout_s: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping within `timeout_s`."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    # docker-py leaks its socket when a unix socket refuses, which pytest turns into an error.
    if host.startswith("unix://") and not _accepts(host.removeprefix("unix://"), timeout_s):
        return False
    try:
        import docker

        client = docker.from_env(timeout=timeout_s)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _accepts(socket_path: str, timeout_s: float) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(socket_path)
        except OSError:
            return False
        return True


@contextlib.contextmanager
def session_redis_url() -> Iterator[str]:
    """The URL of the Redis the test session uses, for as long as the context is open."""
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
    elif docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer(_DOCKER_IMAGE) as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
    else:
        with EmbeddedRedis() as server:
            yield server.url


async def delete_prefixed(client: aioredis.Redis, prefix: str) -> int:
    """Delete every key that starts with `prefix` (SCAN + UNLINK, never FLUSH); return how many."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=pattern, count=_DELETE_BATCH):
        batch.append(key)
        if len(batch) >= _DELETE_BATCH:
            deleted += await client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


@contextlib.asynccontextmanager
async def fake_redis_server(redis_version: str) -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that answers PING and INFO like Redis `redis_version`.

    Yields its port. Every other command gets an error reply, which is enough for probes.
    """
    info = f"# Server\r\nredis_version:{redis_version}\r\n".encode()
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            while command := await _read_command(reader):
                name = command[0].upper()
                if name == b"PING":
                    writer.write(b"+PONG\r\n")
                elif name == b"INFO":
                    writer.write(b"$%d\r\n%s\r\n" % (len(info), info))
                else:
                    writer.write(b"-ERR unknown command\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def _read_command(reader: asyncio.StreamReader) -> list[bytes]:
    """One RESP command (an array of bulk strings); empty at end of stream."""
    header = await reader.readline()
    if not header:
        return []
    args: list[bytes] = []
    for _ in range(int(header[1:])):
        length = int((await reader.readline())[1:])
        args.append((await reader.readexactly(length + 2))[:-2])
    return args
