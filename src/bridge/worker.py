"""The generation worker: takes requests from the consumer group and streams answers into Redis.

Ownership of a generation is an `epoch` in its state hash. Claiming a request increments it
(atomically, in Lua), and every append checks it (see `streams.producer`), so a worker that
lost its request to a takeover cannot write another entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge import metrics
from bridge.errors import Fenced, MalformedEntry, ProviderError
from bridge.modes import Modes
from bridge.providers.base import Delta, ProviderRequest, Usage
from bridge.providers.metered import metered
from bridge.providers.registry import ProviderRegistry
from bridge.ratelimit import RateLimiter, TokenMeter
from bridge.settings import Settings
from bridge.streams.codec import EventType
from bridge.streams.consumer import Delivery, WorkQueue
from bridge.streams.jobs import GenerationJob, decode_job
from bridge.streams.keys import Keys
from bridge.streams.producer import GenerationWriter, StreamProducer

log = structlog.get_logger("bridge.worker")

CLAIM_SCRIPT = """
-- KEYS: generation hash. ARGV: worker name, session, model, ttl
-- Returns {epoch, last seq, tokens already written}, or {-1, 0, 0} if it already ended.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'complete' or status == 'error' or status == 'cancelled' then
  return {-1, 0, 0}
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1],
           'session', ARGV[2], 'model', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
