"""What the SSE direct path reads from a request, and what it leaves to the Litestar route."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.api.stream_direct import parse_stream_request


def scope(
    path: str = "/api/sse/stream/s1", query: bytes = b"", headers: list[tuple[bytes, bytes]] = ()
) -> Any:
    return {"type": "http", "method": "GET", "path": path, "query_string": query,
            "headers": list(headers)}  # fmt: skip


def parse(s: Any, *, max_header_bytes: int = 16_384, cors: bool = False) -> Any:
    return parse_stream_request(s, max_header_bytes=max_header_bytes, cors=cors)


def test_the_token_comes_from_the_query_then_the_bearer_header_then_the_cookie() -> None:
    cookie = (b"cookie", b"a=1; bridge_stream_token=from-cookie")
    bearer = (b"authorization", b"Bearer from-header")
    assert parse(scope(query=b"token=from-query", headers=[bearer, cookie])).token == "from-query"
    assert parse(scope(headers=[bearer, cookie])).token == "from-header"
    assert parse(scope(headers=[(b"authorization", b"Basic x"), cookie])).token == "from-cookie"
    assert parse(scope()).token is None


def test_the_cursor_comes_from_the_header_before_the_query() -> None:
    both = scope(query=b"last_event_id=m%3A2-0", headers=[(b"last-event-id", b"m:1-0")])
    assert parse(both).last_event_id == "m:1-0"
    assert parse(scope(query=b"last_event_id=m%3A2-0")).last_event_id == "m:2-0"
    assert parse(scope()).last_event_id is None


@pytest.mark.parametrize(
    "request_scope",
    [
        scope(path="/api/sse/stream/"),
        scope(path="/api/sse/stream/s1/extra"),
        scope(query=b"token=a&token=b"),
        scope(query=b"last_event_id=a&last_event_id=b"),
        scope(headers=[(b"last-event-id", b"a"), (b"last-event-id", b"b")]),
        scope(headers=[(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]),
        scope(headers=[(b"x-big", b"x" * 20_000)]),
    ],
)
def test_ambiguous_or_oversized_requests_are_left_to_the_route(request_scope: Any) -> None:
    assert parse(request_scope) is None


def test_cross_origin_requests_are_left_to_the_route_only_when_cors_is_configured() -> None:
    request_scope = scope(headers=[(b"origin", b"https://chat.example")])
    assert parse(request_scope, cors=True) is None
    assert parse(request_scope, cors=False) is not None


def test_repeated_headers_the_path_does_not_read_are_fine() -> None:
    forwarded = [(b"x-forwarded-for", b"10.0.0.1"), (b"x-forwarded-for", b"10.0.0.2")]
    assert parse(scope(headers=forwarded)) is not None
