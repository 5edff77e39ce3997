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
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self.comments = 0
        self._first = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Parse `chunk`; return the events it completed."""
        self._buffer += chunk
        events: list[SSEEvent] = []
        while True:
            line, ending = self._next_line()
            if line is None:
                return events
            if self._first:
                self._first = False
                line = line.removeprefix("\ufeff")
            event = self._line(line)
            if event is not None:
                events.append(event)
            del ending

    def _next_line(self) -> tuple[str | None, bytes]:
        buf = self._buffer
        for index, byte in enumerate(buf):
            if byte == 0x0A:
                self._buffer = buf[index + 1 :]
                return buf[:index].decode("utf-8", "replace"), b"\n"
            if byte == 0x0D:
                if index + 1 == len(buf):
                    return None, b""  # wait: this CR may be the first half of CRLF
                skip = 2 if buf[index + 1] == 0x0A else 1
                self._buffer = buf[index + skip :]
                return buf[:index].decode("utf-8", "replace"), b"\r"
        return None, b""

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
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return SSEEvent(event=event or "message", data="\n".join(data), id=self.last_event_id)
