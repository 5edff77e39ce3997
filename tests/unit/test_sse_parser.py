"""SSEParser against the WHATWG "event stream interpretation" rules."""

from __future__ import annotations

import pytest

from bridge.sse_client import SSEEvent, SSEParser


def _feed_all(chunks: list[bytes]) -> tuple[SSEParser, list[SSEEvent]]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return parser, events


@pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"], ids=["LF", "CR", "CRLF"])
def test_each_line_ending_separates_lines_and_events(eol: bytes) -> None:
    """LF, CR and CRLF each end a line, and an empty line dispatches the event."""
    lines = [b"id: 1", b"event: token", b"data: a", b"", b"data: b", b"data: c", b""]
    lines += [b"data: tail", b"", b": more\n"]
    stream = eol.join(lines)
    parser, events = _feed_all([stream])
    assert parser.comments == 1
    assert events == [
        SSEEvent(event="token", data="a", id="1"),
        SSEEvent(event="message", data="b\nc", id="1"),
        SSEEvent(event="message", data="tail", id="1"),
    ]


def test_mixed_line_endings_in_one_stream() -> None:
    """LF, CR and CRLF may be mixed within one stream."""
    _, events = _feed_all([b"data: a\rdata: b\r\ndata: c\n\r\n"])
    assert events == [SSEEvent(event="message", data="a\nb\nc", id="")]


def test_crlf_split_across_chunks_is_one_line_ending() -> None:
    """A CR at the end of one chunk and an LF at the start of the next make one line ending."""
    _, events = _feed_all([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert events == [SSEEvent(event="message", data="a\nb", id="")]


def test_lone_cr_at_chunk_boundary_followed_by_text_ends_the_line() -> None:
    """A CR at a chunk's end followed by ordinary text in the next chunk is a line ending."""
    _, events = _feed_all([b"data: a\r", b"data: b\r", b"\r"])
    # The final CR ends a line at once; an LF opening the next chunk would be skipped.
    assert events == [SSEEvent(event="message", data="a\nb", id="")]
    _, events = _feed_all([b"data: a\r", b"data: b\r", b"\r", b"data: c\n\n"])
    assert events == [
        SSEEvent(event="message", data="a\nb", id=""),
        SSEEvent(event="message", data="c", id=""),
    ]


def test_event_ended_by_cr_at_the_end_of_a_chunk_is_dispatched_at_once() -> None:
    """A complete event ending in CR CR is dispatched when it arrives, not with the next chunk."""
    _, events = _feed_all([b"data: a\r\r"])
    assert events == [SSEEvent(event="message", data="a", id="")]


def test_bom_at_the_start_is_stripped() -> None:
    """A UTF-8 byte order mark before the first line is ignored, so its field is recognised."""
    _, events = _feed_all([b"\xef\xbb\xbfdata: x\n\n"])
    assert events == [SSEEvent(event="message", data="x", id="")]


def test_bom_split_across_chunks_is_stripped() -> None:
    """A BOM whose bytes arrive in separate chunks is still stripped."""
    _, events = _feed_all([b"\xef", b"\xbb", b"\xbfdata: x\n", b"\n"])
    assert events == [SSEEvent(event="message", data="x", id="")]


def test_bom_later_in_the_stream_is_not_stripped() -> None:
    """Only a BOM at the very start is special; later it is part of a field name."""
    _, events = _feed_all([b"data: a\n\n\xef\xbb\xbfdata: b\n\n"])
    assert events == [SSEEvent(event="message", data="a", id="")]


def test_comments_are_counted_and_never_dispatched() -> None:
    """Lines starting with a colon are comments: counted, but never events or data."""
    parser, events = _feed_all([b": \n\n: ping\n\n:\ndata: x\n: between\n\n"])
    assert parser.comments == 4
    assert events == [SSEEvent(event="message", data="x", id="")]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"retry: 3000", 3000),
        (b"retry:250", 250),
        (b"retry: 0", 0),
        (b"retry: 3000ms", None),
        (b"retry: -5", None),
        (b"retry: 1.5", None),
        (b"retry: ", None),
        (b"retry:  300", None),
        (b"retry: 3 000", None),
    ],
)
def test_retry_accepts_ascii_digits_only(line: bytes, expected: int | None) -> None:
    """`retry:` sets the reconnection time only when its value is all ASCII digits."""
    parser, _ = _feed_all([line + b"\n\n"])
    assert parser.retry_ms == expected


def test_invalid_retry_keeps_the_previous_value() -> None:
    """An invalid `retry:` leaves the previously set reconnection time in force."""
    parser, _ = _feed_all([b"retry: 1000\n\nretry: soon\n\n"])
    assert parser.retry_ms == 1000


