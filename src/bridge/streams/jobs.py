"""Generation requests: what `chat/start` enqueues and a worker executes."""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from bridge.errors import MalformedEntry
from bridge.providers.base import Message
from bridge.settings import Settings
from bridge.streams.codec import now_ms
from bridge.streams.keys import Keys


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
    """Decode a request-stream entry; raise MalformedEntry when it is not a job."""
    try:
        return _decode(fields[b"job"])
    except (KeyError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedEntry(f"undecodable generation request: {exc!r}") from None


async def enqueue(redis: Redis, keys: Keys, settings: Settings, job: GenerationJob) -> str:
    """Record a generation and queue it for the workers, in one transaction.

    The session index entry is what lets every process's fan-out reader (and every new
    connection) learn that this session now has a stream for `job.model_id`.
    Returns the request-stream entry id.
    """
    generation = keys.generation(job.request_id)
    index = keys.session_index(job.session_id)
    index_ttl = int(settings.generation_deadline_s) + settings.stream_ttl_s
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(
            generation,
            mapping={
                "epoch": 0,
                "status": "queued",
                "seq": 0,
                "session": job.session_id,
                "model": job.model_id,
                "created": repr(job.created_ms or now_ms()),
            },
        )
        pipe.expire(generation, index_ttl)
        pipe.xadd(index, {"m": job.model_id, "r": job.request_id}, maxlen=1000, approximate=True)
        pipe.expire(index, index_ttl)
        pipe.xadd(keys.requests, {"job": encode_job(job)})
        results = await pipe.execute()
    entry_id: bytes = results[-1]
    return entry_id.decode()
