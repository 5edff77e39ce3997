"""Stream producer: appends the events of one generation to its token stream.

Every append goes through one Lua script, so these checks are atomic with the write:
- fencing: the generation's `epoch` must still be the writer's (a stale worker gets `Fenced`;
  a retried batch that is already stored, terminal event included, is a no-op);
- idempotency: entries whose sequence is not above the stored one are skipped, so a retried
  call whose first attempt did reach Redis writes nothing twice;
- accounting: token counts are added in the same step, so usage equals tokens written;
- the per-session token limit: a token that would take the session past it is not written.

Tokens that arrive while an append is in flight are sent together in the next one. An append
that fails because Redis is unreachable is retried with backoff (safe: see idempotency).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.backoff import Backoff
from bridge.errors import Fenced, GenerationStopped
from bridge.settings import Settings
from bridge.streams.batching import ScriptBatcher, settle
from bridge.streams.codec import EventType, StreamEvent, now_ms, to_fields
from bridge.streams.keys import Keys
from bridge.streams.processor import GenerationContext, Processor, ProcessorChain

log = structlog.get_logger("bridge.producer")

_encode = msgspec.json.Encoder().encode

APPEND_SCRIPT = """
-- KEYS: stream, generation hash, usage hash
-- ARGV: epoch, maxlen, model, session token limit (0: none), the session's live channel
--       (the same for every append of a generation: packed once), then ttl, final status
--       ("" if none), entries as one JSON array of [seq, is_token, field, value, ...]
--       (one argument instead of a dozen per entry: packing arguments was the client's
--       largest cost per token)
-- Returns {last stored seq, 1 if the session token limit stopped the batch else 0}.
local state = redis.call('HMGET', KEYS[2], 'epoch', 'seq', 'status', 'tokens')
local epoch = state[1]
if epoch ~= ARGV[1] then
  return redis.error_reply('FENCED owner epoch is ' .. tostring(epoch))
end
local last_seq = tonumber(state[2] or '0')
local status = state[3]
if status == 'complete' or status == 'error' or status == 'cancelled' then
  local newest = 0
  for _, entry in ipairs(cjson.decode(ARGV[8])) do newest = math.max(newest, entry[1]) end
  if newest <= last_seq then
    return {last_seq, 0}  -- a retry of a batch that is already stored: nothing to do
  end
  return redis.error_reply('FENCED generation already ended: ' .. status)
