"""The mock provider's JSON answers: a tiny rule-based extractor for the job API's schema.

It reads the text between the last pair of triple quotes of the last user message (where the
job prompt puts it), so job-API tests get an answer that depends on their input, without a
model. `invalid_json_answer` is a schema-violating answer for exercising the retry path.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from bridge.providers.base import Message

_POSITIVE = {"love", "loved", "kind", "great", "good", "excellent", "happy", "friendly", "nice"}
_NEGATIVE = {"bad", "terrible", "awful", "rude", "hate", "hated", "slow", "poor", "angry"}
_STOPWORDS = {"the", "was", "and", "for", "with", "that", "this", "were", "time", "minutes"}
_TITLED = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|Prof)\. [A-Z][a-z]+")
_WORD = re.compile(r"[A-Za-z]+")


def subject_text(messages: tuple[Message, ...]) -> str:
    """The text a job asks about: inside the last `\"\"\"...\"\"\"` of the last user message."""
    users = [m.content for m in messages if m.role == "user"]
    last = users[-1] if users else ""
    for content in reversed(users):  # a retry's user message holds no quoted text
        parts = content.split('"""')
        if len(parts) >= 3:
            return parts[-2].strip()
    return last.strip()


def json_answer(messages: tuple[Message, ...]) -> str:
    """A valid structured answer about the subject text."""
    text = subject_text(messages)
    words = [w.lower() for w in _WORD.findall(text)]
    score = sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words)
    sentiment = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    tags: list[str] = []
    for word in words:
        if len(word) > 3 and word not in _STOPWORDS and word not in tags:
            tags.append(word)
    entities = [
        {"type": "person", "value": name, "confidence": 0.9} for name in _TITLED.findall(text)
    ]
    summary = " ".join(text.split()[:40]) or "empty text"
    answer: dict[str, Any] = {
        "summary": summary,
        "sentiment": sentiment,
        "tags": tags[:3] or ["text"],
        "entities": entities,
    }
    return msgspec.json.encode(answer).decode()


def invalid_json_answer() -> str:
    """JSON that breaks the schema twice over (an unknown sentiment, a confidence above 1)."""
    return (
        '{"summary":"mock","sentiment":"ecstatic","tags":["mock"],'
        '"entities":[{"type":"thing","value":"x","confidence":1.5}]}'
    )


def chunks(text: str, size: int = 8) -> list[str]:
    """`text` in pieces of `size` characters: the tokens the mock streams."""
    return [text[i : i + size] for i in range(0, len(text), size)]
