"""Redis key names and the id check that guards every key part."""

from __future__ import annotations

import pytest

from bridge.errors import BadRequest
from bridge.streams.keys import WORKER_GROUP, Keys, check_id


def test_default_prefix_key_names() -> None:
    """With the default `llm:` prefix every key has the documented name."""
    keys = Keys()
    assert keys.prefix == "llm:"
    assert keys.stream("user_123", "gpt-4") == "llm:stream:user_123:gpt-4"
    assert keys.requests == "llm:requests"
    assert keys.dead_letters == "llm:requests:dead"
    assert keys.secret == "llm:secret"
    assert keys.cancel_channel == "llm:cancel"
    assert keys.workers == "llm:workers"
    assert keys.worker_group == WORKER_GROUP == "workers"
    assert keys.session_index("s1") == "llm:session:s1"
    assert keys.generation("abc") == "llm:gen:abc"
    assert keys.usage("s1") == "llm:usage:s1"


def test_custom_prefix_applies_to_every_key() -> None:
    """A custom prefix starts every key name, so tests and tenants stay apart."""
    keys = Keys("test:42:")
    names = [
        keys.stream("s", "m"),
        keys.requests,
        keys.dead_letters,
        keys.secret,
        keys.cancel_channel,
        keys.workers,
        keys.session_index("s"),
        keys.generation("r"),
        keys.usage("s"),
    ]
    assert all(name.startswith("test:42:") for name in names)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize(
    ("session", "model"),
    [
        ("user_123", "gpt-4"),
        ("a.b.c", "claude"),
        ("with-dashes--", "m.v1.5"),
        ("..x", "deepseek-ai"),
        ("s" * 128, "m" * 128),
        ("stream", "stream"),
    ],
)
def test_parse_stream_round_trips(session: str, model: str) -> None:
    """parse_stream splits a stream key back into the session and model it was built from."""
    keys = Keys("p:stream:")
    assert keys.parse_stream(keys.stream(session, model)) == (session, model)


@pytest.mark.parametrize(
    "value",
    ["a", "A", "0", "_", "-", "...", ".a", "a.", "user_123", "gpt-4", "a-b.c_D9", "x" * 128],
)
def test_check_id_accepts_safe_ids(value: str) -> None:
    """Ids of 1 to 128 characters from [A-Za-z0-9_.-] are returned unchanged."""
    assert check_id("sessionId", value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "..",
        "x" * 129,
        "*",
        ":",
        "a:b",
        "{",
        "}",
        "{tag}",
        " ",
        "a b",
        "\n",
        "abc\n",
        "\nabc",
        "\t",
        "\x00",
        "é",
        "naïve",
        "日本",
        "\uff21",  # fullwidth A
        "a/b",
        "a\\b",
        "a,b",
        "$",
        "?",
    ],
    ids=repr,
)
def test_check_id_rejects_unsafe_ids(value: str) -> None:
    """Empty, dot-only, too long, non-ASCII or punctuation-bearing ids raise BadRequest 400."""
    with pytest.raises(BadRequest) as info:
        check_id("modelId", value)
    assert info.value.status_code == 400
    assert "modelId" in info.value.detail
