"""The start-up heap is frozen out of the collector; later garbage is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from bridge.heap import freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # this test process must not keep its objects frozen


def test_objects_alive_at_start_up_leave_the_scans_and_later_cycles_are_collected(
    unfrozen: None,
) -> None:
    before = _Node()
    frozen = freeze_startup_heap()
    assert frozen > 0
    assert all(before is not obj for obj in gc.get_objects())  # frozen: out of the scans
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None