def test_retry_with_non_ascii_digits_is_ignored() -> None:
    """`retry:` with a superscript or Arabic-Indic digit is ignored (not ASCII), not a crash."""
    parser, _ = _feed_all(["retry: 1000\n\nretry: \u00b2\n\nretry: \u0661\n\n".encode()])
    assert parser.retry_ms == 1000


def test_id_with_nul_is_ignored() -> None:
    """An `id:` whose value contains NUL does not change the last event id."""
    parser, events = _feed_all([b"id: good\ndata: a\n\nid: b\x00ad\ndata: b\n\n"])
    assert [e.id for e in events] == ["good", "good"]
    assert parser.last_event_id == "good"


def test_id_persists_across_events_and_can_be_reset() -> None:
    """The last event id carries over to later events until an `id` line changes it."""
    _, events = _feed_all([b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\n"])
    assert [e.id for e in events] == ["1", "1", ""]


def test_last_event_id_only_moves_when_the_event_is_dispatched() -> None:
    """An id whose event has not been completed yet is not the id a reconnect resumes after."""
    parser, events = _feed_all([b"id: 1\ndata: a\n\nid: 2\nevent: token\ndata: b\n"])
    assert [e.id for e in events] == ["1"]
    assert parser.last_event_id == "1"


def test_multi_line_data_is_joined_with_newlines() -> None:
    """Several `data:` lines of one event are joined with LF, with no trailing LF."""
    _, events = _feed_all([b"data: one\ndata:\ndata: three\n\n"])
    assert events == [SSEEvent(event="message", data="one\n\nthree", id="")]


def test_event_type_defaults_to_message_and_resets_after_dispatch() -> None:
    """Without an `event:` line the type is "message"; a set type applies to one event only."""
    _, events = _feed_all([b"event: token\ndata: a\n\ndata: b\n\nevent:\ndata: c\n\n"])
    assert [e.event for e in events] == ["token", "message", "message"]


def test_no_dispatch_without_data() -> None:
    """A block without `data` dispatches nothing, and its event type does not leak onward."""
    parser, events = _feed_all([b"event: token\nid: 5\n\n\n\ndata: x\n\n"])
    assert events == [SSEEvent(event="message", data="x", id="5")]
    assert parser.last_event_id == "5"


def test_empty_data_line_dispatches_an_empty_event() -> None:
    """A `data:` line with an empty value still makes an event, with empty data."""
    _, events = _feed_all([b"data:\n\n", b"data\n\n"])
    assert events == [
        SSEEvent(event="message", data="", id=""),
        SSEEvent(event="message", data="", id=""),
    ]


def test_field_without_colon_has_an_empty_value() -> None:
    """A line with a field name and no colon is that field with an empty value."""
    _, events = _feed_all([b"event: token\nevent\ndata\ndata: x\n\n"])
    assert events == [SSEEvent(event="message", data="\nx", id="")]


def test_only_one_leading_space_is_removed_from_a_value() -> None:
    """A value without a leading space is kept whole; of several spaces only the first goes."""
    _, events = _feed_all([b"data:x\ndata:  y\ndata: z \ndata:a:b\n\n"])
    assert events == [SSEEvent(event="message", data="x\n y\nz \na:b", id="")]


def test_unknown_fields_and_case_differences_are_ignored() -> None:
    """Fields other than event, data, id and retry (case-sensitive) are ignored."""
    parser, events = _feed_all([b"Data: no\nDATA: no\nfoo: bar\nID: 9\ndata: yes\n\n"])
    assert events == [SSEEvent(event="message", data="yes", id="")]
    assert parser.last_event_id == ""


def test_incomplete_event_is_not_dispatched() -> None:
    """An event whose blank line has not arrived yet is held back."""
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"data: b") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [SSEEvent(event="message", data="a\nb", id="")]


def test_multibyte_utf8_split_across_chunks_decodes() -> None:
    """A UTF-8 character whose bytes arrive in separate chunks decodes correctly."""
    raw = "data: é🎉\n\n".encode()
    cut = raw.index(b"\xf0") + 2
    _, events = _feed_all([raw[:cut], raw[cut:]])
    assert events == [SSEEvent(event="message", data="é🎉", id="")]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    """Invalid UTF-8 is decoded with U+FFFD, as the spec's UTF-8 decode requires."""
    _, events = _feed_all([b"data: a\xffb\n\n"])
    assert events == [SSEEvent(event="message", data="a\ufffdb", id="")]
