"""The event codec: Redis fields, SSE payloads and frames, entry ids and resume cursors."""

from __future__ import annotations

import json

import pytest

from bridge.errors import BadRequest, MalformedEntry
from bridge.sse_client import SSEParser
from bridge.streams.codec import (
    MAX_CURSOR_CHARS,
    TERMINAL,
    EventType,
    StreamEvent,
    format_cursor,
    format_entry_id,
    from_fields,
    parse_cursor,
    parse_entry_id,
    sse_data,
    sse_frame,
    to_fields,
)


def _as_redis(fields: list[str]) -> dict[bytes, bytes]:
    """Field/value pairs as redis-py returns them from XRANGE/XREAD: a dict of bytes."""
    assert len(fields) % 2 == 0
    return {fields[i].encode(): fields[i + 1].encode() for i in range(0, len(fields), 2)}


def _event(kind: EventType, **kwargs: object) -> StreamEvent:
    base: dict[str, object] = {"request_id": "req-1", "seq": 7, "ts": 1703123456789.123}
    base.update(kwargs)
    return StreamEvent(kind, **base)  # type: ignore[arg-type]


_SAMPLES = [
    _event(EventType.TOKEN, content="Hello"),
    _event(EventType.SEAM, data={"mode": "restart", "epoch": 2}),
    _event(
        EventType.COMPLETE,
        data={"finishReason": "stop", "usage": {"promptTokens": 3, "completionTokens": 5}},
    ),
    _event(EventType.ERROR, data={"code": "provider_timeout", "message": "slow"}),
    _event(EventType.CANCELLED, data={}),
    _event(EventType.CANCELLED),
]


def test_samples_cover_every_event_type() -> None:
    """The round-trip samples below include at least one event of every EventType."""
    assert {event.type for event in _SAMPLES} == set(EventType)


@pytest.mark.parametrize("event", _SAMPLES, ids=lambda e: f"{e.type.value}")
def test_fields_round_trip_for_every_event_type(event: StreamEvent) -> None:
    """to_fields then from_fields (with bytes keys, as Redis returns them) gives the same event."""
    decoded = from_fields(_as_redis(to_fields(event)))
    assert decoded == event
    assert decoded.type is event.type
    assert decoded.terminal is (event.type in TERMINAL)


def test_fields_round_trip_keeps_token_text_and_float_timestamp_exactly() -> None:
    """Awkward token text and a timestamp with microseconds survive the Redis field form."""
    event = _event(EventType.TOKEN, content="a\nb\r\nc\x00 é 🎉 \u2028", ts=1703123456789.001)
    decoded = from_fields(_as_redis(to_fields(event)))
    assert decoded.content == event.content
    assert decoded.ts == event.ts


def test_fields_are_compact_and_omit_empty_parts() -> None:
    """A token carries no `d` field and a data-less event no `c` or `d` field."""
    token_fields = to_fields(_event(EventType.TOKEN, content="x"))[::2]
    assert token_fields == ["t", "r", "s", "ts", "c"]
    bare = to_fields(_event(EventType.CANCELLED))[::2]
    assert bare == ["t", "r", "s", "ts"]


def _good_fields() -> dict[bytes, bytes]:
    return _as_redis(to_fields(_event(EventType.COMPLETE, data={"finishReason": "stop"})))


@pytest.mark.parametrize("missing", [b"t", b"r", b"s", b"ts"])
def test_from_fields_rejects_a_missing_required_field(missing: bytes) -> None:
    """An entry without one of t, r, s, ts raises MalformedEntry."""
    fields = _good_fields()
    del fields[missing]
    with pytest.raises(MalformedEntry):
        from_fields(fields)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (b"s", b"seven"),
        (b"s", b""),
        (b"ts", b"yesterday"),
        (b"t", b"\xff\xfe"),
        (b"r", b"\xc3"),
        (b"c", b"\xed\xa0\x80"),
        (b"d", b"{not json"),
        (b"d", b'["a", "list"]'),
        (b"d", b'"a string"'),
        (b"d", b"\xff"),
    ],
)
def test_from_fields_rejects_garbled_fields(field: bytes, value: bytes) -> None:
    """Non-numeric sequences or times, invalid UTF-8 and `d` that is not a JSON object fail."""
    fields = _good_fields()
    fields[field] = value
    with pytest.raises(MalformedEntry):
        from_fields(fields)


