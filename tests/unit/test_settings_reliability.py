"""Settings of the reliability features: read from BRIDGE_* variables, nonsense refused."""

from __future__ import annotations

import pytest

from bridge.errors import ConfigError
from bridge.settings import Settings


def test_the_reliability_settings_are_read_from_the_environment() -> None:
    """Each new variable lands in its setting."""
    settings = Settings.from_env(
        {
            "BRIDGE_SESSION_TOKEN_LIMIT": "5000",
            "BRIDGE_REDIS_WATCH_S": "0.5",
            "BRIDGE_PROVIDER_RETRIES": "4",
            "BRIDGE_PROVIDER_RETRY_BACKOFF_S": "0.25",
        }
    )
    assert settings.session_token_limit == 5000
    assert settings.redis_watch_s == 0.5
    assert settings.provider_retries == 4
    assert settings.provider_retry_backoff_s == 0.25


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BRIDGE_RECLAIM_IDLE_MS", "50"),
        ("BRIDGE_MAX_DELIVERIES", "0"),
        ("BRIDGE_STREAM_TTL_S", "0"),
        ("BRIDGE_REDIS_WATCH_S", "0"),
        ("BRIDGE_SESSION_TOKEN_LIMIT", "-1"),
        ("BRIDGE_PROVIDER_RETRIES", "two"),
    ],
)
def test_settings_that_cannot_work_are_refused_by_name(name: str, value: str) -> None:
    """A value that cannot work is a ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})
