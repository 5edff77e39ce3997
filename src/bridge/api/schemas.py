"""Request and response bodies of the HTTP API (camelCase JSON, validated by msgspec)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from bridge.providers.base import Usage
from bridge.streams.cancel import Target
from bridge.streams.keys import ID_PATTERN

Id = Annotated[str, msgspec.Meta(pattern=ID_PATTERN, examples=["user_123"])]


class ChatMessage(msgspec.Struct, frozen=True):
    """One message of a conversation."""

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationParams(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, rename="camel"
):
    """Sampling options passed to the provider; `mock*` ones only steer the built-in mock."""

    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    mock_tokens: Annotated[int, msgspec.Meta(ge=0, le=100_000)] | None = None
    mock_delay_ms: Annotated[float, msgspec.Meta(ge=0, le=60_000)] | None = None
    mock_fail_after: Annotated[int, msgspec.Meta(ge=0)] | None = None
    mock_invalid_outputs: Annotated[int, msgspec.Meta(ge=0, le=100)] | None = None

    def for_provider(self) -> dict[str, Any]:
        """The options that are set, under the snake_case names providers use."""
        return {
            name: getattr(self, name)
            for name in self.__struct_fields__
            if getattr(self, name) is not None
        }


class StartChat(msgspec.Struct, frozen=True, rename="camel"):
    """`POST /api/chat/start`: a prompt, or a list of messages (a prompt is appended last)."""

    session_id: Id
    model_id: Id
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    params: GenerationParams | None = None


class ChatStarted(msgspec.Struct, frozen=True, rename="camel"):
    """The answer to `chat/start`: where to read the stream, and with which token."""

    connection_id: str
    session_id: str
    model_id: str
    request_id: str
    status: str
    stream_url: str
    stream_key: str
    stream_token: str


class CancelChat(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """`POST /api/chat/{sessionId}/cancel`: narrow the cancel to one model or one request."""

    model_id: Id | None = None
    request_id: Id | None = None


class CancelStarted(msgspec.Struct, frozen=True, rename="camel"):
    """The answer to a cancel: generations being cancelled, and matching ones already ended."""

    session_id: str
    cancelling: list[Target]
    already_ended: list[Target]


class SessionUsage(msgspec.Struct, frozen=True, rename="camel"):
    """Tokens written to a session's streams, per model."""

    session_id: str
    completion_tokens: dict[str, int]


__all__ = [
    "CancelChat",
    "CancelStarted",
    "ChatMessage",
    "ChatStarted",
    "GenerationParams",
    "SessionUsage",
    "StartChat",
    "Target",
    "Usage",
]
