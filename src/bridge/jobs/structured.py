"""The `structured` generation mode: ask, validate, re-ask with the error, store the result.

Each attempt streams into the job's token stream like any chat answer, so the job's SSE
progress shows it live. An attempt that fails validation is followed by a `seam` event
(`mode: retry`, with the attempt number and the reason): what came before it is discarded.
The stage (`calling_llm`, `validating`, `done`) is kept in the job's hash for status polls.
"""

from __future__ import annotations

from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis

from bridge.modes import Outcome, RunProvider
from bridge.providers.base import Message
from bridge.settings import Settings
from bridge.streams.answers import (
    FINAL_STATUS,
    answer_text,
    generation_events,
    terminal_event,
)
from bridge.streams.codec import EventType, StreamEvent
from bridge.streams.jobs import GenerationJob
from bridge.streams.keys import Keys
from bridge.streams.producer import GenerationWriter

from .schema import InvalidOutput, parse_output, retry_message

log = structlog.get_logger("bridge.jobs")

_json = msgspec.json.Encoder()


def outcome_fields(event: StreamEvent) -> dict[str, str]:
    """The job-hash fields a terminal event settles: status, and result or error."""
    data = event.data or {}
    fields = {"status": FINAL_STATUS[event.type]}
    if event.type is EventType.COMPLETE:
        fields["result"] = _json.encode(data.get("result")).decode()
        fields["stage"] = "done"
    elif event.type is EventType.ERROR:
        fields["error"] = str(data.get("message", "the job failed"))
        fields["error_code"] = str(data.get("code", "error"))
    if "attempts" in data:
        fields["attempts"] = str(data["attempts"])
    return fields


class StructuredMode:
    """Runs job-API jobs; `settled` copies the outcome into the job's hash for its TTL."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings

    async def run(
        self, job: GenerationJob, writer: GenerationWriter, run_provider: RunProvider
    ) -> Outcome:
        """Up to `job_max_attempts` attempts; the last validation error fails the job."""
        conversation = list(job.messages)
        usage = {"promptTokens": 0, "completionTokens": 0, "totalTokens": 0}
        limit = self._settings.job_max_attempts
        for attempt in range(1, limit + 1):
            await self._stage(job, "calling_llm", attempt)
            first_seq = writer.seq
            attempt_job = msgspec.structs.replace(job, messages=tuple(conversation))
            kind, data = await run_provider(attempt_job, writer)
            for name, count in (data.get("usage") or {}).items():
                usage[name] = usage.get(name, 0) + int(count)
            if kind is not EventType.COMPLETE:
                return kind, {**data, "usage": usage, "attempts": attempt}
            await writer.drain()
            text = await self._attempt_text(job, first_seq)
            await self._stage(job, "validating", attempt)
            try:
                output = parse_output(text)
            except InvalidOutput as exc:
                reason = str(exc)
                log.info("structured_output_invalid", attempt=attempt, reason=reason)
                if attempt == limit:
                    message = f"the output failed validation {attempt} times; last: {reason}"
                    error = {"code": "invalid_output", "message": message}
                    return EventType.ERROR, {**error, "usage": usage, "attempts": attempt}
                await writer.seam({"mode": "retry", "attempt": attempt + 1, "reason": reason})
                conversation += [Message("assistant", text), retry_message(reason)]
                continue
            await self._stage(job, "done", attempt)
            result = msgspec.to_builtins(output)
            return EventType.COMPLETE, {
                "finishReason": data.get("finishReason", "stop"),
                "usage": usage,
                "result": result,
                "attempts": attempt,
            }
        raise AssertionError("unreachable: the loop returns on its last attempt")

    async def settled(self, job: GenerationJob) -> None:
        """Store the final status (and result or reason) in the job's hash, kept for its TTL."""
        event = await self._terminal(job)
        if event is None:
            log.warning("job_terminal_missing", job_id=job.request_id)
            return
        fields: dict[Any, Any] = outcome_fields(event)
        key = self._keys.job(job.request_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=fields)
            pipe.expire(key, self._settings.job_result_ttl_s)
            await pipe.execute()

    async def _stage(self, job: GenerationJob, stage: str, attempt: int) -> None:
        await self._redis.hset(
            self._keys.job(job.request_id), mapping={"stage": stage, "attempts": attempt}
        )

    async def _attempt_text(self, job: GenerationJob, after_seq: int) -> str:
        return answer_text(await generation_events(self._redis, self._keys, job), after_seq)

    async def _terminal(self, job: GenerationJob) -> StreamEvent | None:
        return terminal_event(await generation_events(self._redis, self._keys, job))
