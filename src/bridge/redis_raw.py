"""A dedicated Redis connection for the hot paths, with commands packed by hand.

The fan-out reader's subscription and the producer's batched `EVALSHA` run once per token or
so. Through redis-py's client, each call paid for a pool checkout, a task for its write
timeout, argument packing one value at a time and reply callbacks: a fifth of the API process
and a quarter of the worker under load (py-spy, bench S1/S2). Here a caller packs its command
once (`pack`, or cached parts of it) and the connection only writes bytes and reads raw
replies.

The connection is one of the client's pool, checked out for good and connected by redis-py,
so the URL, TLS, authentication, database and connect timeout are the client's, and closing
the client closes it. Once connected, its transport is handed to `_Replies`, a protocol that
parses replies with hiredis as the bytes arrive: redis-py's stream reader and its read path
cost 12 us more per round trip than the round trip's own 34 us of CPU (a PING loop on the
2-core VM), once per token in each process. It serves one reader at a time (the fan-out
loop), or hands each reply to a listener as it arrives (the fan-out's messages, the script
batcher's replies); other tasks may `send` on it, whole commands being written at once. Any
failure or cancellation mid-call disconnects it: a later call reconnects rather than read a
stale reply.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.redis_metrics import observe_command, record_failure
from bridge.write_flow import WriteFlow

T = TypeVar("T")

_NOT_ENOUGH_DATA = object()

Listener = Callable[[Any], Any]
"""Handles a reply as it arrives, in the protocol's callback; returns what to queue for `read`
in its place, or None for nothing."""

LossListener = Callable[[Exception], None]
"""Hears, in the protocol's callback, that the connection ended, and why."""


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


