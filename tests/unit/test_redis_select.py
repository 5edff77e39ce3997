"""Redis selection: REDIS_URL, then a local server >= 7.0, then an embedded one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import structlog
from structlog.testing import capture_logs

from bridge.errors import ConfigError, RedisUnavailable
from bridge.redis_select import RedisChoice, make_client, redact_url, select_redis
from bridge.redis_server import EmbeddedRedis
from bridge.settings import Settings
from tests.redis_fixtures import fake_redis_server, free_port


@pytest.fixture
async def choices() -> AsyncIterator[list[RedisChoice]]:
    """Collects choices made by a test and stops any embedded server they started."""
    made: list[RedisChoice] = []
    yield made
    for choice in made:
        await choice.aclose()


def _release(version: str) -> tuple[int, int]:
    major, minor, *_ = version.split(".")
    return int(major), int(minor)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@db:6379/0", "redis://:***@db:6379/0"),
        ("rediss://app:s3cret@db/1", "rediss://app:***@db/1"),
        ("redis://app@db:6379", "redis://app@db:6379"),
        ("unix:///run/redis.sock?db=2&password=s3cret", "unix:///run/redis.sock?db=2&password=***"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_redact_url_hides_only_the_password(url: str, shown: str) -> None:
    """Passwords in the user info or the query become `***`; the rest of the URL stays."""
    assert redact_url(url) == shown


def test_make_client_rejects_a_malformed_url() -> None:
    """A URL redis-py cannot parse is a configuration error that hides the password."""
    with pytest.raises(ConfigError, match=r"ftp://u:\*\*\*@h") as info:
        make_client("ftp://u:s3cret@h/0", Settings())
    assert "s3cret" not in str(info.value)


async def test_unreachable_redis_url_fails_fast_without_the_password() -> None:
    """An unreachable REDIS_URL raises RedisUnavailable naming the URL, never its password."""
    port = free_port()
    settings = Settings(redis_url=f"redis://app:s3cret@127.0.0.1:{port}/0")
    started = time.monotonic()
    with capture_logs() as logs, pytest.raises(RedisUnavailable) as info:
        await select_redis(settings, structlog.get_logger(), connect_timeout_s=0.5)
    assert time.monotonic() - started < 3.0
    assert f"redis://app:***@127.0.0.1:{port}/0" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert not [entry for entry in logs if entry["event"] == "redis_selected"]


@pytest.mark.integration
async def test_reachable_redis_url_is_chosen(settings: Settings, redis_url: str) -> None:
    """A REDIS_URL that answers is chosen as it is, and the choice is logged."""
    with capture_logs() as logs:
        choice = await select_redis(settings, structlog.get_logger())
    assert (choice.source, choice.url, choice.embedded) == ("REDIS_URL", redis_url, None)
    assert _release(choice.version) >= (7, 0)
    assert [entry["source"] for entry in logs if entry["event"] == "redis_selected"] == [
        "REDIS_URL"
    ]


@pytest.mark.integration
async def test_wrong_credentials_fail_at_once_without_the_password() -> None:
    """A server that rejects REDIS_URL's password fails selection without echoing it."""
    async with EmbeddedRedis() as server:
        url = f"unix://{server.socket_path}?password=s3cret"
        started = time.monotonic()
        with pytest.raises(RedisUnavailable) as info:
            await select_redis(Settings(redis_url=url), structlog.get_logger())
    assert time.monotonic() - started < 2.0
    assert "password=***" in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.integration
async def test_local_server_is_chosen_without_redis_url(choices: list[RedisChoice]) -> None:
    """Without REDIS_URL, a Redis >= 7.0 answering on the local port is used."""
    port = free_port()
    async with EmbeddedRedis(tcp_port=port):
        with capture_logs() as logs:
            choice = await select_redis(Settings(), structlog.get_logger(), local_port=port)
        choices.append(choice)
    assert (choice.source, choice.url, choice.embedded) == (
        "local",
        f"redis://127.0.0.1:{port}/0",
        None,
    )
    assert _release(choice.version) >= (7, 0)
    selected = [entry for entry in logs if entry["event"] == "redis_selected"]
    assert selected == [
        {
            "event": "redis_selected",
            "log_level": "info",
            "source": "local",
            "url": choice.url,
            "server": choice.server,
            "version": choice.version,
        }
    ]


@pytest.mark.integration
async def test_old_local_server_is_skipped(choices: list[RedisChoice]) -> None:
    """A local server older than 7.0 is skipped with a logged reason; an embedded one starts."""
    async with fake_redis_server("6.2.14") as port:
        with capture_logs() as logs:
            choice = await select_redis(Settings(), structlog.get_logger(), local_port=port)
        choices.append(choice)
    assert choice.source == "embedded"
    skipped = [entry for entry in logs if entry["event"] == "redis_local_skipped"]
    assert len(skipped) == 1
    assert skipped[0]["log_level"] == "warning"
    assert "6.2.14" in skipped[0]["reason"]


@pytest.mark.integration
async def test_closed_local_port_falls_back_to_embedded(choices: list[RedisChoice]) -> None:
    """Without REDIS_URL or a local server, an embedded server is started and logged."""
    with capture_logs() as logs:
        choice = await select_redis(Settings(), structlog.get_logger(), local_port=free_port())
    choices.append(choice)
    assert choice.source == "embedded"
    assert choice.embedded is not None
    assert choice.url == choice.embedded.url
    events = [(entry["event"], entry["log_level"]) for entry in logs]
    assert events == [("redis_local_skipped", "info"), ("redis_selected", "info")]