return {epoch, seq, tokens}
"""

HEARTBEAT_INTERVAL_S = 2.0


async def beat(redis: Redis, keys: Keys, name: str, ttl_s: float) -> None:
    """Record that worker `name` is alive for the next `ttl_s` seconds; forget expired ones."""
    now = time.time()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zadd(keys.workers, {name: now + ttl_s})
        pipe.zremrangebyscore(keys.workers, "-inf", now)
        await pipe.execute()


async def live_workers(redis: Redis, keys: Keys) -> list[str]:
    """Names of workers whose heartbeat has not expired."""
    names: list[Any] = await redis.zrangebyscore(keys.workers, time.time(), "+inf")
    return [name.decode() for name in names]


def worker_name() -> str:
    """A consumer name that is unique and says where the worker runs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs up to `settings.worker_concurrency` generations at once."""

    def __init__(
        self,
        *,
        redis: Redis,
        reader: Redis,
        keys: Keys,
        settings: Settings,
        providers: ProviderRegistry,
        name: str | None = None,
        modes: Modes | None = None,
        stream: str | None = None,
        decode: Callable[[Delivery], GenerationJob] | None = None,
    ) -> None:
        self.name = name or worker_name()
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._providers = providers
        # `stream` and `decode`: serve another request stream (seed 000) with this same loop
        dead_letters = f"{stream}:dead" if stream else None
        self.queue = WorkQueue(
            redis, reader, keys, settings, self.name, stream=stream, dead_letters=dead_letters
        )
        self._decode = decode or (lambda delivery: decode_job(delivery.fields))
        self._modes = modes or Modes()
        self._producer = StreamProducer(redis, keys, settings)
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._limits = RateLimiter(redis, keys, settings)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._accepting = asyncio.Event()  # cleared by drain(): read no more requests
        self._accepting.set()
        self.started_at = time.time()
        self.completed = 0

    @property
    def active(self) -> int:
        return len(self._active)

    async def run(self) -> None:
        """Serve requests until cancelled. Running generations are left pending for reclaim."""
        await self.queue.ensure_group()
        log.info("worker_started", worker=self.name)
        helpers = [
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="worker-maintenance"),
            asyncio.create_task(self.queue.run_acks(), name="worker-acks"),
        ]
        try:
            await self._read_loop()
        finally:
            for task in [*helpers, *self._active.values()]:
                task.cancel()
            await asyncio.gather(*helpers, *self._active.values(), return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.queue.flush_acks()
                await self._redis.zrem(self._keys.workers, self.name)

    @property
    def accepting(self) -> bool:
        return self._accepting.is_set()

    async def drain(self, timeout_s: float) -> int:
        """Take no new requests; wait up to `timeout_s` for the running generations to end.

        Returns how many still run. Cancelling `run()` then leaves those pending in the
        consumer group, and another worker reclaims them.
        """
        self._accepting.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._active and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._active.values()), timeout=left)
        return len(self._active)

    async def _read_loop(self) -> None:
        backoff = 0.05
        while True:
            await self._capacity.wait()
            await self._accepting.wait()
            try:
                free = self._settings.worker_concurrency - len(self._active)
                deliveries = await self.queue.read(free, block_ms=self._settings.fanout_block_ms)
                backoff = 0.05
            except (RedisError, OSError) as exc:
                log.warning("worker_read_failed", error=str(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for delivery in deliveries:
                self._start(delivery)

    async def _maintenance_loop(self) -> None:
        """Renew the claim on running requests, and reclaim those of dead workers."""
        interval = max(self._settings.reclaim_idle_ms / 3000.0, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.queue.renew(self._active)
                while self.accepting and len(self._active) < self._settings.worker_concurrency:
                    deliveries = await self.queue.reclaim()
                    for delivery in deliveries:
                        log.info(
                            "request_reclaimed",
                            entry=delivery.entry_id,
                            times_delivered=delivery.times_delivered,
                        )
                        metrics.REQUESTS_RECLAIMED.inc()
                        self._start(delivery)
                    if self.queue.reclaim_scan_done:
                        break
            except (RedisError, OSError) as exc:
                log.warning("worker_maintenance_failed", error=str(exc))

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                await beat(self._redis, self._keys, self.name, HEARTBEAT_INTERVAL_S * 3)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    def _start(self, delivery: Delivery) -> None:
        if delivery.entry_id in self._active:
            return
        task = asyncio.create_task(self._serve(delivery), name=f"generation-{delivery.entry_id}")
        self._active[delivery.entry_id] = task
        if len(self._active) >= self._settings.worker_concurrency:
            self._capacity.clear()
        task.add_done_callback(functools.partial(self._finished, delivery.entry_id))

    def _finished(self, entry_id: str, _task: object = None) -> None:
        self._active.pop(entry_id, None)
        self._capacity.set()

    async def _serve(self, delivery: Delivery) -> None:
        try:
            job = self._decode(delivery)
        except MalformedEntry as exc:
            log.warning("malformed_request_skipped", entry=delivery.entry_id, error=str(exc))
            await self.queue.dead_letter(delivery, "malformed")
            return
        if delivery.times_delivered > self._settings.max_deliveries:
            await self._give_up(delivery, job)
            return
        structlog.contextvars.bind_contextvars(request_id=job.request_id, session_id=job.session_id)
        try:
            if await self._generate(job):
                await self._modes.settled(job)
                self.queue.ack(delivery.entry_id)
        except Fenced as exc:
            log.warning("generation_fenced", error=str(exc))  # the new owner acknowledges
            metrics.GENERATIONS.labels("taken_over").inc()
        except (RedisError, OSError) as exc:
            log.warning("generation_interrupted", error=str(exc))  # stays pending: reclaimed
            metrics.GENERATIONS.labels("interrupted").inc()

    async def _generate(self, job: GenerationJob) -> bool:
        """Run one generation to its terminal event. False if it had already ended."""
        ttl = int(self._settings.generation_deadline_s) + self._settings.stream_ttl_s
        epoch, last_seq, earlier_tokens = await self._claim(
            keys=[self._keys.generation(job.request_id)],
            args=[self.name, job.session_id, job.model_id, ttl],
        )
        if epoch < 0:
            return True
        writer = self._producer.writer(
            session=job.session_id,
            model=job.model_id,
            request_id=job.request_id,
            epoch=epoch,
            last_seq=last_seq,
        )
        if last_seq > 0:
            # Taken over from a worker that died: the answer restarts, visibly.
            await writer.seam({"mode": "restart", "discardedTokens": earlier_tokens})
        meter = self._limits.meter(job.tenant, job.session_id)
        run_provider = functools.partial(self._run_provider, meter=meter)
        kind, data = await self._modes.run(job, writer, run_provider)
        await meter.settle()  # before the terminal event: a client that saw it sees usage too
        await writer.finish(kind, data)
        self.completed += 1
        log.info("generation_finished", outcome=kind.value, tokens=writer.tokens)
        metrics.GENERATIONS.labels(kind.value).inc()
        return True

    async def _run_provider(
        self, job: GenerationJob, writer: GenerationWriter, meter: TokenMeter
    ) -> tuple[EventType, dict[str, Any]]:
        usage: Usage | None = None
        reason = "stop"
        try:
            provider, upstream = self._providers.resolve(job.model_id)
            request = ProviderRequest(upstream, job.messages, job.params)
            first_ms = (job.created_ms or None) if writer.seq == 0 else None  # not after takeover
            stream = metered(
                provider.stream(request),
                provider=provider.name,
                model=job.model_id,
                created_ms=first_ms,
            )
            try:
                async with asyncio.timeout(self._settings.generation_deadline_s):
                    async for item in stream:
                        if isinstance(item, Delta):
                            if item.text:
                                if not await meter.take():  # a tokens-per-minute limit
                                    return EventType.ERROR, meter.exceeded()
                                await writer.token(item.text)
                        else:
                            reason, usage = item.reason, item.usage
            finally:
                # Close the upstream request now, not when the generator is collected.
                aclose = getattr(stream, "aclose", None)
                if aclose is not None:
                    await aclose()
        except ProviderError as exc:
            log.warning("provider_failed", code=exc.code, error=exc.message)
            return EventType.ERROR, {"code": exc.code, "message": exc.message}
        except TimeoutError:
            return EventType.ERROR, {
                "code": "deadline_exceeded",
                "message": f"generation exceeded {self._settings.generation_deadline_s:g} s",
            }
        if usage is None:
            prompt = sum(len(m.content.split()) for m in job.messages)
            usage = Usage(prompt, writer.tokens, prompt + writer.tokens)
        return EventType.COMPLETE, {
            "finishReason": reason,
            "usage": msgspec.to_builtins(usage),
        }

    async def _give_up(self, delivery: Delivery, job: GenerationJob) -> None:
        """A request delivered too often: dead-letter it and tell the session why."""
        ttl = int(self._settings.generation_deadline_s) + self._settings.stream_ttl_s
        epoch, last_seq, _ = await self._claim(
            keys=[self._keys.generation(job.request_id)],
            args=[self.name, job.session_id, job.model_id, ttl],
        )
        if epoch > 0:
            writer = self._producer.writer(
                session=job.session_id,
                model=job.model_id,
                request_id=job.request_id,
                epoch=epoch,
                last_seq=last_seq,
            )
            await writer.finish(
                EventType.ERROR,
                {
                    "code": "max_deliveries",
                    "message": f"the request failed {delivery.times_delivered - 1} times",
                },
            )
        await self._modes.settled(job)
        await self.queue.dead_letter(delivery, "max_deliveries")
