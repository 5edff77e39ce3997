"""Seed 001's WebSocket protocol end to end, through a real `bridge serve` process."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import websockets

from bridge.providers.mock import mock_answer
from tests.fakes.openai_upstream import Behaviour, FakeUpstream
from tests.seed_server import SeedServer, recv, recv_until, seed_server
from tests.servers import delta, scrape

pytestmark = pytest.mark.integration
__all__ = ["seed_server"]

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

#: The seed's `add` request, exactly as its README shows it.
SEED_ADD: dict[str, Any] = {
    "type": "add",
    "id": "my-custom-id",
    "query": "How tall is it?",
    "assistant": {
        "streams": [
            {
                "provider": "openai",
                "settings": {"model": "gpt-3.5-turbo"},
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"insert": "history"},
                    {"role": "user", "content": "{query}"},
                ],
            }
        ]
    },
    "history": [
        {"role": "user", "content": "Where is the eiffel tower?"},
        {"role": "system", "content": "The Eiffel Tower is located in Paris, France."},
    ],
}
#: The token texts of the seed's example answer (its `running` messages that carry text).
SEED_TOKENS = (
    "The", " E", "iff", "el", " Tower", " is", " approximately", " ", "1", ",", "063",
    " feet", " (", "324", " meters", ")", " tall", ",", " including", " antennas", " at",
    " the", " top", ".",
)  # fmt: skip
SEED_ANSWER = (
    "The Eiffel Tower is approximately 1,063 feet (324 meters) tall, including antennas at the top."
)


def mock_add(query: str = "hi", **settings: Any) -> dict[str, Any]:
    """An `add` for the built-in mock provider."""
    return {
        "type": "add",
        "id": "m1",
        "query": query,
        "assistant": {
            "streams": [
                {
                    "provider": "mock",
                    "settings": {"model": "mock", **settings},
                    "messages": [{"role": "user", "content": "{query}"}],
                }
            ]
        },
    }


async def test_the_seed_example_message_for_message(seed_server: SeedServer) -> None:
    """The README's `add` gets `resp_add`, then `running` per token, then `done`; the provider
    got the rendered template (system, history, query) and the seed's model."""
    tokens = list(SEED_TOKENS)
    assert "".join(tokens) == SEED_ANSWER
    async with FakeUpstream(port=seed_server.upstream_port) as upstream:
        upstream.default = Behaviour(content=tuple(tokens), tokens=len(tokens))
        async with websockets.connect(seed_server.ws_url) as ws:
            await ws.send(json.dumps(SEED_ADD))
            added = await recv(ws)
            assert set(added) == {"type", "id", "job_id"}
            assert added["type"] == "resp_add"
            assert added["id"] == "my-custom-id"
            assert UUID4.match(added["job_id"])
            updates = await recv_until(ws, {"done", "failed"})
    job_id = added["job_id"]
    running = [u for u in updates if u["type"] == "running"]
    assert [u["message"] for u in running] == tokens
    assert all(u["job_id"] == job_id for u in updates)
    assert updates[-1]["type"] == "done"
    assert updates[-1]["usage"]["completionTokens"] == len(tokens)
    sent = upstream.requests[0].body
    assert sent["model"] == "gpt-3.5-turbo"
    assert sent["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Where is the eiffel tower?"},
        {"role": "system", "content": "The Eiffel Tower is located in Paris, France."},
        {"role": "user", "content": "How tall is it?"},
    ]


async def test_braces_in_the_query_stay_literal(seed_server: SeedServer) -> None:
    """A query holding `{history}`, `{0}` or `{query}` reaches the provider unchanged."""
    query = "{history} {0} {query} {{x}} {__class__}"
    add = json.loads(json.dumps(SEED_ADD))
    add["query"] = query
    async with (
        FakeUpstream(port=seed_server.upstream_port, tokens=2) as upstream,
        websockets.connect(seed_server.ws_url) as ws,
    ):
        await ws.send(json.dumps(add))
        await recv_until(ws, {"done", "failed"})
    assert upstream.requests[0].body["messages"][-1] == {"role": "user", "content": query}


