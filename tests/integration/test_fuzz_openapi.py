"""Fuzzing: schemathesis against the service's own OpenAPI document, and hypothesis against
the SSE route's cursor inputs, through a real `bridge serve` process. No 5xx is allowed.

Bounded so that it runs in every CI build: a few dozen examples per operation, and a time
limit on the whole module's tests well under a minute each.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from bridge.access import StreamTokens
from tests.redis_fixtures import delete_prefixed
from tests.servers import bridge_env, start_bridge, wait_ready

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

EXAMPLES = 40
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases every run: a CI failure reproduces locally
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A `bridge serve --no-worker` (fuzzed requests are queued, never generated)."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    env = bridge_env(redis_url, prefix, BRIDGE_RATE_SESSION_RPM="0")
    logs = tmp_path_factory.mktemp("logs")
    server = start_bridge(["serve", "--no-worker"], env, str(logs / "fuzz.log"))
    try:
        asyncio.run(wait_ready(server, path="/health/live"))
        yield server.base_url
    finally:
        server.stop()

        async def clean() -> None:
            client = aioredis.Redis.from_url(redis_url)
            await delete_prefixed(client, prefix)
            await client.aclose()

        asyncio.run(clean())


@pytest.fixture(scope="module")
def api_schema(fuzz_server: str) -> Any:
    """The OpenAPI document the server itself publishes."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server}/schema/openapi.json", timeout=10)
    # readiness is 503 by design here (no worker runs): a correct answer, not a server error
    return schema.exclude(path="/health/ready")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@given(data=st.data())
@FUZZ_SETTINGS
def test_no_request_the_schema_allows_or_breaks_gets_a_5xx(
    fuzz_server: str, api_schema: Any, mode: GenerationMode, data: st.DataObject
) -> None:
    """Every operation, with inputs generated from its schema (valid ones, then ones that
    break it), answers without a server error; a stream that opens is closed at once."""
    case = data.draw(api_schema.as_strategy(generation_mode=mode))
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "modelId" in case.body:
        # reach past validation: a configured model, and some text to answer
        case.body["modelId"] = "mock"
        if not case.body.get("messages") and not case.body.get("prompt"):
            case.body["prompt"] = "hi"
    # schemathesis reads an event stream until its timeout passes; ours stay open, so a
    # stream that opened (its status is what is checked) is read for one second only
    timeout = 1 if _is_event_stream(case.operation.definition.raw) else 10
    case.call_and_validate(
        base_url=fuzz_server, checks=[not_a_server_error], timeout=timeout, stream=True
    )


def _is_event_stream(operation: dict[str, Any]) -> bool:
    responses = operation.get("responses", {}).values()
    return any("text/event-stream" in response.get("content", {}) for response in responses)


header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300
) | st.builds(
    lambda parts: ",".join(f"{m}:{a}-{b}" for m, a, b in parts),
    st.lists(
        st.tuples(
            st.sampled_from(["mock", "gpt-4", "x", "*", "a:b", ""]),
            st.integers(-1, 2**65),
            st.integers(-1, 2**65),
        ),
        max_size=4,
    ),
)


# tokens shaped like real ones (`<digits>.<signature>`) reach the signature check
token_text = st.text(max_size=200) | st.builds(
    "{}.{}".format,
    st.text(st.characters(categories=["Nd"]), min_size=1, max_size=12),
    st.text(min_size=1, max_size=60),
)


@given(cursor=header_text, query=st.text(max_size=200), token=token_text)
@FUZZ_SETTINGS
def test_hostile_tokens_and_cursors_on_the_stream_route_never_get_a_5xx(
    fuzz_server: str, cursor: str, query: str, token: str
) -> None:
    """Any stream token is refused with 401/403; with a valid one, any `Last-Event-ID`
    header or `last_event_id` query value opens the stream (200) or is a 400."""
    session = "fuzzed"
    valid = StreamTokens([b"test-secret"], ttl_s=600).issue(session)
    path = f"/api/sse/stream/{session}"
    with httpx.Client(base_url=fuzz_server, timeout=10) as http:
        refused = http.get(path, params={"token": token})
        assert refused.status_code in (401, 403), refused.text
        for params, headers in (
            ({"token": valid}, {"Last-Event-ID": cursor}),
            ({"token": valid, "last_event_id": query}, {}),
        ):
            with http.stream("GET", path, params=params, headers=headers) as response:
                assert response.status_code in (200, 400), response.read()
