"""A one-line progress display: which scenario, which phase, how many tokens so far.

On a terminal the line is redrawn twice a second; otherwise (CI, a pipe) a line is printed
every few seconds, so logs stay short.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from bench.loadgen import ClientStats


class Progress:
    """What the bench is doing now; `run()` draws it until cancelled."""

    def __init__(self, stream: TextIO = sys.stderr, *, quiet: bool = False) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._quiet = quiet
        self.label = ""
        self.step = ""
        self.phase = ""
        self._clients: list[ClientStats] = []
        self._since = time.monotonic()

    def begin(self, label: str) -> None:
        """A new scenario run starts."""
        self.label, self.step, self.phase = label, "", "start"
        self._clients = []
        self._since = time.monotonic()

    def label_step(self, step: str) -> None:
        self.step = step

    def watch(self, clients: list[ClientStats]) -> None:
        """Count tokens and finished clients of these from now on."""
        self._clients = clients

    def line(self) -> str:
        clients = self._clients
        received = sum(c.received for c in clients)
        expected = sum(c.expected for c in clients)
        done = sum(1 for c in clients if c.done.is_set())
        step = f" [{self.step}]" if self.step else ""
        counts = f" clients {done}/{len(clients)} tokens {received}/{expected}" if clients else ""
        return f"{self.label}{step} {self.phase}{counts} {time.monotonic() - self._since:5.1f}s"

    def say(self, text: str) -> None:
        """A line that stays (a finished scenario, a warning)."""
        if self._quiet:
            return
        if self._tty:
            self._stream.write("\r\033[K")
        self._stream.write(text + "\n")
        self._stream.flush()

    async def run(self) -> None:
        if self._quiet:
            return
        period = 0.5 if self._tty else 5.0
        while True:
            await asyncio.sleep(period)
            if self._tty:
                self._stream.write("\r\033[K" + self.line())
            else:
                self._stream.write(self.line() + "\n")
            self._stream.flush()
