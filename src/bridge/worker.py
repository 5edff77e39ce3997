"""The generation worker: takes requests from the consumer group and runs their generations.

A request is acknowledged once its generation has a terminal event. While it runs, the worker
renews its claim; a request whose claim it lost (another worker reclaimed it while this one
was paused) is abandoned at once, and fencing (`generation`) stops any write that races that.
Requests of dead workers are reclaimed after `reclaim_idle_ms`; one delivered more than
`max_deliveries` times is dead-lettered and its session told so. A graceful stop drains
(`drain`: no new requests, running ones may finish until the shutdown deadline), then hands
what still runs back for immediate reclaim by the other workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from bridge import metrics
from bridge.backoff import Backoff, raise_if_cancelling
from bridge.errors import Fenced, MalformedEntry
from bridge.generation import Generation
from bridge.modes import Modes
from bridge.providers.registry import ProviderRegistry
from bridge.ratelimit import RateLimiter
from bridge.settings import Settings
from bridge.streams.consumer import Delivery, WorkQueue
from bridge.streams.jobs import GenerationJob, decode_job
from bridge.streams.keys import Keys
from bridge.streams.processor import DEFAULT_PROCESSORS, Processor, ProcessorChain
from bridge.streams.producer import StreamProducer

log = structlog.get_logger("bridge.worker")

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
    """Runs up to `settings.worker_concurrency` generations at once.

    Plain counters, for metrics: `completed`, `malformed` (requests that did not decode),
    `fenced` (appends refused because another worker owns the generation), `lost` (claims
    taken over while running), `dead_lettered`, `failed` (unexpected errors).
    """

    def __init__(
        self,
        *,
        redis: Redis,
        reader: Redis,
        keys: Keys,
        settings: Settings,
        providers: ProviderRegistry,
        name: str | None = None,
        processors: Iterable[Processor] = DEFAULT_PROCESSORS,
        modes: Modes | None = None,
        stream: str | None = None,
        decode: Callable[[Delivery], GenerationJob] | None = None,
    ) -> None:
        self.name = name or worker_name()
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._providers = providers
        self._chain = ProcessorChain(processors)
        # `stream` and `decode`: serve another request stream (seed 000) with this same loop
        dead_letters = f"{stream}:dead" if stream else None
        self.queue = WorkQueue(
            redis, reader, keys, settings, self.name, stream=stream, dead_letters=dead_letters
        )
        self._decode = decode or (lambda delivery: decode_job(delivery.fields))
        # cancels need `modes.cancels`: one CancelWatch per process, run by the Runtime
        self._modes = modes or Modes()
        self._producer = StreamProducer(redis, keys, settings)
        self._limits = RateLimiter(redis, keys, settings)
        self._active: dict[str, asyncio.Task[None]] = {}  # request-stream entry id -> task
        self._capacity = asyncio.Event()
        self._capacity.set()
        self._accepting = asyncio.Event()  # cleared by drain(): read no more requests
        self._accepting.set()
        self.started_at = time.time()
        self.completed = 0
        self.malformed = 0
        self.fenced = 0
        self.lost = 0
        self.dead_lettered = 0
        self.failed = 0

    @property
    def active(self) -> int:
        return len(self._active)

    async def run(self) -> None:
        """Serve requests until cancelled; running ones are then handed back for reclaim."""
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
            running = list(self._active)
            for task in [*helpers, *self._active.values()]:
                task.cancel()
            await asyncio.gather(*helpers, *self._active.values(), return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.queue.flush_acks()
                await self.queue.release(running)
                await self._redis.zrem(self._keys.workers, self.name)

    @property
    def accepting(self) -> bool:
        return self._accepting.is_set()

    async def drain(self, timeout_s: float) -> int:
        """Take no new requests; wait up to `timeout_s` for the running generations to end.

        Returns how many still run. Cancelling `run()` then hands those back (`release`):
        they stay pending in the consumer group, and another worker reclaims them at once.
        """
        self._accepting.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._active and (left := deadline - loop.time()) > 0:
            await asyncio.wait(list(self._active.values()), timeout=left)
        return len(self._active)

    async def _read_loop(self) -> None:
        backoff = Backoff()
        while True:
            raise_if_cancelling()
            await self._capacity.wait()
            await self._accepting.wait()
            try:
                free = self._settings.worker_concurrency - len(self._active)
                deliveries = await self.queue.read(free, block_ms=self._settings.fanout_block_ms)
                backoff.reset()
            except (RedisError, OSError) as exc:
                log.warning("worker_read_failed", error=str(exc))
                await backoff.wait()
                continue
            for delivery in deliveries:
                self._start(delivery)

    async def _maintenance_loop(self) -> None:
        """Renew running requests, reclaim dead workers' requests, trim the request stream."""
        interval = max(self._settings.reclaim_idle_ms / 3000.0, 0.05)
        while True:
            raise_if_cancelling()
            await asyncio.sleep(interval)
            try:
                await self._renew()
                await self._reclaim()
                await self.queue.trim()
            except (RedisError, OSError) as exc:
                log.warning("worker_maintenance_failed", error=str(exc))

    async def _renew(self) -> None:
        for entry_id in await self.queue.renew(list(self._active)):
            task = self._active.get(entry_id)
            if task is not None:
                self.lost += 1
                log.warning("generation_lost", entry=entry_id)
                metrics.GENERATIONS.labels("taken_over").inc()
                task.cancel()

    async def _reclaim(self) -> None:
        while self.accepting and len(self._active) < self._settings.worker_concurrency:
            for delivery in await self.queue.reclaim():
                log.info(
                    "request_reclaimed",
                    entry=delivery.entry_id,
                    times_delivered=delivery.times_delivered,
                )
                metrics.REQUESTS_RECLAIMED.inc()
                self._start(delivery)
            if self.queue.reclaim_scan_done:
                return

    async def _heartbeat_loop(self) -> None:
        while True:
            with contextlib.suppress(RedisError, OSError):
                await beat(self._redis, self._keys, self.name, HEARTBEAT_INTERVAL_S * 3)
            raise_if_cancelling()
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
            self.malformed += 1
            metrics.MALFORMED_ENTRIES.labels("worker").inc()
            log.warning("malformed_request_skipped", entry=delivery.entry_id, error=str(exc))
            with contextlib.suppress(RedisError, OSError):  # else it is reclaimed and retried
                await self.queue.dead_letter(delivery, "malformed")
            return
        generation = Generation(
            job,
            worker=self.name,
            redis=self._redis,
            keys=self._keys,
            settings=self._settings,
            producer=self._producer,
            providers=self._providers,
            chain=self._chain,
            modes=self._modes,
            limits=self._limits,
        )
        structlog.contextvars.bind_contextvars(request_id=job.request_id, session_id=job.session_id)
        try:
            await self._execute(delivery, generation, job)
        except Fenced as exc:
            self.fenced += 1
            log.warning("generation_fenced", error=str(exc))  # the new owner acknowledges
            metrics.GENERATIONS.labels("taken_over").inc()
        except (RedisError, OSError) as exc:
            log.warning("generation_interrupted", error=str(exc))  # stays pending: reclaimed
            metrics.GENERATIONS.labels("interrupted").inc()
        except Exception:
            # Left pending: reclaimed and retried, then dead-lettered after max_deliveries.
            self.failed += 1
            log.exception("generation_failed", entry=delivery.entry_id)

    async def _execute(
        self, delivery: Delivery, generation: Generation, job: GenerationJob
    ) -> None:
        # The mode's `settled` step also runs when a redelivered request finds its terminal
        # event already stored (its effects are idempotent).
        if delivery.times_delivered > self._settings.max_deliveries:
            if await generation.give_up(delivery.times_delivered - 1):
                await self._modes.settled(job)
                self.dead_lettered += 1
                await self.queue.dead_letter(delivery, "max_deliveries")
                return
        elif (kind := await generation.run()) is not None:
            self.completed += 1
            metrics.GENERATIONS.labels(kind.value).inc()
        await self._modes.settled(job)
        self.queue.ack(delivery.entry_id)
