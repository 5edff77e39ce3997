"""One frozen settings object, read from the environment in one place.

Every variable is documented in the README's configuration table; keep the two in step.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping

import msgspec

from bridge.auth import ApiKeyEntry, parse_api_keys
from bridge.errors import ConfigError
from bridge.provider_catalog import PROVIDERS, SEED_ALIASES, Endpoint, endpoints_from

#: Seed 000's aliases; `gpt-4` is the model seed 002 uses in its examples.
DEFAULT_MODELS = (
    "chatgpt=gpt-4o,"
    "claude=anthropic.claude-3-opus-20240229,"
    "grok=xai.grok-1,"
    "gemini=gemini/gemini-1.5-flash,"
    "deepseek=deepseek-ai/deepseek-chat,"
    "gpt-4=gpt-4,"
    "mock=mock:mock"
)


_ALIAS_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class ModelRoute(msgspec.Struct, frozen=True):
    """Where a public model name goes: a provider and the model name the provider knows."""

    alias: str
    provider: str | None  # None: the default provider
    upstream: str


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Configuration of one bridge process. Build it with `Settings.from_env()`."""

    redis_url: str | None = None
    key_prefix: str = "llm:"
    redis_timeout_s: float = 5.0
    redis_pool_size: int = 64

    stream_maxlen: int = 10_000
    stream_ttl_s: int = 3600
    generation_deadline_s: float = 600.0

    sse_heartbeat_s: float = 15.0
    sse_retry_ms: int = 3000
    sse_linger_s: float = 5.0
    sse_recent_s: float = 5.0
    send_queue_size: int = 2048
    fanout_block_ms: int = 5000

    max_body_bytes: int = 256 * 1024
    max_prompt_chars: int = 32_000
    max_messages: int = 256

    worker_concurrency: int = 64
    reclaim_idle_ms: int = 15_000
    max_deliveries: int = 3
    session_token_limit: int = 0  # 0: no limit
    redis_watch_s: float = 1.0

    provider: str = "mock"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: str | None = None
    provider_connect_timeout_s: float = 10.0
    provider_read_timeout_s: float = 60.0
    provider_retries: int = 2
    provider_retry_backoff_s: float = 0.5
    models: tuple[ModelRoute, ...] = ()
    # the catalog providers' endpoints and keys (bridge.provider_catalog)
    endpoints: dict[str, Endpoint] = msgspec.field(default_factory=lambda: endpoints_from({}))

    mock_tokens: int = 24
    mock_delay_ms: float = 20.0

    stream_secret: str | None = None
    stream_token_ttl_s: int = 86_400

    # security: producers' API keys, fleet-wide rate limits (0 = off), per-client limits
    api_keys: tuple[ApiKeyEntry, ...] = ()
    cors_origins: tuple[str, ...] = ()
    rate_key_rpm: int = 0
    rate_key_tpm: int = 0
    rate_session_rpm: int = 120
    rate_session_tpm: int = 0
    max_generations_per_session: int = 8
    max_sse_per_session: int = 64
    max_sse_per_address: int = 1000
    max_header_bytes: int = 16 * 1024
    ws_max_message_bytes: int = 64 * 1024
    ws_messages_per_s: float = 20.0
    ws_message_burst: int = 40

    log_format: str = "auto"
    log_level: str = "info"
    log_prompts: bool = False

    metrics_port: int | None = None
    shutdown_timeout_s: float = 25.0
    shutdown_delay_s: float = 2.0

    # the seed systems (docs/seeds.md)
    job_model: str = "mock"
    job_max_attempts: int = 3
    job_result_ttl_s: int = 3600
    job_max_batch: int = 100
    seed_streams: bool = True
    summary_stream: str = "summary_requests"
    question_stream: str = "question_requests"
    results_stream: str = "llm_results"
    seed_model: str = "chatgpt"
    batch_size: int = 4
    batch_window_ms: float = 200.0
    batch_concurrency: int = 1
    batch_command: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every setting from `environ` (default: the process environment)."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        openai_base_url = env.get("OPENAI_BASE_URL")
        openai_api_key = env.get("OPENAI_API_KEY") or None
        default_provider = "openai" if (openai_base_url or openai_api_key) else "mock"
        provider = reader.choice("BRIDGE_PROVIDER", default_provider, ("mock", "openai"))
        settings = cls(
            redis_url=env.get("REDIS_URL") or None,
            key_prefix=reader.text("BRIDGE_KEY_PREFIX", "llm:"),
            redis_timeout_s=reader.number("BRIDGE_REDIS_TIMEOUT_S", 5.0),
            redis_pool_size=reader.integer("BRIDGE_REDIS_POOL_SIZE", 64),
            stream_maxlen=reader.integer("BRIDGE_STREAM_MAXLEN", 10_000),
            stream_ttl_s=reader.integer("BRIDGE_STREAM_TTL_S", 3600),
            generation_deadline_s=reader.number("BRIDGE_GENERATION_DEADLINE_S", 600.0),
            sse_heartbeat_s=reader.number("BRIDGE_SSE_HEARTBEAT_S", 15.0),
            sse_retry_ms=reader.integer("BRIDGE_SSE_RETRY_MS", 3000),
            sse_linger_s=reader.number("BRIDGE_SSE_LINGER_S", 5.0),
            sse_recent_s=reader.number("BRIDGE_SSE_RECENT_S", 5.0),
            send_queue_size=reader.integer("BRIDGE_SEND_QUEUE_SIZE", 2048),
            fanout_block_ms=reader.integer("BRIDGE_FANOUT_BLOCK_MS", 5000),
            max_body_bytes=reader.integer("BRIDGE_MAX_BODY_BYTES", 256 * 1024),
            max_prompt_chars=reader.integer("BRIDGE_MAX_PROMPT_CHARS", 32_000),
            max_messages=reader.integer("BRIDGE_MAX_MESSAGES", 256),
            worker_concurrency=reader.integer("BRIDGE_WORKER_CONCURRENCY", 64),
            reclaim_idle_ms=reader.integer("BRIDGE_RECLAIM_IDLE_MS", 15_000),
            max_deliveries=reader.integer("BRIDGE_MAX_DELIVERIES", 3),
            session_token_limit=reader.integer("BRIDGE_SESSION_TOKEN_LIMIT", 0),
            redis_watch_s=reader.number("BRIDGE_REDIS_WATCH_S", 1.0),
            provider=provider,
            openai_base_url=(openai_base_url or "https://api.openai.com/v1").rstrip("/"),
            openai_api_key=openai_api_key,
            provider_connect_timeout_s=reader.number("BRIDGE_PROVIDER_CONNECT_TIMEOUT_S", 10.0),
            provider_read_timeout_s=reader.number("BRIDGE_PROVIDER_READ_TIMEOUT_S", 60.0),
            provider_retries=reader.integer("BRIDGE_PROVIDER_RETRIES", 2),
            provider_retry_backoff_s=reader.number("BRIDGE_PROVIDER_RETRY_BACKOFF_S", 0.5),
            models=parse_models(env["BRIDGE_MODELS"])
            if env.get("BRIDGE_MODELS")
            else default_routes(env),
            endpoints=endpoints_from(env),
            mock_tokens=reader.integer("BRIDGE_MOCK_TOKENS", 24),
            mock_delay_ms=reader.number("BRIDGE_MOCK_DELAY_MS", 20.0),
            stream_secret=env.get("BRIDGE_STREAM_SECRET") or None,
            stream_token_ttl_s=reader.integer("BRIDGE_STREAM_TOKEN_TTL_S", 86_400),
            api_keys=parse_api_keys(env.get("BRIDGE_API_KEYS") or ""),
            cors_origins=reader.items("BRIDGE_CORS_ORIGINS"),
            rate_key_rpm=reader.integer("BRIDGE_RATE_KEY_RPM", 0),
            rate_key_tpm=reader.integer("BRIDGE_RATE_KEY_TPM", 0),
            rate_session_rpm=reader.integer("BRIDGE_RATE_SESSION_RPM", 120),
            rate_session_tpm=reader.integer("BRIDGE_RATE_SESSION_TPM", 0),
            max_generations_per_session=reader.integer("BRIDGE_MAX_GENERATIONS_PER_SESSION", 8),
            max_sse_per_session=reader.integer("BRIDGE_MAX_SSE_PER_SESSION", 64),
            max_sse_per_address=reader.integer("BRIDGE_MAX_SSE_PER_ADDRESS", 1000),
            max_header_bytes=reader.integer("BRIDGE_MAX_HEADER_BYTES", 16 * 1024),
            ws_max_message_bytes=reader.integer("BRIDGE_WS_MAX_MESSAGE_BYTES", 64 * 1024),
            ws_messages_per_s=reader.number("BRIDGE_WS_MESSAGES_PER_S", 20.0),
            ws_message_burst=reader.integer("BRIDGE_WS_MESSAGE_BURST", 40),
            log_format=reader.choice("BRIDGE_LOG_FORMAT", "auto", ("auto", "json", "console")),
            log_level=reader.choice(
                "BRIDGE_LOG_LEVEL", "info", ("debug", "info", "warning", "error")
            ),
            log_prompts=reader.flag("BRIDGE_LOG_PROMPTS", False),
            metrics_port=reader.port("BRIDGE_METRICS_PORT"),
            shutdown_timeout_s=reader.number("BRIDGE_SHUTDOWN_TIMEOUT_S", 25.0),
            shutdown_delay_s=reader.number("BRIDGE_SHUTDOWN_DELAY_S", 2.0),
            job_model=reader.text("BRIDGE_JOB_MODEL", "mock"),
            job_max_attempts=max(1, reader.integer("BRIDGE_JOB_MAX_ATTEMPTS", 3)),
            job_result_ttl_s=reader.integer("BRIDGE_JOB_RESULT_TTL_S", 3600),
            job_max_batch=reader.integer("BRIDGE_JOB_MAX_BATCH", 100),
            seed_streams=reader.flag("BRIDGE_SEED_STREAMS", True),
            summary_stream=reader.text("BRIDGE_SUMMARY_STREAM", "summary_requests"),
            question_stream=reader.text("BRIDGE_QUESTION_STREAM", "question_requests"),
            results_stream=reader.text("BRIDGE_RESULTS_STREAM", "llm_results"),
            seed_model=reader.text("BRIDGE_SEED_MODEL", "chatgpt"),
            batch_size=max(1, reader.integer("BRIDGE_BATCH_SIZE", 4)),
            batch_window_ms=reader.number("BRIDGE_BATCH_WINDOW_MS", 200.0),
            batch_concurrency=max(1, reader.integer("BRIDGE_BATCH_CONCURRENCY", 1)),
            batch_command=tuple(shlex.split(env.get("BRIDGE_BATCH_COMMAND") or "")),
        )
        if settings.stream_maxlen < 100:
            raise ConfigError("BRIDGE_STREAM_MAXLEN must be at least 100")
        if settings.stream_ttl_s < 1:
            raise ConfigError("BRIDGE_STREAM_TTL_S must be at least 1")
        if settings.reclaim_idle_ms < 100:
            raise ConfigError("BRIDGE_RECLAIM_IDLE_MS must be at least 100")
        if settings.max_deliveries < 1:
            raise ConfigError("BRIDGE_MAX_DELIVERIES must be at least 1")
        if settings.redis_watch_s <= 0:
            raise ConfigError("BRIDGE_REDIS_WATCH_S must be positive")
        return settings

    @property
    def known_models(self) -> tuple[str, ...]:
        """Public model names, in configuration order."""
        return tuple(route.alias for route in self.models)