async def test_listen_from_another_connection_and_resume_with_a_cursor(
    seed_server: SeedServer,
) -> None:
    """A second client `listen`s by job id; a client that drops resumes after its cursor with
    nothing lost or repeated."""
    async with websockets.connect(seed_server.ws_url) as first:
        await first.send(json.dumps(mock_add(mock_tokens=40, mock_delay_ms=25)))
        job_id = (await recv(first))["job_id"]
        early = [await recv(first) for _ in range(10)]
    assert [u["type"] for u in early] == ["running"] * 10
    async with websockets.connect(seed_server.ws_url) as second:
        await second.send(
            json.dumps({"type": "listen", "job_id": job_id, "cursor": early[-1]["cursor"]})
        )
        rest = await recv_until(second, {"done", "failed"})
    text = "".join(u["message"] for u in early + rest if u["type"] == "running")
    assert text == mock_answer(40)
    async with websockets.connect(seed_server.ws_url) as late:
        await late.send(json.dumps({"type": "listen", "job_id": job_id}))
        replayed = await recv_until(late, {"done", "failed"})
    assert "".join(u["message"] for u in replayed if u["type"] == "running") == mock_answer(40)


async def test_websocket_tokens_are_counted_and_live_ones_timed(seed_server: SeedServer) -> None:
    """`bridge_tokens_delivered_total{transport="websocket"}` counts every token sent, the
    replayed ones too; the delivery latency histogram times the live ones only."""
    _, before = await scrape(seed_server.process)
    async with websockets.connect(seed_server.ws_url) as ws:
        await ws.send(json.dumps(mock_add(mock_tokens=6, mock_delay_ms=20)))
        job_id = (await recv(ws))["job_id"]
        live = await recv_until(ws, {"done", "failed"})
    async with websockets.connect(seed_server.ws_url) as late:
        await late.send(json.dumps({"type": "listen", "job_id": job_id}))
        replayed = await recv_until(late, {"done", "failed"})
    _, after = await scrape(seed_server.process)
    assert [u["type"] for u in live].count("running") == 6
    assert [u["type"] for u in replayed].count("running") == 6
    assert delta(before, after, "bridge_tokens_delivered_total", transport="websocket") == 12
    timed = "bridge_token_delivery_latency_seconds_count"
    assert delta(before, after, timed, transport="websocket") == 6


async def test_a_failing_stream_falls_back_to_the_next(seed_server: SeedServer) -> None:
    """Several streams are fallbacks: a provider error before any token moves to the next."""
    add = mock_add(mock_tokens=3, mock_fail_after=0)
    backup = {
        "provider": "mock",
        "settings": {"model": "backup", "mock_tokens": 4},
        "messages": [{"role": "user", "content": "{query}"}],
    }
    add["assistant"]["streams"].append(backup)
    async with websockets.connect(seed_server.ws_url) as ws:
        await ws.send(json.dumps(add))
        await recv(ws)
        updates = await recv_until(ws, {"done", "failed"})
    assert "".join(u["message"] for u in updates if u["type"] == "running") == mock_answer(4)
    assert updates[-1]["type"] == "done"


async def test_a_provider_failure_is_a_failed_message(seed_server: SeedServer) -> None:
    """The provider failing midway: the tokens so far, then `failed` with its message."""
    async with websockets.connect(seed_server.ws_url) as ws:
        await ws.send(json.dumps(mock_add(mock_tokens=5, mock_fail_after=2)))
        await recv(ws)
        updates = await recv_until(ws, {"done", "failed"})
    assert [u["message"] for u in updates if u["type"] == "running"] == ["This ", "is "]
    assert updates[-1]["type"] == "failed"
    assert updates[-1]["code"] == "mock_failure"
    assert "failed after 2 tokens" in updates[-1]["message"]


