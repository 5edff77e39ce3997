"""Capped exponential backoff for the loops that ride out Redis outages.

Such loops must also stop when cancelled, and on Python 3.11 a Redis call can swallow a
cancellation: redis-py sends each command through `asyncio.wait_for` when a socket timeout is
set, and 3.11's `wait_for` drops a cancel that arrives as the send completes (fixed in 3.12;
measured here: about a third of cancels landing during a PING). The task keeps its
`cancelling()` count, so every loop calls `raise_if_cancelling()` once per turn, and
`Backoff.wait()` does so before sleeping.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task has been asked to stop."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Backoff:
    """Delays that double from `start_s` up to `cap_s`; `reset()` after a success."""

    def __init__(self, start_s: float = 0.05, cap_s: float = 2.0) -> None:
        self._start_s = start_s
        self._cap_s = cap_s
        self.delay_s = start_s

    def reset(self) -> None:
        self.delay_s = self._start_s

    async def wait(self) -> None:
        """Sleep the current delay and double the next one (unless this task is stopping)."""
        raise_if_cancelling()
        await asyncio.sleep(self.delay_s)
        self.grow()

    def grow(self) -> None:
        """Double the delay, up to the cap (for a caller that waits it on its own)."""
        self.delay_s = min(self.delay_s * 2, self._cap_s)
