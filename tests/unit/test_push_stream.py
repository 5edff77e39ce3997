"""`PushStream`: an SSE body written straight to a transport, live events from the callback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from bridge.connections.manager import ConnectionManager
from bridge.connections.push import Pulse, PushStream, chunk
from bridge.connections.sse import History
from bridge.connections.subscriber import Envelope
from bridge.errors import CloseReason
from bridge.sse_client import SSEEvent, SSEParser
from bridge.streams.codec import Cursor, EventType, StreamEvent
from bridge.streams.history import Gap


class FakeTransport(asyncio.Transport):
    """Records what is written; closing and aborting as a socket's transport would."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.buffered = 0  # what get_write_buffer_size() reports
        self.closing = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "written after close"
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def body(self) -> bytes:
        """The chunked body written after the head, de-chunked (up to the last chunk)."""
        raw = bytes(self.data)
        out = bytearray()
        pos = raw.index(b"\r\n\r\n") + 4
        while pos < len(raw):
            end = raw.index(b"\r\n", pos)
            size = int(raw[pos:end], 16)
            if size == 0:
                break
            out += raw[end + 2 : end + 2 + size]
            pos = end + 2 + size + 2
        return bytes(out)

    def events(self) -> list[SSEEvent]:
        return list(SSEParser().feed(self.body()))

    def ended(self) -> bool:
        return self.data.endswith(b"0\r\n\r\n")


def envelope(seq: int, model: str = "m") -> Envelope:
    event = StreamEvent(EventType.TOKEN, "r1", seq, 1700000000000.5, content=f"t{seq} ")
    return Envelope(model, (1000 + seq, 0), event)


def history_of(*items: list[Envelope] | Gap, gate: asyncio.Event | None = None) -> History:
    """A catch-up that yields `items` (after `gate` opens), whatever the cursor."""

    async def replay(cursor: Cursor) -> AsyncIterator[list[Envelope] | Gap]:
        for item in items:
            if gate is not None:
                await gate.wait()
            yield item

    return replay


class Retained:
    """A stream's retained entries: each catch-up pass yields those after the cursor."""

    def __init__(self, *seqs: int) -> None:
        self.entries = [envelope(seq) for seq in seqs]
        self.passes = 0
        self.gate: asyncio.Event | None = None

    async def replay(self, cursor: Cursor) -> AsyncIterator[list[Envelope] | Gap]:
        self.passes += 1
        if self.gate is not None:
            await self.gate.wait()
            self.gate = None
        last = cursor.get("m")
        yield [e for e in self.entries if last is None or e.entry_id > last]

    def append(self, seq: int) -> tuple[tuple[int, int], StreamEvent]:
        self.entries.append(envelope(seq))
        return self.entries[-1].entry_id, self.entries[-1].event


def sequences(events: list[SSEEvent]) -> list[Any]:
    return [msgspec.json.decode(e.data)["sequence"] for e in events if e.event == "token"]


class Setup:
    def __init__(self, *, max_behind: int = 100, heartbeat_s: float = 3600) -> None:
        self.manager = ConnectionManager(queue_size=100)
        self.transport = FakeTransport()
        self.pulse = Pulse(heartbeat_s)
        self.max_behind = max_behind

    async def stream(self) -> PushStream:
        sub = await self.manager.connect("s", {})
        return PushStream(
            sub,
            self.transport,
            manager=self.manager,
            pulse=self.pulse,
            max_behind=self.max_behind,
        )


HEAD = b"HTTP/1.1 200 OK\r\n\r\n"
AFTER = (0, 0)  # what a delivery continues: unused, the manager keeps no recent entries here


async def test_catch_up_then_live_events_each_once_in_order() -> None:
    """What is delivered during the catch-up makes it read again (Redis has it); then the
    stream goes live and deliveries are written from the callback itself."""
    setup = Setup()
    stream = await setup.stream()
    retained = Retained(1, 2)
    retained.gate = gate = asyncio.Event()
    running = asyncio.create_task(stream.run(HEAD, retained.replay, 1000))
    await asyncio.sleep(0)
    setup.manager.deliver("s", "m", AFTER, [retained.append(3)])  # during the first pass
    assert sequences(setup.transport.events()) == []
    gate.set()
    await running
    assert retained.passes == 2
    assert sequences(setup.transport.events()) == [1, 2, 3]
    setup.manager.deliver("s", "m", AFTER, [retained.append(4)])
    setup.manager.deliver("s", "m", AFTER, [(envelope(4).entry_id, envelope(4).event)])  # repeated
    events = setup.transport.events()
    assert sequences(events) == [1, 2, 3, 4]
    assert events[-1].id == "m:1004-0"
    assert len(setup.pulse) == 1


async def test_a_catch_up_that_meets_no_delivery_reads_once() -> None:
    setup = Setup()
    stream = await setup.stream()
    retained = Retained(1, 2)
    await stream.run(HEAD, retained.replay, 1000)
    assert retained.passes == 1
    assert sequences(setup.transport.events()) == [1, 2]


async def test_a_gap_in_the_catch_up_is_written_as_a_gap_event() -> None:
    setup = Setup()
    stream = await setup.stream()
    await stream.run(HEAD, history_of(Gap("m", "trimmed", None), [envelope(5)]), 1000)
    assert [e.event for e in setup.transport.events()] == ["gap", "token"]


