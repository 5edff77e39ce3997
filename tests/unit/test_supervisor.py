"""The background-task supervisor's stop path."""

from __future__ import annotations

import asyncio

from bridge.supervisor import BackgroundTask


async def test_stop_ends_a_task_that_swallows_a_cancellation() -> None:
    """A coroutine that swallows one CancelledError (as redis-py's pub/sub read can) still stops."""
    swallowed = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()  # carries on as if nothing happened

    task = BackgroundTask("stubborn", stubborn)
    task.start()
    await asyncio.sleep(0)
    async with asyncio.timeout(5):
        await task.stop()
    assert swallowed.is_set()
    assert not task.alive
