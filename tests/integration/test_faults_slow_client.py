"""A client that stops reading, with real processes: bounded memory, a cut, a full resume."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis.asyncio as aioredis

from bridge.sse_client import SSEEvent, SSEParser
from bridge.streams.keys import Keys
from tests.faults import Fleet, RssSampler, fleet, new_session, upstream_process, wait_until
from tests.servers import bridge_env, open_stream, start_chat, tokens

pytestmark = pytest.mark.integration

TOKENS = 10_000
TOKEN_CHARS = 2048  # 10,000 tokens of 2 KiB: ~20 MiB of text flows past the stuck client
QUEUE = 256
STUCK_CLIENTS = 3
BACKLOG = 3000  # entries in the stream when the stuck clients join: their catch-up is paged
# Measured on the reference machine: ~7.5 MiB of growth with the bounds; with the queue made
# effectively unbounded (QUEUE = 1_000_000) the same run grows by ~140 MiB and fails, and with
# catch-up pages of 500 entries whatever their size and appends of any size, by ~30 MiB.
MAX_GROWTH_MB = 20


@pytest.fixture
def processes(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    with upstream_process() as upstream:
        env = bridge_env(
            redis_url,
            key_prefix,
            OPENAI_BASE_URL=upstream,
            # paced (5 s in all), so tokens keep coming once a stuck client's socket is full
            BRIDGE_MODELS=f"big=openai:big?tokens={TOKENS}&pad={TOKEN_CHARS}&delay_ms=0.5",
            BRIDGE_SEND_QUEUE_SIZE=str(QUEUE),
            BRIDGE_STREAM_MAXLEN=str(2 * TOKENS),  # retain the whole answer
        )
        with fleet(env, tmp_path) as running:
            yield running


async def open_stuck(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open an SSE request on a socket with a tiny receive buffer, and read nothing."""
    parts = urlsplit(url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((parts.hostname, parts.port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**22)
    target = f"{parts.path}?{parts.query}"
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def read_to_end(reader: asyncio.StreamReader) -> list[SSEEvent]:
    """Read until the server closes the connection; parse the (chunked) SSE body."""
    raw = b""
    while chunk := await reader.read(2**20):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    parser, events, stream = SSEParser(), [], _unchunk(body)
    for start in range(0, len(stream), 65536):  # the parser copies its buffer per line
        events += parser.feed(stream[start : start + 65536])
    return events


def _unchunk(body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16) if size_line else 0
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2 :]
    return b"".join(out)


async def test_a_client_that_stops_reading_is_cut_off_with_bounded_memory_and_resumes(
    processes: Fleet, redis: aioredis.Redis, key_prefix: str
) -> None:
    """Stuck clients join while 10,000 large tokens flow, a backlog of thousands already in the
    stream: the API process's memory grows by far less than the data (the catch-up's pages are
    bounded in bytes, the live queue in entries), each stuck connection is closed for
    overflowing its queue, and a reconnect with its Last-Event-ID gets the rest: every token
    exactly once."""
    server, worker = processes.serve(), processes.worker()
    await processes.ready(worker, server)
    with contextlib.ExitStack() as cleanup:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=15) as http:
            with RssSampler(server.proc.pid) as memory:
                started = await start_chat(http, new_session(), "big")
                url = server.base_url + started["streamUrl"]
                stream = Keys(key_prefix).stream(started["sessionId"], "big")
                await wait_until(lambda: backlog(redis, stream, BACKLOG), 60, "a backlog")
                stuck = [await open_stuck(url) for _ in range(STUCK_CLIENTS)]
                for _, writer in stuck:
                    cleanup.callback(writer.close)
                await wait_until(
                    lambda: finished(redis, f"{key_prefix}gen:{started['requestId']}"),
                    180,
                    "the generation's end",
                )
            report = (await http.get("/health")).json()
        assert memory.growth_mb < MAX_GROWTH_MB, f"RSS grew {memory.growth_mb:.1f} MiB"
        assert report["connections"]["slowConsumerCloses"] >= STUCK_CLIENTS
        async with open_stream(url) as replayed:
            await replayed.wait_terminal(timeout=120)
        expected = tokens(replayed.events)
        assert len(expected) == TOKENS
        for reader, _ in stuck:
            await check_resume(reader, url, expected)
    print(f"RSS growth of the API process: {memory.growth_mb:.1f} MiB")


async def backlog(redis: aioredis.Redis, stream: str, entries: int) -> bool:
    return await redis.xlen(stream) >= entries


async def finished(redis: aioredis.Redis, generation: str) -> bool:
    return await redis.hget(generation, "status") == b"complete"


async def check_resume(reader: asyncio.StreamReader, url: str, expected: list[Any]) -> None:
    """The cut-off client got a gap-free prefix; resuming after it yields exactly the rest."""
    received = await asyncio.wait_for(read_to_end(reader), 60)
    cut = tokens(received)
    assert 0 < len(cut) < TOKENS
    assert cut == expected[: len(cut)], "the cut-off client saw a gap or a repeat"
    async with open_stream(url, **{"Last-Event-ID": received[-1].id}) as resumed:
        await resumed.wait_terminal(timeout=120)
    assert cut + tokens(resumed.events) == expected
