"""build_messages: the conversation sent upstream, and the limits on what a client may send."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from bridge.api.chat import build_messages
from bridge.api.schemas import StartChat
from bridge.errors import BadRequest
from bridge.providers.base import Message
from bridge.settings import Settings


def _start(**body: Any) -> StartChat:
    return msgspec.convert({"sessionId": "s1", "modelId": "mock", **body}, StartChat)


def _settings(**changes: Any) -> Settings:
    return msgspec.structs.replace(Settings(), **changes)


def test_prompt_only_becomes_one_user_message() -> None:
    """A bare prompt is sent as a single user message."""
    assert build_messages(_start(prompt="Hello"), _settings()) == (Message("user", "Hello"),)


def test_messages_then_prompt_keep_their_order() -> None:
    """Messages come first in their order, and the prompt is appended as the last user message."""
    data = _start(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        prompt="and now?",
    )
    assert build_messages(data, _settings()) == (
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", "hello"),
        Message("user", "and now?"),
    )


def test_messages_without_prompt_are_sent_as_they_are() -> None:
    """Without a prompt the messages are the whole conversation."""
    data = _start(messages=[{"role": "user", "content": "question"}])
    assert build_messages(data, _settings()) == (Message("user", "question"),)


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"prompt": None, "messages": None}])
def test_neither_prompt_nor_messages_is_400(body: dict[str, Any]) -> None:
    """A request without prompt or messages is BadRequest 400."""
    with pytest.raises(BadRequest) as info:
        build_messages(_start(**body), _settings())
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": "   \n\t "},
        {"messages": [{"role": "user", "content": " "}], "prompt": "\n"},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "\t"}]},
    ],
)
def test_whitespace_only_content_is_400(body: dict[str, Any]) -> None:
    """A conversation whose every message is empty or whitespace is BadRequest 400."""
    with pytest.raises(BadRequest) as info:
        build_messages(_start(**body), _settings())
    assert info.value.status_code == 400


def test_too_many_messages_is_413() -> None:
    """More messages than max_messages (the prompt counts as one) is BadRequest 413."""
    settings = _settings(max_messages=3)
    three = [{"role": "user", "content": f"m{i}"} for i in range(3)]
    assert len(build_messages(_start(messages=three), settings)) == 3
    with pytest.raises(BadRequest) as info:
        build_messages(_start(messages=three, prompt="one more"), settings)
    assert info.value.status_code == 413
    assert "3" in info.value.detail


def test_too_many_characters_is_413() -> None:
    """More characters than max_prompt_chars over all messages is BadRequest 413."""
    settings = _settings(max_prompt_chars=10)
    exact = _start(messages=[{"role": "system", "content": "12345"}], prompt="67890")
    assert len(build_messages(exact, settings)) == 2
    over = _start(messages=[{"role": "system", "content": "12345"}], prompt="678901")
    with pytest.raises(BadRequest) as info:
        build_messages(over, settings)
    assert info.value.status_code == 413
    assert "11" in info.value.detail
    assert "10" in info.value.detail


def test_characters_are_counted_not_bytes() -> None:
    """The character limit counts code points, so multi-byte text is not penalised."""
    settings = _settings(max_prompt_chars=4)
    assert build_messages(_start(prompt="é🎉日本"), settings) == (Message("user", "é🎉日本"),)