def parse_models(spec: str) -> tuple[ModelRoute, ...]:
    """Parse `alias=upstream` or `alias=provider:upstream`, comma-separated.

    The provider prefix is split at the first colon only, so upstream names such as
    `llama3:8b` keep theirs when a provider is named (`local=openai:llama3:8b`).
    """
    routes: list[ModelRoute] = []
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        alias, sep, target = item.partition("=")
        alias, target = alias.strip(), target.strip()
        if not sep or not alias or not target:
            raise ConfigError(f"BRIDGE_MODELS entry {item!r} is not alias=[provider:]model")
        if not _ALIAS_RE.fullmatch(alias) or alias in (".", ".."):
            raise ConfigError(
                f"BRIDGE_MODELS alias {alias!r} is not a valid model id ([A-Za-z0-9_.-]{{1,128}})"
            )
        provider: str | None = None
        head, colon, rest = target.partition(":")
        if colon and (head == "mock" or head in PROVIDERS):
            provider, target = head, rest.strip()
            if not target:
                raise ConfigError(f"BRIDGE_MODELS entry {item!r} names no model after {head}:")
        if alias in seen:
            raise ConfigError(f"BRIDGE_MODELS names {alias!r} twice")
        seen.add(alias)
        routes.append(ModelRoute(alias=alias, provider=provider, upstream=target))
    if not routes:
        raise ConfigError("BRIDGE_MODELS names no model")
    return tuple(routes)


