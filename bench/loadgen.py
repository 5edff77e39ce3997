"""The load generator: a raw asyncio HTTP/1.1 + SSE client that is never the bottleneck.

Each `SSEConnection` is an `asyncio.Protocol`: no streams, no HTTP library, one pass over the
bytes as they arrive (chunked transfer decoding, then SSE event splitting). Token texts carry
the fake upstream's write time (`t<i>@<epoch us> `), so the added latency of every token is
its receive time minus that stamp, with both clocks on this machine.

What one logical client saw (over one or several connections, for resume) is a `ClientStats`:
tokens in order, duplicates, losses, latencies, time to first token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec


def now_us() -> int:
    """Wall-clock time in epoch microseconds (the clock the fake upstream stamps with)."""
    return time.time_ns() // 1000


class _BridgeToken(msgspec.Struct):
    sequence: int
    content: str = ""


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _UpstreamChunk(msgspec.Struct):
    choices: list[_Choice] = []


OPEN_TIMEOUT_S = 30.0

# states of the chunked transfer decoder
_SIZE, _DATA, _CRLF, _END = "size", "data", "crlf", "end"

_bridge_token = msgspec.json.Decoder(_BridgeToken).decode
_upstream_chunk = msgspec.json.Decoder(_UpstreamChunk).decode


def stamp_of(content: str) -> int:
    """The write time (epoch us) in a stamped token text `t<i>@<us> `."""
    return int(content[content.index("@") + 1 :].rstrip())


def _entry_ms(cursor: bytes) -> int:
    """The Redis entry time (epoch ms) in a one-model cursor `model:<ms>-<seq>`."""
    return int(cursor.rpartition(b":")[2].partition(b"-")[0])


@dataclass
class ClientStats:
    """Everything one logical client (a browser tab) received, across its connections."""

    expected: int
    latencies_us: list[int] = field(default_factory=list)
    # the part after the Redis append: receive time minus the entry id's time (ms precision)
    after_append_us: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    last_seq: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    first_token_us: int | None = None
    last_token_us: int = 0
    # the upstream's write times of the first and last token: how fast it really generated
    first_stamp_us: int | None = None
    last_stamp_us: int = 0
    complete: bool = False
    anomalies: list[str] = field(default_factory=list)  # gap, reconnect, error, HTTP failures
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def token(self, seq: int, stamp_us: int, received_us: int, appended_ms: int = 0) -> None:
        if seq in self.seen:
            self.duplicates += 1
            return
        if seq < self.last_seq:
            self.out_of_order += 1
        self.seen.add(seq)
        self.last_seq = max(self.last_seq, seq)
        self.latencies_us.append(received_us - stamp_us)
        if appended_ms:
            self.after_append_us.append(received_us - appended_ms * 1000)
        if self.first_token_us is None:
            self.first_token_us = received_us
        self.last_token_us = received_us
        if self.first_stamp_us is None or stamp_us < self.first_stamp_us:
            self.first_stamp_us = stamp_us
        self.last_stamp_us = max(self.last_stamp_us, stamp_us)

    @property
    def received(self) -> int:
        return len(self.seen)

    @property
    def lost(self) -> int:
        return max(self.expected - len(self.seen), 0)

    def finish(self, ok: bool, why: str = "") -> None:
        self.complete = self.complete or ok
        if why:
            self.anomalies.append(why)
        self.done.set()


class _HTTPStream(asyncio.Protocol):
    """Sends one request and decodes a (possibly chunked) response body as it arrives."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._buf = bytearray()
        self._head_done = False
        self._chunked = False
        self._state = _SIZE  # where the chunked decoder is
        self._left = 0  # bytes left in the current chunk
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.opened_us = 0  # when the response head arrived
        self.opened = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._head_done:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).decode("latin-1").lower()
            del self._buf[: end + 4]
            self._head_done = True
            self.status = int(head.split(" ", 2)[1])
            self._chunked = "transfer-encoding: chunked" in head
            self.opened_us = now_us()
            if not self.opened.done():
                self.opened.set_result(self.status)
        body = self._dechunk() if self._chunked else self._take_all()
        if body:
            self.body_received(body, now_us())

    def _take_all(self) -> bytes:
        body = bytes(self._buf)
        self._buf.clear()
        return body

    def _dechunk(self) -> bytes:
        out = bytearray()
        buf, pos, size = self._buf, 0, len(self._buf)
        while True:
            if self._state == _SIZE:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                self._left = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                pos = eol + 2
                self._state = _DATA if self._left else _END
            elif self._state == _DATA:
                take = min(self._left, size - pos)
                if take == 0:
                    break
                out += buf[pos : pos + take]
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = _CRLF
            elif self._state == _CRLF and size - pos >= 2:
                pos += 2
                self._state = _SIZE
            else:
                break  # waiting for the CRLF, or the last chunk was read
        del buf[:pos]
        return bytes(out)

    def body_received(self, body: bytes, received_us: int) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed before the response head"))
        if not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def get_request(host: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post_request(host: str, path: str, body: Any) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


class SSEConnection(_HTTPStream):
    """One SSE connection to the bridge, feeding a `ClientStats`.

    `stop_after` closes the connection after that many tokens (the resume scenario); the
    last event id seen is kept for the reconnect.
    """

    def __init__(
        self, request: bytes, stats: ClientStats, *, stop_after: int | None = None
    ) -> None:
        super().__init__(request)
        self.stats = stats
        self.stop_after = stop_after
        self.tokens = 0
        self.last_event_id = ""
        self.first_token_us: int | None = None
        self._events = b""

    def body_received(self, body: bytes, received_us: int) -> None:
        data = self._events + body
        blocks = data.split(b"\n\n")
        self._events = blocks.pop()
        stats = self.stats
        for block in blocks:
            if block.startswith(b":") or not block:
                continue
            event, data_line, event_id = b"", b"", b""
            for line in block.split(b"\n"):
                if line.startswith(b"data: "):
                    data_line = line[6:]
                elif line.startswith(b"event: "):
                    event = line[7:]
                elif line.startswith(b"id: "):
                    event_id = line[4:]
            if event_id:
                self.last_event_id = event_id.decode()
            if event == b"token":
                token = _bridge_token(data_line)
                appended_ms = _entry_ms(event_id) if event_id.count(b":") == 1 else 0
                stats.token(token.sequence, stamp_of(token.content), received_us, appended_ms)
                self.tokens += 1
                if self.first_token_us is None:
                    self.first_token_us = received_us
                if self.stop_after is not None and self.tokens >= self.stop_after:
                    self.close()
                    return
            elif event == b"complete":
                stats.finish(True)
                self.close()
                return
            elif event in (b"error", b"cancelled", b"gap", b"reconnect"):
                stats.finish(False, f"{event.decode()}: {data_line[:120].decode()}")
                self.close()
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.status not in (0, 200) and not self.stats.done.is_set():
            self.stats.finish(False, f"HTTP {self.status}")
        super().connection_lost(exc)


class UpstreamConnection(_HTTPStream):
    """A direct read of the fake upstream's OpenAI-style stream (the latency floor)."""

    def __init__(self, request: bytes, stats: ClientStats) -> None:
        super().__init__(request)
        self.stats = stats
        self._events = b""
        self._index = 0

    def body_received(self, body: bytes, received_us: int) -> None:
        data = self._events + body
        blocks = data.split(b"\n\n")
        self._events = blocks.pop()
        for block in blocks:
            payload = block[6:]  # `data: `
            if payload == b"[DONE]":
                self.stats.finish(True)
                self.close()
                return
            for choice in _upstream_chunk(payload).choices:
                if choice.delta is not None and choice.delta.content:
                    self._index += 1
                    stats_seq = self._index
                    self.stats.token(stats_seq, stamp_of(choice.delta.content), received_us)


async def open_stream(
    host: str, port: int, protocol_factory: Callable[[], _HTTPStream]
) -> _HTTPStream:
    """Connect and send the request; returns once the response head arrived."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(OPEN_TIMEOUT_S):
        _, protocol = await loop.create_connection(protocol_factory, host, port)
        await protocol.opened
    return protocol


async def post_json(host: str, port: int, path: str, body: Any) -> tuple[int, Any]:
    """POST JSON with `Connection: close`; returns (status, decoded JSON body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(post_request(f"{host}:{port}", path, body))
        raw = await reader.read()
    finally:
        writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None
