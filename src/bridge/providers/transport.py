"""A lean httpx transport for long streamed responses: HTTP/1.1 on asyncio and httptools.

httpx's default transport (httpcore on anyio, h11) spends about 100 us of CPU on every chunk
of a streamed body: a cancel scope, a state machine and several generators per read. An LLM
answer arrives as one small chunk per token, so that was most of a worker's CPU per token.
Here a chunk costs one parser callback and one queue append; everything the provider relies
on stays httpx's (requests, responses, timeouts, the exception classes it maps).

Kept from httpx's transport: keep-alive pooling with an upper bound and expiry, TLS with
httpx's default context, connect/read/write/pool timeouts raising httpx's exceptions, and
closing the connection of a response abandoned midway. Proxies from the environment are
still served by httpx's own transports, which the client mounts for them.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools
import httpx

from bridge.write_flow import WriteFlow

_READ_HIGH_WATER = 1 << 20  # stop reading the socket past this much unread body
BODY = "bridge.body"
"""The response extension holding the body as this transport reads it, before httpx's
layers: `raw_chunks` reads it there when there is nothing to decode."""


class _Connection(WriteFlow):
    """One HTTP/1.1 connection: parses responses as bytes arrive, buffers body chunks."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._last_read = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self.head_done = False
        self.keep_alive = False
        self.delimited = True
        self.complete = False
        self.error: Exception | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._last_read = asyncio.get_running_loop().time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(httpx.RemoteProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"invalid HTTP response: {exc}"))

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head_done and not self.delimited and exc is None:
            self.complete = True  # a close-delimited body ends with the connection
        if not self.complete and self.error is None:
            message = f"connection closed: {exc}" if exc else "peer closed connection"
            failure: Exception = (
                httpx.RemoteProtocolError(message) if self.head_done else httpx.ReadError(message)
            )
            self.error = failure
        self.resume_writing()
        self.stop_watchdog()
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        self.keep_alive = self._parser.should_keep_alive()  # only known at this point
        names = {name.lower() for name, _ in self._headers}
        # without either, the body is whatever arrives until the server closes
        self.delimited = b"content-length" in names or b"transfer-encoding" in names
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # used by the transport and the body stream
    def reset(self) -> None:
        """Get ready for the next request on this connection."""
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self.head_done, self.keep_alive, self.complete = [], False, False, False

    @property
    def status(self) -> int:
        return int(self._parser.get_status_code())

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self._headers

    @property
    def reusable(self) -> bool:
        return self.complete and not self.closed and self.keep_alive

    def take(self) -> bytes:
        """Every body byte buffered so far, in one piece."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def has_data(self) -> bool:
        return bool(self._chunks)

    async def wait(self) -> None:
        """Wait for the next parser event or the connection's end."""
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def watch_reads(self, timeout: float | None) -> None:
        """Fail a waiting read with ReadTimeout once nothing arrived for `timeout` seconds.

        One timer per period, re-armed only when it fires: a timeout around every wait
        for the next chunk (one per token) cost more than the chunk itself.
        """
        if self._watchdog is None and timeout is not None:
            loop = asyncio.get_running_loop()
            self._watchdog = loop.call_at(self._last_read + timeout, self._on_watchdog, timeout)

    def stop_watchdog(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _on_watchdog(self, timeout: float) -> None:
        self._watchdog = None
        idle = asyncio.get_running_loop().time() - self._last_read
        if self._waiter is not None and idle >= timeout and not self.complete:
            self._fail(httpx.ReadTimeout(f"no data for {timeout} s"))
        elif not self.complete and not self.closed:
            self.watch_reads(timeout)

    def close(self) -> None:
        self.closed = True
        self.stop_watchdog()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: Exception) -> None:
        self.error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Body(httpx.AsyncByteStream):
    """A response body read from its connection; hands the connection back when done."""

    def __init__(self, pool: StreamingTransport, conn: _Connection, read_timeout: float | None):
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.has_data:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.error is not None:
                raise conn.error
            else:
                conn.watch_reads(self._read_timeout)
                await conn.wait()

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._conn.stop_watchdog()
            self._pool.release(self._conn)


def raw_chunks(response: httpx.Response) -> AsyncIterator[bytes]:
    """The body's chunks: straight from `StreamingTransport` when it carries no content
    encoding (httpx's four generator layers per chunk cost more than the chunk's parsing,
    and a chunk is a token); through httpx's `aiter_bytes` otherwise."""
    body = response.extensions.get(BODY)
    if (
        isinstance(body, _Body)
        and response.headers.get("content-encoding", "identity") == "identity"
    ):
        return aiter(body)
    return response.aiter_bytes()


class StreamingTransport(httpx.AsyncBaseTransport):
    """HTTP/1.1 connections pooled per origin; see the module docstring."""

    def __init__(self, *, max_connections: int, keepalive_expiry: float = 30.0) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._keepalive_expiry = keepalive_expiry
        self._ssl: ssl.SSLContext | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout("no free connection in time") from None
        try:
            return await self._exchange(request, timeouts)
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(
        self, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        head = _request_head(request)
        body = await request.aread()
        for attempt in range(2):
            conn, reused = await self._connection(request.url, timeouts.get("connect"))
            try:
                try:
                    async with asyncio.timeout(timeouts.get("write")):
                        await self._send(conn, head + body)
                except TimeoutError:
                    raise httpx.WriteTimeout("the request was not sent in time") from None
                while not conn.head_done:
                    if conn.error is not None:
                        raise conn.error
                    try:
                        async with asyncio.timeout(timeouts.get("read")):
                            await conn.wait()
                    except TimeoutError:
                        raise httpx.ReadTimeout("no response head in time") from None
            except httpx.ReadError:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed an idle connection under us: a fresh one
                raise
            except BaseException:
                conn.close()
                raise
            chunks = _Body(self, conn, timeouts.get("read"))
            return httpx.Response(
                conn.status,
                headers=conn.headers,
                stream=chunks,
                extensions={"http_version": b"HTTP/1.1", BODY: chunks},
            )
        raise AssertionError("unreachable")

    async def _connection(
        self, url: httpx.URL, connect_timeout: float | None
    ) -> tuple[_Connection, bool]:
        key = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        idle = self._idle.get(key, [])
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive_expiry:
                conn.reset()
                return conn, True
            conn.close()
        loop = asyncio.get_running_loop()
        tls = self._tls() if url.scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(key),
                    key[1],
                    key[2],
                    ssl=tls,
                    server_hostname=key[1] if tls else None,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"connecting to {key[1]}:{key[2]} timed out") from None
        except OSError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        return conn, False

    async def _send(self, conn: _Connection, data: bytes) -> None:
        if conn.transport is None or conn.closed:
            raise httpx.ReadError("connection closed")
        conn.transport.write(data)
        await conn.drained()

    def release(self, conn: _Connection) -> None:
        """A response is closed: pool its connection if it can carry another request."""
        self._slots.release()
        if conn.reusable:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, []).append(conn)
        else:
            conn.close()

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context()
        return self._ssl

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for conn in connections:
                conn.close()
        self._idle.clear()


def _request_head(request: httpx.Request) -> bytes:
    target = request.url.raw_path
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n"
