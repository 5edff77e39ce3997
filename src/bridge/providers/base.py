"""The provider protocol: an async iterator of token deltas that ends with a `Finish`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec


class Message(msgspec.Struct, frozen=True):
    """One chat message in OpenAI's shape."""

    role: str
    content: str


class Usage(msgspec.Struct, frozen=True, rename="camel"):
    """Token counts of one generation (camelCase on the wire: promptTokens, ...)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Delta(msgspec.Struct, frozen=True):
    """A piece of generated text, as the provider streamed it."""

    text: str


class Finish(msgspec.Struct, frozen=True):
    """The end of a generation: why it stopped, and its usage when the provider reports it."""

    reason: str = "stop"
    usage: Usage | None = None


class ProviderRequest(msgspec.Struct, frozen=True):
    """What a provider is asked to generate. `model` is the provider's own model name.

    `prefix` is the part of the answer already written by a worker that died: a provider
    that sets `continues_prefix = True` continues after it instead of starting over.
    """

    model: str
    messages: tuple[Message, ...]
    params: dict[str, Any] = {}
    prefix: str = ""


class Provider(Protocol):
    """An LLM backend. `stream` yields `Delta`s and exactly one final `Finish`.

    Failures raise `bridge.errors.ProviderError` (never a third-party exception); deltas
    already yielded stay valid. Cancelling the iteration aborts the upstream request.

    A provider may also set a class attribute `continues_prefix = True` when it can continue
    a partial answer (`ProviderRequest.prefix`); without it, a takeover restarts the answer.
    """

    name: str

    def stream(self, request: ProviderRequest) -> AsyncIterator[Delta | Finish]: ...

    async def aclose(self) -> None: ...
