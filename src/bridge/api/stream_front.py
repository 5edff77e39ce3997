"""uvicorn's HTTP protocol, with live SSE streams served in front of it, without ASGI.

An idle SSE connection served through ASGI keeps uvicorn's protocol, parser, request cycle
and flow control, a task running the app and a task waiting for the disconnect: 14.5 KiB of
Python objects (tracemalloc), and every event it is sent wakes its task and passes the
server's `send`. So `bridge serve` gives uvicorn `StreamFront` as its protocol. It reads the
head of a connection's first request itself; a `GET` of the stream route that gets a live
stream is served here, as a `PushStream` (`bridge.connections.push`) written from the
fan-out's callback. Everything else is handed, with the bytes read so far, to the protocol
uvicorn would have used, which then owns the connection as if it had from the start.

It declines (hands over) whenever the answer is not a plain live stream, exactly as the ASGI
direct path does (`stream_direct`): anything but `GET /api/sse/stream/<id> HTTP/1.1` without
a body; a head it does not parse as simply as that; a client address a trusted proxy gives
(uvicorn's proxy headers); and every refusal or `reconnect`-only answer of
`open_session_stream`. The ASGI path behind then checks everything again and answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

import structlog
from litestar import Litestar
from uvicorn.config import Config
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from uvicorn.server import ServerState

from bridge.api.observability import REQUEST_ID_HEADER, log_request, request_id
from bridge.api.stream import STREAM_PATH, open_session_stream
from bridge.api.stream_direct import ROUTE, StreamRequest, parse_stream_request
from bridge.connections.push import Pulse, PushStream
from bridge.connections.sse import SSE_HEADERS, SSEStream
from bridge.errors import CloseReason
from bridge.runtime import Runtime

#: a head longer than this is left to uvicorn (whose limits answer it)
MAX_HEAD_BYTES = 64 * 1024
#: streams registering at once; the others wait their turn. A burst of thousands (a
#: restart's reconnects) otherwise holds every registration's transient objects at the
#: same time, and the heap they grew stays: 12.6 KiB of RSS per idle stream against 4.2
#: with this limit (2,000 streams opened at once, 2026-12-03).
OPENING_LIMIT = 32

_PREFIX = b"GET " + STREAM_PATH.encode()
_HEAD_END = b"\r\n\r\n"
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"expect", b"upgrade"})
_STATUS_AND_HEADERS = b"".join(
    [
        b"HTTP/1.1 200 OK\r\n",
        b"content-type: text/event-stream; charset=utf-8\r\n",
        *(f"{name.lower()}: {value}\r\n".encode() for name, value in SSE_HEADERS.items()),
        b"transfer-encoding: chunked\r\n",
    ]
)


class Shared:
    """What every connection of one server shares."""

    def __init__(
        self, app: Litestar, config: Config, server_state: ServerState, app_state: dict[str, Any]
    ) -> None:
        self.app = app
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        runtime: Runtime | None = app.state.get("runtime")
        self.pulse = Pulse(runtime.settings.sse_heartbeat_s if runtime is not None else 15.0)
        self.opening = asyncio.Semaphore(OPENING_LIMIT)
        trusted = ProxyHeadersMiddleware(app, config.forwarded_allow_ips).trusted_hosts  # type: ignore[arg-type]
        self.trusts: Callable[[str | None], bool] | None = (
            trusted.__contains__ if config.proxy_headers else None
        )


def stream_front(app: Litestar) -> Callable[..., StreamFront]:
    """The `http` protocol to give `uvicorn.Config` for `app`."""
    shared: Shared | None = None

    def factory(
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> StreamFront:
        nonlocal shared
        if shared is None:
            shared = Shared(app, config, server_state, app_state)
        return StreamFront(shared)

    return factory


class StreamFront(asyncio.Protocol):
    """One connection: a live stream served here, or handed to uvicorn's own protocol."""

    __slots__ = ("_head", "_path", "_rid", "_shared", "_started", "_stream", "_task", "_transport")

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._transport: asyncio.Transport | None = None
        self._head = b""  # every byte read until the connection is served or handed over
        self._task: asyncio.Task[None] | None = None
        self._stream: PushStream | None = None
        self._path = ""
        self._rid = ""
        self._started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._shared.server_state.connections.add(self)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._stream is not None:
            return  # a live stream reads nothing more; the client only ever closes it
        self._head += data
        if self._task is not None:  # opening: kept for uvicorn in case the stream is declined
            if len(self._head) > MAX_HEAD_BYTES:  # but a stream request has nothing to send
                self._transport.close()  # type: ignore[union-attr]
            return
        if not self._head.startswith(_PREFIX[: len(self._head)]):
            self._hand_over()
            return
        end = self._head.find(_HEAD_END)
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                self._hand_over()
            return
        request = self._parse(self._head[: end + 2], rest=self._head[end + 4 :])
        if request is None:
            self._hand_over()
            return
        self._task = asyncio.get_running_loop().create_task(self._open(*request))

    def connection_lost(self, exc: Exception | None) -> None:
        self._shared.server_state.connections.discard(self)
        stream = self._stream
        if stream is not None:
            stream.lost()
            with structlog.contextvars.bound_contextvars(
                http_request_id=self._rid,
                session_id=stream.sub.session,
                connection_id=stream.sub.id,
            ):
                elapsed = time.perf_counter() - self._started
                log_request("GET", ROUTE, self._path, 200, elapsed, True)
        elif self._task is not None:
            self._task.cancel()

    def eof_received(self) -> bool | None:
        return None  # close: a stream's client has nothing more to say

    def pause_writing(self) -> None:
        if self._stream is not None:
            self._stream.pause_writing()

    def resume_writing(self) -> None:
        if self._stream is not None:
            self._stream.resume_writing()

    def shutdown(self) -> None:
        """uvicorn's shutdown: a stream ends with `reconnect`, anything else closes."""
        if self._stream is not None:
            self._stream.sub.close(CloseReason.SHUTDOWN)
        elif self._transport is not None:
            self._transport.close()

    def _parse(
        self, head: bytes, rest: bytes
    ) -> tuple[StreamRequest, list[tuple[bytes, bytes]]] | None:
        """The stream request of `head`, or None if uvicorn must read it."""
        if rest:
            return None  # a body or a second request
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] != "HTTP/1.1":
            return None
        target = parts[1]
        path, _, query = target.partition("?")
        if "#" in target:
            return None
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:-1]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or " " in name:
                return None  # obsolete folding, or not a header
            key = name.lower().encode("latin-1")
            if key in _BODY_HEADERS:
                return None
            headers.append((key, value.strip(" \t").encode("latin-1")))
        forwarded = any(name == b"x-forwarded-for" for name, _ in headers)
        if forwarded and self._trusted_peer():
            return None  # the client address is the proxy's to give: uvicorn's middleware
        scope = {"path": unquote(path), "query_string": query.encode("latin-1"), "headers": headers}
        app = self._shared.app
        runtime: Runtime | None = app.state.get("runtime")
        if runtime is None:
            return None
        request = parse_stream_request(
            scope,  # type: ignore[arg-type]
            max_header_bytes=runtime.settings.max_header_bytes,
            cors=app.cors_config is not None,
        )
        if request is None:
            return None
        self._path = scope["path"]  # type: ignore[assignment]
        return request, headers

    def _trusted_peer(self) -> bool:
        trusts = self._shared.trusts
        return trusts is not None and trusts(_host(self._transport))

    async def _open(self, request: StreamRequest, headers: list[tuple[bytes, bytes]]) -> None:
        runtime: Runtime = self._shared.app.state.runtime
        transport = self._transport
        assert transport is not None
        self._rid = rid = request_id({"headers": headers})  # type: ignore[arg-type]
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(http_request_id=rid)
        self._started = time.perf_counter()
        try:
            async with self._shared.opening:
                opened = await open_session_stream(
                    runtime,
                    request.session_id,
                    request.token,
                    request.last_event_id,
                    address=_host(transport),
                )
        except Exception:  # a BridgeError, or a bug: the route meets it again, and answers it
            self._task = None
            self._hand_over()
            return
        if not isinstance(opened, SSEStream):
            self._task = None
            self._hand_over()
            return
        self._shared.server_state.total_requests += 1
        self._stream = stream = PushStream(
            opened.sub,
            transport,
            manager=runtime.manager,
            pulse=self._shared.pulse,
            max_behind=runtime.settings.send_queue_size,
        )
        self._head = b""
        self._task = None
        head = b"%b%b: %b\r\n%b" % (
            _STATUS_AND_HEADERS,
            REQUEST_ID_HEADER.encode(),
            rid.encode(),
            _default_headers(self._shared.server_state),
        )
        await stream.run(head, opened.history, runtime.settings.sse_retry_ms)

    def _hand_over(self) -> None:
        """Give the connection, and what it sent, to the protocol uvicorn would have used."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._shared.server_state.connections.discard(self)
        shared = self._shared
        protocol = AutoHTTPProtocol(  # type: ignore[call-arg]
            config=shared.config, server_state=shared.server_state, app_state=shared.app_state
        )
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        data, self._head = self._head, b""
        protocol.data_received(data)


def _host(transport: asyncio.Transport | None) -> str | None:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return peer[0] if isinstance(peer, tuple) else None


def _default_headers(state: ServerState) -> bytes:
    """uvicorn's `date` and `server` headers, and the blank line that ends the head."""
    return b"".join(b"%b: %b\r\n" % pair for pair in state.default_headers) + b"\r\n"
