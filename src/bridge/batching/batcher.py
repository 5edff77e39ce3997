"""The micro-batcher and the `batch` generation mode.

The worker runs each `/generate` request as a generation in the `batch` mode, like any
other: claimed, fenced, renewed, reclaimed, cancellable. The mode hands the request to this
process's `Batcher`, which gathers up to `batch_size` requests, or what arrived within
`batch_window_ms` of the first, runs the backend once for the batch, and writes each output
line to its request's stream as soon as it is read. A request cancelled mid-batch only
stops receiving lines; the backend is killed when no request of its batch still wants it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import structlog

from bridge import metrics
from bridge.batching.backend import BatchRun
from bridge.batching.stats import BatchStats
from bridge.modes import Outcome, RunProvider
from bridge.settings import Settings
from bridge.streams.codec import EventType, now_ms
from bridge.streams.jobs import GenerationJob
from bridge.streams.producer import GenerationWriter

log = structlog.get_logger("bridge.batching")


class Submission:
    """One request waiting for, or running in, a batch."""

    __slots__ = ("arrived", "chunks", "future", "job", "writer")

    def __init__(self, job: GenerationJob, writer: GenerationWriter) -> None:
        self.job = job
        self.writer = writer
        self.future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.arrived = time.monotonic()
        self.chunks = 0

    @property
    def context(self) -> str:
        return self.job.messages[-1].content if self.job.messages else ""

    def finish(self, outcome: Outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)


class Batcher:
    """Collects submissions into batches and runs them (up to `batch_concurrency` at once)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pending: deque[Submission] = deque()
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.batch_concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self.stats = BatchStats()

    async def submit(self, job: GenerationJob, writer: GenerationWriter) -> Outcome:
        """Wait for `job`'s batch to produce its answer; cancelling this call drops it."""
        sub = Submission(job, writer)
        self._pending.append(sub)
        self._arrived.set()
        try:
            return await sub.future
        finally:
            sub.future.cancel()  # no-op when done; otherwise the batch stops writing to it

    async def run(self) -> None:
        """Form and start batches until cancelled (then kill the running ones)."""
        try:
            while True:
                await self._slots.acquire()
                try:
                    batch = await self._collect()
                except BaseException:
                    self._slots.release()
                    raise
                task = asyncio.create_task(self._run_batch(batch), name="batch")
                self._running.add(task)
                task.add_done_callback(self._batch_done)
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _collect(self) -> list[Submission]:
        """The next batch: the first live submission, and what joins it within the window."""
        while not self._live():
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0].arrived + self._settings.batch_window_ms / 1000
        while self._live() < self._settings.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._arrived.wait()
            except TimeoutError:
                break
        batch: list[Submission] = []
        while self._pending and len(batch) < self._settings.batch_size:
            sub = self._pending.popleft()
            if not sub.future.done():
                batch.append(sub)
        return batch

    def _live(self) -> int:
        while self._pending and self._pending[0].future.done():
            self._pending.popleft()  # cancelled while waiting
        return sum(1 for sub in self._pending if not sub.future.done())

    async def _run_batch(self, batch: list[Submission]) -> None:
        started_ms = now_ms()
        self.stats.batch_size.add(len(batch))
        metrics.BATCH_SIZE.observe(len(batch))
        for sub in batch:
            waited_ms = started_ms - sub.job.created_ms
            self.stats.queue_wait_ms.add(waited_ms)
            metrics.BATCH_QUEUE_WAIT.observe(max(waited_ms, 0.0) / 1000)
        info = {"size": len(batch), "startedMs": started_ms}
        log.info("batch_started", size=len(batch), requests=[s.job.request_id for s in batch])
        outcome: Outcome | None = None
        try:
            async with (
                asyncio.timeout(self._settings.generation_deadline_s),
                BatchRun(self._settings.batch_command, [s.context for s in batch]) as run,
            ):

                def stop_when_unwanted(_: object) -> None:
                    if all(sub.future.done() for sub in batch):
                        run.kill()

                for sub in batch:
                    sub.future.add_done_callback(stop_when_unwanted)
                async for index, chunk in run.lines():
                    await self._deliver(batch[index], chunk, info)
            if run.returncode != 0 and not all(sub.future.done() for sub in batch):
                message = f"the batch backend exited with status {run.returncode}"
                if run.stderr_tail:
                    message += f": {run.stderr_tail}"
                outcome = EventType.ERROR, {"code": "batch_backend_failed", "message": message}
        except TimeoutError:
            message = f"the batch exceeded {self._settings.generation_deadline_s:g} s"
            outcome = EventType.ERROR, {"code": "deadline_exceeded", "message": message}
        except OSError as exc:
            message = f"the batch backend could not start: {exc}"
            outcome = EventType.ERROR, {"code": "batch_backend_unavailable", "message": message}
        for sub in batch:
            if not sub.future.done():
                sub.finish(outcome or self._complete(sub, info))
        log.info("batch_finished", size=len(batch), duration_ms=round(now_ms() - started_ms, 1))

    async def _deliver(self, sub: Submission, chunk: str | None, info: dict[str, Any]) -> None:
        if sub.future.done():
            return  # cancelled, or already finished
        if chunk is None:
            sub.finish(self._complete(sub, info))
            return
        if sub.chunks == 0:
            self.stats.first_chunk_ms.add(now_ms() - sub.job.created_ms)
        sub.chunks += 1
        try:
            await sub.writer.token(chunk)
        except Exception as exc:  # fenced or Redis gone: that request's worker decides
            if not sub.future.done():
                sub.future.set_exception(exc)

    def _complete(self, sub: Submission, info: dict[str, Any]) -> Outcome:
        self.stats.request_done(sub.job.request_id, now_ms() - sub.job.created_ms)
        prompt = len(sub.context.split())
        usage = {
            "promptTokens": prompt,
            "completionTokens": sub.chunks,
            "totalTokens": prompt + sub.chunks,
        }
        queue_wait = round(info["startedMs"] - sub.job.created_ms, 1)
        batch = {"size": info["size"], "queueWaitMs": queue_wait}
        return EventType.COMPLETE, {"finishReason": "stop", "usage": usage, "batch": batch}


class BatchMode:
    """The `batch` generation mode: the request's answer comes from the batcher."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher

    async def run(
        self, job: GenerationJob, writer: GenerationWriter, run_provider: RunProvider
    ) -> Outcome:
        return await self._batcher.submit(job, writer)

    async def settled(self, job: GenerationJob) -> None:
        """Nothing to do: the stream is the whole answer."""