end
local limit = tonumber(ARGV[4])
local used = 0
if limit > 0 then used = tonumber(redis.call('HGET', KEYS[3], '*') or '0') end
local tokens = 0
local limited = 0
local prev = nil
local indexes = {}
local ids = {}
for i, entry in ipairs(cjson.decode(ARGV[8])) do
  local seq = entry[1]
  local is_token = entry[2] == 1
  if seq > last_seq then
    if is_token and limit > 0 and used + tokens >= limit then
      limited = 1
      break
    end
    if prev == nil then
      local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
      prev = newest and newest[1] or '0-0'
    end
    local args = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*'}
    for j = 3, #entry do args[#args + 1] = entry[j] end
    local id = redis.call(unpack(args))
    if last_seq == 0 then redis.call('HSET', KEYS[2], 'first', id) end
    last_seq = seq
    indexes[#indexes + 1] = i
    ids[#ids + 1] = id
    if is_token then tokens = tokens + 1 end
  end
end
if prev ~= nil then
  -- what the fan-out readers deliver from (see streams/fanout.py): model, the stream's
  -- last id before this append, which entries of ARGV[8] were written, their ids, ARGV[8]
  redis.call('PUBLISH', ARGV[5], ARGV[3] .. '\\n' .. prev .. '\\n' .. table.concat(indexes, ' ')
    .. '\\n' .. table.concat(ids, ' ') .. '\\n' .. ARGV[8])
end
-- the generation's fields in one HSET (fewer calls: each costs the script more than the
-- command itself)
local fields = {'HSET', KEYS[2], 'seq', last_seq}
if tokens > 0 then
  fields[#fields + 1] = 'tokens'
  fields[#fields + 1] = tonumber(state[4] or '0') + tokens
  redis.call('HINCRBY', KEYS[3], ARGV[3], tokens)
  redis.call('HINCRBY', KEYS[3], '*', tokens)
end
local ending = ARGV[7] ~= '' and limited == 0
if ending then
  fields[#fields + 1] = 'status'
  fields[#fields + 1] = ARGV[7]
end
redis.call(unpack(fields))
if ending then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
-- Always: while a generation runs this also raises a short TTL an earlier one's end set.
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {last_seq, limited}
"""

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)


class Stored(msgspec.Struct, frozen=True):
    """What an append stored: the last sequence number, and whether the session limit hit."""

    last_seq: int
    limited: bool


def _stored(request_id: str, done: Callable[[Stored | BaseException], None], reply: Any) -> None:
    """The append script's reply as what `done` expects."""
    if isinstance(reply, ResponseError) and str(reply).startswith("FENCED"):
        done(Fenced(f"generation {request_id}: {reply}"))
    elif isinstance(reply, BaseException):
        done(reply)
    else:
        last_seq, limited = reply
        done(Stored(int(last_seq), bool(limited)))


class StreamProducer:
    """Creates `GenerationWriter`s; owns the append script."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        # appends of all this process's generations share round trips (see batching)
        self._script = ScriptBatcher(redis, APPEND_SCRIPT)
        # the keys and leading arguments of a generation's appends, packed once for all
        self._append_head = functools.lru_cache(maxsize=4096)(self._pack_append_head)

    def writer(
        self, ctx: GenerationContext, *, last_seq: int = 0, chain: Processor | None = None
    ) -> GenerationWriter:
        """A writer for the generation `ctx` describes, continuing after `last_seq`."""
        return GenerationWriter(
            self, ctx, chain or ProcessorChain(), last_seq, self._settings.generation_deadline_s
        )

    async def append(
        self,
        *,
        session: str,
        model: str,
        request_id: str,
        epoch: int,
        events: Sequence[StreamEvent],
    ) -> Stored:
        """Append `events` atomically with the fencing, idempotency and accounting checks."""
        future: asyncio.Future[Stored] = asyncio.get_running_loop().create_future()
        ctx = GenerationContext(session, model, request_id, "", epoch)
        self.submit(ctx, events, functools.partial(settle, future))
        return await future

    def submit(
        self,
        ctx: GenerationContext,
        events: Sequence[StreamEvent],
        done: Callable[[Stored | BaseException], None],
    ) -> None:
        """`append`, answered through `done` (called from the event loop, not now): what was
        stored, or the exception (`Fenced` for a generation taken over or ended)."""
        final = events[-1].type.value if events and events[-1].terminal else ""
        ttl = self._settings.stream_ttl_s if final else self.active_ttl
        entries = [
            [event.seq, 1 if event.type is EventType.TOKEN else 0, *to_fields(event)]
            for event in events
        ]
        head = self._append_head(ctx.session, ctx.model, ctx.request_id, ctx.epoch)
        more = (ttl, final, _encode(entries))
        self._script.submit(head, more, functools.partial(_stored, ctx.request_id, done))

    def _pack_append_head(self, session: str, model: str, request_id: str, epoch: int) -> bytes:
        keys = (
            self._keys.stream(session, model),
            self._keys.generation(request_id),
            self._keys.usage(session),
        )
        settings = self._settings
        args = (
            epoch,
            settings.stream_maxlen,
            model,
            settings.session_token_limit,
            self._keys.live_channel(session),
        )
        return self._script.head(keys, args, more=3)

    @property
    def active_ttl(self) -> int:
        """TTL of a stream while a generation runs: one whose worker vanished still expires."""
        return int(self._settings.generation_deadline_s) + self._settings.stream_ttl_s


class GenerationWriter:
    """Writes one generation's events in order, batching tokens that arrive during a round trip.

    Each event passes the processor chain first. `token()` returns before the write lands
    (errors surface on a later call); `finish()` writes the terminal event and returns once
    everything is stored. One append is in flight at a time, driven by its reply's callback:
    the next batch is sent from there, so a token wakes no task of its own. Appends that fail
    for want of Redis are retried with backoff for `retry_for_s`.
    """

    _MAX_PENDING = 512  # past this, token() waits for the append in flight
    # An append's content at most (unless one event is larger): it bounds the script call,
    # the message published for it, and what every API process tailing it decodes at once.
    _MAX_BATCH_BYTES = 256 * 1024

    def __init__(
        self,
        producer: StreamProducer,
        ctx: GenerationContext,
        chain: Processor,
        last_seq: int,
        retry_for_s: float,
    ) -> None:
        self._producer = producer
        self.ctx = ctx
        self._chain = chain
        self.seq = last_seq
        self._retry_for_s = retry_for_s
        self.retries = 0
        self._pending: list[StreamEvent] = []  # not stored yet, in order
        self._sending: list[StreamEvent] | None = None  # the head of _pending being appended
        self._give_up_at = 0.0
        self._backoff: Backoff | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None  # raised by the next call
        self._waiters: list[asyncio.Future[None]] = []  # woken when an append settles

    @property
    def tokens(self) -> int:
        """Tokens this writer emitted (counted by the chain's `count_tokens`)."""
        return self.ctx.tokens

    async def token(self, text: str) -> None:
        """Queue one token for appending."""
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
        while self._sending is not None:
            await self._settled()
        self._check()

    async def abort(self) -> None:
        """Stop appending (the generation was abandoned); queued events are dropped. An
        append already sent still lands (it cannot be called back); its answer is ignored."""
        self._sending = None
        self._pending.clear()
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._wake()

    async def _emit(
        self, kind: EventType, *, content: str = "", data: dict[str, Any] | None = None
    ) -> None:
        self._check()
        seq = self.seq + 1
        event = StreamEvent(kind, self.ctx.request_id, seq, now_ms(), content=content, data=data)
        event = self._chain(self.ctx, event)
        self.seq = seq
        self._pending.append(event)
        if self._sending is None:
            self._send(self._next_batch())
        elif len(self._pending) >= self._MAX_PENDING:
            await self._settled()
            self._check()

    def _check(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def _settled(self) -> None:
        """Until the append in flight (or its retry) settles."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _next_batch(self) -> list[StreamEvent]:
        """The pending events within `_MAX_BATCH_BYTES` of content (or the first alone)."""
        size = 0
        for count, event in enumerate(self._pending):
            size += len(event.content)
            if size > self._MAX_BATCH_BYTES and count:
                return self._pending[:count]
        return list(self._pending)

    def _send(self, batch: list[StreamEvent], *, retry: bool = False) -> None:
        self._retry = None
        if not retry:
            self._give_up_at = asyncio.get_running_loop().time() + self._retry_for_s
            self._backoff = None
        self._sending = batch
        self._producer.submit(self.ctx, batch, functools.partial(self._on_stored, batch))

    def _on_stored(self, batch: list[StreamEvent], result: Stored | BaseException) -> None:
        if batch is not self._sending:
            return  # aborted meanwhile
        if isinstance(result, BaseException):
            self._failed(batch, result)
            return
        if result.limited:
            self._pending.clear()
            self.seq = result.last_seq
            self._stop(
                GenerationStopped(
                    "session_limit", "the session reached its token limit; the answer is cut"
                )
            )
            return
        del self._pending[: len(batch)]
        if self._pending:
            self._send(self._next_batch())
        else:
            self._sending = None
        self._wake()

    def _failed(self, batch: list[StreamEvent], error: BaseException) -> None:
        """Retry an append that failed for want of Redis (safe: appends are idempotent by
        sequence), until `retry_for_s` has passed; any other failure stops the writer."""
        loop = asyncio.get_running_loop()
        backoff = self._backoff = self._backoff or Backoff()
        if not isinstance(error, _RETRYABLE) or loop.time() + backoff.delay_s > self._give_up_at:
            self._stop(error)
            return
        self.retries += 1
        log.warning("append_retrying", request_id=self.ctx.request_id, error=str(error))
        self._retry = loop.call_later(
            backoff.delay_s, functools.partial(self._send, batch, retry=True)
        )
        backoff.grow()

    def _stop(self, error: BaseException) -> None:
        """Stop appending; `error` is raised by the writer's next call. The events not stored
        stay pending: a later call sends them again."""
        self._sending = None
        self._error = error
        self._wake()
