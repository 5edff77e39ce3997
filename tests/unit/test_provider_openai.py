"""The OpenAI client against a fake upstream over real loopback HTTP."""

from __future__ import annotations

import asyncio
import gzip
import signal
import socket
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bridge.errors import ConfigError, ProviderError, ProviderTimeout, ProviderUnavailable
from bridge.providers.base import Delta, Finish, Message, ProviderRequest, Usage
from bridge.providers.openai import OpenAIProvider
from tests.fakes.openai_upstream import FakeUpstream

KEY = "sk-test-0123456789-secret"
REPO = Path(__file__).resolve().parents[2]


def _request(fake: dict[str, Any] | None = None, **params: Any) -> ProviderRequest:
    if fake is not None:
        params["fake"] = fake
    messages = (Message("system", "be brief"), Message("user", "say three words"))
    return ProviderRequest(model="gpt-test", messages=messages, params=params)


async def _collect(
    provider: OpenAIProvider, request: ProviderRequest, into: list[Delta | Finish] | None = None
) -> list[Delta | Finish]:
    items = [] if into is None else into
    async for item in provider.stream(request):
        items.append(item)
    return items


def _texts(items: list[Delta | Finish]) -> list[str]:
    return [item.text for item in items if isinstance(item, Delta)]


def _assert_no_key(error: BaseException) -> None:
    for exc in (error, error.__cause__):
        if exc is not None:
            assert KEY not in str(exc)
            assert KEY not in repr(exc)


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(tokens=5) as fake:
        yield fake


@pytest.fixture
async def provider(upstream: FakeUpstream) -> AsyncIterator[OpenAIProvider]:
    client = OpenAIProvider(upstream.base_url, KEY, connect_timeout_s=2, read_timeout_s=2)
    yield client
    await client.aclose()


async def test_stream_yields_deltas_then_finish_with_usage(provider: OpenAIProvider) -> None:
    """A normal stream gives every content delta in order, then one Finish carrying usage."""
    items = await _collect(provider, _request())
    assert _texts(items) == ["t0 ", "t1 ", "t2 ", "t3 ", "t4 "]
    assert items[-1] == Finish(
        reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=5, total_tokens=10)
    )
    assert sum(isinstance(item, Finish) for item in items) == 1


async def test_request_carries_body_params_and_bearer_key(
    provider: OpenAIProvider, upstream: FakeUpstream
) -> None:
    """The POST has the model, messages, stream flags, extra params and the Bearer key."""
    await _collect(provider, _request(temperature=0.5))
    [received] = upstream.requests
    assert (received.method, received.path) == ("POST", "/v1/chat/completions")
    assert received.headers["authorization"] == f"Bearer {KEY}"
    assert received.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say three words"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.5,
    }


async def test_without_key_no_authorization_header_is_sent(upstream: FakeUpstream) -> None:
    """A provider configured without a key sends no Authorization header at all."""
    provider = OpenAIProvider(upstream.base_url, None, connect_timeout_s=2, read_timeout_s=2)
    try:
        await _collect(provider, _request())
    finally:
        await provider.aclose()
    assert "authorization" not in upstream.requests[0].headers


async def test_finish_without_usage_when_upstream_sends_none(provider: OpenAIProvider) -> None:
    """When params turn usage off, Finish still comes, with the upstream's reason and no usage."""
    request = _request({"finish_reason": "length"}, stream_options={"include_usage": False})
    items = await _collect(provider, request)
    assert items[-1] == Finish(reason="length", usage=None)


async def test_sequential_streams_reuse_one_connection(
    provider: OpenAIProvider, upstream: FakeUpstream
) -> None:
    """After a complete stream the connection goes back to the pool and is reused."""
    for _ in range(3):
        await _collect(provider, _request())
    assert [request.connection for request in upstream.requests] == [1, 1, 1]
    assert upstream.connections == 1


async def test_concurrent_streams_all_complete(provider: OpenAIProvider) -> None:
    """Many streams at once each get their own complete answer."""
    results = await asyncio.gather(
        *(_collect(provider, _request({"tokens": 20})) for _ in range(30))
    )
    assert all(_texts(items) == [f"t{i} " for i in range(20)] for items in results)


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failures_map_to_provider_auth_without_leaking_the_key(
    provider: OpenAIProvider, status: int
) -> None:
    """401/403 become provider_auth, and a key echoed by the upstream is redacted."""
    fake = {"status": status, "error_message": f"Incorrect API key provided: {KEY}"}
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request(fake))
    assert (caught.value.code, caught.value.status) == ("provider_auth", status)
    assert "Incorrect API key provided: [redacted]" in caught.value.message
    assert caught.value.retryable is False
    _assert_no_key(caught.value)


