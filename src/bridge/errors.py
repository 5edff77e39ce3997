"""The exception tree of bridge, and the reasons a connection is closed.

    BridgeError
    ├── ConfigError            settings that cannot work (raised at start-up)
    ├── RedisUnavailable       Redis could not be reached or chosen
    ├── BadRequest             client input rejected before anything touches Redis
    │   └── UnknownModel       the model id is not configured (names the known ones)
    ├── AccessDenied           a stream token or API key is missing, expired, tampered or wrong
    ├── RateLimited            a rate limit, quota or connection limit is reached (429)
    ├── MalformedEntry         a stream entry that does not decode (skipped, never fatal)
    ├── Fenced                 this worker no longer owns the generation it tried to append to
    ├── GenerationStopped      a processor or a limit ended the generation (an `error` event)
    └── ProviderError          an upstream LLM call failed; `code` is what the client sees
        ├── ProviderTimeout
        └── ProviderUnavailable

Third-party errors (httpx, redis) are mapped to these at the boundary where they occur.
"""

from __future__ import annotations

import enum
import math


class BridgeError(Exception):
    """Base of every error bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration cannot work; the message names the variable."""


class RedisUnavailable(BridgeError):
    """No usable Redis: the configured one does not answer, or none could be started."""


class BadRequest(BridgeError):
    """Client input that is rejected with a 4xx before any Redis write."""

    status_code = 400

    def __init__(self, detail: str, *, status_code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code


class UnknownModel(BadRequest):
    """The requested model is not configured."""

    def __init__(self, model: str, known: tuple[str, ...]) -> None:
        super().__init__(f"unknown model {model!r}; known models: {', '.join(known)}")
        self.model = model
        self.known = known


class AccessDenied(BridgeError):
    """A request without valid credentials: 401 missing (or unknown API key), 403 otherwise."""

    def __init__(self, detail: str, *, status_code: int = 403) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status_code


class RateLimited(BridgeError):
    """A limit is reached: `limit` names it, `retry_after_s` says when to try again."""

    def __init__(self, limit: str, retry_after_s: float, detail: str | None = None) -> None:
        self.limit = limit
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        self.detail = detail or f"{limit} reached; retry in {self.retry_after_s} s"
        super().__init__(self.detail)


class MalformedEntry(BridgeError):
    """A Redis stream entry whose fields do not form a known event."""


class Fenced(BridgeError):
    """The generation was taken over by another worker; this one must stop writing."""


class GenerationStopped(BridgeError):
    """A processor or the session token limit ended a generation; `code` is what clients see."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProviderError(BridgeError):
    """An LLM provider call failed. `code` is stable and shown to clients in `error` events."""

    def __init__(
        self, code: str, message: str, *, retryable: bool = False, status: int | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.status = status


class ProviderTimeout(ProviderError):
    """The provider did not connect or answer in time."""

    def __init__(self, message: str) -> None:
        super().__init__("provider_timeout", message, retryable=True)


class ProviderUnavailable(ProviderError):
    """The provider could not be reached at all."""

    def __init__(self, message: str) -> None:
        super().__init__("provider_unavailable", message, retryable=True)


class CloseReason(enum.StrEnum):
    """Why the server ended a client connection; sent to the client in a final event."""

    SLOW_CONSUMER = "slow_consumer"  # its send queue overflowed; resume from Redis
    SHUTDOWN = "shutdown"  # this process is stopping; reconnect elsewhere
    REDIS_UNAVAILABLE = "redis_unavailable"  # Redis went away; reconnect to retry
    CLIENT_GONE = "client_gone"  # the client disconnected (never sent: it is gone)
    STALLED = "stalled"  # no write completed for too long: the client stopped reading
