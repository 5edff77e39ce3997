"""Limits on what one client controls inside one process: header sizes, WebSocket messages.

Fleet-wide limits (requests and tokens per minute, concurrent generations) are in
`bridge.ratelimit`; open SSE connections per session and per address are counted by the
connection manager; body size, prompt length and message count are checked by the routes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPResponseStartEvent, Receive, Scope, Send

from bridge.errors import BadRequest, RateLimited
from bridge.settings import Settings

PROBLEM_JSON = b"application/problem+json"


class HeaderSizeLimit:
    """ASGI middleware: a request whose headers exceed `max_bytes` in total gets 431.

    uvicorn bounds what it buffers before the app runs (see `bridge serve`); this gives the
    precise, documented limit and a problem+json answer.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self._app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in (ScopeType.HTTP, ScopeType.WEBSOCKET) and self._max_bytes:
            size = header_bytes(scope["headers"])
            if size > self._max_bytes:
                await _refuse(scope, send, size, self._max_bytes)
                return
        await self._app(scope, receive, send)


def header_bytes(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The size of request headers as the limit counts it: `name: value\r\n` each."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


async def _refuse(scope: Scope, send: Send, size: int, limit: int) -> None:
    if scope["type"] == ScopeType.WEBSOCKET:
        await send({"type": "websocket.close", "code": 1008, "reason": "headers too large"})
        return
    body = msgspec.json.encode(
        {
            "type": "about:blank",
            "title": "Request Header Fields Too Large",
            "status": 431,
            "detail": f"the request headers hold {size} bytes; at most {limit} are allowed",
        }
    )
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 431,
        "headers": [(b"content-type", PROBLEM_JSON), (b"content-length", b"%d" % len(body))],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


class MessageLimiter:
    """Limits of one WebSocket connection: message size, and messages per second.

    The rate is a token bucket (`per_s` refill, `burst` capacity), local to the connection.
    Call `check(size)` for every received message before decoding it:

    - `BadRequest` (status 413): too large; close the socket with code 1009;
    - `RateLimited`: too many; answer with an error message (or close with 1008) and drop it.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_bytes = max_bytes
        self._per_s = per_s
        self._burst = float(max(burst, 1))
        self._tokens = self._burst
        self._clock = clock
        self._last = clock()

    @classmethod
    def from_settings(cls, settings: Settings) -> MessageLimiter:
        """A limiter with the `BRIDGE_WS_*` limits, for one new connection."""
        return cls(
            max_bytes=settings.ws_max_message_bytes,
            per_s=settings.ws_messages_per_s,
            burst=settings.ws_message_burst,
        )

    def check(self, size: int) -> None:
        """Admit a message of `size` bytes, or raise (see the class docstring)."""
        if self._max_bytes and size > self._max_bytes:
            raise BadRequest(
                f"the message holds {size} bytes; at most {self._max_bytes} are allowed",
                status_code=413,
            )
        if not self._per_s:
            return
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._per_s)
        self._last = now
        if self._tokens < 1:
            raise RateLimited("WebSocket messages per second", (1 - self._tokens) / self._per_s)
        self._tokens -= 1