async def test_cancel_ends_the_job_with_failed_cancelled(seed_server: SeedServer) -> None:
    """`cancel` stops a running job: its listeners get `failed` with message `cancelled`."""
    async with websockets.connect(seed_server.ws_url) as ws:
        await ws.send(json.dumps(mock_add(mock_tokens=500, mock_delay_ms=20)))
        job_id = (await recv(ws))["job_id"]
        await recv(ws)
        await ws.send(json.dumps({"type": "cancel", "job_id": job_id}))
        updates = await recv_until(ws, {"done", "failed"})
        assert updates[-1] == {**updates[-1], "type": "failed", "message": "cancelled"}
        assert len(updates) < 500
        await ws.send(json.dumps({"type": "cancel", "job_id": job_id}))
        again = await recv(ws)
    assert again["type"] == "failed"
    assert "already ended (cancelled)" in again["message"]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("{not json", {"type": "error", "message": "the message is not a JSON object"}),
        ('["add"]', {"type": "error", "message": "the message is not a JSON object"}),
        (
            '{"type": "remove"}',
            {
                "type": "error",
                "message": "unknown message type 'remove'; known types: add, listen, cancel",
            },
        ),
        ('{"id": "x"}', {"type": "error", "message": "unknown message type None"}),
        (
            '{"type": "add", "id": "a1"}',
            {
                "type": "failed",
                "id": "a1",
                "message": "invalid 'add' message: Object missing required field `assistant`",
            },
        ),
        (
            '{"type": "listen"}',
            {
                "type": "error",
                "message": "invalid 'listen' message: Object missing required field `job_id`",
            },
        ),
        (
            '{"type": "listen", "job_id": "1d3f7c9e-0000-4000-8000-000000000000"}',
            {
                "type": "failed",
                "job_id": "1d3f7c9e-0000-4000-8000-000000000000",
                "message": "unknown job (or it expired)",
            },
        ),
        (
            '{"type": "listen", "job_id": "a:b"}',
            {
                "type": "failed",
                "job_id": "a:b",
                "message": "invalid 'listen' message: Expected `str` matching regex",
            },
        ),
    ],
)
async def test_bad_messages_get_an_answer_and_the_connection_stays(
    seed_server: SeedServer, message: str, expected: dict[str, str]
) -> None:
    """Unreadable or invalid messages are answered with `error`/`failed`; the connection then
    still serves a valid `add`."""
    async with websockets.connect(seed_server.ws_url) as ws:
        await ws.send(message)
        reply = await recv(ws)
        assert {k: v for k, v in reply.items() if k != "message"} == {
            k: v for k, v in expected.items() if k != "message"
        }
        assert reply["message"].startswith(expected["message"])
        await ws.send(json.dumps(mock_add(mock_tokens=1)))
        assert (await recv(ws))["type"] == "resp_add"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"provider": "anthropic"}, "unknown provider 'anthropic'; known providers: mock, openai"),
        (
            {"settings": {"model": "gpt-9"}},
            "unknown model 'gpt-9'; known models: chatgpt, mock, backup",
        ),
        ({"settings": {}}, "a stream's settings need a `model`"),
        (
            {"settings": {"model": "mock", "temprature": 1}},
            "invalid stream settings: Object contains unknown field `temprature`",
        ),
        (
            {"messages": [{"insert": "everything"}]},
            'template message 0: only {"insert": "history"} exists',
        ),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "template message 0: Invalid enum value 'robot'",
        ),
    ],
)
async def test_an_add_that_cannot_run_is_failed_with_the_reason(
    seed_server: SeedServer, change: dict[str, Any], needle: str
) -> None:
    """Unknown provider or model, bad settings or template: `failed` naming the client's id."""
    add = mock_add()
    add["assistant"]["streams"][0].update(change)
    async with websockets.connect(seed_server.ws_url) as ws:
        await ws.send(json.dumps(add))
        reply = await recv(ws)
    assert reply["type"] == "failed"
    assert reply["id"] == "m1"
    assert needle in reply["message"]
