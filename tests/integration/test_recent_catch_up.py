"""A reconnect's catch-up from the entries the process delivered a moment ago, or from Redis.

Both give the rest of the answer exactly once; which one answered is counted in
`bridge_catch_ups_total{source}`.
"""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.metrics import REGISTRY
from bridge.settings import Settings
from tests.integration.test_sse_direct import chat, read_until, serving, terminal, tokens_of

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::litestar.exceptions.LitestarDeprecationWarning"),
]

TOKENS = 60


def catch_ups(source: str) -> float:
    return REGISTRY.get_sample_value("bridge_catch_ups_total", {"source": source}) or 0.0


@pytest.mark.parametrize(
    ("recent_s", "linger_s", "source"),
    [
        (5.0, 5.0, "memory"),  # the session lingered, tailed: its recent entries cover it
        (5.0, 0.0, "redis"),  # its tailing stopped when the client left: nothing is held
        (0.0, 5.0, "redis"),  # keeping recent entries is turned off
    ],
)
async def test_a_reconnect_gets_the_rest_of_the_answer_once(
    settings: Settings,
    redis: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    recent_s: float,
    linger_s: float,
    source: str,
) -> None:
    quick = msgspec.structs.replace(
        settings,
        mock_tokens=TOKENS,
        mock_delay_ms=5.0,
        sse_recent_s=recent_s,
        sse_linger_s=linger_s,
    )
    async with serving(quick, monkeypatch, front=True) as served:
        started = await chat(served, "recent")
        async with served.http() as http:
            async with http.stream("GET", started["streamUrl"]) as resp:
                first = await read_until(resp, lambda e: e.event == "token")
            await asyncio.sleep(0.05)  # away while the answer goes on
            other = "redis" if source == "memory" else "memory"
            before, before_other = catch_ups(source), catch_ups(other)
            async with http.stream(
                "GET", started["streamUrl"], headers={"Last-Event-ID": first[-1].id}
            ) as resp:
                rest = await read_until(resp, terminal)
        # one pass, or more: an event delivered during a pass makes it read again (push.py)
        assert catch_ups(source) - before >= 1
        assert catch_ups(other) == before_other
        assert tokens_of(first) + tokens_of(rest) == list(range(1, TOKENS + 1))
        assert rest[-1].event == "complete"


async def test_a_second_tab_reconnecting_beside_a_live_one_catches_up_from_memory(
    settings: Settings, redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One tab stays; the other drops and returns: the session never stopped being tailed."""
    quick = msgspec.structs.replace(
        settings, mock_tokens=TOKENS, mock_delay_ms=5.0, sse_linger_s=0.0
    )
    async with serving(quick, monkeypatch, front=True) as served:
        started = await chat(served, "two-tabs")
        async with (
            served.http() as http,
            http.stream("GET", started["streamUrl"]) as steady,
        ):
            async with http.stream("GET", started["streamUrl"]) as resp:
                first = await read_until(resp, lambda e: e.event == "token")
            await asyncio.sleep(0.05)
            before = catch_ups("memory")
            async with http.stream(
                "GET", started["streamUrl"], headers={"Last-Event-ID": first[-1].id}
            ) as resp:
                rest = await read_until(resp, terminal)
            whole = await read_until(steady, terminal)
        assert catch_ups("memory") - before == 1
        assert tokens_of(first) + tokens_of(rest) == list(range(1, TOKENS + 1))
        assert tokens_of(whole) == list(range(1, TOKENS + 1))
