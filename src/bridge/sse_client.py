"""A standards-conforming SSE parser (WHATWG HTML, "event stream interpretation").

Used by `bridge chat`, the tests and the benchmark's load generator.
"""

from __future__ import annotations

import msgspec


class SSEEvent(msgspec.Struct, frozen=True):
    """One dispatched event. `id` is the last event id in force when it was dispatched."""

    event: str
    data: str
    id: str


class SSEParser:
    """Incremental parser: feed bytes as they arrive, get complete events back."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []
        self._event = ""
        self._id_buffer = ""
        self._after_cr = False
        self._first = True
        self.last_event_id = ""  # what EventSource would send as Last-Event-ID
        self.retry_ms: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse `chunk`; return the events it completed."""
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]  # the LF of a CRLF split across chunks
        self._after_cr = False
        buf = self._buffer + chunk
        events: list[SSEEvent] = []
        start = 0
        while True:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start, lf if lf >= 0 else len(buf))
            if cr >= 0:
                end, start_next = cr, cr + 1
                if cr + 1 < len(buf) and buf[cr + 1] == 0x0A:
                    start_next += 1
                elif cr + 1 == len(buf):
                    self._after_cr = True
            elif lf >= 0:
                end, start_next = lf, lf + 1
            else:
                break
            line = buf[start:end].decode("utf-8", "replace")
            start = start_next
            if self._first:
                self._first = False
                line = line.removeprefix("\ufeff")
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._buffer = buf[start:]
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._id_buffer = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        self.last_event_id = self._id_buffer
        return SSEEvent(event=event or "message", data="\n".join(data), id=self.last_event_id)
