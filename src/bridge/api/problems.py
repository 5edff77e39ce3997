"""One place mapping errors to HTTP responses: RFC 9457 problem details (problem+json)."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap
from redis.exceptions import RedisError

from bridge.errors import AccessDenied, BadRequest, RateLimited, RedisUnavailable

log = structlog.get_logger("bridge.api")

PROBLEM_JSON = "application/problem+json"
RETRY_AFTER_S = 2


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response[dict[str, Any]]:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    body["detail"] = detail
    body.update(extra)
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _bad_request(_: Request[Any, Any, Any], exc: BadRequest) -> Response[dict[str, Any]]:
    title = "Payload Too Large" if exc.status_code == 413 else "Bad Request"
    return problem(exc.status_code, title, exc.detail)


def _access_denied(_: Request[Any, Any, Any], exc: AccessDenied) -> Response[dict[str, Any]]:
    if exc.status_code == 401:
        return problem(401, "Unauthorized", exc.detail, headers={"WWW-Authenticate": "Bearer"})
    return problem(exc.status_code, "Forbidden", exc.detail)


def _rate_limited(_: Request[Any, Any, Any], exc: RateLimited) -> Response[dict[str, Any]]:
    return problem(
        429,
        "Too Many Requests",
        exc.detail,
        headers={"Retry-After": str(exc.retry_after_s)},
        limit=exc.limit,
        retryAfter=exc.retry_after_s,
    )


def _redis_down(_: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    log.warning("redis_unavailable", error=str(exc))
    return problem(
        503,
        "Service Unavailable",
        "Redis is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    extra: dict[str, Any] = {}
    if isinstance(exc, ValidationException) and exc.extra:
        extra["errors"] = exc.extra
    headers = dict(exc.headers or {})
    return problem(exc.status_code, _title(exc.status_code), exc.detail, headers=headers, **extra)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    BadRequest: _bad_request,
    AccessDenied: _access_denied,
    RateLimited: _rate_limited,
    RedisError: _redis_down,
    RedisUnavailable: _redis_down,
    HTTPException: _http,
}

__all__ = ["EXCEPTION_HANDLERS", "PROBLEM_JSON", "MediaType", "problem"]
