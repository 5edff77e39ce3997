"""Generation modes: how a worker runs a `GenerationJob`, by its `mode` field.

Every mode writes through the same fenced `GenerationWriter` and is run by the same worker
loop, so the seed systems inherit acknowledgement, reclaim, fencing, dead-lettering and
SSE resume from the core. A mode has two steps:

- `run(job, writer, run_provider)` produces the generation's events and returns the terminal
  one (`run_provider` is the worker's own provider call, with its deadline and error mapping);
- `settled(job)` runs after the terminal event is stored, also when a redelivered request
  finds it already stored, so its effects (storing a job result, publishing a reply) must
  be idempotent.

`Modes` dispatches by name and makes every run cancellable (see `streams.cancel`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgspec
import structlog

from bridge.streams.cancel import CancelWatch
from bridge.streams.codec import EventType
from bridge.streams.jobs import GenerationJob
from bridge.streams.producer import GenerationWriter

log = structlog.get_logger("bridge.modes")

Outcome = tuple[EventType, dict[str, Any]]
RunProvider = Callable[[GenerationJob, GenerationWriter], Awaitable[Outcome]]


class Mode(Protocol):
    """One way of running a generation."""

    async def run(
        self, job: GenerationJob, writer: GenerationWriter, run_provider: RunProvider
    ) -> Outcome: ...

    async def settled(self, job: GenerationJob) -> None: ...


class ChatMode:
    """Plain chat: the job's model, then each fallback while nothing has been written."""

    async def run(
        self, job: GenerationJob, writer: GenerationWriter, run_provider: RunProvider
    ) -> Outcome:
        outcome = await run_provider(job, writer)
        for fallback in job.fallbacks:
            if outcome[0] is not EventType.ERROR or writer.tokens:
                break
            log.info("generation_fallback", failed=job.model_id, next=fallback.model_id)
            job = msgspec.structs.replace(
                job,
                model_id=fallback.model_id,
                messages=fallback.messages,
                params=fallback.params,
            )
            outcome = await run_provider(job, writer)
        return outcome

    async def settled(self, job: GenerationJob) -> None:
        """Nothing to do: the stream is the whole result."""


def cancelled_outcome(tokens: int) -> Outcome:
    """The terminal event of a generation stopped by a cancel request after `tokens` tokens."""
    usage = {"promptTokens": 0, "completionTokens": tokens, "totalTokens": tokens}
    return EventType.CANCELLED, {"reason": "cancel requested", "usage": usage}


class Modes:
    """The modes a worker knows, by name; `chat` is always there."""

    def __init__(self, cancels: CancelWatch | None = None) -> None:
        self.cancels = cancels
        self._modes: dict[str, Mode] = {"chat": ChatMode()}

    def add(self, name: str, mode: Mode) -> None:
        """Register `mode` under `name` (the value of `GenerationJob.mode`)."""
        self._modes[name] = mode

    async def run(
        self, job: GenerationJob, writer: GenerationWriter, run_provider: RunProvider
    ) -> Outcome:
        """Run `job` in its mode; a cancel request ends it with a `cancelled` event."""
        mode = self._modes.get(job.mode)
        if mode is None:
            known = ", ".join(sorted(self._modes))
            message = f"this worker has no mode {job.mode!r}; it knows {known}"
            return EventType.ERROR, {"code": "unknown_mode", "message": message}
        if self.cancels is None:
            return await mode.run(job, writer, run_provider)
        if await self.cancels.requested(job.request_id):
            return cancelled_outcome(writer.tokens)
        outcome = await self.cancels.run(job.request_id, mode.run(job, writer, run_provider))
        return cancelled_outcome(writer.tokens) if outcome is None else outcome

    async def settled(self, job: GenerationJob) -> None:
        """Run the mode's after-step (unknown modes have none)."""
        mode = self._modes.get(job.mode)
        if mode is not None:
            await mode.settled(job)