async def test_429_maps_to_retryable_rate_limit(provider: OpenAIProvider) -> None:
    """429 becomes provider_rate_limited, marked retryable."""
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request({"status": 429, "error_message": "slow down"}))
    assert (caught.value.code, caught.value.retryable) == ("provider_rate_limited", True)
    assert "slow down" in caught.value.message


@pytest.mark.parametrize("status", [500, 503])
async def test_5xx_maps_to_retryable_http_error_with_status(
    provider: OpenAIProvider, status: int
) -> None:
    """5xx becomes provider_http_error, retryable, carrying the upstream status."""
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request({"status": status}))
    assert (caught.value.code, caught.value.retryable) == ("provider_http_error", True)
    assert caught.value.status == status


async def test_400_maps_to_bad_request_with_upstream_message(provider: OpenAIProvider) -> None:
    """Other 4xx become provider_bad_request whose message is the upstream's own."""
    fake = {"status": 400, "error_message": "max_tokens is too large"}
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request(fake))
    assert caught.value.code == "provider_bad_request"
    assert caught.value.message == "max_tokens is too large"
    assert (caught.value.status, caught.value.retryable) == (400, False)


async def test_connection_refused_maps_to_unavailable() -> None:
    """A port nobody listens on gives ProviderUnavailable, with no key in the error."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        port = blocker.getsockname()[1]
        provider = OpenAIProvider(f"http://127.0.0.1:{port}/v1", KEY, 2, 2)
        try:
            with pytest.raises(ProviderUnavailable) as caught:
                await _collect(provider, _request())
        finally:
            await provider.aclose()
    assert (caught.value.code, caught.value.retryable) == ("provider_unavailable", True)
    _assert_no_key(caught.value)


async def test_upstream_that_never_answers_times_out(upstream: FakeUpstream) -> None:
    """With a short read timeout a hanging upstream gives ProviderTimeout and is let go."""
    provider = OpenAIProvider(upstream.base_url, KEY, connect_timeout_s=2, read_timeout_s=0.2)
    try:
        with pytest.raises(ProviderTimeout) as caught:
            await asyncio.wait_for(_collect(provider, _request({"hang": True})), 5)
    finally:
        await provider.aclose()
    assert (caught.value.code, caught.value.retryable) == ("provider_timeout", True)
    await asyncio.wait_for(upstream.requests[0].disconnected.wait(), 5)


async def test_malformed_chunk_is_a_protocol_error_after_earlier_deltas(
    provider: OpenAIProvider,
) -> None:
    """A chunk that is not JSON raises provider_protocol_error; earlier deltas were yielded."""
    seen: list[Delta | Finish] = []
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request({"malformed_after": 2}), into=seen)
    assert caught.value.code == "provider_protocol_error"
    assert _texts(seen) == ["t0 ", "t1 "]


async def test_stream_ending_without_done_or_finish_is_a_protocol_error(
    provider: OpenAIProvider,
) -> None:
    """A complete body with neither [DONE] nor a finish reason is provider_protocol_error."""
    seen: list[Delta | Finish] = []
    fake = {"done": False, "finish_reason": None}
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request(fake), into=seen)
    assert caught.value.code == "provider_protocol_error"
    assert len(_texts(seen)) == 5


@pytest.mark.parametrize(
    ("fake", "reason"), [({"done": False}, "stop"), ({"finish_reason": None}, "stop")]
)
async def test_either_done_or_finish_reason_is_enough(
    provider: OpenAIProvider, fake: dict[str, Any], reason: str
) -> None:
    """A stream with a finish reason but no [DONE], or [DONE] but no reason, still finishes."""
    items = await _collect(provider, _request(fake))
    assert isinstance(items[-1], Finish)
    assert items[-1].reason == reason
    assert len(_texts(items)) == 5


async def test_connection_broken_midway_yields_deltas_then_stream_broken(
    provider: OpenAIProvider,
) -> None:
    """A body cut after 3 tokens gives those 3 deltas, then provider_stream_broken."""
    seen: list[Delta | Finish] = []
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request({"tokens": 10, "break_after": 3}), into=seen)
    assert seen == [Delta("t0 "), Delta("t1 "), Delta("t2 ")]
    assert caught.value.code == "provider_stream_broken"
    _assert_no_key(caught.value)


async def test_aclose_of_the_iteration_closes_the_upstream_connection(
    provider: OpenAIProvider, upstream: FakeUpstream
) -> None:
    """Closing the stream's iterator midway disconnects from the upstream at once."""
    stream = provider.stream(_request({"tokens": 1000, "delay_ms": 20}))
    assert isinstance(stream, AsyncGenerator)
    assert await asyncio.wait_for(anext(stream), 5) == Delta("t0 ")
    await stream.aclose()
    await asyncio.wait_for(upstream.requests[0].disconnected.wait(), 2)
    assert upstream.requests[0].completed is False


