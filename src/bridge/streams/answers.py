"""Reading one generation's events back from its token stream (for modes that post-process).

Job-API jobs, WebSocket jobs and seed-000 requests each have a session of their own, so
their token stream holds one generation and is short.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from bridge.errors import MalformedEntry
from bridge.streams.codec import EventType, StreamEvent, from_fields
from bridge.streams.jobs import GenerationJob
from bridge.streams.keys import Keys

#: The outcome names the seed APIs report, by terminal event type (or generation status).
FINAL_STATUS: dict[str, str] = {
    EventType.COMPLETE: "completed",
    EventType.ERROR: "failed",
    EventType.CANCELLED: "cancelled",
}


async def generation_events(redis: Redis, keys: Keys, job: GenerationJob) -> list[StreamEvent]:
    """The retained events of `job`'s generation, in order (malformed entries skipped)."""
    entries: Any = await redis.xrange(keys.stream(job.session_id, job.model_id))
    events = []
    for _, fields in entries:
        try:
            event = from_fields(fields)
        except MalformedEntry:
            continue
        if event.request_id == job.request_id:
            events.append(event)
    return events


def answer_text(events: list[StreamEvent], after_seq: int = 0) -> str:
    """The text of the tokens after `after_seq` and after the last seam (a restart or retry)."""
    start = 0
    for index, event in enumerate(events):
        if event.type is EventType.SEAM:
            start = index + 1
    return "".join(
        e.content for e in events[start:] if e.type is EventType.TOKEN and e.seq > after_seq
    )


def terminal_event(events: list[StreamEvent]) -> StreamEvent | None:
    """The generation's terminal event, or None if it has not ended (or expired)."""
    return events[-1] if events and events[-1].terminal else None
