"""Write flow control for asyncio protocols that write requests of their own."""

from __future__ import annotations

import asyncio


class WriteFlow(asyncio.Protocol):
    """A protocol whose writers wait, with `drained()`, while its transport's buffer is full."""

    _drained: asyncio.Future[None] | None = None  # set while writing is paused

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    async def drained(self) -> None:
        """Return once the transport takes writes again (at once if it does now)."""
        if self._drained is not None:
            await asyncio.shield(self._drained)
