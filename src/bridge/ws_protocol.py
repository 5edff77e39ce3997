"""Seed 001's WebSocket protocol: the client's messages, and rendering assistant templates.

Rendering is plain substitution, never `str.format`: the only placeholder is `{query}`, and
the query is inserted as it is, so braces in it (or anywhere else) stay literal. A template
message `{"insert": "history"}` is replaced by the request's history, unrendered.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from bridge.api.chat import check_messages
from bridge.api.schemas import ChatMessage, GenerationParams, Id
from bridge.errors import BadRequest
from bridge.providers.base import Message
from bridge.providers.registry import ProviderRegistry
from bridge.settings import Settings
from bridge.streams.jobs import Fallback, GenerationJob

MESSAGE_TYPES = ("add", "listen", "cancel")
QUERY = "{query}"


class TemplateStream(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One stream of an assistant: a provider, its settings, and the message template.

    Several streams are fallbacks: the next one runs if the one before it fails before
    writing any token.
    """

    provider: str
    settings: dict[str, Any]
    messages: Annotated[list[dict[str, Any]], msgspec.Meta(min_length=1)]


class Assistant(msgspec.Struct, frozen=True):
    streams: Annotated[list[TemplateStream], msgspec.Meta(min_length=1, max_length=8)]


class AddRequest(msgspec.Struct, frozen=True):
    """`{"type": "add", ...}`: queue a job from an assistant template."""

    type: Literal["add"]
    id: Annotated[str, msgspec.Meta(max_length=256)]
    assistant: Assistant
    query: str = ""
    history: list[ChatMessage] = []


class ListenRequest(msgspec.Struct, frozen=True):
    """`{"type": "listen", "job_id": ...}`; `cursor` resumes after the update that carried it."""

    type: Literal["listen"]
    job_id: Id
    cursor: str | None = None


class CancelRequest(msgspec.Struct, frozen=True):
    """`{"type": "cancel", "job_id": ...}` (an addition to the seed's protocol)."""

    type: Literal["cancel"]
    job_id: Id


ClientMessage = AddRequest | ListenRequest | CancelRequest
_SHAPES: dict[str, type[AddRequest] | type[ListenRequest] | type[CancelRequest]] = {
    "add": AddRequest,
    "listen": ListenRequest,
    "cancel": CancelRequest,
}
_decode_object = msgspec.json.Decoder(dict[str, Any]).decode


class InvalidMessage(BadRequest):
    """A client message that cannot be served; `about` names the request or job it was for."""

    def __init__(self, detail: str, about: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.about = about or {}


def parse_message(text: str | bytes) -> ClientMessage:
    """Decode one client message; InvalidMessage says what is wrong with it."""
    try:
        raw = _decode_object(text)
    except msgspec.DecodeError as exc:
        raise InvalidMessage(f"the message is not a JSON object: {exc}") from None
    kind = raw.get("type")
    shape = _SHAPES.get(kind) if isinstance(kind, str) else None
    if shape is None:
        known = ", ".join(MESSAGE_TYPES)
        raise InvalidMessage(f"unknown message type {kind!r}; known types: {known}")
    try:
        return msgspec.convert(raw, shape)
    except msgspec.ValidationError as exc:
        about = {name: raw[name] for name in ("id", "job_id") if isinstance(raw.get(name), str)}
        raise InvalidMessage(f"invalid {kind!r} message: {exc}", about) from None


def render(template: list[dict[str, Any]], query: str, history: list[ChatMessage]) -> list[Message]:
    """The conversation a template describes, for this query and history."""
    messages: list[Message] = []
    for index, item in enumerate(template):
        if "insert" in item:
            if item != {"insert": "history"}:
                raise BadRequest(f'template message {index}: only {{"insert": "history"}} exists')
            messages += [Message(m.role, m.content) for m in history]
            continue
        try:
            message = msgspec.convert(item, ChatMessage)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"template message {index}: {exc}") from None
        messages.append(Message(message.role, message.content.replace(QUERY, query)))
    return messages


def stream_settings(settings: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A stream's model name, and its other settings validated as provider params.

    Settings are OpenAI's snake_case names (`max_tokens`); camelCase is accepted too.
    """
    model = settings.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("a stream's settings need a `model`")
    options = {_camel(name): value for name, value in settings.items() if name != "model"}
    try:
        params = msgspec.convert(options, GenerationParams)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid stream settings: {exc}") from None
    return model, params.for_provider()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def build_job(
    add: AddRequest,
    job_id: str,
    session: str,
    providers: ProviderRegistry,
    settings: Settings,
    created_ms: float,
) -> GenerationJob:
    """The generation an `add` asks for: its first stream, with the others as fallbacks."""
    steps = []
    for stream in add.assistant.streams:
        name, params = stream_settings(stream.settings)
        model = providers.alias_for(stream.provider, name)
        messages = check_messages(render(stream.messages, add.query, add.history), settings)
        steps.append(Fallback(model, messages, params))
    first, *rest = steps
    return GenerationJob(
        request_id=job_id,
        session_id=session,
        model_id=first.model_id,
        messages=first.messages,
        params=first.params,
        created_ms=created_ms,
        fallbacks=tuple(rest),
    )
