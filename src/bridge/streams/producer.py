"""Stream producer: appends the events of one generation to its token stream.

Every append goes through one Lua script, so three checks are atomic with the write:
- fencing: the generation's `epoch` must still be the writer's (a stale worker gets `Fenced`);
- idempotency: entries whose sequence is not above the stored one are skipped, so a retried
  call whose first attempt did reach Redis writes nothing twice;
- accounting: token counts are added in the same step, so usage equals tokens written.

Tokens that arrive while an append is in flight are sent together in the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bridge.errors import Fenced
from bridge.settings import Settings
from bridge.streams.codec import EventType, StreamEvent, now_ms, to_fields
from bridge.streams.keys import Keys

APPEND_SCRIPT = """
-- KEYS: stream, generation hash, usage hash
-- ARGV: epoch, maxlen, ttl, usage field, final status ("" if none), entry count,
--       then per entry: seq, is_token, field count, fields...
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED owner epoch is ' .. tostring(epoch))
end
local last_seq = tonumber(redis.call('HGET', KEYS[2], 'seq') or '-1')
local status = redis.call('HGET', KEYS[2], 'status')
if status == 'complete' or status == 'error' or status == 'cancelled' then
  local newest, j = -1, 7
  for _ = 1, tonumber(ARGV[6]) do
    newest = math.max(newest, tonumber(ARGV[j]))
    j = j + 3 + tonumber(ARGV[j + 2])
  end
  if newest <= last_seq then
    return false  -- a retry of a batch that is already stored: nothing to do
  end
  return redis.error_reply('FENCED generation already ended: ' .. status)
end
local i = 7
local tokens = 0
local last_id = false
for _ = 1, tonumber(ARGV[6]) do
  local seq = tonumber(ARGV[i])
  local is_token = ARGV[i + 1]
  local n = tonumber(ARGV[i + 2])
  if seq > last_seq then
    local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*'}
    for j = i + 3, i + 2 + n do args[#args + 1] = ARGV[j] end
    last_id = redis.call(unpack(args))
    last_seq = seq
    if is_token == '1' then tokens = tokens + 1 end
  end
  i = i + 3 + n
end
redis.call('HSET', KEYS[2], 'seq', last_seq)
if tokens > 0 then
  redis.call('HINCRBY', KEYS[2], 'tokens', tokens)
  redis.call('HINCRBY', KEYS[3], ARGV[4], tokens)
end
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], 'status', ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return last_id
"""


class StreamProducer:
    """Creates `GenerationWriter`s; owns the append script."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._script = redis.register_script(APPEND_SCRIPT)

    def writer(
        self, *, session: str, model: str, request_id: str, epoch: int, last_seq: int = 0
    ) -> GenerationWriter:
        """A writer for one generation, owned by `epoch`, continuing after `last_seq`."""
        return GenerationWriter(self, session, model, request_id, epoch, last_seq)

    async def append(
        self,
        *,
        session: str,
        model: str,
        request_id: str,
        epoch: int,
        events: Sequence[StreamEvent],
    ) -> None:
        """Append `events` atomically with the fencing, idempotency and accounting checks."""
        final = events[-1].type.value if events and events[-1].terminal else ""
        ttl = self._settings.stream_ttl_s if final else self._active_ttl()
        args: list[Any] = [epoch, self._settings.stream_maxlen, ttl, model, final, len(events)]
        for event in events:
            fields = to_fields(event)
            args += [event.seq, 1 if event.type is EventType.TOKEN else 0, len(fields), *fields]
        keys = [
            self._keys.stream(session, model),
            self._keys.generation(request_id),
            self._keys.usage(session),
        ]
        try:
            await self._script(keys=keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise Fenced(f"generation {request_id}: {exc}") from None
            raise

    def _active_ttl(self) -> int:
        # A stream whose worker vanished for good still expires eventually.
        return int(self._settings.generation_deadline_s) + self._settings.stream_ttl_s


class GenerationWriter:
    """Writes one generation's events in order, batching tokens that arrive during a round trip.

    `token()` returns before the write lands (errors surface on a later call); `finish()`
    writes the terminal event and returns once everything is stored.
    """

    _MAX_PENDING = 512  # past this, token() waits for the append in flight

    def __init__(
        self,
        producer: StreamProducer,
        session: str,
        model: str,
        request_id: str,
        epoch: int,
        last_seq: int,
    ) -> None:
        self._producer = producer
        self._session = session
        self._model = model
        self._request_id = request_id
        self._epoch = epoch
        self.seq = last_seq
        self.tokens = 0
        self._pending: list[StreamEvent] = []
        self._flushing: asyncio.Task[None] | None = None

    async def token(self, text: str) -> None:
        """Queue one token for appending."""
        self.tokens += 1
        await self._emit(EventType.TOKEN, content=text)

    async def seam(self, data: dict[str, Any]) -> None:
        """Record that this writer took the generation over from another worker."""
        await self._emit(EventType.SEAM, data=data)

    async def finish(self, kind: EventType, data: dict[str, Any]) -> None:
        """Write the terminal event of `kind` and wait until every event is stored."""
        await self._emit(kind, data=data)
        await self.drain()

    async def drain(self) -> None:
        """Wait until every queued event is stored; raise the error of a failed append."""
        while self._flushing is not None:
            await asyncio.shield(self._flushing)
            self._check()

    async def _emit(
        self, kind: EventType, *, content: str = "", data: dict[str, Any] | None = None
    ) -> None:
        self._check()
        self.seq += 1
        self._pending.append(
            StreamEvent(kind, self._request_id, self.seq, now_ms(), content=content, data=data)
        )
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        elif len(self._pending) >= self._MAX_PENDING:
            await asyncio.shield(self._flushing)
            self._check()

    def _check(self) -> None:
        task = self._flushing
        if task is not None and task.done():
            self._flushing = None
            task.result()  # re-raises the append's error, if any

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            await self._producer.append(
                session=self._session,
                model=self._model,
                request_id=self._request_id,
                epoch=self._epoch,
                events=batch,
            )
