"""API process deaths, with real processes: clients resume on another process."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge.providers.mock import mock_answer
from tests.faults import Fleet, answer_text, fleet, new_session, request_events, strictly_increasing
from tests.servers import bridge_env, open_stream, start_chat, tokens

pytestmark = pytest.mark.integration


@pytest.fixture
def processes(redis_url: str, key_prefix: str, tmp_path: Path) -> Iterator[Fleet]:
    with fleet(bridge_env(redis_url, key_prefix), tmp_path) as running:
        yield running


async def test_tabs_of_a_killed_api_process_resume_on_another_exactly(processes: Fleet) -> None:
    """kill -9 of the API process a tab reads from: the tab reconnects to another API process
    with its Last-Event-ID and gets the rest, nothing lost or repeated; a tab on the surviving
    process never notices."""
    doomed, survivor, worker = processes.serve(), processes.serve(), processes.worker()
    await processes.ready(worker, doomed, survivor)
    async with httpx.AsyncClient(base_url=survivor.base_url, timeout=15) as http:
        started = await start_chat(
            http, new_session(), params={"mockTokens": 300, "mockDelayMs": 10}
        )
    rid, path = started["requestId"], started["streamUrl"]
    async with open_stream(survivor.base_url + path) as steady:
        async with open_stream(doomed.base_url + path) as cut:
            await cut.wait_for(lambda evs: len(tokens(evs)) >= 40)
            doomed.kill(signal.SIGKILL)
            await cut.wait_closed()
        cursor = cut.parser.last_event_id
        async with open_stream(survivor.base_url + path, **{"Last-Event-ID": cursor}) as resumed:
            await resumed.wait_terminal(timeout=60)
        await steady.wait_terminal(timeout=60)
    assert 40 <= len(tokens(cut.events)) < 300
    joined = cut.events + resumed.events
    assert tokens(joined) == tokens(steady.events)
    assert answer_text(joined, rid) == mock_answer(300)
    assert strictly_increasing([p["sequence"] for _, p in request_events(joined, rid)])
