"""Reading a session's retained history: the catch-up a connection does before it goes live."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import structlog
from redis.asyncio import Redis

from bridge import metrics
from bridge.connections.subscriber import Envelope
from bridge.errors import MalformedEntry
from bridge.streams.codec import Cursor, EntryId, format_entry_id, from_fields, parse_entry_id
from bridge.streams.keys import Keys, indexed_model

log = structlog.get_logger("bridge.history")


class Gap(msgspec.Struct, frozen=True):
    """Part of a model stream the client asked for is not retained.

    reason: `expired` (the whole stream is gone), `trimmed` (entries after the cursor, or
    at the start for a client without one, were trimmed by MAXLEN), `reset` (the cursor is
    ahead of everything the stream ever held, so it cannot be from this stream; replay
    restarts from the first retained entry).
    """

    model: str
    reason: str
    after: EntryId | None


class HistoryStats:
    """Counters of this process's catch-up reads (plain attributes, for metrics)."""

    def __init__(self) -> None:
        self.malformed = 0


async def session_models(redis: Redis, keys: Keys, session: str) -> set[str]:
    """Models that have had a generation in `session` (from its index stream)."""
    entries: Any = await redis.xrange(keys.session_index(session))
    return {model for _, fields in entries if (model := indexed_model(fields))}


async def replay(
    redis: Redis,
    keys: Keys,
    session: str,
    cursor: Cursor,
    *,
    page: int = 500,
    known_models: Callable[[str], set[str] | None] | None = None,
    stats: HistoryStats | None = None,
) -> AsyncIterator[list[Envelope] | Gap]:
    """Yield every retained entry after `cursor`, model by model, announcing gaps first.

    `known_models(session)` may answer from the fan-out reader, which read the session's
    index when it began tailing it and learns of every later stream from its announcement: a
    stream it has not seen yet is delivered live from its first entry, so the catch-up need
    not read the index again (one round trip less per connection, a new session's included).
    Entries that do not decode are skipped with a log line and counted in `stats`.
    """
    stats = stats or HistoryStats()
    known = known_models(session) if known_models is not None else None
    if known is None:
        known = await session_models(redis, keys, session)
    models = sorted(known | set(cursor))
    if not models:
        return
    # One round trip for what each stream retains and its first page after the cursor.
    streams = [keys.stream(session, model) for model in models]
    async with redis.pipeline(transaction=False) as pipe:
        for model, key in zip(models, streams, strict=True):
            pipe.xinfo_stream(key)
            pipe.xrange(key, min=_start(cursor.get(model)), max="+", count=page)
        replies = await pipe.execute(raise_on_error=False)
    for index, (model, key) in enumerate(zip(models, streams, strict=True)):
        info, first_page = replies[2 * index], replies[2 * index + 1]
        after = cursor.get(model)
        if isinstance(info, Exception):  # no such key: expired, or not written yet
            if after is not None:
                yield Gap(model, "expired", after)
            continue
        gap = _gap(model, info, after)
        if gap is not None:
            yield gap
            if gap.reason == "reset":
                after, first_page = None, None  # the page was read after a foreign cursor
        if isinstance(first_page, Exception):
            raise first_page
        async for batch in _pages(redis, key, model, after, page, stats, first_page):
            yield batch


def _gap(model: str, info: dict[str, Any], after: EntryId | None) -> Gap | None:
    """Compare a cursor with what the stream retains (Redis >= 7.0 XINFO fields).

    Trimming only removes the oldest entries. So a cursor whose own entry is gone (it is
    older than the first retained one) may have missed entries: that is reported, even in
    the rare case where only the cursor's entry itself was trimmed. Never silent.
    """
    last_generated = parse_entry_id(info["last-generated-id"])
    if after is not None and after > last_generated:
        return Gap(model, "reset", after)
    if after is None:
        ever_trimmed = int(info["entries-added"]) > int(info["length"])
        return Gap(model, "trimmed", None) if ever_trimmed else None
    first = info.get("recorded-first-entry-id") or (info.get("first-entry") or (b"0-0",))[0]
    if int(info["length"]) == 0 or after < parse_entry_id(first):
        return Gap(model, "trimmed", after)
    return None


def _start(after: EntryId | None) -> str:
    return f"({format_entry_id(after)}" if after is not None else "-"


async def _pages(
    redis: Redis,
    key: str,
    model: str,
    after: EntryId | None,
    page: int,
    stats: HistoryStats,
    entries: Any = None,
) -> AsyncIterator[list[Envelope]]:
    """The stream's entries after `after`, a page at a time; `entries`: the first, if read."""
    start = _start(after)
    while True:
        if entries is None:
            entries = await redis.xrange(key, min=start, max="+", count=page)
        if not entries:
            return
        batch: list[Envelope] = []
        for raw_id, fields in entries:
            try:
                batch.append(Envelope(model, parse_entry_id(raw_id), from_fields(fields)))
            except MalformedEntry as exc:
                stats.malformed += 1
                metrics.MALFORMED_ENTRIES.labels("history").inc()
                log.warning("malformed_entry_skipped", model=model, entry=raw_id, error=str(exc))
        if batch:
            yield batch
        if len(entries) < page:
            return
        start = "(" + entries[-1][0].decode()
        entries = None