async def test_the_catch_up_waits_while_the_transport_is_paused() -> None:
    """A client that reads slowly holds the catch-up at its page, not the server's memory."""
    setup = Setup()
    stream = await setup.stream()
    running = asyncio.create_task(stream.run(HEAD, history_of([envelope(1)], [envelope(2)]), 1000))
    stream.pause_writing()
    await asyncio.sleep(0.05)
    assert sequences(setup.transport.events()) == [1]
    stream.resume_writing()
    await asyncio.wait_for(running, 5)
    assert sequences(setup.transport.events()) == [1, 2]


async def test_a_client_that_stops_reading_is_closed_as_a_slow_consumer() -> None:
    """Past `max_behind` events written over the high water mark: `reconnect`, the last
    chunk, and a close that still flushes what the client has not read yet."""
    setup = Setup(max_behind=3)
    stream = await setup.stream()
    await stream.run(HEAD, history_of(), 1000)
    stream.pause_writing()
    for seq in range(1, 5):
        setup.manager.deliver("s", "m", AFTER, [(envelope(seq).entry_id, envelope(seq).event)])
    assert stream.sub.closed is CloseReason.SLOW_CONSUMER
    events = setup.transport.events()
    assert sequences(events) == [1, 2, 3, 4]
    assert events[-1].event == "reconnect"
    assert setup.transport.ended()
    assert setup.transport.closing
    assert not setup.transport.aborted
    # nothing more is written
    setup.manager.deliver("s", "m", AFTER, [(envelope(5).entry_id, envelope(5).event)])
    assert sequences(setup.transport.events()) == [1, 2, 3, 4]
    assert len(setup.pulse) == 0


async def test_a_client_that_reads_nothing_during_its_catch_up_is_closed_too() -> None:
    """While the catch-up waits for the transport, deliveries are dropped, not queued; past
    `max_behind` of them the stream closes as a slow consumer."""
    setup = Setup(max_behind=3)
    stream = await setup.stream()
    retained = Retained(1)
    running = asyncio.create_task(stream.run(HEAD, retained.replay, 1000))
    stream.pause_writing()
    await asyncio.sleep(0.01)
    for seq in range(2, 6):
        setup.manager.deliver("s", "m", AFTER, [retained.append(seq)])
    with pytest.raises(asyncio.CancelledError):
        await running
    assert stream.sub.closed is CloseReason.SLOW_CONSUMER
    events = setup.transport.events()
    assert sequences(events) == [1]
    assert events[-1].event == "reconnect"
    assert setup.transport.ended()


async def test_writing_resumes_the_count_of_events_behind() -> None:
    setup = Setup(max_behind=3)
    stream = await setup.stream()
    await stream.run(HEAD, history_of(), 1000)
    for round_ in range(3):
        stream.pause_writing()
        for seq in range(3):
            e = envelope(round_ * 3 + seq + 1)
            setup.manager.deliver("s", "m", AFTER, [(e.entry_id, e.event)])
        stream.resume_writing()
    assert stream.sub.closed is None
    assert sequences(setup.transport.events()) == list(range(1, 10))


async def test_the_pulse_pings_streams_that_wrote_nothing_and_notes_progress() -> None:
    setup = Setup(heartbeat_s=0.05)
    stream = await setup.stream()
    await stream.run(HEAD, history_of(), 1000)
    stream.sub.last_progress = 0.0
    await asyncio.sleep(0.18)
    assert setup.transport.body().count(b": ping\n\n") >= 2
    assert stream.sub.last_progress > 0.0
    stream.pause_writing()  # a client that reads nothing makes no progress
    stream.sub.last_progress = 0.0
    await asyncio.sleep(0.12)
    assert stream.sub.last_progress == 0.0


async def test_closing_for_shutdown_ends_the_body_and_unregisters_on_loss() -> None:
    setup = Setup()
    stream = await setup.stream()
    await stream.run(HEAD, history_of(), 1000)
    assert setup.manager.close_all(CloseReason.SHUTDOWN) == 1
    events = setup.transport.events()
    assert [e.event for e in events] == ["reconnect"]
    assert setup.transport.ended()
    assert setup.transport.closing
    stream.lost()  # the transport's connection_lost
    assert setup.manager.connection_count == 0


async def test_a_client_gone_during_the_catch_up_stops_it() -> None:
    setup = Setup()
    stream = await setup.stream()
    gate = asyncio.Event()
    running = asyncio.create_task(stream.run(HEAD, history_of([envelope(1)], gate=gate), 1000))
    await asyncio.sleep(0)
    stream.lost()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert setup.transport.aborted
    assert setup.manager.connection_count == 0
    assert len(setup.pulse) == 0  # never went live


async def test_a_redis_failure_in_the_catch_up_ends_with_reconnect() -> None:
    setup = Setup()
    stream = await setup.stream()

    async def failing(cursor: Cursor) -> AsyncIterator[list[Envelope] | Gap]:
        raise ConnectionError("Redis went away")
        yield []

    await stream.run(HEAD, failing, 1000)
    events = setup.transport.events()
    assert [(e.event, e.data) for e in events] == [("reconnect", '{"reason":"redis_unavailable"}')]
    assert setup.transport.ended()


def test_a_chunk_frames_its_length_in_hex() -> None:
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
