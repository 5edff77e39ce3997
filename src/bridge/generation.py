"""One generation, run by a worker from its claim to its terminal event.

Claiming increments the generation's `epoch` (in Lua); every append checks it, so a worker
that lost the generation to a takeover cannot write another entry (`streams.producer`).

A claim that finds events already written is a takeover: the previous worker died or was
paused past the reclaim time. The new owner reads the answer written so far and writes a
`seam` event, then either continues the answer (`mode: continue`, the partial answer sent to
a provider that supports it as a prefix) or starts it again (`mode: restart`: clients drop the
text of this request received before the seam). Sequence numbers keep increasing across it.

The generation runs in its mode (`bridge.modes`: chat, or a seed system's), which calls the
provider through `_run_provider`: retried with backoff on retryable errors only while no token
has been written (after that, a retry would repeat text), under a deadline, metered, and
charged to the tokens-per-minute limits. A cancel (`streams.cancel`) aborts it at once and
ends the stream with `cancelled`; one flagged before the claim never calls a provider.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis

from bridge.backoff import raise_if_cancelling
from bridge.errors import GenerationStopped, MalformedEntry, ProviderError, UnknownModel
from bridge.modes import Modes, Outcome, cancelled_outcome
from bridge.providers.base import Delta, Finish, Provider, ProviderRequest, Usage
from bridge.providers.metered import metered
from bridge.providers.registry import ProviderRegistry
from bridge.ratelimit import RateLimiter, TokenMeter
from bridge.settings import Settings
from bridge.streams.codec import EventType, from_fields
from bridge.streams.jobs import GenerationJob
from bridge.streams.keys import Keys
from bridge.streams.processor import GenerationContext, Processor
from bridge.streams.producer import GenerationWriter, StreamProducer

log = structlog.get_logger("bridge.generation")

CLAIM_SCRIPT = """
-- KEYS: generation hash, session usage hash. ARGV: worker name, session, model, ttl
-- Returns {epoch, last seq, tokens written, cancel flag, first entry id, session tokens};
-- epoch is -1 if the generation already ended.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'complete' or status == 'error' or status == 'cancelled' then
  return {-1, 0, 0, 0, '', 0}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1],
           'session', ARGV[2], 'model', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'seq', 'tokens', 'cancel', 'first')
local used = redis.call('HGET', KEYS[2], '*')
return {epoch, tonumber(state[1] or '0'), tonumber(state[2] or '0'),
        state[3] and 1 or 0, state[4] or '', tonumber(used or '0')}
