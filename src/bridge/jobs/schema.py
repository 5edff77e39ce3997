"""The structured result a job asks the model for, the prompts that ask for it, and validation.

The prompt is built by concatenation, never `str.format`, so braces in the user's text stay
literal.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from bridge.providers.base import Message

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class ExtractedEntity(msgspec.Struct, frozen=True):
    """Something named in the text, how it is typed, and how sure the model is."""

    type: NonEmpty
    value: NonEmpty
    confidence: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]


class LLMOutput(msgspec.Struct, frozen=True):
    """The validated result of a job (seed 003's `LLMOutput`, with its comments made rules)."""

    summary: NonEmpty
    sentiment: Literal["positive", "neutral", "negative"]
    tags: Annotated[list[NonEmpty], msgspec.Meta(min_length=1, max_length=5)]
    entities: list[ExtractedEntity]


class InvalidOutput(ValueError):
    """The model's answer is not JSON of the `LLMOutput` shape; the message says where."""


SYSTEM_PROMPT = (
    "You are a precise information extraction assistant. "
    "Return ONLY a compact JSON object following the schema provided, no prose."
)

_INSTRUCTIONS = (
    "Read the text and produce JSON with keys:\n"
    "summary: brief summary (<=40 words)\n"
    'sentiment: one of ["positive","neutral","negative"]\n'
    "tags: array of 1-5 short tags\n"
    "entities: array of objects {type, value, confidence (0..1)}\n\n"
    "Text:\n"
)

_decode = msgspec.json.Decoder(LLMOutput).decode


def structured_messages(text: str) -> tuple[Message, ...]:
    """The conversation that asks for `text`'s structure (the seed's prompt)."""
    return (
        Message("system", SYSTEM_PROMPT),
        Message("user", _INSTRUCTIONS + '"""' + text + '"""'),
    )


def retry_message(reason: str) -> Message:
    """What the model is told after an answer that failed validation."""
    return Message(
        "user",
        "Your answer did not match the schema: "
        + reason
        + ". Reply again with ONLY the corrected JSON object.",
    )


def parse_output(text: str) -> LLMOutput:
    """Validate the model's answer; a Markdown code fence around the JSON is tolerated."""
    body = text.strip()
    if body.startswith("```"):
        body = body.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not body:
        raise InvalidOutput("the answer is empty")
    try:
        return _decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidOutput(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidOutput(f"the answer is not JSON ({exc})") from None
