"""The mock provider: deterministic text, usage, per-request overrides and failures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from bridge.errors import ProviderError
from bridge.providers.base import Delta, Finish, Message, ProviderRequest, Usage
from bridge.providers.mock import MockProvider, mock_answer


def _request(
    params: dict[str, Any] | None = None, prompt: str = "hello there world"
) -> ProviderRequest:
    return ProviderRequest(
        model="mock",
        messages=(Message("system", "be brief"), Message("user", prompt)),
        params=params or {},
    )


async def _collect(
    provider: MockProvider, request: ProviderRequest, into: list[Delta | Finish] | None = None
) -> list[Delta | Finish]:
    items = [] if into is None else into
    async for item in provider.stream(request):
        items.append(item)
    return items


def test_mock_answer_cycles_the_sentence_word_by_word() -> None:
    """mock_answer builds the text from the fixed sentence, one word and a space per token."""
    assert mock_answer(0) == ""
    assert mock_answer(5) == "This is a mock answer "
    long = mock_answer(100).split(" ")[:-1]
    assert len(long) == 100
    cycle = long.index("This", 1)
    assert long[cycle : cycle * 2] == long[:cycle]


async def test_stream_yields_exactly_the_mock_answer_then_one_finish() -> None:
    """The stream is `tokens` deltas spelling mock_answer(tokens), then a single Finish."""
    provider = MockProvider(tokens=7, delay_ms=0)
    items = await _collect(provider, _request())
    deltas, finish = items[:-1], items[-1]
    assert all(isinstance(item, Delta) for item in deltas)
    assert len(deltas) == 7
    assert "".join(item.text for item in deltas if isinstance(item, Delta)) == mock_answer(7)
    assert finish == Finish(
        reason="stop", usage=Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12)
    )


async def test_params_override_token_count() -> None:
    """mock_tokens in the request params replaces the configured token count."""
    provider = MockProvider(tokens=50, delay_ms=0)
    items = await _collect(provider, _request({"mock_tokens": 3}, prompt="one"))
    assert [item.text for item in items if isinstance(item, Delta)] == ["This ", "is ", "a "]
    assert items[-1] == Finish(usage=Usage(prompt_tokens=3, completion_tokens=3, total_tokens=6))


async def test_delay_is_applied_before_each_token_and_can_be_overridden() -> None:
    """mock_delay_ms spaces the tokens out; the configured delay is replaced, not added."""
    provider = MockProvider(tokens=4, delay_ms=10_000)
    started = time.monotonic()
    items = await asyncio.wait_for(_collect(provider, _request({"mock_delay_ms": 25})), 5)
    elapsed = time.monotonic() - started
    assert len(items) == 5
    assert 0.09 <= elapsed < 2.0


async def test_zero_delay_still_yields_control_to_other_tasks() -> None:
    """With no delay the stream still lets other tasks run between tokens."""
    provider = MockProvider(tokens=200, delay_ms=0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await _collect(provider, _request())
    finally:
        task.cancel()
    assert ticks >= 100


async def test_fail_after_streams_that_many_tokens_then_raises() -> None:
    """mock_fail_after yields the first N tokens and then raises ProviderError mock_failure."""
    provider = MockProvider(tokens=10, delay_ms=0)
    seen: list[Delta | Finish] = []
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request({"mock_fail_after": 3}), into=seen)
    assert seen == [Delta("This "), Delta("is "), Delta("a ")]
    assert caught.value.code == "mock_failure"
    assert caught.value.retryable is False


async def test_fail_after_zero_fails_before_any_token_and_can_be_retryable() -> None:
    """mock_fail_after=0 fails at once; mock_fail_retryable marks the error retryable."""
    provider = MockProvider(tokens=10, delay_ms=0)
    params = {"mock_fail_after": 0, "mock_fail_retryable": True}
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request(params))
    assert caught.value.code == "mock_failure"
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    "params",
    [{"mock_tokens": -1}, {"mock_tokens": "5"}, {"mock_tokens": True}, {"mock_delay_ms": -2.0}],
)
async def test_invalid_overrides_are_rejected_as_bad_requests(params: dict[str, Any]) -> None:
    """Overrides of the wrong type or sign raise provider_bad_request before any token."""
    provider = MockProvider(tokens=3, delay_ms=0)
    with pytest.raises(ProviderError) as caught:
        await _collect(provider, _request(params))
    assert caught.value.code == "provider_bad_request"


async def test_cancelling_mid_stream_stops_the_generator() -> None:
    """Cancelling a task that iterates a slow mock stream ends it promptly."""
    provider = MockProvider(tokens=1000, delay_ms=50)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.stream(_request()):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)


async def test_the_mock_continues_a_partial_answer_given_as_prefix() -> None:
    """Given the first k tokens as a prefix, the mock streams the rest of the same answer and
    counts only the new tokens as completion."""
    provider = MockProvider(tokens=10, delay_ms=0)
    request = msgspec.structs.replace(_request(), prefix=mock_answer(4))
    items = await _collect(provider, request)
    deltas = [item.text for item in items if isinstance(item, Delta)]
    assert mock_answer(4) + "".join(deltas) == mock_answer(10)
    finish = items[-1]
    assert isinstance(finish, Finish)
    assert finish.usage is not None
    assert finish.usage.completion_tokens == 6
