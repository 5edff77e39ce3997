"""Shared fixtures: one test Redis per session, and a private key prefix per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from uuid import uuid4

import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.redis_select import make_client
from bridge.settings import Settings
from tests.redis_fixtures import delete_prefixed, session_redis_url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The test session's Redis: TEST_REDIS_URL, else a container, else a private server."""
    with session_redis_url() as url:
        yield url


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses; the `redis` fixture deletes its keys afterwards."""
    return f"test:{uuid4().hex[:12]}:"


@pytest.fixture
def settings(redis_url: str, key_prefix: str) -> Settings:
    """Default settings (as from an empty environment) aimed at the test Redis and prefix."""
    return msgspec.structs.replace(
        Settings.from_env({}), redis_url=redis_url, key_prefix=key_prefix
    )


@pytest.fixture
async def redis(
    settings: Settings, redis_url: str, key_prefix: str
) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis; the test's keys (and only those) are deleted afterwards."""
    client = make_client(redis_url, settings)
    try:
        yield client
    finally:
        try:
            await delete_prefixed(client, key_prefix)
        finally:
            await client.aclose()
