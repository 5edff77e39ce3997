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

# A catch-up holds a page several times over (the reply, the events, their frames) while a
# slow client takes it: pages are bounded in bytes as well as entries, so a backlog of large
# entries costs a reconnecting client a few hundred KiB, never megabytes.
PAGE_BYTES = 256 * 1024
FIRST_PAGE = 64  # entries in the first page, read before any entry's size is known


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
    page_bytes: int = PAGE_BYTES,
    known_models: Callable[[str], set[str] | None] | None = None,
    stats: HistoryStats | None = None,
) -> AsyncIterator[list[Envelope] | Gap]:
    """Yield every retained entry after `cursor`, model by model, announcing gaps first.

    `known_models(session)` may answer from the fan-out reader, which read the session's
    index when it began tailing it and learns of every later stream from its announcement: a
    stream it has not seen yet is delivered live from its first entry, so the catch-up need
    not read the index again (one round trip less per connection, a new session's included).
    Entries that do not decode are skipped with a log line and counted in `stats`.
    A page holds at most `page` entries, and about `page_bytes` once entries were seen.
    """
    stats = stats or HistoryStats()
    known = known_models(session) if known_models is not None else None
    if known is None:
        known = await session_models(redis, keys, session)
    models = sorted(known | set(cursor))
    if not models:
        return
    # One round trip for what each stream retains and its first page after the cursor.
    first = min(page, FIRST_PAGE)
    streams = [keys.stream(session, model) for model in models]
    async with redis.pipeline(transaction=False) as pipe:
        for model, key in zip(models, streams, strict=True):
            pipe.xinfo_stream(key)
            pipe.xrange(key, min=_start(cursor.get(model)), max="+", count=first)
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
        pages = _Pages(first, page, page_bytes)
        async for batch in _pages(redis, key, model, after, pages, stats, first_page):
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


class _Pages:
    """How many entries the next page asks for: as many as fit `page_bytes` at the size of
    the last page's entries, between 1 and `most`."""

    def __init__(self, first: int, most: int, page_bytes: int) -> None:
        self.count = first
        self._most = most
        self._page_bytes = page_bytes

    def read(self, entries: list[Any]) -> bool:
        """Size the next page after `entries` (read with `count`); False if it was the last."""
        if len(entries) < self.count:
            return False
        size = sum(
            len(name) + len(value) for _, fields in entries for name, value in fields.items()
        )
        self.count = max(1, min(self._most, self._page_bytes * len(entries) // max(1, size)))
        return True


async def _pages(
    redis: Redis,
    key: str,
    model: str,
    after: EntryId | None,
    pages: _Pages,
    stats: HistoryStats,
    entries: Any = None,
) -> AsyncIterator[list[Envelope]]:
    """The stream's entries after `after`, a page at a time; `entries`: the first, if read."""
    start = _start(after)
    while True:
        if entries is None:
            entries = await redis.xrange(key, min=start, max="+", count=pages.count)
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
        if not pages.read(entries):
            return
        start = "(" + entries[-1][0].decode()
        entries = None
