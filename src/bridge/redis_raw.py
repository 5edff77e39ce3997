"""A dedicated Redis connection for the hot paths, with commands packed by hand.

The fan-out reader's subscription and the producer's batched `EVALSHA` run once per token or
so. Through redis-py's client, each call paid for a pool checkout, a task for its write
timeout, argument packing one value at a time and reply callbacks: a fifth of the API process
and a quarter of the worker under load (py-spy, bench S1/S2). Here a caller packs its command
once (`pack`, or cached parts of it) and the connection only writes bytes and reads raw
replies.

The connection is one of the client's pool, checked out for good, so the URL, TLS,
authentication, database and connect timeout are the client's, and closing the client closes
it. It serves one reader at a time (the fan-out loop, the script batcher's single sender);
other tasks may `send` on it, whole commands being written at once. Any failure or
cancellation mid-call disconnects it: a later call reconnects rather than read a stale reply.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.redis_metrics import observe_command, record_failure

T = TypeVar("T")


def bulk(value: bytes | str | int) -> bytes:
    """One RESP bulk string."""
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, int):
        value = str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(value), value)


def pack(*args: bytes | str | int) -> bytes:
    """A whole command in RESP: `pack("XADD", key, "*", "f", value)`."""
    return b"*%d\r\n" % len(args) + b"".join(bulk(arg) for arg in args)


class RawConnection:
    """Send packed commands on one connection; read their raw (RESP2) replies."""

    def __init__(
        self, client: Redis, *, name: str, timeout_s: float | None = None, timed: bool = True
    ) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        # default: the client's own socket timeout (a blocking reader's is longer)
        self._timeout_s = timeout_s or self._pool.connection_kwargs.get("socket_timeout") or 5.0
        self.name = name  # the command label of its metrics
        self._timed = timed  # False for blocking reads: their duration is the wait
        # the deadline of the call or read under way, and the timer that enforces it
        self._deadline: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._expired = False
        self._closing: asyncio.Task[None] | None = None

    async def _connection(self) -> AbstractConnection:
        if self._conn is None:
            # Checked out of the client's pool for good: closing the client closes it too.
            conn: AbstractConnection = await self._pool.get_connection()  # type: ignore[no-untyped-call]
            # No socket timeout inside redis-py (it costs a task per write): `call` bounds
            # the whole exchange itself.
            conn.socket_timeout = None
            self._conn = conn
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.is_connected

    async def connect(self) -> None:
        """Connect now, if not connected (`send` and `call` connect too)."""
        await self._guarded(self._connect(), None)

    async def _connect(self) -> None:
        await (await self._connection()).connect()  # type: ignore[no-untyped-call]

    async def call(
        self, packed: bytes | list[bytes], replies: int = 1, *, timeout_s: float | None = None
    ) -> list[Any]:
        """Send `packed` (`replies` commands) and return their replies, in order.

        An error reply is returned as its `ResponseError` in its place, so one failing
        command of a batch leaves the others' results readable. Connection errors and
        timeouts raise redis-py's `ConnectionError` / `TimeoutError`.
        """
        started = time.perf_counter()
        results = await self._watched(self._exchange(packed, replies), timeout_s)
        if self._timed:
            observe_command(self.name, time.perf_counter() - started)
        return results

    async def send(self, packed: bytes | list[bytes], *, timeout_s: float | None = None) -> None:
        """Send commands whose replies `read` takes later (pipelining across awaits)."""
        await self._guarded(self._exchange(packed, 0), timeout_s)

    async def read(self, *, timeout_s: float | None = None) -> Any:
        """The reply to the oldest command sent and not yet read."""
        conn = self._conn
        if conn is None:
            raise RedisConnectionError("nothing was sent on this connection")
        return await self._watched(_reply(conn), timeout_s)

    async def _exchange(self, packed: bytes | list[bytes], replies: int) -> list[Any]:
        conn = await self._connection()
        await conn.send_packed_command(packed, check_health=False)
        return [await _reply(conn) for _ in range(replies)]

    async def _guarded(self, work: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """`work` within the timeout; any failure drops the connection (no stale replies)."""
        try:
            async with asyncio.timeout(self._timeout_s if timeout_s is None else timeout_s):
                return await work
        except BaseException as exc:
            error = await self._failed(exc, timed_out=isinstance(exc, TimeoutError))
            if error is exc:
                raise
            raise error from None

    async def _watched(self, work: Coroutine[Any, Any, T], timeout_s: float | None) -> T:
        """`_guarded` for the calls and reads, one at a time: a watchdog timer enforces the
        deadline, armed again only when it fires, as `asyncio.timeout` costs 6.5 us per use
        (uvloop, this VM) and a call or read happens about once per token. A call past its
        deadline has its connection closed under it, and raises redis-py's TimeoutError."""
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + (
            self._timeout_s if timeout_s is None else timeout_s
        )
        self._expired = False
        if self._watchdog is None or deadline < self._watchdog_at:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._on_watchdog)
            self._watchdog_at = deadline
        try:
            return await work
        except BaseException as exc:
            error = await self._failed(exc, timed_out=self._expired)
            if error is exc:
                raise
            raise error from None
        finally:
            self._deadline = None

    def _on_watchdog(self) -> None:
        self._watchdog = None
        deadline = self._deadline
        if deadline is None:
            return  # nothing under way: the next call arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._watchdog = loop.call_at(deadline, self._on_watchdog)
            self._watchdog_at = deadline
        elif self._conn is not None:
            self._expired = True
            self._closing = loop.create_task(self._conn.disconnect(nowait=True))

    async def _failed(self, exc: BaseException, *, timed_out: bool) -> BaseException:
        """Drop the connection after a failure (no stale replies); the exception to raise."""
        await self._drop()
        if timed_out:
            exc = RedisTimeoutError(f"Redis did not answer {self.name} in time")
        if isinstance(exc, Exception):
            record_failure(self.name, exc)
        return exc

    async def _drop(self) -> None:
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)


async def _reply(conn: AbstractConnection) -> Any:
    try:
        return await conn.read_response(timeout=math.inf)
    except ResponseError as exc:
        return exc
