"""What bridge's own Python spends per delivered token on the SSE side, without sockets.

`python -m bench.writer_cost` registers `--sessions` x `--connections` SSE streams with a
connection manager, as the API does, but gives each a `send` (ASGI streams) or a transport
(push streams, what `bridge serve` runs) that writes nowhere; then it hands the manager one
live token per session at a time, as the fan-out reader does, and lets every stream write it.
The figure is the process's CPU per delivered token: the hub's delivery (with the keeping of
recent entries for reconnects), the wake-up of each connection's task (ASGI streams only), the
encoding (once per event) and the metrics, everything of the live path but the server's write
and the kernel's. S2's serve figure minus this one is what the socket writes cost. The third
row starts one step earlier, as `bridge serve` does: each token arrives as an append's pub/sub
message, which the fan-out reader parses before it delivers (`--connections 1` is S1's shape).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from bridge.connections.manager import ConnectionManager
from bridge.connections.push import Pulse, PushStream
from bridge.connections.sse import SSEStream
from bridge.connections.subscriber import Envelope
from bridge.errors import CloseReason
from bridge.streams.codec import Cursor, EventType, StreamEvent, to_fields
from bridge.streams.fanout import FanoutReader
from bridge.streams.keys import Keys

_RECENT_S = 5.0  # the default BRIDGE_SSE_RECENT_S: each delivery is also kept for reconnects


async def _no_history(cursor: Cursor) -> AsyncIterator[list[Envelope]]:
    return
    yield


class _NullTransport(asyncio.Transport):
    """A socket's transport that takes every write at once."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> None:
        self.writes += 1

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        pass


class _NoConnection:
    def listen(self, listener: Any) -> None:
        pass


def _deliver(manager: ConnectionManager, sessions: int, tokens: int) -> float:
    began = time.process_time()
    for seq in range(1, tokens + 1):
        event = StreamEvent(EventType.TOKEN, "r", seq, time.time() * 1000, content=f"t{seq} ")
        for session in range(sessions):
            manager.deliver(f"s{session}", "m", (1, seq - 1), [((1, seq), event)])
    return time.process_time() - began


async def _push_streams(
    manager: ConnectionManager, sessions: int, connections: int
) -> _NullTransport:
    """`connections` live push streams per session, all writing to one null transport."""
    transport = _NullTransport()
    pulse = Pulse(60)
    for session in range(sessions):
        for _ in range(connections):
            sub = await manager.connect(f"s{session}", {})
            stream = PushStream(sub, transport, manager=manager, pulse=pulse, max_behind=1024)
            await stream.run(b"", _no_history, 1000)
    transport.writes = 0
    return transport


async def _measure_push(sessions: int, connections: int, tokens: int) -> tuple[float, int]:
    """The same for push streams: written from the delivery itself."""
    manager = ConnectionManager(queue_size=1024, recent_s=_RECENT_S)
    transport = await _push_streams(manager, sessions, connections)
    spent = _deliver(manager, sessions, tokens)
    manager.close_all(CloseReason.CLIENT_GONE)
    return spent * 1e6 / (sessions * connections * tokens), transport.writes


async def _measure_messages(sessions: int, connections: int, tokens: int) -> tuple[float, int]:
    """Push streams fed as `bridge serve` feeds them: each token an append's pub/sub message
    (the producer script's format) handed to the fan-out reader, which parses it and delivers."""
    manager = ConnectionManager(queue_size=1024, recent_s=_RECENT_S)
    keys = Keys("writer-cost:")
    # the reader's connections are never used: its sessions are registered as tracked ones
    reader = FanoutReader(_NoConnection(), None, None, keys, manager.deliver)  # type: ignore[arg-type]
    transport = await _push_streams(manager, sessions, connections)
    ms = int(time.time() * 1000)
    for session in range(sessions):
        reader._session_keys[f"s{session}"] = set()
        reader._ready.add(f"s{session}")
        reader._add_stream(f"s{session}", "m", (ms, 0))
    messages = []
    for seq in range(1, tokens + 1):
        event = StreamEvent(EventType.TOKEN, "r" * 32, seq, ms + seq, content=f"t{seq} ")
        entries = msgspec.json.encode([[seq, 1, *to_fields(event)]])
        head = b"m\n%d-%d\n1\n%d-%d\n" % (ms, seq - 1, ms, seq)
        messages += [
            (keys.live_channel(f"s{session}").encode(), head + entries)
            for session in range(sessions)
        ]
    began = time.process_time()
    for channel, payload in messages:
        reader._on_reply([b"message", channel, payload])  # as the subscription hands it over
    spent = time.process_time() - began
    manager.close_all(CloseReason.CLIENT_GONE)
    return spent * 1e6 / (sessions * connections * tokens), transport.writes


async def _measure(sessions: int, connections: int, tokens: int) -> tuple[float, int]:
    """CPU microseconds per delivered token, and the writes the streams made."""
    manager = ConnectionManager(queue_size=1024, recent_s=_RECENT_S)
    writes = 0
    gone = asyncio.Event()

    async def send(message: Any) -> None:  # like the server's: done at once
        nonlocal writes
        writes += 1

    async def receive() -> Any:
        await gone.wait()
        return {"type": "http.disconnect"}

    start: Any = {"type": "http.response.start", "status": 200, "headers": []}
    streams = []
    for session in range(sessions):
        for _ in range(connections):
            sub = await manager.connect(f"s{session}", {})
            stream = SSEStream(
                sub=sub, manager=manager, history=_no_history, heartbeat_s=60, retry_ms=1000
            )
            streams.append(asyncio.create_task(stream(send, receive, start)))
    await asyncio.sleep(0.05)  # every stream sent its start and waits for events
    began = time.process_time()
    for seq in range(1, tokens + 1):
        event = StreamEvent(EventType.TOKEN, "r", seq, time.time() * 1000, content=f"t{seq} ")
        for session in range(sessions):
            manager.deliver(f"s{session}", "m", (1, seq - 1), [((1, seq), event)])
        await asyncio.sleep(0)  # the connections' tasks write
    spent = time.process_time() - began
    gone.set()
    await asyncio.gather(*streams)
    return spent * 1e6 / (sessions * connections * tokens), writes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--connections", type=int, default=25, help="per session (S2: 25)")
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5, help="the best round is reported")
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    print("| streams | sessions x connections | tokens each | writes | us per token (best) |")
    print("|---|---|---|---|---|")
    kinds = (
        ("ASGI (a task each)", _measure),
        ("push (bridge serve)", _measure_push),
        ("push, from the fan-out's messages", _measure_messages),
    )
    for name, measure in kinds:
        figures = [
            run(measure(args.sessions, args.connections, args.tokens)) for _ in range(args.rounds)
        ]
        best = min(cpu for cpu, _ in figures)
        print(
            f"| {name} | {args.sessions} x {args.connections} | {args.tokens} "
            f"| {figures[0][1]} | {best:.2f} |"
        )


if __name__ == "__main__":
    main()
