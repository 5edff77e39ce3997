"""Hostile input that needs no Redis: ids, cursors, stream tokens, headers, WebSocket messages."""

from __future__ import annotations

import string
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.access import StreamTokens
from bridge.client_limits import HeaderSizeLimit, MessageLimiter
from bridge.errors import AccessDenied, BadRequest, RateLimited
from bridge.settings import Settings
from bridge.sse_client import SSEParser
from bridge.streams.codec import (
    EventType,
    StreamEvent,
    format_cursor,
    parse_cursor,
    sse_data,
    sse_frame,
)
from bridge.streams.keys import check_id, is_safe_id

HOSTILE_IDS = [
    "*",
    "a*",
    "a:b",
    "{a}",
    "..",
    ".",
    "../x",
    "a/b",
    "a\nb",
    "a\n",
    "a\r",
    "a b",
    "",
    "x" * 129,
    "é",
    "a\u0000",
    "\uff41",  # fullwidth letter a: not ASCII
    "\u0661",  # an Arabic-Indic digit one
]


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_ids_that_could_reach_other_keys_are_refused(value: str) -> None:
    """Glob, separator, hash-tag, path, newline, long and non-ASCII ids never become key parts."""
    assert not is_safe_id(value)
    with pytest.raises(BadRequest):
        check_id("sessionId", value)


@given(st.text(max_size=200))
@settings(max_examples=300)
def test_check_id_accepts_only_the_safe_alphabet(value: str) -> None:
    """Whatever the text, an accepted id holds only [A-Za-z0-9_.-] and is 1-128 long."""
    if is_safe_id(value):
        assert 1 <= len(value) <= 128
        assert set(value) <= set(string.ascii_letters + string.digits + "_.-")
        assert value not in (".", "..")


@given(st.text(max_size=300))
@settings(max_examples=300)
def test_any_last_event_id_parses_or_is_a_bad_request(text: str) -> None:
    """Garbage `Last-Event-ID` values give a cursor or BadRequest, never another error."""
    try:
        cursor = parse_cursor(text)
    except BadRequest:
        return
    for model, (ms, seq) in cursor.items():
        assert is_safe_id(model)
        assert 0 <= ms < 2**64
        assert 0 <= seq < 2**64


cursor_strategy = st.dictionaries(
    st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True).filter(is_safe_id),
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    max_size=5,
)


@given(cursor_strategy)
def test_cursors_round_trip(cursor: dict[str, tuple[int, int]]) -> None:
    """Every cursor the server can send parses back to itself."""
    assert parse_cursor(format_cursor(cursor)) == cursor


@pytest.mark.parametrize(
    "text",
    [
        "m:18446744073709551616-0",  # one past the largest Redis stream id part
        "m:1-18446744073709551616",
        "m:99999999999999999999-0",
        "m:1-1,,m:2-2",
        "m:1-1\nid: x",
        "m:-1-1",
        "*:1-1",
        "m:1-1" + ",m:1-1" * 2000,
    ],
)
def test_cursors_a_server_cannot_have_sent_are_refused(text: str) -> None:
    """Ids past Redis's 64-bit range, injected lines and oversized cursors are 400s."""
    with pytest.raises(BadRequest):
        parse_cursor(text)


TOKENS = StreamTokens([b"new", b"old"], ttl_s=60)


@pytest.mark.parametrize(
    "token",
    [
        "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669\u0660.abc",  # int() takes these
        "9999999999.é",
        "9999999999.\u0000",
        "9999999999.\ud800",
        "." * 5000,
        "9999999999999.abc",
        "-1.abc",
        " 9999999999.abc",
        "9999999999",
        "9999999999.",
    ],
)
def test_hostile_stream_tokens_are_refused_not_crashed_on(token: str) -> None:
    """Tokens with non-ASCII characters, NULs, surrogates or odd shapes get 403, not a 500."""
    with pytest.raises(AccessDenied) as refused:
        TOKENS.verify("s1", token)
    assert refused.value.status_code == 403


