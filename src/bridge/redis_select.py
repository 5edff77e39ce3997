"""Which Redis this process uses, and the one place that builds Redis clients.

Selection, in order (DESIGN.md, "Processes and roles"):

1. `REDIS_URL` if set; it must answer, or start-up fails (no silent fallback);
2. a Redis/Valkey >= 7.0 answering on 127.0.0.1:6379;
3. an `EmbeddedRedis` started for this process.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, NamedTuple, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.errors import ConfigError, RedisUnavailable
from bridge.redis_metrics import ObservedRedis
from bridge.redis_server import EmbeddedRedis
from bridge.settings import Settings

Source = Literal["REDIS_URL", "local", "embedded"]

#: The oldest Redis release bridge runs on (as `redis_version` reports it; Valkey says 7.2+).
MIN_VERSION = (7, 0)
_MIN_VERSION_TEXT = ".".join(map(str, MIN_VERSION))
_RETRIES = 3
_PROBE_BACKOFF_S = 0.1
_LOCAL_PROBE_TIMEOUT_S = 1.0
_DRIVER_INFO = DriverInfo(name="redis-py", lib_version=metadata.version("redis"))


class Log(Protocol):
    """The logger methods selection uses (a structlog bound logger fits)."""

    def info(self, event: str, **kw: Any) -> Any:
        """Log an event at info level."""

    def warning(self, event: str, **kw: Any) -> Any:
        """Log an event at warning level."""


@dataclass(frozen=True, slots=True)
class RedisChoice:
    """The Redis this process uses; `embedded` is the server to stop at shutdown, if any."""

    url: str
    source: Source
    server: str  # "redis" or "valkey"
    version: str
    embedded: EmbeddedRedis | None = None

    async def aclose(self) -> None:
        """Stop the embedded server, if this choice started one."""
        if self.embedded is not None:
            await self.embedded.astop()


def make_client(
    url: str,
    settings: Settings,
    *,
    socket_timeout: float | None = None,
    retries: int = _RETRIES,
) -> aioredis.Redis:
    """Build an asyncio Redis client for `url`; every client of bridge comes from here.

    `socket_timeout` defaults to `settings.redis_timeout_s`; a reader that blocks (`XREAD
    BLOCK`) must pass one longer than its block time. Connecting never waits longer than
    `settings.redis_timeout_s`. Commands are retried `retries` times on connection errors
    and timeouts with jittered exponential backoff (redis-py's `from_url` would not retry).
    The pool holds at most `settings.redis_pool_size` connections; when all are busy a
    command waits for one (up to the socket timeout) instead of failing at once.
    """
    timeout = settings.redis_timeout_s if socket_timeout is None else socket_timeout
    backoff = ExponentialWithJitterBackoff(cap=1.0, base=0.05) if retries else NoBackoff()
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_pool_size,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, settings.redis_timeout_s),
            retry=Retry(backoff, retries, (RedisConnectionError, RedisTimeoutError)),
            health_check_interval=30,
            decode_responses=False,
            # Given once: redis-py would otherwise look its own version up in the installed
            # package metadata for every new connection (milliseconds each, on the event loop;
            # a burst of generations opening connections stalled a worker ~3 ms per job).
            driver_info=_DRIVER_INFO,
            # RESP2 everywhere: the classic reply shapes, and any proxy or server speaks it.
            protocol=2,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {redact_url(url)}: {exc}") from None
    return ObservedRedis.from_pool(pool)


def redact_url(url: str) -> str:
    """`url` with its password (in the user info or a `password=` query) replaced by `***`."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}{colon and ':***'}@{hostinfo}"
    query = parts.query
    if "password" in query:
        query = urlencode(
            [
                (key, "***" if key == "password" else value)
                for key, value in parse_qsl(query, keep_blank_values=True)
            ],
            safe="*",
        )
    # Not urlunsplit: it turns `unix:///path` into `unix:/path`.
    shown = f"{parts.scheme}://{netloc}{parts.path}"
    return shown + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


async def select_redis(
    settings: Settings,
    log: Log,
    *,
    local_host: str = "127.0.0.1",
    local_port: int = 6379,
    connect_timeout_s: float = 3.0,
) -> RedisChoice:
    """Choose the Redis to use, log the choice, and return it.

    `REDIS_URL` (`settings.redis_url`) must answer PING within `connect_timeout_s`, else this
    raises `RedisUnavailable`. Without it, a server >= 7.0 on `local_host:local_port` is used,
    else an embedded server is started (the caller stops it with `RedisChoice.aclose()`).
    """
    if settings.redis_url:
        choice = await _configured(settings.redis_url, settings, connect_timeout_s)
    else:
        host = f"[{local_host}]" if ":" in local_host else local_host
        local = await _local(f"redis://{host}:{local_port}/0", settings, log)
        choice = local or await _embedded(settings)
    log.info(
        "redis_selected",
        source=choice.source,
        url=redact_url(choice.url),
        server=choice.server,
        version=choice.version,
    )
    return choice


async def _configured(url: str, settings: Settings, timeout_s: float) -> RedisChoice:
    shown = redact_url(url)
    deadline = time.monotonic() + timeout_s
    client = make_client(url, settings, socket_timeout=timeout_s, retries=0)
    try:
        while True:
            try:
                async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                    server = await _probe(client)
                break
            except (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError) as exc:
                if (reply := _server_reply(exc)) is not None:
                    raise RedisUnavailable(
                        f"REDIS_URL {shown} refused the connection: {_why(reply)}"
                    ) from None
                if time.monotonic() + _PROBE_BACKOFF_S >= deadline:
                    raise RedisUnavailable(
                        f"REDIS_URL {shown} did not answer within {timeout_s:g} s: {_why(exc)}"
                    ) from None
                await asyncio.sleep(_PROBE_BACKOFF_S)
            except RedisError as exc:
                raise RedisUnavailable(f"REDIS_URL {shown} is not usable: {_why(exc)}") from None
    finally:
        await client.aclose()
    if server.too_old:
        raise RedisUnavailable(
            f"REDIS_URL {shown} runs {server.name} {server.version}; bridge needs Redis "
            f"{_MIN_VERSION_TEXT} or newer"
        )
    return RedisChoice(url=url, source="REDIS_URL", server=server.name, version=server.version)


async def _local(url: str, settings: Settings, log: Log) -> RedisChoice | None:
    client = make_client(url, settings, socket_timeout=_LOCAL_PROBE_TIMEOUT_S, retries=0)
    try:
        async with asyncio.timeout(_LOCAL_PROBE_TIMEOUT_S):
            server = await _probe(client)
    except (RedisError, TimeoutError, OSError) as exc:
        log.info("redis_local_skipped", url=url, reason=_why(exc))
        return None
    finally:
        await client.aclose()
    if server.too_old:
        log.warning(
            "redis_local_skipped",
            url=url,
            version=server.version,
            reason=f"{server.name} {server.version} is older than {_MIN_VERSION_TEXT}",
        )
        return None
    return RedisChoice(url=url, source="local", server=server.name, version=server.version)


async def _embedded(settings: Settings) -> RedisChoice:
    embedded = await EmbeddedRedis().astart()
    try:
        client = make_client(embedded.url, settings)
        try:
            server = await _probe(client)
        finally:
            await client.aclose()
    except BaseException:
        await embedded.astop()
        raise
    return RedisChoice(
        url=embedded.url,
        source="embedded",
        server=server.name,
        version=server.version,
        embedded=embedded,
    )


class _Server(NamedTuple):
    name: str
    version: str
    too_old: bool


async def _probe(client: aioredis.Redis) -> _Server:
    """PING the server, then read what it is from INFO (a server that forbids INFO passes)."""
    await client.ping()
    try:
        info = await client.info("server")
    except (RedisConnectionError, RedisTimeoutError):
        raise
    except RedisError:
        return _Server(name="redis", version="unknown", too_old=False)
    compat = str(info.get("redis_version", "0"))
    # Valkey reports its own version beside the Redis version it is compatible with.
    if "valkey_version" in info:
        name, version = "valkey", str(info["valkey_version"])
    else:
        name, version = "redis", compat
    return _Server(name=name, version=version, too_old=_release(compat) < MIN_VERSION)


def _release(version: str) -> tuple[int, int]:
    """`"7.0.15"` -> `(7, 0)`; parts that are not numbers count as 0."""
    parts = [*version.split("."), "0", "0"][:2]
    major, minor = (int("".join(filter(str.isdigit, part)) or 0) for part in parts)
    return major, minor


def _server_reply(exc: BaseException) -> RedisError | None:
    """The server's refusal (bad credentials, no permission) behind a connection error, if any.

    redis-py 8 reports a failed AUTH during the handshake as a ConnectionError caused by the
    AuthenticationError; retrying cannot fix either.
    """
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, AuthenticationError | ResponseError):
            return cause
        cause = cause.__cause__
    return None


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
