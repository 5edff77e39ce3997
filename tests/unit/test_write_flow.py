"""WriteFlow: a writer waits while the transport's buffer is full, and only then."""

from __future__ import annotations

import asyncio

from bridge.write_flow import WriteFlow


async def test_drained_waits_from_pause_to_resume() -> None:
    flow = WriteFlow()
    await asyncio.wait_for(flow.drained(), 1)  # never paused: at once
    flow.pause_writing()
    waiting = asyncio.create_task(flow.drained())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    flow.resume_writing()
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(flow.drained(), 1)  # resumed: at once again


async def test_a_cancelled_writer_leaves_the_others_waiting() -> None:
    """The wait is shielded: cancelling one writer does not release another."""
    flow = WriteFlow()
    flow.pause_writing()
    first = asyncio.create_task(flow.drained())
    second = asyncio.create_task(flow.drained())
    await asyncio.sleep(0.01)
    first.cancel()
    await asyncio.sleep(0.01)
    assert first.cancelled()
    assert not second.done()
    flow.resume_writing()
    await asyncio.wait_for(second, 1)