async def test_cancelling_the_consumer_task_closes_the_upstream_connection(
    provider: OpenAIProvider, upstream: FakeUpstream
) -> None:
    """Cancelling the task that iterates the stream disconnects from the upstream."""
    two_seen = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in provider.stream(_request({"tokens": 1000, "delay_ms": 20})):
            count += 1
            if count == 2:
                two_seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two_seen.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(upstream.requests[0].disconnected.wait(), 2)


@pytest.mark.parametrize("piece", [7, 1 << 16])
async def test_split_crlf_lines_and_midstream_error_objects_are_parsed(piece: int) -> None:
    """SSE parsing survives any byte split and CRLF; deltas before an in-stream error survive."""
    events = [
        b": keep-alive comment\r\n\r\n",
        b'data:{"choices":[{"index":0,"delta":{"content":"Hel"}}]}\r\n\r\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\r\n\r\n',
        f'data: {{"error": {{"message": "overloaded {KEY}"}}}}\r\n\r\n'.encode(),
    ]
    body = b"".join(events)

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), piece):
            yield body[start : start + piece]

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=pieces()))
    async with httpx.AsyncClient(transport=transport) as client:
        provider = OpenAIProvider("http://upstream.test/v1", KEY, 2, 2, client=client)
        seen: list[Delta | Finish] = []
        with pytest.raises(ProviderError) as caught:
            await _collect(provider, _request(), into=seen)
        await provider.aclose()
        assert not client.is_closed  # a client passed in belongs to the caller
    assert _texts(seen) == ["Hel", "lo"]
    assert caught.value.code == "provider_protocol_error"
    assert "overloaded [redacted]" in caught.value.message


async def test_a_compressed_answer_is_decoded() -> None:
    """An upstream that gzips its stream (its body is read through httpx's decoders, not
    straight from the transport) still gives every delta."""
    events = b"".join(
        f'data: {{"choices":[{{"index":0,"delta":{{"content":"w{i} "}}}}]}}\n\n'.encode()
        for i in range(3)
    )
    body = gzip.compress(
        events + b'data: {"choices":[{"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()

    answered = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()
        await writer.wait_closed()
        answered.set()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = OpenAIProvider(f"http://127.0.0.1:{port}/v1", KEY, 2, 2)
    try:
        items = await _collect(provider, _request())
    finally:
        await provider.aclose()
        server.close()
    await asyncio.wait_for(answered.wait(), 5)
    assert _texts(items) == ["w0 ", "w1 ", "w2 "]
    assert items[-1] == Finish(reason="stop")


async def test_owned_client_is_closed_by_aclose(upstream: FakeUpstream) -> None:
    """After aclose a provider that owns its client can no longer send requests."""
    provider = OpenAIProvider(upstream.base_url, KEY, connect_timeout_s=2, read_timeout_s=2)
    await provider.aclose()
    with pytest.raises(RuntimeError):
        await _collect(provider, _request())
    assert upstream.requests == []


@pytest.mark.parametrize("url", ["not a url", "ftp://example.com/v1", "http://"])
def test_unusable_base_url_is_a_config_error(url: str) -> None:
    """A base URL that is not http(s) with a host is rejected at construction."""
    with pytest.raises(ConfigError):
        OpenAIProvider(url, None, 1, 1)


async def test_fake_upstream_runs_as_a_separate_process() -> None:
    """`python -m tests.fakes.openai_upstream` prints READY <base_url> and then serves streams."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.openai_upstream",
        "--port",
        "0",
        "--tokens",
        "3",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        ready, base_url = (await asyncio.wait_for(process.stdout.readline(), 10)).split()
        assert ready == b"READY"
        provider = OpenAIProvider(base_url.decode(), KEY, connect_timeout_s=2, read_timeout_s=2)
        try:
            items = await _collect(provider, _request())
        finally:
            await provider.aclose()
        assert _texts(items) == ["t0 ", "t1 ", "t2 "]
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
