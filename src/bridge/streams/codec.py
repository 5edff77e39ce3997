"""Events: their compact Redis form, their SSE form, and resume cursors.

A stream entry has short fields: `t` type, `r` request id, `s` sequence, `ts` producer time
(epoch milliseconds, microsecond precision), `c` token text, `d` JSON of other payloads.

A resume cursor names the last entry seen in each model stream of a session:
`gpt-4:1703123456789-4,claude:1703123456790-0`. Model ids cannot hold `:` or `,`, so the
form is unambiguous; it is what SSE sends as `id:` and what `Last-Event-ID` brings back.
"""

from __future__ import annotations

import enum
import re
import time
from typing import Any

import msgspec

from bridge.errors import BadRequest, MalformedEntry

EntryId = tuple[int, int]
Cursor = dict[str, EntryId]

MAX_CURSOR_CHARS = 8192
_CURSOR_PART = re.compile(r"^([A-Za-z0-9_.-]{1,128}):([0-9]{1,20})-([0-9]{1,20})$")
_MAX_ID_PART = 2**64 - 1
_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder(dict[str, Any]).decode


class EventType(enum.StrEnum):
    """Kinds of stream events. The last three end a generation."""

    TOKEN = "token"
    SEAM = "seam"  # a worker took the generation over; see the README
    COMPLETE = "complete"
    ERROR = "error"
    CANCELLED = "cancelled"


TERMINAL = frozenset({EventType.COMPLETE, EventType.ERROR, EventType.CANCELLED})
_TYPES = {t.value: t for t in EventType}


class StreamEvent(msgspec.Struct, frozen=True, gc=False):
    """One event of a generation, as stored in a token stream.

    Not tracked by the cycle collector (it refers to no object that could refer back to
    it): the events a process holds for a while (`connections/recent.py`) would otherwise
    reach the oldest generation, and every full collection would walk them.
    """

    type: EventType
    request_id: str
    seq: int
    ts: float
    content: str = ""
    data: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL


Batch = list[tuple[EntryId, StreamEvent]]
"""Entries of one stream as the fan-out reader delivers them: (entry id, event), in order."""


def now_ms() -> float:
    """Wall-clock time as epoch milliseconds with microsecond precision."""
    return round(time.time() * 1000.0, 3)


def to_fields(event: StreamEvent) -> list[str]:
    """Flatten an event into Redis field/value pairs."""
    fields = [
        "t",
        event.type.value,
        "r",
        event.request_id,
        "s",
        str(event.seq),
        "ts",
        repr(event.ts),
    ]
    if event.content:
        fields += ["c", event.content]
    if event.data is not None:
        fields += ["d", _json_encode(event.data).decode()]
    return fields


def from_fields(fields: dict[bytes, bytes]) -> StreamEvent:
    """Decode a stream entry; raise MalformedEntry for anything that is not a known event."""
    try:
        return from_text_fields({key.decode(): value.decode() for key, value in fields.items()})
    except UnicodeDecodeError as exc:
        raise MalformedEntry(f"undecodable stream entry: {exc!r}") from None


def from_text_fields(fields: dict[str, str]) -> StreamEvent:
    """`from_fields` for an entry whose fields are text already (the append's message)."""
    try:
        data_raw = fields.get("d")
        return StreamEvent(
            type=_TYPES[fields["t"]],
            request_id=fields["r"],
            seq=int(fields["s"]),
            ts=float(fields["ts"]),
            content=fields.get("c", ""),
            data=None if data_raw is None else _json_decode(data_raw),
        )
    except (KeyError, ValueError, msgspec.DecodeError) as exc:
        raise MalformedEntry(f"undecodable stream entry: {exc!r}") from None


def sse_data(event: StreamEvent, model: str) -> bytes:
    """The JSON `data:` payload clients see (camelCase), one line whatever the text holds."""
    payload: dict[str, Any] = {
        "sequence": event.seq,
        "timestamp": event.ts,
        "modelId": model,
        "requestId": event.request_id,
    }
    if event.type is EventType.TOKEN:
        payload["content"] = event.content
    if event.data:
        payload.update(event.data)
    return _json_encode(payload)


def sse_frame(event: str, data: bytes, cursor: str | None = None) -> bytes:
    """One SSE event. `data` must be a single line (JSON always is)."""
    head = f"id: {cursor}\nevent: {event}\ndata: " if cursor else f"event: {event}\ndata: "
    return head.encode() + data + b"\n\n"


def parse_entry_id(raw: bytes | str) -> EntryId:
    """`b"1703123456789-4"` -> `(1703123456789, 4)`."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_entry_id(entry_id: EntryId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def format_cursor(cursor: Cursor) -> str:
    """The `id:` of an event: every model's last entry, in a stable order."""
    return ",".join(f"{model}:{ms}-{seq}" for model, (ms, seq) in sorted(cursor.items()))


def parse_cursor(text: str) -> Cursor:
    """Parse a `Last-Event-ID`; raise BadRequest for anything this server could not have sent."""
    text = text.strip()
    if not text:
        return {}
    if len(text) > MAX_CURSOR_CHARS:
        raise BadRequest("Last-Event-ID is too long")
    cursor: Cursor = {}
    for part in text.split(","):
        match = _CURSOR_PART.fullmatch(part)
        if match is None:
            raise BadRequest(f"Last-Event-ID {text[:80]!r} is not a cursor this server issued")
        ms, seq = int(match[2]), int(match[3])
        if ms > _MAX_ID_PART or seq > _MAX_ID_PART:
            raise BadRequest(f"Last-Event-ID {text[:80]!r} is not a cursor this server issued")
        cursor[match[1]] = (ms, seq)
    return cursor
