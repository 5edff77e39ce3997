"""What one fan-out wake-up costs Redis, by the number of sessions a process tails.

`python -m bench.fanout_cost` compares the three designs the fan-out reader has had, on a
private Redis (the bundled valkey-server):

- `multiplexed`: one blocking `XREAD` naming every tailed stream (bridge's first design);
- `activity`: a blocking `XREAD` of an activity stream every append also names, then a
  non-blocking `XREAD` of the stream it names (the second);
- `pubsub`: every append also publishes its entry on its session's channel, to which the
  reader is subscribed (the current design, `bridge/streams/fanout.py`).

A writer appends one entry at a time to a random stream (with what the design adds to the
append); the reader follows. The figures are Redis's own time in its commands (`INFO
commandstats`, the append itself included, the same in every design) and Redis's CPU time
(`INFO cpu`, its socket reads and writes included), per entry delivered: what a token costs
Redis, whatever else runs on the machine.
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


async def _measure(url: str, design: str, sessions: int, entries: int) -> tuple[float, float]:
    """Redis microseconds in commands, and of CPU, per entry delivered."""
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
    if design == "pubsub":
        await raw.call(pack("SUBSCRIBE", *(b"live:" + key for key in streams)), len(streams))
    delivered = 0

    async def follow() -> None:
        nonlocal delivered, activity_position
        while delivered < entries:
            if design == "multiplexed":
                command = pack("XREAD", "BLOCK", 200, "STREAMS", *positions, *positions.values())
                (reply,) = await raw.call(command)
                named = reply or []
            elif design == "activity":
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
            else:
                message = await raw.read()  # ["message", channel, "<id>"]
                named = [(message[1][len(b"live:") :], [[message[2]]])]
            for key, got in named:
                positions[key] = got[-1][0]
                delivered += len(got)

    reader = asyncio.create_task(follow())
    await asyncio.sleep(0.1)
    await client.config_resetstat()
    cpu_before = await _cpu(client)
    for _ in range(entries):
        key = random.choice(streams)
        if design == "pubsub":
            # the entry's id in the message, as the append script sends id and fields
            await client.eval(_APPEND_AND_PUBLISH, 1, key)
        else:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {"x": 1})
                if design == "activity":
                    pipe.xadd(activity, {"k": key})
                await pipe.execute()
        await asyncio.sleep(0.0005)  # one token at a time: every entry is a wake-up
    await asyncio.wait_for(reader, 30)
    cpu_spent = await _cpu(client) - cpu_before
    stats: Any = await client.info("commandstats")
    spent = sum(
        float(stat.get("usec", 0))
        for name, stat in stats.items()
        if name not in ("cmdstat_config|resetstat", "cmdstat_info")
    )
    await client.aclose()
    await blocking.aclose()
    return spent / max(delivered, 1), cpu_spent * 1e6 / max(delivered, 1)


_APPEND_AND_PUBLISH = """
local id = redis.call('XADD', KEYS[1], '*', 'x', 1)
redis.call('PUBLISH', 'live:' .. KEYS[1], id)
"""


async def _cpu(client: aioredis.Redis) -> float:
    info: Any = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _last_id(client: aioredis.Redis, key: bytes) -> bytes:
    last: Any = await client.xrevrange(key, count=1)
    return bytes(last[0][0])


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    it = iter(flat)
    return list(zip(it, it, strict=False))


async def _main(entries: int, counts: list[int]) -> None:
    designs = ("multiplexed", "activity", "pubsub")
    async with EmbeddedRedis() as server:
        header = " | ".join(f"{design}: Redis us/entry, commands / CPU" for design in designs)
        print(f"| sessions tailed | {header} |")
        print("|---|---|---|---|")
        for sessions in counts:
            cells = []
            for design in designs:
                commands, cpu = await _measure(server.url, design, sessions, entries)
                cells.append(f"{commands:.1f} / {cpu:.1f}")
            print(f"| {sessions} | " + " | ".join(cells) + " |", flush=True)


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