def test_a_token_of_a_rotated_out_secret_and_of_another_session_fail() -> None:
    """A token signed by a secret no longer configured, or for another session, is refused."""
    retired = StreamTokens([b"retired"], ttl_s=60).issue("s1")
    with pytest.raises(AccessDenied):
        TOKENS.verify("s1", retired)
    with pytest.raises(AccessDenied):
        TOKENS.verify("s2", TOKENS.issue("s1"))
    TOKENS.verify("s1", StreamTokens([b"old"], ttl_s=60).issue("s1"))  # still verifies


HOSTILE_TEXT = [
    "a\nb",
    "\r",
    "\r\n\r\n",
    "data: injected\n\n",
    "event: complete\nid: x:1-1\n\n",
    "\u2028\u2029\u0085",
    "\x00\x1b[31m",
    "🙂 e\u0301",
    "\ufeff",
]


@pytest.mark.parametrize("content", HOSTILE_TEXT)
def test_token_text_cannot_break_sse_framing(content: str) -> None:
    """Newlines, CRs, `data:` and other control text stay inside one event's JSON payload."""
    event = StreamEvent(EventType.TOKEN, "r1", 1, 1.0, content=content)
    frame = sse_frame("token", sse_data(event, "m"), "m:1-1")
    parsed = SSEParser().feed(b": \nretry: 10\n\n" + frame)
    assert len(parsed) == 1
    assert parsed[0].event == "token"
    assert parsed[0].id == "m:1-1"
    assert msgspec.json.decode(parsed[0].data)["content"] == content


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_websocket_messages_over_the_size_limit_are_refused() -> None:
    """A message larger than the limit is a 413 before anything decodes it."""
    limiter = MessageLimiter(max_bytes=1024, per_s=0, burst=1)
    limiter.check(1024)
    with pytest.raises(BadRequest) as refused:
        limiter.check(1025)
    assert refused.value.status_code == 413


def test_websocket_limits_come_from_settings() -> None:
    """`MessageLimiter.from_settings` applies BRIDGE_WS_MAX_MESSAGE_BYTES and the rate."""
    limiter = MessageLimiter.from_settings(
        Settings.from_env({"BRIDGE_WS_MAX_MESSAGE_BYTES": "10", "BRIDGE_WS_MESSAGE_BURST": "1"})
    )
    with pytest.raises(BadRequest):
        limiter.check(11)
    limiter.check(10)
    with pytest.raises(RateLimited):
        limiter.check(10)


def test_websocket_message_rate_is_a_token_bucket() -> None:
    """A burst passes, the next message waits for the refill, and the bucket refills over time."""
    clock = Clock()
    limiter = MessageLimiter(max_bytes=0, per_s=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.check(10)
    with pytest.raises(RateLimited) as refused:
        limiter.check(10)
    assert refused.value.retry_after_s == 1
    assert refused.value.limit == "WebSocket messages per second"
    clock.now += 0.5
    limiter.check(10)
    with pytest.raises(RateLimited):
        limiter.check(10)
    clock.now += 100
    for _ in range(3):
        limiter.check(10)


async def test_oversized_headers_get_431_and_never_reach_the_app() -> None:
    """The header middleware answers 431 problem+json and does not call the app."""
    called: list[Any] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        called.append(scope)

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    limit = HeaderSizeLimit(app, max_bytes=100)
    await limit({"type": "http", "headers": [(b"x", b"y" * 50)]}, receive, send)  # type: ignore[arg-type]
    assert len(called) == 1
    await limit({"type": "http", "headers": [(b"x", b"y" * 100)]}, receive, send)  # type: ignore[arg-type]
    assert len(called) == 1
    assert sent[0]["status"] == 431
    assert msgspec.json.decode(sent[1]["body"])["status"] == 431
    await limit({"type": "websocket", "headers": [(b"x", b"y" * 100)]}, receive, send)  # type: ignore[arg-type]
    assert sent[2] == {"type": "websocket.close", "code": 1008, "reason": "headers too large"}
