"""StreamingTransport: the lean HTTP/1.1 transport under the OpenAI provider, at its edges.

The provider's own tests (test_provider_openai.py) run every ordinary path through it:
streaming, keep-alive reuse, concurrency, timeouts, broken and abandoned streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from bridge.providers.transport import StreamingTransport
from tests.fakes.openai_upstream import FakeUpstream

Handler = Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A loopback server running `handler(connection number, reader, writer)`."""
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        try:
            await handler(count, reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    finally:
        server.close()


def client(**kw: float) -> httpx.AsyncClient:
    timeout = httpx.Timeout(kw.pop("timeout", 2.0), **kw)
    return httpx.AsyncClient(transport=StreamingTransport(max_connections=1), timeout=timeout)


async def test_an_idle_connection_closed_by_the_server_is_replaced_transparently() -> None:
    """A request that meets a kept-alive connection the server just dropped goes out again."""
    connections: list[int] = []

    async def handler(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        connections.append(number)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        if number == 1:  # keep the first connection, but drop it at its second request
            await reader.readuntil(b"\r\n\r\n")
            return
        await writer.drain()

    async with raw_server(handler) as url, client() as http:
        assert (await http.get(url)).text == "ok"
        assert (await http.get(url)).text == "ok"
    assert connections == [1, 2]


async def test_a_request_waits_for_a_free_connection_and_times_out() -> None:
    """With every connection busy, a request fails with PoolTimeout after the pool timeout."""
    async with FakeUpstream(tokens=1000, delay_ms=20) as up, client(pool=0.2) as http:
        body = {"model": "m", "stream": True, "messages": []}
        url = f"{up.base_url}/chat/completions"
        async with http.stream("POST", url, json=body) as first:
            assert first.status_code == 200
            with pytest.raises(httpx.PoolTimeout):
                await http.post(url, json=body)


async def test_a_server_that_does_not_read_makes_a_large_request_time_out() -> None:
    """A request body the server never reads fails with WriteTimeout, not a hang."""
    stalled = asyncio.Event()

    async def handler(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await stalled.wait()

    async with raw_server(handler) as url, client(write=0.3) as http:
        with pytest.raises(httpx.WriteTimeout):
            await http.post(url, content=b"x" * (64 << 20))
        stalled.set()


async def test_a_response_that_is_not_http_is_a_protocol_error() -> None:
    """Garbage instead of a status line raises RemoteProtocolError."""

    async def handler(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with raw_server(handler) as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)


async def test_large_bodies_go_both_ways_intact() -> None:
    """A request body and a response body larger than the socket buffers arrive whole."""
    size = 8 << 20

    async def handler(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        length = int(head.split("content-length: ")[1].split("\r\n")[0])
        received = await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(received) + received)
        await writer.drain()

    async with raw_server(handler) as url, client(timeout=10.0) as http:
        response = await http.post(url, content=b"y" * size)
    assert response.status_code == 200
    assert len(response.content) == size
    assert set(response.content) == {ord("y")}


async def test_a_body_that_stops_arriving_times_out() -> None:
    """Once the head is in, a gap between chunks longer than the read timeout raises."""
    async with FakeUpstream(tokens=3, delay_ms=5000) as up, client(read=0.2) as http:
        body = {"model": "m", "stream": True, "messages": []}
        async with http.stream("POST", f"{up.base_url}/chat/completions", json=body) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                async for _ in response.aiter_bytes():
                    pass


async def test_a_consumer_slower_than_the_read_timeout_is_not_timed_out() -> None:
    """The read timeout measures the upstream's silence, not the reader's pace."""
    async with FakeUpstream(tokens=5) as up, client(read=0.1) as http:
        body = {"model": "m", "stream": True, "messages": []}
        async with http.stream("POST", f"{up.base_url}/chat/completions", json=body) as response:
            await asyncio.sleep(0.3)  # a busy consumer, not a poll
            text = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert text.count(b"data: ") >= 6


async def test_a_body_delimited_by_the_connection_close_ends_cleanly() -> None:
    """A response with neither length nor chunking ends, whole, when the server closes."""

    async def handler(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        await writer.drain()

    async with raw_server(handler) as url, client() as http:
        response = await http.get(url)
    assert response.text == "all of it"


async def test_a_chunked_body_cut_short_is_a_protocol_error() -> None:
    """A chunked body whose connection closes before the last chunk raises, not truncates."""

    async def handler(number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()

    async with raw_server(handler) as url, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)
