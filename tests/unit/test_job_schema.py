"""The job API's output schema, its validation, and the mock's structured answers."""

from __future__ import annotations

import msgspec
import pytest

from bridge.jobs.schema import InvalidOutput, parse_output, structured_messages
from bridge.providers.mock_extract import invalid_json_answer, json_answer, subject_text

VALID = {
    "summary": "A visit.",
    "sentiment": "neutral",
    "tags": ["clinic"],
    "entities": [{"type": "person", "value": "Dr. Rao", "confidence": 0.5}],
}


def encoded(**changes: object) -> str:
    return msgspec.json.encode({**VALID, **changes}).decode()


def test_a_valid_answer_parses() -> None:
    """The seed's example result shape validates, also inside a Markdown code fence."""
    assert parse_output(encoded()).entities[0].value == "Dr. Rao"
    assert parse_output("```json\n" + encoded() + "\n```").sentiment == "neutral"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (encoded(sentiment="ecstatic"), "Invalid enum value 'ecstatic' - at `$.sentiment`"),
        (encoded(tags=[]), "length >= 1 - at `$.tags`"),
        (encoded(tags=["a", "b", "c", "d", "e", "f"]), "length <= 5 - at `$.tags`"),
        (encoded(tags=[""]), "at `$.tags[0]`"),
        (encoded(summary=""), "at `$.summary`"),
        (encoded(entities=[{"type": "x", "value": "y", "confidence": 1.2}]), "<= 1.0"),
        (encoded(entities=[{"type": "x", "value": "y", "confidence": -0.1}]), ">= 0.0"),
        (encoded(entities=[{"type": "x", "value": "y"}]), "missing required field `confidence`"),
        ('{"summary": "x"}', "missing required field"),
        ("Sure! Here is the JSON:", "the answer is not JSON"),
        ("", "the answer is empty"),
    ],
)
def test_invalid_answers_say_where(text: str, needle: str) -> None:
    """Every rule of the schema is enforced, and the error names the place (for the re-ask)."""
    with pytest.raises(InvalidOutput) as caught:
        parse_output(text)
    assert needle in str(caught.value)


def test_the_prompt_keeps_the_text_literal() -> None:
    """The user's text, braces and quotes included, is embedded as is."""
    text = 'A {weird} "text" with {0}'
    system, user = structured_messages(text)
    assert system.role == "system"
    assert user.content.endswith('Text:\n"""' + text + '"""')
    assert subject_text(structured_messages(text)) == text


def test_the_mock_answers_the_seed_example_validly() -> None:
    """The mock's JSON for the seed's text is valid and about that text."""
    text = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes."
    output = parse_output(json_answer(structured_messages(text)))
    assert output.summary == text
    assert output.sentiment == "positive"
    assert output.tags == ["loved", "clinic", "kind"]
    assert [(e.type, e.value, e.confidence) for e in output.entities] == [
        ("person", "Dr. Rao", 0.9)
    ]
    with pytest.raises(InvalidOutput):
        parse_output(invalid_json_answer())
