"""Property: any token text survives sse_data + sse_frame + SSEParser, however it is chunked."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.sse_client import SSEParser
from bridge.streams.codec import EventType, StreamEvent, sse_data, sse_frame

# Every code point except surrogates (not encodable as UTF-8), control characters included.
_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200)


def _frame(content: str, seq: int) -> bytes:
    event = StreamEvent(EventType.TOKEN, "req", seq, 1703123456789.5, content=content)
    return sse_frame("token", sse_data(event, "model-a"), f"model-a:1703123456789-{seq}")


def _split(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(content=_TEXT)
def test_any_token_text_round_trips_in_one_chunk(content: str) -> None:
    """Arbitrary token text fed as one chunk comes back exactly as the event's content."""
    parser = SSEParser()
    events = parser.feed(_frame(content, 1))
    assert len(events) == 1
    assert events[0].event == "token"
    assert events[0].id == "model-a:1703123456789-1"
    assert json.loads(events[0].data)["content"] == content


@settings(max_examples=300, deadline=None)
@given(
    contents=st.lists(_TEXT, min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
)
def test_any_token_texts_round_trip_when_split_into_arbitrary_chunks(
    contents: list[str], cuts: list[int]
) -> None:
    """Several frames, cut at arbitrary byte offsets and fed separately, give back every text."""
    stream = b"".join(_frame(content, seq) for seq, content in enumerate(contents))
    parser = SSEParser()
    events = []
    for chunk in _split(stream, cuts):
        events += parser.feed(chunk)
    assert [json.loads(e.data)["content"] for e in events] == contents
    assert [e.id for e in events] == [f"model-a:1703123456789-{i}" for i in range(len(contents))]
    assert parser.feed(b"") == []
