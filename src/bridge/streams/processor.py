"""The processor chain: small callables the worker applies to each event before appending it.

Every processor has one signature::

    def processor(ctx: GenerationContext, event: StreamEvent) -> StreamEvent

It returns the event to append (the same one or a changed copy), or raises
`GenerationStopped` to end the generation with an `error` event carrying its code.

The chain runs in the worker that writes the event, so it runs once per event fleet-wide, not
once per connection or per API process (seed 002 ran it in each SSE consumer). A worker that
takes a generation over does not run it again over events already stored.

Processors run before the append and die with their worker, so they suit work that may be
lost with a crash: logging, live counters, analytics that can tolerate a lost event (hooks get
`(requestId, seq)` to deduplicate). Effects that must stay exact under redelivery, takeover and
retried appends are not processors: usage counting and the per-session token limit live in the
append script (`streams.producer`), atomic with the write they count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from bridge.streams.codec import EventType, StreamEvent

log = structlog.get_logger("bridge.processor")


@dataclass
class GenerationContext:
    """What processors know about the generation an event belongs to; they may update it."""

    session: str
    model: str
    request_id: str
    worker: str
    epoch: int
    kept_tokens: int = 0  # tokens of this answer written by earlier owners (continuation)
    tokens: int = 0  # tokens this worker emitted
    characters: int = 0


Processor = Callable[[GenerationContext, StreamEvent], StreamEvent]
Hook = Callable[[GenerationContext, StreamEvent], None]


def count_tokens(ctx: GenerationContext, event: StreamEvent) -> StreamEvent:
    """Keep the live token and character counts of this worker's part of the answer."""
    if event.type is EventType.TOKEN:
        ctx.tokens += 1
        ctx.characters += len(event.content)
    return event


def log_events(ctx: GenerationContext, event: StreamEvent) -> StreamEvent:
    """Log seams at info level; tokens and terminal events at debug level (the worker logs
    one `generation_finished` line per generation)."""
    if event.type is EventType.TOKEN:
        log.debug("token", request_id=ctx.request_id, seq=event.seq)
    else:
        (log.debug if event.terminal else log.info)(
            f"event_{event.type.value}",
            request_id=ctx.request_id,
            session_id=ctx.session,
            model=ctx.model,
            seq=event.seq,
            tokens=ctx.tokens,
            epoch=ctx.epoch,
        )
    return event


def analytics(hook: Hook) -> Processor:
    """A processor that hands every event to `hook`; a failing hook is logged, never fatal."""

    def call_hook(ctx: GenerationContext, event: StreamEvent) -> StreamEvent:
        try:
            hook(ctx, event)
        except Exception:
            log.exception("analytics_hook_failed", request_id=ctx.request_id, seq=event.seq)
        return event

    return call_hook


DEFAULT_PROCESSORS: tuple[Processor, ...] = (count_tokens, log_events)


class ProcessorChain:
    """Applies processors in order; callable like a single processor."""

    def __init__(self, processors: Iterable[Processor] = DEFAULT_PROCESSORS) -> None:
        self.processors = tuple(processors)

    def __call__(self, ctx: GenerationContext, event: StreamEvent) -> StreamEvent:
        for processor in self.processors:
            event = processor(ctx, event)
        return event
