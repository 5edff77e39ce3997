"""HTTP observability: a request id, one access-log line per request, request durations.

A streaming route (its handler has `opt={"streaming": True}`, like the SSE stream) is left
out of `bridge_http_request_duration_seconds`, since its "duration" is the connection's
lifetime; it still gets its one log line, written when the connection ends. Query strings
are never logged: stream URLs carry access tokens there.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import cast

import structlog
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send

from bridge import metrics

log = structlog.get_logger("bridge.http")

STREAMING = "streaming"  # the handler opt that marks a streaming route
REQUEST_ID_HEADER = "x-request-id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UNTIMED_ROUTES = frozenset({"/metrics"})
_QUIET_PREFIXES = ("/health", "/metrics")  # probes and scrapes: debug level


def request_id(scope: Scope) -> str:
    """The caller's `X-Request-ID` when it is a sane token, else a new random one."""
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class ObservabilityMiddleware(ASGIMiddleware):
    """Binds `http_request_id`, echoes it as `X-Request-ID`, logs and times the request."""

    scopes = (ScopeType.HTTP,)

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        rid = request_id(scope)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(http_request_id=rid)
        status = 500  # if the app fails before starting a response
        header = (REQUEST_ID_HEADER.encode(), rid.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        started = time.perf_counter()
        try:
            await next_app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("path_template") or scope["path"]
            streaming = bool(scope["route_handler"].opt.get(STREAMING))
            method = cast("HTTPScope", scope)["method"]
            log_request(method, route, scope["path"], status, elapsed, streaming)


def log_request(
    method: str, route: str, path: str, status: int, elapsed_s: float, streaming: bool
) -> None:
    """The request's access-log line, and its duration unless it was a stream."""
    if not streaming and route not in _UNTIMED_ROUTES:
        metrics.HTTP_REQUEST_DURATION.labels(method, route, str(status)).observe(elapsed_s)
    if status >= 500:
        emit = log.warning
    elif route.startswith(_QUIET_PREFIXES):
        emit = log.debug
    else:
        emit = log.info
    emit(
        "http_request",
        method=method,
        route=route,
        path=path,
        status=status,
        duration_ms=round(elapsed_s * 1000, 3),
        streaming=streaming,
    )
