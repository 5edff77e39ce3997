"""The runtime: owns the Redis clients and the components; starts them, stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any

import structlog
from redis.asyncio import Redis

from bridge import metrics
from bridge.access import StreamTokens
from bridge.batching.batcher import Batcher
from bridge.connections.manager import ConnectionManager
from bridge.connections.subscriber import Envelope
from bridge.errors import CloseReason, RedisUnavailable
from bridge.health import HealthMonitor
from bridge.providers.registry import ProviderRegistry
from bridge.ratelimit import RateLimiter
from bridge.redis_raw import RawConnection
from bridge.redis_select import RedisChoice, make_client, select_redis
from bridge.redis_watch import RedisWatch
from bridge.seeds import seed_streams, worker_modes
from bridge.settings import Settings
from bridge.streams.cancel import CancelWatch
from bridge.streams.codec import Cursor
from bridge.streams.fanout import FanoutReader
from bridge.streams.history import Gap, HistoryStats, replay
from bridge.streams.keys import Keys
from bridge.streams.seed_requests import SeedRequestDecoder
from bridge.supervisor import BackgroundTask
from bridge.worker import Worker

log = structlog.get_logger("bridge.runtime")


class Runtime:
    """Everything one bridge process runs. Use `Runtime.running(settings)`."""

    def __init__(
        self,
        settings: Settings,
        choice: RedisChoice,
        redis: Redis,
        tokens: StreamTokens,
        *,
        with_api: bool,
        with_worker: bool,
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.redis_choice = choice
        self.redis = redis
        self.tokens = tokens
        self.providers = ProviderRegistry.from_settings(settings)
        self.limits = RateLimiter(redis, self.keys, settings)
        self.manager = ConnectionManager(
            queue_size=settings.send_queue_size,
            max_per_session=settings.max_sse_per_session,
            max_per_address=settings.max_sse_per_address,
            linger_s=settings.sse_linger_s,
            recent_s=settings.sse_recent_s,
        )
        self.history_stats = HistoryStats()
        self.watch = RedisWatch(
            redis,
            interval_s=settings.redis_watch_s,
            timeout_s=max(settings.redis_watch_s, 1.0),
            on_down=self._redis_down,
        )
        blocking_timeout = settings.fanout_block_ms / 1000 + settings.redis_timeout_s
        self._blocking_clients: list[Redis] = []
        self.fanout: FanoutReader | None = None
        self.worker: Worker | None = None
        self.tasks: list[BackgroundTask] = []
        if with_api:
            self.fanout = FanoutReader(
                RawConnection(
                    self._blocking_client(choice.url, blocking_timeout),
                    name="SUBSCRIBE",
                    timeout_s=blocking_timeout,
                    timed=False,
                ),
                RawConnection(redis, name="XREAD"),
                redis,
                self.keys,
                self.manager.deliver,
                keepalive_s=settings.fanout_block_ms / 1000,
                timeout_s=settings.redis_timeout_s,
                on_lost=self.manager.recent.clear,
            )
            self.manager.tracker = self.fanout
            self.tasks.append(BackgroundTask("fanout-reader", self.fanout.run))
        self.batcher: Batcher | None = None
        self.seed_workers: list[Worker] = []
        if with_worker:
            cancels = CancelWatch(redis, self.keys)
            self.batcher = Batcher(settings)
            modes = worker_modes(redis, self.keys, settings, cancels, self.batcher)
            self.worker = Worker(
                redis=redis,
                reader=self._blocking_client(choice.url, blocking_timeout),
                keys=self.keys,
                settings=settings,
                providers=self.providers,
                modes=modes,
            )
            self.tasks.append(BackgroundTask("worker", self.worker.run))
            self.tasks.append(BackgroundTask("cancel-watch", cancels.watch))
            self.tasks.append(BackgroundTask("batcher", self.batcher.run))
            for kind, stream in seed_streams(settings):
                seed_worker = Worker(
                    redis=redis,
                    reader=self._blocking_client(choice.url, blocking_timeout),
                    keys=self.keys,
                    settings=settings,
                    providers=self.providers,
                    name=f"{self.worker.name}-{kind}",
                    modes=modes,
                    stream=stream,
                    decode=SeedRequestDecoder(kind, self.providers, settings),
                )
                self.seed_workers.append(seed_worker)
                self.tasks.append(BackgroundTask(f"{kind}-worker", seed_worker.run))
        if with_api:
            self.tasks.append(BackgroundTask("redis-watch", self.watch.run))
        self.monitor = HealthMonitor(self)
        self.tasks.append(BackgroundTask("health-monitor", self.monitor.run))
        self.stopping = False
        self._drained: asyncio.Task[int] | None = None
        roles = (("api", with_api), ("worker", with_worker))
        metrics.set_build_info("+".join(role for role, on in roles if on))

    async def catch_up(self, session: str, cursor: Cursor) -> AsyncIterator[list[Envelope] | Gap]:
        """What `session` retains after `cursor`: from the entries this process delivered in
        the last seconds when they hold all of it (the common reconnect), else from Redis.

        Call it once the connection is registered (tailing the session): whatever is
        delivered after the entries it finds reaches the connection live.
        """
        models = self.fanout.models(session) if self.fanout is not None else None
        if models is not None:
            held = self.manager.recent.after(session, cursor, models | cursor.keys())
            if held is not None:
                metrics.CATCH_UPS.labels("memory").inc()
                if held:
                    yield held
                return
        metrics.CATCH_UPS.labels("redis").inc()
        async for item in replay(
            self.redis,
            self.keys,
            session,
            cursor,
            known_models=self.fanout.models if self.fanout is not None else None,
            stats=self.history_stats,
        ):
            yield item

    def _redis_down(self) -> None:
        # EventSource reconnects (after `retry:`) to a connection that ends; it resumes from
        # its Last-Event-ID once Redis answers again.
        closed = self.manager.close_all(CloseReason.REDIS_UNAVAILABLE)
        log.warning("connections_closed_redis_down", connections=closed)

    def _blocking_client(self, url: str, timeout: float) -> Redis:
        client = make_client(url, self.settings, socket_timeout=timeout)
        self._blocking_clients.append(client)
        return client

    @classmethod
    @contextlib.asynccontextmanager
    async def running(
        cls, settings: Settings, *, with_api: bool = True, with_worker: bool = True
    ) -> AsyncIterator[Runtime]:
        """Select Redis, start the components, and stop everything on exit."""
        choice = await select_redis(settings, log)
        redis = make_client(choice.url, settings)
        runtime: Runtime | None = None
        try:
            tokens = StreamTokens(
                await _stream_secrets(settings, redis, Keys(settings.key_prefix)),
                settings.stream_token_ttl_s,
            )
            runtime = cls(
                settings, choice, redis, tokens, with_api=with_api, with_worker=with_worker
            )
            for task in runtime.tasks:
                task.start()
            yield runtime
        finally:
            if runtime is not None:
                await runtime._stop()
            await redis.aclose()
            await choice.aclose()

    def begin_shutdown(self) -> None:
        """Stop taking work, at once: readiness fails, new generations and streams are
        refused, open streams get a final `reconnect` event and close, and the worker (if
        any) starts draining. Safe to call more than once."""
        if self.stopping:
            return
        self.stopping = True
        closed = self.manager.close_all(CloseReason.SHUTDOWN)
        workers = self.workers
        running = sum(worker.active for worker in workers)
        if workers:
            self._drained = asyncio.create_task(self._drain(workers), name="worker-drain")
        log.info("shutdown_started", connections_closed=closed, generations_running=running)

    @property
    def workers(self) -> list[Worker]:
        """Every worker of this process: the chat worker and the seed request-stream ones."""
        return ([self.worker] if self.worker is not None else []) + self.seed_workers

    async def _drain(self, workers: list[Worker]) -> int:
        timeout = self.settings.shutdown_timeout_s
        return sum(await asyncio.gather(*(worker.drain(timeout) for worker in workers)))

    async def drained(self) -> None:
        """Wait until the worker's running generations ended, or the shutdown deadline."""
        self.begin_shutdown()
        if self._drained is not None:
            left = await self._drained
            self._drained = None
            if left:
                log.warning("shutdown_deadline_passed", generations_left_pending=left)

    async def _stop(self) -> None:
        await self.drained()
        self.manager.close_all(CloseReason.SHUTDOWN)  # any that opened meanwhile
        self.manager.recent.close()
        for task in reversed(self.tasks):
            await task.stop()
        await self.providers.aclose()
        for client in self._blocking_clients:
            await client.aclose()


async def _stream_secrets(settings: Settings, redis: Redis, keys: Keys) -> list[bytes]:
    """Configured secrets (comma-separated, first one signs), else one shared through Redis.

    Sharing a generated secret through Redis lets every process of a fleet verify tokens the
    others issued, with nothing to configure.
    """
    if settings.stream_secret:
        return [part.strip().encode() for part in settings.stream_secret.split(",") if part]
    await redis.set(keys.secret, secrets.token_urlsafe(32), nx=True)
    shared: Any = await redis.get(keys.secret)
    if shared is None:  # deleted between the two commands: use ours next time round
        raise RedisUnavailable("the shared stream secret vanished; retry start-up")
    return [shared]
