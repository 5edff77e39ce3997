"""The seed systems' parts of a worker process: generation modes and request-stream workers."""

from __future__ import annotations

from redis.asyncio import Redis

from bridge.batching.batcher import Batcher, BatchMode
from bridge.jobs.structured import StructuredMode
from bridge.modes import Modes
from bridge.settings import Settings
from bridge.streams.cancel import CancelWatch
from bridge.streams.keys import Keys
from bridge.streams.seed_requests import ReplyMode


def worker_modes(
    redis: Redis, keys: Keys, settings: Settings, cancels: CancelWatch, batcher: Batcher
) -> Modes:
    """Every generation mode, sharing one cancel watch (see `bridge.modes`)."""
    modes = Modes(cancels)
    modes.add("structured", StructuredMode(redis, keys, settings))
    modes.add("reply", ReplyMode(redis, keys, settings))
    modes.add("batch", BatchMode(batcher))
    return modes


def seed_streams(settings: Settings) -> list[tuple[str, str]]:
    """(kind, stream) of each seed-000 request stream to serve (none when switched off)."""
    if not settings.seed_streams:
        return []
    return [("summary", settings.summary_stream), ("question", settings.question_stream)]