"""

_PAGE = 1000


class TokensRefused(Exception):
    """A tokens-per-minute limit refused the next token."""


class Claim(msgspec.Struct, frozen=True):
    """What claiming a generation found."""

    epoch: int  # -1: it had already ended
    last_seq: int
    written_tokens: int  # by every owner so far, discarded restarts included
    cancel: bool
    first_id: str
    session_tokens: int


class Generation:
    """Runs one generation request, from its claim to its terminal event."""

    def __init__(
        self,
        job: GenerationJob,
        *,
        worker: str,
        redis: Redis,
        keys: Keys,
        settings: Settings,
        producer: StreamProducer,
        providers: ProviderRegistry,
        chain: Processor,
        modes: Modes,
        limits: RateLimiter,
    ) -> None:
        self.job = job
        self._worker = worker
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._producer = producer
        self._providers = providers
        self._chain = chain
        self._modes = modes
        self._meter: TokenMeter = limits.meter(job.tenant, job.session_id)
        self._claim_script = redis.register_script(CLAIM_SCRIPT)
        self._prefix = ""  # the answer so far, for the first provider call of a continuation

    async def run(self) -> EventType | None:
        """Claim, produce and end the generation; None if it had already ended.

        Raises `Fenced` when another worker took it over meanwhile, and Redis errors when
        Redis stayed away longer than the writer retries (the request stays pending).
        """
        claim, writer = await self._claim()
        if writer is None:
            return None
        try:
            raise_if_cancelling()
            kind, data = await self._produce(claim, writer)
            await self._meter.settle()  # before the terminal event: who sees it sees usage too
            try:
                await writer.finish(kind, data)
            except GenerationStopped as exc:  # the session limit cut the last tokens
                kind = EventType.ERROR
                await writer.finish(kind, {"code": exc.code, "message": exc.message})
        except BaseException:
            await writer.abort()
            raise
        log.info("generation_finished", outcome=kind.value, tokens=writer.tokens)
        return kind

    async def give_up(self, failed_deliveries: int) -> bool:
        """End the generation with a `max_deliveries` error; False if it had already ended."""
        _claim, writer = await self._claim()
        if writer is None:
            return False
        message = f"the request was delivered {failed_deliveries} times without finishing"
        await writer.finish(EventType.ERROR, {"code": "max_deliveries", "message": message})
        return True

    async def _claim(self) -> tuple[Claim, GenerationWriter | None]:
        job, settings = self.job, self._settings
        ttl = int(settings.generation_deadline_s) + settings.stream_ttl_s
        raw = await self._claim_script(
            keys=[self._keys.generation(job.request_id), self._keys.usage(job.session_id)],
            args=[self._worker, job.session_id, job.model_id, ttl],
        )
        first_id = raw[4].decode() if isinstance(raw[4], bytes) else str(raw[4])
        claim = Claim(raw[0], raw[1], raw[2], bool(raw[3]), first_id, raw[5])
        if claim.epoch < 0:
            return claim, None
        ctx = GenerationContext(
            session=job.session_id,
            model=job.model_id,
            request_id=job.request_id,
            worker=self._worker,
            epoch=claim.epoch,
        )
        return claim, self._producer.writer(ctx, last_seq=claim.last_seq, chain=self._chain)

    async def _produce(self, claim: Claim, writer: GenerationWriter) -> Outcome:
        if claim.cancel:  # cancelled while queued, or before this worker reclaimed it
            return self._cancelled(claim, writer)
        limit = self._settings.session_token_limit
        if limit and claim.session_tokens >= limit:
            return EventType.ERROR, {
                "code": "session_limit",
                "message": f"the session used its {limit} tokens",
            }
        if claim.last_seq > 0:
            self._prefix = await self._takeover(claim, writer)
        raise_if_cancelling()
        kind, data = await self._modes.run(self.job, writer, self._run_provider)
        if kind is EventType.CANCELLED:
            return self._cancelled(claim, writer)
        return kind, data

    def _cancelled(self, claim: Claim, writer: GenerationWriter) -> Outcome:
        written = claim.written_tokens + writer.tokens  # every token the session was sent
        log.info("generation_cancelled", tokens=written)
        return cancelled_outcome(written)

    async def _takeover(self, claim: Claim, writer: GenerationWriter) -> str:
        """Write the seam; return the answer so far if the provider continues it, else ""."""
        tokens, whole = await self._answer_so_far(claim)
        log.warning("generation_taken_over", epoch=claim.epoch, tokens_so_far=len(tokens))
        if whole and self._continues():
            writer.ctx.kept_tokens = len(tokens)
            await writer.seam({"mode": "continue", "keptTokens": len(tokens)})
            return "".join(tokens)
        await writer.seam({"mode": "restart", "discardedTokens": len(tokens)})
        return ""

    def _continues(self) -> bool:
        """Whether a takeover may continue the answer: plain chat, one model, and a provider
        that continues a prefix (a fallback or another mode's retries would not)."""
        if self.job.mode != "chat" or self.job.fallbacks:
            return False
        try:
            provider, _upstream = self._providers.resolve(self.job.model_id)
        except UnknownModel:
            return False
        return bool(getattr(provider, "continues_prefix", False))

    async def _answer_so_far(self, claim: Claim) -> tuple[list[str], bool]:
        """Tokens of the answer since its last restart, and whether every event is retained."""
        key = self._keys.stream(self.job.session_id, self.job.model_id)
        start = claim.first_id or "-"
        tokens: list[str] = []
        seqs: list[int] = []
        while True:
            entries: Any = await self._redis.xrange(key, min=start, max="+", count=_PAGE)
            for _entry_id, fields in entries:
                try:
                    event = from_fields(fields)
                except MalformedEntry:
                    continue  # the readers skip it and count it
                if event.request_id != self.job.request_id:
                    continue
                seqs.append(event.seq)
                if event.type is EventType.TOKEN:
                    tokens.append(event.content)
                elif event.type is EventType.SEAM and (event.data or {}).get("mode") == "restart":
                    tokens.clear()
            if len(entries) < _PAGE:
                break
            start = "(" + entries[-1][0].decode()
        return tokens, seqs == list(range(1, claim.last_seq + 1))

    async def _run_provider(self, job: GenerationJob, writer: GenerationWriter) -> Outcome:
        """One provider call of the mode (`modes.RunProvider`), its failures as outcomes."""
        try:
            provider, upstream = self._providers.resolve(job.model_id)
        except UnknownModel as exc:  # the API knows a model this worker is not configured for
            return EventType.ERROR, {"code": "unknown_model", "message": exc.detail}
        prefix, self._prefix = self._prefix, ""
        request = ProviderRequest(upstream, job.messages, job.params, prefix=prefix)
        try:
            async with asyncio.timeout(self._settings.generation_deadline_s):
                finish = await self._stream_with_retries(provider, request, writer, job.model_id)
        except ProviderError as exc:
            log.warning("provider_failed", code=exc.code, error=exc.message)
            return EventType.ERROR, {"code": exc.code, "message": exc.message}
        except GenerationStopped as exc:
            return EventType.ERROR, {"code": exc.code, "message": exc.message}
        except TokensRefused:
            return EventType.ERROR, self._meter.exceeded()
        except TimeoutError:
            return EventType.ERROR, {
                "code": "deadline_exceeded",
                "message": f"generation exceeded {self._settings.generation_deadline_s:g} s",
            }
        return EventType.COMPLETE, {
            "finishReason": finish.reason,
            "usage": msgspec.to_builtins(self._usage(job, finish, writer)),
        }

    async def _stream_with_retries(
        self, provider: Provider, request: ProviderRequest, writer: GenerationWriter, model: str
    ) -> Finish:
        settings = self._settings
        attempt = 0
        while True:
            before = writer.ctx.tokens
            try:
                return await self._stream(provider, request, writer, model)
            except ProviderError as exc:
                if not exc.retryable or writer.ctx.tokens > before:
                    raise
                if attempt >= settings.provider_retries:
                    exc.message += f" (after {attempt + 1} attempts)"
                    raise
                delay = settings.provider_retry_backoff_s * 2**attempt
                attempt += 1
                log.info("provider_retrying", code=exc.code, attempt=attempt, delay_s=delay)
                await asyncio.sleep(delay)

    async def _stream(
        self, provider: Provider, request: ProviderRequest, writer: GenerationWriter, model: str
    ) -> Finish:
        finish = Finish()
        # The time to first token counts from the request's creation, not after a takeover.
        first_ms = (self.job.created_ms or None) if writer.seq == 0 else None
        stream = metered(
            provider.stream(request),
            provider=provider.name,
            model=model,
            created_ms=first_ms,
        )
        try:
            async for item in stream:
                if isinstance(item, Delta):
                    if item.text:
                        if not await self._meter.take():  # a tokens-per-minute limit
                            raise TokensRefused
                        await writer.token(item.text)
                else:
                    finish = item
        finally:
            # Close the upstream request now, not when the generator is collected.
            await stream.aclose()  # type: ignore[attr-defined]
        return finish

    def _usage(self, job: GenerationJob, finish: Finish, writer: GenerationWriter) -> Usage:
        ctx = writer.ctx
        if finish.usage is None:
            prompt = sum(len(m.content.split()) for m in job.messages)
            completion = ctx.tokens
        else:
            prompt, completion = finish.usage.prompt_tokens, finish.usage.completion_tokens
        completion += ctx.kept_tokens  # the continued answer includes the earlier owner's part
        return Usage(prompt, completion, prompt + completion)
