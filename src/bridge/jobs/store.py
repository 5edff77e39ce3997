"""Job-API jobs in Redis: submission (with idempotency keys), status, result and cancel.

A job is a generation in the `structured` mode: its id (uuid4 hex, 122 random bits, the
capability to read it) is the generation's request id, and its session is `job-<id>`, so
its progress is an ordinary token stream. The job's hash keeps what outlives the stream:
the stage while it runs, then the final status with the result or the failure's reason,
for `job_result_ttl_s`.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import msgspec
from redis.asyncio import Redis

from bridge.errors import BadRequest
from bridge.jobs.schema import structured_messages
from bridge.jobs.structured import outcome_fields
from bridge.ratelimit import RateLimiter
from bridge.settings import Settings
from bridge.streams.answers import FINAL_STATUS, generation_events, terminal_event
from bridge.streams.cancel import request_cancel
from bridge.streams.codec import now_ms
from bridge.streams.jobs import GenerationJob, enqueue
from bridge.streams.keys import Keys

_RUNNING = {"queued": "queued", "running": "in_progress"}


class JobNotFound(BadRequest):
    """No job has that id (or its result's TTL has passed)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found", status_code=404)


class JobConflict(BadRequest):
    """The request conflicts with the job's state or with an earlier use of its key."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, status_code=409)


class JobStatus(msgspec.Struct, frozen=True, omit_defaults=True):
    """What `GET /llm/status/{job_id}` answers (OpenAI-style status names)."""

    job_id: str
    status: str
    stage: str | None  # always sent, null before the first stage (as in the seed)
    attempts: int | None = None
    error: str | None = None


def session_of(job_id: str) -> str:
    """The synthetic session that carries a job's token stream."""
    return f"job-{job_id}"


class JobStore:
    """Creates and reads jobs."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings

    async def submit(
        self,
        texts: list[str],
        *,
        model: str,
        params: dict[str, Any],
        idempotency_key: str | None,
        body: bytes,
        tenant: str = "",
        limits: RateLimiter | None = None,
    ) -> list[str]:
        """Queue one job per text and return their ids.

        With an `idempotency_key`, the first request's ids are returned again for the same
        body, and a different body under that key is a 409.
        """
        job_ids = [uuid.uuid4().hex for _ in texts]
        if idempotency_key is not None:
            earlier = await self._claim_key(idempotency_key, body, job_ids)
            if earlier is not None:
                return earlier
        for job_id, text in zip(job_ids, texts, strict=True):
            if limits is not None:  # the chat's rate limits, per job (a job is a generation)
                await limits.admit_generation(tenant, session_of(job_id), job_id)
            await self._create(job_id, text, model, params, tenant)
        return job_ids

    async def _claim_key(self, key: str, body: bytes, job_ids: list[str]) -> list[str] | None:
        """Bind `key` to this body and these ids, or return the ids it was bound to before."""
        key_digest = hashlib.sha256(key.encode()).hexdigest()
        body_digest = hashlib.sha256(body).hexdigest()
        value = body_digest + "|" + ",".join(job_ids)
        earlier: Any = await self._redis.set(
            self._keys.idempotency(key_digest),
            value,
            nx=True,
            get=True,
            ex=self._settings.job_result_ttl_s,
        )
        if earlier is None:
            return None
        text: str = earlier.decode()
        earlier_digest, _, earlier_ids = text.partition("|")
        if earlier_digest != body_digest:
            raise JobConflict("this Idempotency-Key was already used with a different body")
        return earlier_ids.split(",")

    async def _create(
        self, job_id: str, text: str, model: str, params: dict[str, Any], tenant: str
    ) -> None:
        created = now_ms()
        key = self._keys.job(job_id)
        ttl = int(self._settings.generation_deadline_s) + self._settings.job_result_ttl_s
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"model": model, "created": repr(created)})
            pipe.expire(key, ttl)
            await pipe.execute()
        job = GenerationJob(
            request_id=job_id,
            session_id=session_of(job_id),
            model_id=model,
            messages=structured_messages(text),
            params={**params, "response_format": {"type": "json_object"}},
            created_ms=created,
            mode="structured",
            tenant=tenant,
        )
        await enqueue(self._redis, self._keys, self._settings, job)

    async def status(self, job_id: str) -> JobStatus:
        """The job's status and stage; `JobNotFound` if there is no such job."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._keys.job(job_id))
            pipe.hget(self._keys.generation(job_id), "status")
            record, generation = await pipe.execute()
        if not record:
            raise JobNotFound(job_id)
        fields = {k.decode(): v.decode() for k, v in record.items()}
        state = generation.decode() if generation is not None else "queued"
        if "status" not in fields and state in FINAL_STATUS:
            # ended but not settled yet: the terminal event says what `settled` will store
            fields.update(await self._outcome(job_id, fields.get("model", "")))
        status = fields.get("status") or _RUNNING.get(state, "in_progress")
        attempts = fields.get("attempts")
        return JobStatus(
            job_id=job_id,
            status=status,
            stage=fields.get("stage"),
            attempts=int(attempts) if attempts else None,
            error=fields.get("error"),
        )

    async def _outcome(self, job_id: str, model: str) -> dict[str, str]:
        job = GenerationJob(job_id, session_of(job_id), model, ())
        event = terminal_event(await generation_events(self._redis, self._keys, job))
        return outcome_fields(event) if event is not None else {}

    async def result(self, job_id: str) -> Any:
        """The validated result; 404 until the job completed (the detail names the status)."""
        raw: Any = await self._redis.hget(self._keys.job(job_id), "result")
        if raw is not None:
            return msgspec.json.decode(raw)
        status = await self.status(job_id)
        if status.status == "completed":  # not settled yet
            model: Any = await self._redis.hget(self._keys.job(job_id), "model")
            outcome = await self._outcome(job_id, model.decode() if model else "")
            if "result" in outcome:
                return msgspec.json.decode(outcome["result"])
        reason = f" ({status.error})" if status.error else ""
        raise BadRequest(f"no result: status={status.status}{reason}", status_code=404)

    async def cancel(self, job_id: str) -> str:
        """Ask the job to stop; 409 if it already ended."""
        await self.status(job_id)  # 404 for unknown jobs
        outcome = await request_cancel(self._redis, self._keys, job_id)
        if outcome in FINAL_STATUS:
            raise JobConflict(f"the job already ended: {FINAL_STATUS[outcome]}")
        if outcome == "unknown":
            raise JobConflict("the job's generation has expired")
        return "cancelling"