class _Replies(WriteFlow):
    """Parses the replies of a connection taken over from redis-py, in arrival order.

    An error reply is parsed into redis-py's exception for it (`NoScriptError`, ...) and
    queued in its place. The protocol it replaced still hears of the connection's end, so
    redis-py's own `disconnect()` (the pool's, when the client closes) completes.
    """

    def __init__(
        self, transport: asyncio.Transport, replaced: asyncio.BaseProtocol, encoding: str | None
    ) -> None:
        self.transport = transport
        self._replaced = replaced
        options: dict[str, Any] = {
            "protocolError": InvalidResponse,
            "replyError": BaseParser.parse_error,
            "notEnoughData": _NOT_ENOUGH_DATA,
        }
        if encoding is not None:
            options["encoding"] = encoding
        self._parser = hiredis.Reader(**options)
        self._replies: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self.lost: Exception | None = None
        self.listener: Listener | None = None
        self.on_lost: LossListener | None = None

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while (reply := self._parser.gets()) is not _NOT_ENOUGH_DATA:
                # the listener sees a reply only when none waits before it: order is kept
                if self.listener is not None and not self._replies:
                    try:
                        reply = self.listener(reply)
                    except Exception as exc:  # read in the reply's place, as an error reply is
                        reply = exc
                    if reply is None:
                        continue
                self._replies.append(reply)
        except InvalidResponse as exc:
            self.lost = RedisConnectionError(f"Redis sent an invalid reply: {exc}")
            self.transport.close()
        self._wake()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        lost = self.lost
        if lost is None:
            lost = self.lost = RedisConnectionError(f"Redis closed the connection: {exc or 'EOF'}")
        self.resume_writing()
        self._wake()
        self._replaced.connection_lost(exc)
        if self.on_lost is not None:
            self.on_lost(lost)

    @property
    def closed(self) -> bool:
        return self.lost is not None or self.transport.is_closing()

    async def write(self, packed: bytes | list[bytes]) -> None:
        if self.closed:
            raise self.lost or RedisConnectionError("the connection is closing")
        if isinstance(packed, list):
            self.transport.writelines(packed)
        else:
            self.transport.write(packed)
        await self.drained()

    @property
    def ready(self) -> bool:
        """A reply is waiting to be taken."""
        return bool(self._replies)

    async def next(self) -> Any:
        """The oldest reply not yet taken, once it arrived."""
        while not self._replies:
            if self.lost is not None:
                raise self.lost
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def take(self) -> Any:
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class RawConnection:
    """Send packed commands on one connection; read their raw (RESP2) replies."""

    def __init__(
        self, client: Redis, *, name: str, timeout_s: float | None = None, timed: bool = True
    ) -> None:
        self._pool = client.connection_pool
        self._conn: AbstractConnection | None = None
        self._replies: _Replies | None = None
        # default: the client's own socket timeout (a blocking reader's is longer)
        self._timeout_s = timeout_s or self._pool.connection_kwargs.get("socket_timeout") or 5.0
        self.name = name  # the command label of its metrics
        self._timed = timed  # False for blocking reads: their duration is the wait
        # the deadline of the call or read under way, and the timer that enforces it
        self._deadline: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._expired = False
        self._listener: Listener | None = None
        self._on_lost: LossListener | None = None

    def listen(self, listener: Listener | None, on_lost: LossListener | None = None) -> None:
        """Hand replies to `listener` as they arrive, whenever no reply is waiting to be read
        (on this connection and the ones after a reconnect): a reply it handles wakes no task.
        `on_lost` hears of each connection's end."""
        self._listener = listener
        self._on_lost = on_lost
        if self._replies is not None:
            self._replies.listener = listener
            self._replies.on_lost = on_lost

    async def _open(self) -> _Replies:
        """The connection's reply parser, connecting (again) first if it is not open."""
        replies = self._replies
        if replies is not None and not replies.closed:
            return replies
        if self._conn is None:
            # Checked out of the client's pool for good: closing the client closes it too.
            self._conn = await self._pool.get_connection()  # type: ignore[no-untyped-call]
        conn = self._conn
        # redis-py's own timeouts bound its connect and handshake; later reads are ours
        await conn.disconnect(nowait=True)  # what is left of the last transport, if any
        if replies is not None:  # its late callbacks must not reach the new connection's
            replies.listener = replies.on_lost = None
        self._replies = None
        await conn.connect()
        # redis-py keeps its transport behind a private attribute: taken over once connected
        writer = conn._writer
        if writer is None:
            raise RedisConnectionError("redis-py connected without a transport")
        transport = cast(asyncio.Transport, writer.transport)
        encoder = conn.encoder
        replies = _Replies(
            transport,
            transport.get_protocol(),
            encoder.encoding if encoder.decode_responses else None,
        )
        transport.set_protocol(replies)
        replies.listener = self._listener
        replies.on_lost = self._on_lost
        self._replies = replies
        return replies

    @property
    def connected(self) -> bool:
        return self._replies is not None and not self._replies.closed

    async def connect(self) -> None:
        """Connect now, if not connected (`send` and `call` connect too)."""
        await self._guarded(self._open(), None)

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

    def write(self, packed: list[bytes]) -> bool:
        """Write `packed` now if connected, without waiting for the buffer to drain (the caller
        bounds what it leaves unanswered); False, writing nothing, if not connected. Its
        replies are due within the connection's timeout (until `answered`): past it, the
        connection is closed and `on_lost` hears redis-py's TimeoutError."""
        replies = self._replies
        if replies is None or replies.closed:
            return False
        replies.transport.writelines(packed)
        self._arm(None)
        return True

    def answered(self) -> None:
        """Every reply of what was written has arrived: no deadline is running."""
        self._deadline = None

    async def send(self, packed: bytes | list[bytes], *, timeout_s: float | None = None) -> None:
        """Send commands whose replies `read` takes later (pipelining across awaits)."""
        await self._guarded(self._exchange(packed, 0), timeout_s)

    async def read(self, *, timeout_s: float | None = None) -> Any:
        """The reply to the oldest command sent and not yet read."""
        replies = self._replies
        if replies is None:
            raise RedisConnectionError("nothing was sent on this connection")
        if replies.ready:  # arrived with an earlier one: no wait, no deadline
            return replies.take()
        return await self._watched(replies.next(), timeout_s)

    async def _exchange(self, packed: bytes | list[bytes], count: int) -> list[Any]:
        replies = await self._open()
        await replies.write(packed)
        return [await replies.next() for _ in range(count)]

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
        self._arm(timeout_s)
        try:
            return await work
        except BaseException as exc:
            error = await self._failed(exc, timed_out=self._expired)
            if error is exc:
                raise
            raise error from None
        finally:
            self._deadline = None

    def _arm(self, timeout_s: float | None) -> None:
        """Set the deadline of what is under way, arming the watchdog if it would fire late."""
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

    def _on_watchdog(self) -> None:
        self._watchdog = None
        deadline = self._deadline
        if deadline is None:
            return  # nothing under way: the next call arms it again
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._watchdog = loop.call_at(deadline, self._on_watchdog)
            self._watchdog_at = deadline
        elif self._replies is not None:
            self._expired = True
            # what is under way fails with the connection, and `on_lost` hears why
            self._replies.lost = RedisTimeoutError(f"Redis did not answer {self.name} in time")
            self._replies.transport.close()

    async def _failed(self, exc: BaseException, *, timed_out: bool) -> BaseException:
        """Drop the connection after a failure (no stale replies); the exception to raise."""
        await self._drop()
        if timed_out:
            exc = RedisTimeoutError(f"Redis did not answer {self.name} in time")
        if isinstance(exc, Exception):
            record_failure(self.name, exc)
        return exc

    async def _drop(self) -> None:
        self._replies = None
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)
