"""Generation requests: what `chat/start` enqueues and a worker executes."""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from bridge.errors import BadRequest, MalformedEntry
from bridge.providers.base import Message
from bridge.settings import Settings
from bridge.streams.codec import now_ms
from bridge.streams.keys import Keys, check_id


class Fallback(msgspec.Struct, frozen=True):
    """Another model to try when the one before it fails without writing a token."""

    model_id: str
    messages: tuple[Message, ...]
    params: dict[str, Any] = {}


class GenerationJob(msgspec.Struct, frozen=True):
    """One generation request, as stored in the request stream.

    `mode` names how a worker runs it (see `bridge.modes`): plain `chat` by default, or a
    mode of the seed systems (structured output, micro-batching, request-stream replies);
    `meta` holds what that mode needs.
    """

    request_id: str
    session_id: str
    model_id: str
    messages: tuple[Message, ...]
    params: dict[str, Any] = {}
    created_ms: float = 0.0
    tenant: str = ""  # whom limits and usage are charged to (bridge.auth.principal)
    mode: str = "chat"
    meta: dict[str, str] = {}
    fallbacks: tuple[Fallback, ...] = ()


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(GenerationJob).decode


def encode_job(job: GenerationJob) -> bytes:
    return _encode(job)


def decode_job(fields: dict[bytes, bytes]) -> GenerationJob:
    """Decode a request-stream entry; raise MalformedEntry when it is not a valid job.

    The ids become key parts, so they are checked like the API checks them.
    """
    try:
        job = _decode(fields[b"job"])
        check_id("requestId", job.request_id)
        check_id("sessionId", job.session_id)
        check_id("modelId", job.model_id)
    except (KeyError, msgspec.DecodeError, msgspec.ValidationError, BadRequest) as exc:
        raise MalformedEntry(f"undecodable generation request: {exc!r}") from None
    return job


ENQUEUE_SCRIPT = """
-- KEYS: generation hash, session index, request stream
-- ARGV: request id, session, model, created, ttl, job
-- Returns the request-stream entry id, or false if this request was already queued.
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[1], 'epoch', 0, 'status', 'queued', 'seq', 0,
           'session', ARGV[2], 'model', ARGV[3], 'created', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'm', ARGV[3], 'r', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return redis.call('XADD', KEYS[3], '*', 'job', ARGV[6])
"""


async def enqueue(redis: Redis, keys: Keys, settings: Settings, job: GenerationJob) -> str | None:
    """Record a generation and queue it for the workers, atomically and at most once.

    The session index entry is what lets every process's fan-out reader (and every new
    connection) learn that this session now has a stream for `job.model_id`. Queuing is
    idempotent by request id, so a call retried after a lost reply cannot queue it twice
    (nor reset the state of a generation a worker already started).
    Returns the request-stream entry id, or None if the request was already queued.
    """
    ttl = int(settings.generation_deadline_s) + settings.stream_ttl_s
    script = redis.register_script(ENQUEUE_SCRIPT)
    result: bytes | None = await script(
        keys=[keys.generation(job.request_id), keys.session_index(job.session_id), keys.requests],
        args=[
            job.request_id,
            job.session_id,
            job.model_id,
            repr(job.created_ms or now_ms()),
            ttl,
            encode_job(job),
        ],
    )
    return result.decode() if result else None
