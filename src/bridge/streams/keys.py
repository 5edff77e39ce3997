"""Every Redis key and name bridge uses, in one place.

Ids that become key parts are validated by `check_id` before any key is built from them.
"""

from __future__ import annotations

import re

from bridge.errors import BadRequest

ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
_ID_RE = re.compile(ID_PATTERN)

WORKER_GROUP = "workers"


def is_safe_id(value: str) -> bool:
    """True if `value` may become a key part (also applied to ids read back from Redis)."""
    return _ID_RE.fullmatch(value) is not None and value not in (".", "..")


def indexed_model(fields: dict[bytes, bytes]) -> str | None:
    """The model a session-index entry names, or None if it is not a safe id (never trusted)."""
    model = fields.get(b"m", b"").decode("utf-8", "replace")
    return model if is_safe_id(model) else None


def check_id(kind: str, value: str) -> str:
    """Return `value` if it is a safe key part, else raise BadRequest naming `kind`."""
    if not is_safe_id(value):
        raise BadRequest(f"{kind} must match [A-Za-z0-9_.-]{{1,128}}")
    return value


class Keys:
    """Key names under one prefix (default `llm:`)."""

    def __init__(self, prefix: str = "llm:") -> None:
        self.prefix = prefix
        self._stream_prefix = f"{prefix}stream:"
        self.requests = f"{prefix}requests"
        self.dead_letters = f"{prefix}requests:dead"
        self.secret = f"{prefix}secret"
        self.cancel_channel = f"{prefix}cancel"
        # worker heartbeats: a sorted set of worker names scored by when their beat expires
        self.workers = f"{prefix}workers"
        self.worker_group = WORKER_GROUP

    def stream(self, session: str, model: str) -> str:
        """Token stream of one session and model."""
        return f"{self._stream_prefix}{session}:{model}"

    def parse_stream(self, key: str) -> tuple[str, str]:
        """Split a token-stream key into (session, model)."""
        session, _, model = key[len(self._stream_prefix) :].rpartition(":")
        return session, model

    def live_channel(self, session: str) -> str:
        """Pub/sub channel on which every append to the session's streams is published."""
        return f"{self.prefix}live:{session}"

    def session_index(self, session: str) -> str:
        """Stream of the session's generation starts: which models it has, and when they began."""
        return f"{self.prefix}session:{session}"

    def generation(self, request_id: str) -> str:
        """Hash with the state of one generation: owner epoch, status, sequence, usage."""
        return f"{self.prefix}gen:{request_id}"

    def job(self, job_id: str) -> str:
        """Hash of a job-API job: its stage, and once settled its status and result."""
        return f"{self.prefix}job:{job_id}"

    def idempotency(self, key_digest: str) -> str:
        """The job ids an `Idempotency-Key` (by its SHA-256) was first used for."""
        return f"{self.prefix}idempotency:{key_digest}"

    def usage(self, session: str) -> str:
        """Hash of token counters for one session: a field per model, and `*` for the total."""
        return f"{self.prefix}usage:{session}"

    def tenant_usage(self, tenant: str) -> str:
        """Hash of counters for one tenant (API key owner): generations, completion tokens."""
        return f"{self.prefix}tenant:{tenant}"

    def rate(self, limit: str, subject: str) -> str:
        """Sliding-window counter hash of one rate limit for one subject (tenant or session)."""
        return f"{self.prefix}rate:{limit}:{subject}"

    def active_generations(self, session: str) -> str:
        """Sorted set of a session's unfinished generations (request ids, scored by start)."""
        return f"{self.prefix}active:{session}"
