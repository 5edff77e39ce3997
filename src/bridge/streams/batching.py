"""Calls of one Lua script from many callers, sent together in pipelines.

Every generation of a worker appends its tokens with its own script call. Sent one by one,
each call pays a write and a read; sent together, calls that became ready during the same
round trip share one pipeline, packed by hand on a dedicated connection (`redis_raw`). Each
call keeps its own result or error, and stays atomic on the server (a script runs whole), so
batching changes neither ordering (a caller waits for its call before making the next) nor
durability (a call is answered only once Redis answered it).

The round trip runs in callbacks: a call is written from a loop callback and its reply handed
over as the bytes arrive, so a token's append wakes no task (each wake-up cost the worker
several microseconds per token: `bench.worker_cost`). Only the rare paths run in tasks:
connecting, and loading a script the server lost.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from bridge.redis_metrics import observe_command, record_failure
from bridge.redis_raw import RawConnection, bulk

log = structlog.get_logger("bridge.batching")

Done = Callable[[Any], None]
"""Gets a call's result, or the exception it failed with (an error reply included)."""


class _Call:
    __slots__ = ("done", "packed", "reload")

    def __init__(self, packed: bytes, done: Done, reload: bool = True) -> None:
        self.packed = packed
        self.done = done
        self.reload = reload  # a NOSCRIPT reply loads the script and sends it once more


class ScriptBatcher:
    """`await batcher(keys=..., args=...)`, like a registered script, with shared round trips;
    `submit` is the same call answered through a callback.

    One pipeline is in flight at a time; calls made meanwhile go in the next one, written as
    soon as the last reply of the one before arrives. A pipeline unanswered after the
    connection's timeout has its connection closed: its calls fail with `TimeoutError`. A
    server that lost the script (restart, `SCRIPT FLUSH`) gets it loaded again and the calls
    that failed on it are sent once more (the append script is idempotent by sequence).
    """

    def __init__(self, redis: Redis, script: str, *, max_batch: int = 512) -> None:
        self._redis = redis
        self._registered = redis.register_script(script)
        self._connection = RawConnection(redis, name="EVALSHA")
        self._connection.listen(self._on_reply, self._on_lost)
        self._evalsha = bulk("EVALSHA") + bulk(self._registered.sha)
        self._max_batch = max_batch
        self._queue: collections.deque[_Call] = collections.deque()  # not sent yet
        self._in_flight: collections.deque[_Call] = collections.deque()  # sent, in order
        self._missing: list[_Call] = []  # answered NOSCRIPT in the pipeline in flight
        self._send_soon: asyncio.Handle | None = None
        self._detour: asyncio.Task[None] | None = None  # connecting or loading the script
        self._sent_at = 0.0  # perf_counter, for the round trip's metric
        self.round_trips = 0

    def head(self, keys: Sequence[Any], args: Sequence[Any], *, more: int = 0) -> bytes:
        """A call's keys and first `args` packed, for `call` to add the `more` others to."""
        parts = [bulk(len(keys)), *map(bulk, keys), *map(bulk, args)]
        return b"".join((b"*%d\r\n" % (len(parts) + 2 + more), self._evalsha, *parts))

    async def __call__(self, *, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self.call(self.head(keys, args))

    async def call(self, head: bytes, more: Sequence[Any] = ()) -> Any:
        """The script's result for `head` (see `head`) followed by the arguments `more`."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(head, more, functools.partial(settle, future))
        return await future

    def submit(self, head: bytes, more: Sequence[Any], done: Done) -> None:
        """Call the script (as `call` does); `done` gets the result, or the exception."""
        self._queue.append(_Call(head + b"".join(map(bulk, more)) if more else head, done))
        if self._send_soon is None and not self._in_flight and self._detour is None:
            # from the loop, not now: calls made in the same turn share the pipeline
            self._send_soon = asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._send_soon = None
        if self._in_flight or self._detour is not None or not self._queue:
            return
        count = min(len(self._queue), self._max_batch)
        batch = [self._queue.popleft() for _ in range(count)]
        if not self._connection.write([call.packed for call in batch]):
            self._queue.extendleft(reversed(batch))
            self._detour = asyncio.create_task(self._connect(), name="script-batcher-connect")
            return
        self._in_flight.extend(batch)
        self._sent_at = time.perf_counter()

    def _on_reply(self, reply: Any) -> None:
        call = self._in_flight.popleft()
        if isinstance(reply, NoScriptError) and call.reload:
            call.reload = False
            self._missing.append(call)
        else:
            _answer(call, reply)
        if self._in_flight:
            return
        self._connection.answered()
        self.round_trips += 1
        observe_command(self._connection.name, time.perf_counter() - self._sent_at)
        if self._missing:
            missing, self._missing = self._missing, []
            self._detour = asyncio.create_task(self._reload(missing), name="script-batcher-load")
        else:
            self._send()

    def _on_lost(self, error: Exception) -> None:
        failed = [*self._in_flight, *self._missing]
        self._in_flight.clear()
        self._missing.clear()
        if failed:
            record_failure(self._connection.name, error)
        for call in failed:
            _answer(call, error)
        if self._queue and self._send_soon is None and self._detour is None:
            self._send_soon = asyncio.get_running_loop().call_soon(self._send)

    async def _connect(self) -> None:
        try:
            await self._connection.connect()
        except BaseException as exc:
            failed = list(self._queue)
            self._queue.clear()
            for call in failed:
                _answer(call, exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._detour = None
        self._send()

    async def _reload(self, missing: list[_Call]) -> None:
        try:
            await self._redis.script_load(self._registered.script)
        except BaseException as exc:
            for call in missing:
                _answer(call, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._queue.extendleft(reversed(missing))
        finally:
            self._detour = None
        self._send()


def _answer(call: _Call, reply: Any) -> None:
    """Hand `reply` to the call's callback; a callback's own failure is logged, not raised
    into the connection's protocol (which would stop the replies after it)."""
    try:
        call.done(reply)
    except Exception:
        log.exception("script_callback_failed")


def settle(future: asyncio.Future[Any], reply: Any) -> None:
    """A `Done` callback for `future`: its result, or its exception."""
    if future.done():  # its caller was cancelled
        return
    if isinstance(reply, asyncio.CancelledError):
        future.cancel()
    elif isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)
