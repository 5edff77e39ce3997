"""The micro-batcher with real backend subprocesses (no Redis: writers are recorded)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from bridge.batching.batcher import Batcher
from bridge.batching.mock_model import answer
from bridge.providers.base import Message
from bridge.settings import Settings
from bridge.streams.codec import EventType, now_ms
from bridge.streams.jobs import GenerationJob

MOCK = (sys.executable, "-m", "bridge.batching.mock_model")


class RecordingWriter:
    """Stands in for a GenerationWriter: keeps the chunks it is given."""

    def __init__(self) -> None:
        self.chunks: list[str] = []
        self.tokens = 0

    async def token(self, text: str) -> None:
        self.chunks.append(text)
        self.tokens += 1


def job(context: str) -> GenerationJob:
    return GenerationJob(
        f"r-{context}", "s", "batch", (Message("user", context),), created_ms=now_ms(), mode="batch"
    )


@pytest.fixture
async def batcher(request: pytest.FixtureRequest) -> AsyncIterator[Batcher]:
    """A running Batcher; `@pytest.mark.parametrize("batcher", [{...}], indirect=True)` sets
    its settings."""
    overrides: dict[str, Any] = {
        "batch_window_ms": 300.0,
        "batch_command": (*MOCK, "--delay-ms", "0"),
    }
    overrides.update(getattr(request, "param", {}))
    settings = msgspec.structs.replace(Settings.from_env({}), **overrides)
    batcher = Batcher(settings)
    runner = asyncio.create_task(batcher.run())
    yield batcher
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def run_all(batcher: Batcher, contexts: list[str]) -> list[tuple[Any, RecordingWriter]]:
    writers = [RecordingWriter() for _ in contexts]
    outcomes = await asyncio.gather(
        *(batcher.submit(job(c), w) for c, w in zip(contexts, writers, strict=True))  # type: ignore[arg-type]
    )
    return list(zip(outcomes, writers, strict=True))


@pytest.mark.parametrize("batcher", [{"batch_size": 2}], indirect=True)
async def test_batches_hold_at_most_batch_size_requests(batcher: Batcher) -> None:
    """Three requests with a batch size of 2: a batch of 2, then one of 1; all answered."""
    results = await run_all(batcher, ["a", "b", "c"])
    sizes = sorted(outcome[1]["batch"]["size"] for outcome, _ in results)
    assert sizes == [1, 2, 2]
    for (outcome, writer), context in zip(results, "abc", strict=True):
        assert outcome[0] is EventType.COMPLETE
        assert writer.chunks == answer(context)
    assert batcher.stats.batch_size.summary()["max"] == 2.0


@pytest.mark.parametrize(
    "batcher", [{"batch_command": (*MOCK, "--delay-ms", "0", "--fail-after", "2")}], indirect=True
)
async def test_a_failing_backend_fails_its_requests_with_its_stderr(batcher: Batcher) -> None:
    """A backend exiting non-zero: the chunks it wrote stay, then an error quoting stderr."""
    [(outcome, writer)] = await run_all(batcher, ["x"])
    assert writer.chunks == answer("x")[:2]
    kind, data = outcome
    assert kind is EventType.ERROR
    assert data["code"] == "batch_backend_failed"
    assert data["message"] == (
        "the batch backend exited with status 3: mock model: failing after 2 steps as asked"
    )


@pytest.mark.parametrize("batcher", [{"batch_command": ("/nonexistent/model",)}], indirect=True)
async def test_a_backend_that_cannot_start_is_reported(batcher: Batcher) -> None:
    """A missing backend program: an error naming it, and the batcher keeps serving."""
    [(outcome, _)] = await run_all(batcher, ["x"])
    assert outcome[0] is EventType.ERROR
    assert outcome[1]["code"] == "batch_backend_unavailable"
    assert "/nonexistent/model" in outcome[1]["message"]


SCRIPT = """
import sys
print("garbage", flush=True)
print("7\\t\\"out of range\\"", flush=True)
print("0\\tnot json", flush=True)
print("0\\t\\"kept\\"", flush=True)
"""


@pytest.mark.parametrize(
    "batcher", [{"batch_command": (sys.executable, "-c", SCRIPT)}], indirect=True
)
async def test_lines_that_break_the_protocol_are_skipped(batcher: Batcher) -> None:
    """Unparsable lines and unknown indexes are logged and skipped, not fatal."""
    [(outcome, writer)] = await run_all(batcher, ["x"])
    assert writer.chunks == ["kept"]
    assert outcome[0] is EventType.COMPLETE


HANGS_ON_SLOW = """
import sys, time
context = open(sys.argv[1], encoding="utf-8").read()
print('0\t"started"', flush=True)
if context == "slow":
    time.sleep(30)
print("0\tnull", flush=True)
"""


class FirstChunk(RecordingWriter):
    """A writer that says when its first chunk arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = asyncio.Event()

    async def token(self, text: str) -> None:
        await super().token(text)
        self.arrived.set()


@pytest.mark.parametrize(
    "batcher",
    [{"batch_command": (sys.executable, "-c", HANGS_ON_SLOW), "batch_window_ms": 0.0}],
    indirect=True,
)
async def test_a_batch_nobody_wants_is_killed(batcher: Batcher) -> None:
    """Cancelling the only request of a batch kills its backend, freeing the single slot for
    the next batch (which would otherwise wait 30 s behind it)."""
    writer = FirstChunk()
    slow = asyncio.create_task(batcher.submit(job("slow"), writer))  # type: ignore[arg-type]
    async with asyncio.timeout(10):
        await writer.arrived.wait()
    slow.cancel()
    async with asyncio.timeout(10):
        kind, _ = await batcher.submit(job("quick"), RecordingWriter())  # type: ignore[arg-type]
    assert kind is EventType.COMPLETE
