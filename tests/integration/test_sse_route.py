"""The SSE route is a plain ASGI handler: its errors still come out as problem+json."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from bridge.api.stream import TOKEN_COOKIE, stream_token
from bridge.app import create_app
from bridge.settings import Settings

pytestmark = [
    pytest.mark.integration,
    # chat.py's inferred `runtime` dependency warns when the app is built in-process
    pytest.mark.filterwarnings("ignore::litestar.exceptions.LitestarDeprecationWarning"),
]


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    app = create_app(msgspec.structs.replace(settings, stream_secret="s"), with_worker=False)
    async with AsyncTestClient(app) as http:
        yield http


@pytest.mark.parametrize(
    ("path", "status", "detail"),
    [
        ("/api/sse/stream/abc", 401, "a stream token is required"),
        ("/api/sse/stream/abc?token=123.bad", 403, "invalid stream token"),
        ("/api/sse/stream/a/b?token=x", 400, "sessionId must match"),
        ("/api/sse/stream/", 400, "sessionId must match"),
    ],
)
async def test_bad_stream_requests_get_problem_details(
    client: AsyncTestClient,
    path: str,
    status: int,
    detail: str,  # type: ignore[type-arg]
) -> None:
    """Missing or wrong tokens and malformed session ids are refused with a clear JSON error."""
    response = await client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"].startswith(detail)


async def test_other_methods_are_not_allowed(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """Only GET reads a stream; anything else is 405 with Allow: GET."""
    response = await client.post("/api/sse/stream/abc")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"


def test_the_token_comes_from_query_then_bearer_then_cookie() -> None:
    """The query token wins, then an Authorization: Bearer header, then the cookie."""
    cookie = {b"cookie": f"other=1; {TOKEN_COOKIE}=from-cookie"}
    assert stream_token(cookie, None) == "from-cookie"
    assert stream_token({**cookie, b"authorization": "Bearer from-header"}, None) == "from-header"
    assert stream_token({**cookie, b"authorization": "Bearer x"}, "from-query") == "from-query"
    assert stream_token({b"cookie": 'broken="unterminated'}, None) is None
