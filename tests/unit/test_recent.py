"""Recent: a session's recent entries answer a catch-up only when they hold all of it."""

from __future__ import annotations

import gc

from bridge.connections.recent import Recent
from bridge.connections.subscriber import Envelope
from bridge.streams.codec import EntryId, EventType, StreamEvent
from tests.faults import wait_until


def entries(*seqs: int) -> list[tuple[EntryId, StreamEvent]]:
    """A batch as the fan-out reader delivers it: (entry id, event) in stream order."""
    return [
        (at(seq), StreamEvent(EventType.TOKEN, "r", seq, 1.0, content=f"t{seq}")) for seq in seqs
    ]


def seqs(found: list[Envelope] | None) -> list[int] | None:
    return None if found is None else [env.event.seq for env in found]


def at(seq: int) -> EntryId:
    return (1000, seq)


async def test_a_cursor_within_what_is_held_gets_every_entry_after_it() -> None:
    recent = Recent(window_s=60)
    recent.record("s", "m", at(0), entries(1, 2, 3))
    recent.record("s", "m", at(3), entries(4, 5))
    assert seqs(recent.after("s", {"m": at(2)}, {"m"})) == [3, 4, 5]
    assert seqs(recent.after("s", {"m": at(0)}, {"m"})) == [1, 2, 3, 4, 5]
    assert seqs(recent.after("s", {"m": at(5)}, {"m"})) == []  # up to date
    recent.close()


async def test_a_cursor_outside_what_is_held_reads_redis() -> None:
    recent = Recent(window_s=60)
    recent.record("s", "m", at(10), entries(11, 12))
    assert recent.after("s", {"m": at(9)}, {"m"}) is None  # entry 10 was never held
    assert recent.after("s", {"m": at(13)}, {"m"}) is None  # past what this process read
    assert recent.after("s", {}, {"m"}) is None  # the stream is not held from its start
    assert recent.after("other", {"m": at(11)}, {"m"}) is None  # a session never delivered
    recent.close()


async def test_a_new_stream_is_held_from_its_first_entry() -> None:
    """A client without a cursor needs everything: held when the first batch began the stream."""
    recent = Recent(window_s=60)
    recent.record("s", "m", (0, 0), entries(1, 2))
    assert seqs(recent.after("s", {}, {"m"})) == [1, 2]
    assert seqs(recent.after("new", {}, set())) == []  # no streams yet: nothing to read
    recent.close()


async def test_a_batch_that_does_not_continue_the_stream_starts_it_anew() -> None:
    """The reader's position jumped (its tailing restarted past entries never delivered):
    what came before the jump cannot be joined to what comes after it."""
    recent = Recent(window_s=60)
    recent.record("s", "m", at(0), entries(1, 2))
    recent.record("s", "m", at(5), entries(6, 7))  # 3..5 never delivered here
    assert recent.after("s", {"m": at(1)}, {"m"}) is None
    assert seqs(recent.after("s", {"m": at(5)}, {"m"})) == [6, 7]
    recent.close()


async def test_every_model_of_the_session_must_be_held() -> None:
    recent = Recent(window_s=60)
    recent.record("s", "a", at(0), entries(1, 2))
    recent.record("s", "b", at(0), entries(1))
    cursor = {"a": at(1), "b": at(0)}
    found = recent.after("s", cursor, {"a", "b"})
    assert found is not None
    assert [(env.model, env.event.seq) for env in found] == [("a", 2), ("b", 1)]
    assert recent.after("s", cursor, {"a", "b", "c"}) is None  # c was not delivered since
    recent.close()


