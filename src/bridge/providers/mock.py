"""A deterministic provider for development, tests and benchmarks: no network, no keys.

The answer is a fixed English sentence cycled word by word, so any test can predict the
exact text from the token count alone (`mock_answer`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from bridge.errors import ProviderError
from bridge.providers.base import Delta, Finish, ProviderRequest, Usage
from bridge.providers.mock_extract import chunks, invalid_json_answer, json_answer

_SENTENCE = (
    "This is a mock answer from the bridge, streamed one word at a time so that "
    "every open tab of the conversation sees the same tokens in the same order."
)
_WORDS = tuple(_SENTENCE.split())


def mock_token(index: int) -> str:
    """The text of token number `index` (0-based): one word and a trailing space."""
    return _WORDS[index % len(_WORDS)] + " "


def mock_answer(tokens: int) -> str:
    """The exact full text `MockProvider` streams for `tokens` tokens."""
    return "".join(mock_token(index) for index in range(tokens))


class MockProvider:
    """Streams `mock_answer(tokens)` one word per token, `delay_ms` before each token.

    Per-request overrides in `ProviderRequest.params`:

    - `mock_tokens` (int): how many tokens to stream;
    - `mock_delay_ms` (float): the delay before each token;
    - `mock_fail_after` (int): stream that many tokens (at most `mock_tokens`), then raise
      `ProviderError("mock_failure")`; `mock_fail_retryable` (bool) sets its `retryable`.

    It continues a partial answer: given a `prefix` of k words, it streams from token k on,
    so a taken-over generation ends with exactly the text an uninterrupted one would have.

    With `response_format` `{"type": "json_object"}` (what job-API jobs send) the answer is
    instead a JSON object of the job schema about the prompt's text (`mock_extract`), in
    8-character tokens (a prefix skips the tokens it holds); `mock_invalid_outputs` (int)
    makes that many first attempts (counted by the assistant messages already in the
    conversation) answer schema-breaking JSON.
    """

    name = "mock"
    continues_prefix = True

    def __init__(self, tokens: int, delay_ms: float) -> None:
        if tokens < 0 or not delay_ms >= 0:
            raise ValueError("tokens and delay_ms must not be negative")
        self._tokens = tokens
        self._delay_ms = delay_ms

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Delta | Finish]:
        """Yield the mock answer's tokens, then a `Finish` with word-count usage."""
        params = request.params
        if (params.get("response_format") or {}).get("type") == "json_object":
            delay_ms = _delay_ms(params, "mock_delay_ms", self._delay_ms)
            async for item in self._json(request, delay_ms):
                yield item
            return
        tokens = _count(params, "mock_tokens")
        tokens = self._tokens if tokens is None else tokens
        delay_s = _delay_ms(params, "mock_delay_ms", self._delay_ms) / 1000
        fail_after = _count(params, "mock_fail_after")
        emitted = tokens if fail_after is None else min(tokens, fail_after)
        start = min(len(request.prefix.split()), emitted)
        for index in range(start, emitted):
            # sleep(0) still yields to the loop, so a zero delay cannot starve other tasks
            await asyncio.sleep(delay_s)
            yield Delta(mock_token(index))
        if fail_after is not None:
            raise ProviderError(
                "mock_failure",
                f"mock provider failed after {emitted} tokens as requested",
                retryable=bool(params.get("mock_fail_retryable", False)),
            )
        prompt = sum(len(message.content.split()) for message in request.messages)
        completion = tokens - start
        yield Finish(
            reason="stop",
            usage=Usage(
                prompt_tokens=prompt,
                completion_tokens=completion,
                total_tokens=prompt + completion,
            ),
        )

    async def _json(
        self, request: ProviderRequest, delay_ms: float
    ) -> AsyncIterator[Delta | Finish]:
        earlier = sum(1 for message in request.messages if message.role == "assistant")
        invalid = _count(request.params, "mock_invalid_outputs") or 0
        answer = invalid_json_answer() if earlier < invalid else json_answer(request.messages)
        pieces = chunks(answer)
        skipped = min(len(request.prefix) // 8, len(pieces))  # pieces of 8 characters
        for piece in pieces[skipped:]:
            await asyncio.sleep(delay_ms / 1000)
            yield Delta(piece)
        prompt = sum(len(message.content.split()) for message in request.messages)
        completion = len(pieces) - skipped
        usage = Usage(prompt, completion, prompt + completion)
        yield Finish(reason="stop", usage=usage)

    async def aclose(self) -> None:
        """Nothing to release."""


def _count(params: Mapping[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProviderError("provider_bad_request", f"{key} must be a non-negative integer")
    return value


def _delay_ms(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ProviderError("provider_bad_request", f"{key} must be a non-negative number")
    return float(value)
