"""The catch-up read: every retained entry after the cursor, once, in order, gaps announced."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.streams.codec import EntryId, EventType, StreamEvent, parse_entry_id, to_fields
from bridge.streams.history import FIRST_PAGE, Gap, replay
from bridge.streams.keys import Keys

pytestmark = pytest.mark.integration


async def write(redis: aioredis.Redis, key: str, count: int, *, pad: int = 0) -> list[EntryId]:
    ids = []
    for seq in range(1, count + 1):
        event = StreamEvent(EventType.TOKEN, "r1", seq, 1.0, content=f"t{seq}" + "x" * pad)
        fields = to_fields(event)
        entry: Any = await redis.xadd(key, dict(zip(fields[::2], fields[1::2], strict=True)))
        ids.append(parse_entry_id(entry))
    return ids


async def read(redis: aioredis.Redis, keys: Keys, cursor: dict[str, EntryId], page: int) -> Any:
    items = [
        item async for item in replay(redis, keys, "s", cursor, page=page, known_models=_models)
    ]
    gaps = [item for item in items if isinstance(item, Gap)]
    seqs = [
        (env.model, env.event.seq) for item in items if not isinstance(item, Gap) for env in item
    ]
    return gaps, seqs


def _models(session: str) -> set[str]:
    return {"a", "b"}


@pytest.mark.parametrize("page", [1, 3, 7, 500])
async def test_every_entry_after_the_cursor_arrives_once_in_order_across_pages(
    redis: aioredis.Redis, key_prefix: str, page: int
) -> None:
    """Pages of any size (the first read with the stream's retention, the rest after it)."""
    keys = Keys(key_prefix)
    a_ids = await write(redis, keys.stream("s", "a"), 7)
    await write(redis, keys.stream("s", "b"), 3)
    gaps, seqs = await read(redis, keys, {"a": a_ids[1]}, page)
    assert gaps == []
    assert seqs == [("a", n) for n in range(3, 8)] + [("b", n) for n in (1, 2, 3)]


async def test_pages_hold_about_page_bytes_whatever_the_size_of_the_entries(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A slow client holds a page several times over: large entries come in pages of about
    `page_bytes`, small ones in pages of `page` entries, after a first page of FIRST_PAGE
    entries (read before any size is known). Every entry once, in order, either way."""
    keys = Keys(key_prefix)
    await write(redis, keys.stream("s", "a"), 300, pad=4096)
    await write(redis, keys.stream("s", "b"), 1200)
    pages = [
        item
        async for item in replay(
            redis, keys, "s", {}, page=500, page_bytes=64 * 1024, known_models=_models
        )
    ]
    assert not any(isinstance(item, Gap) for item in pages)
    large = [page for page in pages if page[0].model == "a"]
    small = [len(page) for page in pages if page[0].model == "b"]
    assert len(large[0]) == FIRST_PAGE
    assert all(sum(len(env.event.content) for env in page) <= 64 * 1024 for page in large[1:])
    assert len(large[1]) >= 10  # as many as fit, not one at a time
    assert small == [FIRST_PAGE, 500, 500, 1200 - FIRST_PAGE - 1000]
    assert [env.event.seq for page in large for env in page] == list(range(1, 301))


async def test_a_cursor_from_elsewhere_resets_and_a_missing_stream_is_expired(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A cursor ahead of all the stream ever held replays it whole, after a `reset` gap; a
    cursor on a stream that is gone gets an `expired` gap."""
    keys = Keys(key_prefix)
    await write(redis, keys.stream("s", "a"), 4)
    ahead = (2**62, 0)
    gaps, seqs = await read(redis, keys, {"a": ahead, "b": (1, 0)}, 3)
    assert gaps == [Gap("a", "reset", ahead), Gap("b", "expired", (1, 0))]
    assert seqs == [("a", n) for n in range(1, 5)]


async def test_trimmed_entries_after_the_cursor_are_announced(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Entries trimmed after the cursor: a `trimmed` gap, then what is left."""
    keys = Keys(key_prefix)
    ids = await write(redis, keys.stream("s", "a"), 6)
    await redis.xtrim(keys.stream("s", "a"), maxlen=2, approximate=False)
    gaps, seqs = await read(redis, keys, {"a": ids[0]}, 500)
    assert gaps == [Gap("a", "trimmed", ids[0])]
    assert seqs == [("a", 5), ("a", 6)]
