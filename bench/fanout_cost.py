"""What one fan-out wake-up costs Redis, by the number of sessions a process tails.

`python -m bench.fanout_cost` compares the two designs of the fan-out reader on a private
Redis (the bundled valkey-server):

- `multiplexed`: one blocking `XREAD` naming every tailed stream (bridge's first design);
- `activity`: a blocking `XREAD` of the activity stream alone, then a non-blocking `XREAD`
  of the stream it names (the current design, `bridge/streams/fanout.py`).

A writer appends one entry at a time to a random stream (and, for `activity`, announces it);
the reader follows. The figure is Redis's own time in `XREAD` (`INFO commandstats`) per entry
delivered: the Redis CPU a token costs the fan-out, whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import uuid
from typing import Any

import redis.asyncio as aioredis

from bridge.redis_raw import RawConnection, pack
from bridge.redis_server import EmbeddedRedis

SESSIONS = (10, 100, 400, 1000, 2000)


async def _measure(url: str, design: str, sessions: int, entries: int) -> float:
    """Redis microseconds spent in XREAD per entry delivered."""
    prefix = f"cost:{uuid.uuid4().hex[:8]}:"
    client = aioredis.Redis.from_url(url, protocol=2)
    blocking = aioredis.Redis.from_url(url, protocol=2, socket_timeout=10)
    raw = RawConnection(blocking, name="XREAD", timeout_s=10, timed=False)
    streams = [f"{prefix}s{i}".encode() for i in range(sessions)]
    activity = f"{prefix}activity".encode()
    async with client.pipeline(transaction=False) as pipe:
        for key in [*streams, activity]:
            pipe.xadd(key, {"x": 0})
        await pipe.execute()
    positions: dict[bytes, bytes] = {key: await _last_id(client, key) for key in streams}
    activity_position = await _last_id(client, activity)
    await client.config_resetstat()
    delivered = 0
    done = asyncio.Event()

    async def follow() -> None:
        nonlocal delivered, activity_position
        while not done.is_set() or delivered < entries:
            if design == "multiplexed":
                command = pack("XREAD", "BLOCK", 200, "STREAMS", *positions, *positions.values())
                (reply,) = await raw.call(command)
                named = reply or []
            else:
                command = pack("XREAD", "BLOCK", 200, "STREAMS", activity, activity_position)
                (reply,) = await raw.call(command)
                if not reply:
                    continue
                announced = reply[0][1]
                activity_position = announced[-1][0]
                keys = list(dict.fromkeys(dict(_pairs(flat))[b"k"] for _, flat in announced))
                read = pack("XREAD", "STREAMS", *keys, *(positions[k] for k in keys))
                (data,) = await raw.call(read)
                named = data or []
            for key, got in named:
                positions[key] = got[-1][0]
                delivered += len(got)

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    for _ in range(entries):
        key = random.choice(streams)
        async with client.pipeline(transaction=True) as pipe:
            pipe.xadd(key, {"x": 1})
            if design == "activity":
                pipe.xadd(activity, {"k": key})
            await pipe.execute()
        await asyncio.sleep(0.0005)  # one token at a time: every entry is a wake-up
    done.set()
    await asyncio.wait_for(reader, 30)
    stats: Any = await client.info("commandstats")
    spent = float(stats.get("cmdstat_xread", {}).get("usec", 0))
    await client.aclose()
    await blocking.aclose()
    return spent / max(delivered, 1)


async def _last_id(client: aioredis.Redis, key: bytes) -> bytes:
    last: Any = await client.xrevrange(key, count=1)
    return bytes(last[0][0])


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    it = iter(flat)
    return list(zip(it, it, strict=False))


async def _main(entries: int, counts: list[int]) -> None:
    async with EmbeddedRedis() as server:
        print("| sessions tailed | multiplexed: Redis us/entry | activity: Redis us/entry |")
        print("|---|---|---|")
        for sessions in counts:
            old = await _measure(server.url, "multiplexed", sessions, entries)
            new = await _measure(server.url, "activity", sessions, entries)
            print(f"| {sessions} | {old:.1f} | {new:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=2000, help="entries per measurement")
    parser.add_argument(
        "--sessions", type=int, nargs="+", default=list(SESSIONS), help="sessions tailed"
    )
    args = parser.parse_args()
    asyncio.run(_main(args.entries, args.sessions))


if __name__ == "__main__":
    main()