async def test_at_most_a_number_of_entries_per_stream_is_held() -> None:
    recent = Recent(window_s=60, most=3)
    recent.record("s", "m", at(0), entries(1, 2))
    recent.record("s", "m", at(2), entries(3, 4))  # 1 and 2 leave together (one batch)
    assert recent.after("s", {"m": at(1)}, {"m"}) is None
    assert seqs(recent.after("s", {"m": at(2)}, {"m"})) == [3, 4]
    assert recent.entries == 2
    recent.record("s", "m", at(4), entries(5, 6, 7, 8))  # a batch larger than `most` goes whole
    assert recent.entries == 0
    assert recent.after("s", {"m": at(8)}, {"m"}) == []  # nothing after 8, known to be so
    assert recent.after("s", {"m": at(7)}, {"m"}) is None
    recent.close()


async def test_entries_older_than_the_window_go() -> None:
    """Older batches leave when the stream gets a new one; a session that got nothing for the
    window is forgotten by the sweep."""
    now = [0.0]
    recent = Recent(window_s=10, clock=lambda: now[0])
    recent.record("quiet", "m", at(0), entries(1))
    recent.record("busy", "m", at(0), entries(1))
    now[0] = 6
    recent.record("busy", "m", at(1), entries(2))
    now[0] = 12
    recent.record("busy", "m", at(2), entries(3))  # entry 1, 12 s old, leaves
    assert recent.after("busy", {"m": at(0)}, {"m"}) is None
    assert seqs(recent.after("busy", {"m": at(1)}, {"m"})) == [2, 3]
    assert seqs(recent.after("quiet", {"m": at(0)}, {"m"})) == [1]  # until a sweep
    recent.expire()
    assert recent.after("quiet", {"m": at(0)}, {"m"}) is None
    assert recent.entries == 2
    now[0] = 30
    recent.expire()
    assert recent.entries == 0
    recent.close()


async def test_the_sweep_runs_by_itself_while_anything_is_held() -> None:
    recent = Recent(window_s=0.05)
    recent.record("s", "m", at(0), entries(1))
    recent.record("t", "m", at(0), entries(1))

    async def emptied() -> bool:
        return recent.entries == 0

    await wait_until(emptied, 5, "the sweep")
    recent.close()


async def test_a_forgotten_session_and_a_zero_window_hold_nothing() -> None:
    recent = Recent(window_s=60)
    recent.record("s", "m", at(0), entries(1))
    recent.forget("s")
    assert recent.after("s", {"m": at(0)}, {"m"}) is None
    off = Recent(window_s=0)
    off.record("s", "m", at(0), entries(1))
    assert off.entries == 0
    assert off.after("s", {"m": at(0)}, {"m"}) is None
    assert recent.after("new", {}, set()) == []  # no stream yet: nothing to catch up
    assert off.after("new", {}, set()) is None  # turned off, Redis answers even that
    recent.close()


async def test_clearing_drops_every_session() -> None:
    """The reader lost Redis: nothing delivered before may be trusted to be there still."""
    recent = Recent(window_s=60)
    recent.record("s", "m", at(0), entries(1))
    recent.record("t", "m", at(0), entries(2))
    recent.clear()
    assert recent.entries == 0
    assert recent.after("s", {"m": at(0)}, {"m"}) is None
    assert recent.after("t", {"m": at(0)}, {"m"}) is None
    # what the reader reads next, from the position it had, may not continue the stream
    # the client saw (Redis restarted empty): a cursor at that position reads Redis, which
    # can tell (a gap); a cursor past it had an entry since
    recent.record("s", "m", at(0), entries(1, 2))
    assert recent.after("s", {"m": at(0)}, {"m"}) is None
    assert seqs(recent.after("s", {"m": at(1)}, {"m"})) == [2]
    recent.close()


async def test_held_entries_add_nothing_for_the_cycle_collector_to_walk() -> None:
    """Thousands of entries held for seconds would reach the collector's oldest generation,
    and each full collection would walk them all (pauses of tens of milliseconds)."""
    recent = Recent(window_s=60, most=100_000)
    gc.collect()
    before = len(gc.get_objects())
    for seq in range(1, 2001):
        recent.record("s", "m", at(seq - 1), entries(seq))
    gc.collect()
    assert recent.entries == 2000
    assert len(gc.get_objects()) - before < 50
    recent.close()