@pytest.mark.parametrize("kind", [b"tokens", b"TOKEN", b"", b"message"])
def test_from_fields_rejects_an_unknown_type(kind: bytes) -> None:
    """A type that is not one of the EventType values raises MalformedEntry."""
    fields = _good_fields()
    fields[b"t"] = kind
    with pytest.raises(MalformedEntry):
        from_fields(fields)


def test_from_fields_rejects_an_empty_entry() -> None:
    """An entry with no fields at all raises MalformedEntry, not KeyError."""
    with pytest.raises(MalformedEntry):
        from_fields({})


def test_sse_data_of_a_token_is_one_camel_case_json_line_with_content() -> None:
    """A token's payload is a single JSON line with content, sequence, timestamp and modelId."""
    event = _event(EventType.TOKEN, content="line1\nline2\r\n\u2028")
    raw = sse_data(event, "gpt-4")
    assert b"\n" not in raw
    assert b"\r" not in raw
    payload = json.loads(raw)
    assert payload == {
        "content": "line1\nline2\r\n\u2028",
        "sequence": 7,
        "timestamp": 1703123456789.123,
        "modelId": "gpt-4",
        "requestId": "req-1",
    }


def test_sse_data_of_complete_merges_its_data_and_has_no_content() -> None:
    """A complete event's payload carries finishReason and usage and no content key."""
    event = _event(EventType.COMPLETE, data={"finishReason": "stop", "usage": {"totalTokens": 4}})
    payload = json.loads(sse_data(event, "claude"))
    assert payload["finishReason"] == "stop"
    assert payload["usage"] == {"totalTokens": 4}
    assert payload["modelId"] == "claude"
    assert payload["sequence"] == 7
    assert "content" not in payload


def test_sse_frame_has_id_event_and_data_lines() -> None:
    """sse_frame writes id, event and data lines and ends with a blank line."""
    frame = sse_frame("token", b'{"a":1}', "m:1-0")
    assert frame == b'id: m:1-0\nevent: token\ndata: {"a":1}\n\n'
    assert sse_frame("gap", b"{}") == b"event: gap\ndata: {}\n\n"


_AWKWARD = [
    "\n",
    "\r",
    "\r\n",
    "a\n\nb",
    "data: x",
    "\ndata: injected\n\n",
    "id: 99\n",
    ": comment",
    "\u2028\u2029",
    "🎉👩‍👩‍👧",
    "\x00",
    "nul\x00in the middle",
    "",
    " leading space",
    '"quoted" \\ backslash',
]


@pytest.mark.parametrize("content", _AWKWARD, ids=repr)
def test_awkward_tokens_round_trip_through_sse_frame_and_parser(content: str) -> None:
    """Token text with line breaks, SSE syntax, U+2028, emoji or NUL arrives unchanged."""
    event = _event(EventType.TOKEN, content=content)
    frame = sse_frame("token", sse_data(event, "m"), "m:1-5")
    parser = SSEParser()
    events = parser.feed(frame)
    assert len(events) == 1
    assert events[0].event == "token"
    assert events[0].id == "m:1-5"
    assert json.loads(events[0].data)["content"] == content


def test_several_awkward_frames_fed_byte_by_byte_arrive_in_order() -> None:
    """All awkward tokens in one stream, fed one byte at a time, arrive in order and intact."""
    stream = b"".join(
        sse_frame("token", sse_data(_event(EventType.TOKEN, content=c, seq=i), "m"), f"m:1-{i}")
        for i, c in enumerate(_AWKWARD)
    )
    parser = SSEParser()
    got = []
    for i in range(len(stream)):
        got += parser.feed(stream[i : i + 1])
    assert [json.loads(e.data)["content"] for e in got] == _AWKWARD
    assert [e.id for e in got] == [f"m:1-{i}" for i in range(len(_AWKWARD))]


def test_cursor_round_trip() -> None:
    """format_cursor then parse_cursor gives back the same per-model positions."""
    cursor = {"gpt-4": (1703123456789, 4), "claude": (1703123456790, 0), "a.b_c-d": (0, 0)}
    assert parse_cursor(format_cursor(cursor)) == cursor


def test_cursor_format_is_stable_and_sorted() -> None:
    """The cursor text lists models sorted by name, whatever the dict's insertion order."""
    one = format_cursor({"gpt-4": (2, 1), "claude": (1, 0)})
    two = format_cursor({"claude": (1, 0), "gpt-4": (2, 1)})
    assert one == two == "claude:1-0,gpt-4:2-1"