def default_routes(env: Mapping[str, str]) -> tuple[ModelRoute, ...]:
    """DEFAULT_MODELS, with each seed-000 alias sent to its own provider when that provider's
    API key is in the environment (`claude` to Anthropic with ANTHROPIC_API_KEY, ...)."""
    routes = []
    for route in parse_models(DEFAULT_MODELS):
        home = SEED_ALIASES.get(route.alias)
        if home is not None and env.get(f"{home[0].upper()}_API_KEY"):
            route = ModelRoute(alias=route.alias, provider=home[0], upstream=home[1])
        routes.append(route)
    return tuple(routes)


class _Reader:
    """Typed reads of environment variables with errors that name the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def text(self, name: str, default: str) -> str:
        return self._env.get(name) or default

    def integer(self, name: str, default: int) -> int:
        raw = self._env.get(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if value < 0:
            raise ConfigError(f"{name}={raw!r} must not be negative")
        return value

    def number(self, name: str, default: float) -> float:
        raw = self._env.get(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if not value >= 0:  # also rejects NaN
            raise ConfigError(f"{name}={raw!r} must not be negative")
        return value

    def items(self, name: str) -> tuple[str, ...]:
        return tuple(filter(None, (part.strip() for part in self._env.get(name, "").split(","))))

    def flag(self, name: str, default: bool) -> bool:
        raw = (self._env.get(name) or "").strip().lower()
        if not raw:
            return default
        if raw in ("1", "true", "yes", "on"):
            return True
        if raw in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")

    def port(self, name: str) -> int | None:
        raw = self._env.get(name)
        if not raw:
            return None
        value = self.integer(name, 0)
        if not 1 <= value <= 65535:
            raise ConfigError(f"{name}={raw!r} is not a TCP port (1-65535)")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = (self._env.get(name) or default).lower()
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")
        return value
