"""Running the batch model: a subprocess fed through files, read line by line as it writes.

The protocol is in `bridge.batching.mock_model`'s docstring. The process runs in its own
process group, so killing it (all its requests cancelled, the deadline passed, shutdown)
also kills anything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgspec
import structlog

log = structlog.get_logger("bridge.batching")

DEFAULT_COMMAND = (sys.executable, "-m", "bridge.batching.mock_model")
_LINE_LIMIT = 1 << 20
_STDERR_TAIL = 2000
_decode_chunk = msgspec.json.Decoder(str | None).decode


class BatchRun:
    """One run of the backend on one batch; use `async with`."""

    def __init__(self, command: Sequence[str], contexts: Sequence[str]) -> None:
        self._command = tuple(command) or DEFAULT_COMMAND
        self._contexts = contexts
        self._dir: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = bytearray()
        self._stderr_task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BatchRun:
        self._dir = tempfile.mkdtemp(prefix="bridge-batch-")
        try:
            paths = await asyncio.to_thread(_write_contexts, self._dir, self._contexts)
            self._proc = await asyncio.create_subprocess_exec(
                *self._command,
                *paths,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=_LINE_LIMIT,
            )
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._stderr_task = asyncio.create_task(self._read_stderr())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.kill()
        if self._proc is not None:
            await self._proc.wait()
        if self._stderr_task is not None:
            await asyncio.gather(self._stderr_task, return_exceptions=True)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def lines(self) -> AsyncIterator[tuple[int, str | None]]:
        """(request index, chunk) as the process writes them; None marks a request done."""
        assert self._proc is not None
        assert self._proc.stdout is not None
        count = len(self._contexts)
        async for raw in self._proc.stdout:
            index_text, tab, payload = raw.decode("utf-8", "replace").rstrip("\r\n").partition("\t")
            try:
                index = int(index_text)
                chunk = _decode_chunk(payload)
            except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
                index = -1
            if not tab or not 0 <= index < count:
                log.warning("batch_backend_bad_line", line=raw[:200])
                continue
            yield index, chunk
        await self._proc.wait()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def stderr_tail(self) -> str:
        return self._stderr[-_STDERR_TAIL:].decode("utf-8", "replace").strip()

    def kill(self) -> None:
        """Kill the process group if it still runs."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    async def _read_stderr(self) -> None:
        stream: Any = self._proc.stderr if self._proc is not None else None
        if stream is None:
            return
        while chunk := await stream.read(4096):
            self._stderr += chunk
            del self._stderr[:-_STDERR_TAIL]


def _write_contexts(directory: str, contexts: Sequence[str]) -> list[str]:
    """One UTF-8 file per context, named by its index in the batch; returns their paths."""
    paths = []
    for index, context in enumerate(contexts):
        path = os.path.join(directory, f"{index}.txt")
        with open(path, "wb") as handle:
            handle.write(context.encode("utf-8"))
        paths.append(path)
    return paths
