"""What bridge's own Python spends per delivered token on the SSE side, without sockets.

`python -m bench.writer_cost` registers `--sessions` x `--connections` SSE streams with a
connection manager, as the API does, but gives each a `send` that writes nowhere; then it hands
the manager one live token per session at a time, as the fan-out reader does, and lets every
stream write it. The figure is the process's CPU per delivered token: the hub's delivery, the
wake-up of each connection's task, the encoding (once per event) and the metrics, everything
of the live path but the server's write and the kernel's. S2's serve figure minus this one is
what the socket writes cost.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from bridge.connections.manager import ConnectionManager
from bridge.connections.sse import SSEStream
from bridge.connections.subscriber import Envelope
from bridge.streams.codec import Cursor, EventType, StreamEvent


async def _no_history(cursor: Cursor) -> AsyncIterator[list[Envelope]]:
    return
    yield


async def _measure(sessions: int, connections: int, tokens: int) -> tuple[float, int]:
    """CPU microseconds per delivered token, and the writes the streams made."""
    manager = ConnectionManager(queue_size=1024)
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
            manager.deliver(f"s{session}", "m", [((1, seq), event)])
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
    figures = [
        run(_measure(args.sessions, args.connections, args.tokens)) for _ in range(args.rounds)
    ]
    best = min(cpu for cpu, _ in figures)
    print("| sessions x connections | tokens each | writes | us per delivered token (best) |")
    print("|---|---|---|---|")
    print(
        f"| {args.sessions} x {args.connections} | {args.tokens} | {figures[0][1]} | {best:.2f} |"
    )


if __name__ == "__main__":
    main()