def test_cursor_with_twenty_digit_parts_parses() -> None:
    """Parts of up to 20 digits (the width of uint64) are accepted."""
    cursor = parse_cursor("m:18446744073709551615-18446744073709551615")
    assert cursor == {"m": (18446744073709551615, 18446744073709551615)}


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_empty_cursor_means_from_the_start(blank: str) -> None:
    """An empty or blank Last-Event-ID parses to an empty cursor."""
    assert parse_cursor(blank) == {}


def test_cursor_surrounding_whitespace_is_ignored() -> None:
    """Whitespace around the whole Last-Event-ID (as a header may carry) is stripped."""
    assert parse_cursor(" m:1-2,n:3-4\r\n") == {"m": (1, 2), "n": (3, 4)}


@pytest.mark.parametrize(
    "garbage",
    [
        "*",
        "m:*",
        "m: 1-2",
        "m:1 -2",
        "m:1-2, n:3-4",
        "m :1-2",
        "m:1-2\nn:3-4",
        "m:1-2\r,n:3-4",
        "m\n:1-2",
        "m:1-",
        "m:1",
        "m:-1",
        "m:1-x",
        "m:a-1",
        "m:1.5-1",
        "m:+1-1",
        "m:1-2-3",
        "m:123456789012345678901-0",
        "m:0-123456789012345678901",
        ":1-2",
        "m:1-2,",
        ",m:1-2",
        "m:1-2,,n:3-4",
        "m:n:1-2",
        "m/x:1-2",
        "m{x}:1-2",
        "$",
        "0-0",
        "a" * 129 + ":1-2",
    ],
    ids=repr,
)
def test_garbage_cursor_is_a_bad_request(garbage: str) -> None:
    """A Last-Event-ID this server could not have sent raises BadRequest (400)."""
    with pytest.raises(BadRequest) as info:
        parse_cursor(garbage)
    assert info.value.status_code == 400


def test_too_long_cursor_is_a_bad_request() -> None:
    """A cursor longer than MAX_CURSOR_CHARS is rejected even when each part is valid."""
    parts = [f"model{i}:1703123456789-{i}" for i in range(MAX_CURSOR_CHARS // 10)]
    text = ",".join(parts)
    assert len(text) > MAX_CURSOR_CHARS
    with pytest.raises(BadRequest, match="too long"):
        parse_cursor(text)


def test_cursor_beyond_uint64_is_a_bad_request() -> None:
    """A cursor part above the largest Redis stream id (2**64-1) is rejected, not sent to Redis."""
    with pytest.raises(BadRequest):
        parse_cursor("m:99999999999999999999-0")


def test_cursor_with_non_ascii_digits_is_a_bad_request() -> None:
    """A cursor written with Arabic-Indic digits is not one this server issued and is rejected."""
    with pytest.raises(BadRequest):
        parse_cursor("m:\u0661\u0662-\u0663")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"1703123456789-4", (1703123456789, 4)),
        ("1703123456789-4", (1703123456789, 4)),
        (b"0-0", (0, 0)),
        (b"5", (5, 0)),
        ("18446744073709551615-18446744073709551615", (2**64 - 1, 2**64 - 1)),
    ],
)
def test_parse_entry_id(raw: bytes | str, expected: tuple[int, int]) -> None:
    """parse_entry_id splits a Redis entry id (bytes or str) into (ms, seq)."""
    assert parse_entry_id(raw) == expected


@pytest.mark.parametrize("entry_id", [(0, 0), (1703123456789, 4), (2**64 - 1, 7)])
def test_format_entry_id_round_trips(entry_id: tuple[int, int]) -> None:
    """format_entry_id writes `ms-seq`, which parse_entry_id reads back."""
    text = format_entry_id(entry_id)
    assert text == f"{entry_id[0]}-{entry_id[1]}"
    assert parse_entry_id(text) == entry_id
    assert parse_entry_id(text.encode()) == entry_id


def test_entry_ids_order_like_redis() -> None:
    """Parsed entry ids compare numerically, so 10-0 comes after 9-5 (unlike the strings)."""
    assert parse_entry_id(b"10-0") > parse_entry_id(b"9-5")
    assert parse_entry_id(b"9-10") > parse_entry_id(b"9-9")
