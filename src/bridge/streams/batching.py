"""Calls of one Lua script from many tasks, sent together in pipelines.

Every generation of a worker appends its tokens with its own script call. Sent one by one,
each call pays a write and a read; sent together, calls that became ready during the same
round trip share one pipeline, packed by hand on a dedicated connection (`redis_raw`). Each
call keeps its own result or error, and stays atomic on the server (a script runs whole), so
batching changes neither ordering (a caller awaits its call before making the next) nor
durability (a call returns only once Redis answered it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from bridge.redis_raw import RawConnection, bulk

_Call = tuple[bytes, "asyncio.Future[Any]"]


class ScriptBatcher:
    """`await batcher(keys=..., args=...)`, like a registered script, with shared round trips.

    One pipeline is in flight at a time; calls made meanwhile go in the next one. A server
    that lost the script (restart, `SCRIPT FLUSH`) gets it loaded again and the calls that
    failed on it are sent once more (the append script is idempotent by sequence).
    """

    def __init__(self, redis: Redis, script: str, *, max_batch: int = 512) -> None:
        self._redis = redis
        self._registered = redis.register_script(script)
        self._connection = RawConnection(redis, name="EVALSHA")
        self._evalsha = bulk("EVALSHA") + bulk(self._registered.sha)
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
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
        self._queue.append((head + b"".join(map(bulk, more)) if more else head, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="script-batcher")
        return await future

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._send(batch, reload=True)
        finally:
            self._sender = None

    async def _send(self, batch: list[_Call], *, reload: bool) -> None:
        try:
            results = await self._connection.call([packed for packed, _ in batch], len(batch))
            self.round_trips += 1
        except BaseException as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        missing: list[_Call] = []
        for call, result in zip(batch, results, strict=True):
            future = call[1]
            if future.done():  # its caller was cancelled
                continue
            if isinstance(result, NoScriptError) and reload:
                missing.append(call)
            elif isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if missing:
            try:
                await self._redis.script_load(self._registered.script)
            except BaseException as exc:
                for _, future in missing:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            await self._send(missing, reload=False)
