"""Hostile data inside Redis, and a service running open, through a real `bridge serve`.

Entries are written straight into the server's keys, as a buggy or hostile writer with Redis
access could: token text that looks like SSE framing, entries with unexpected or missing
fields, and session indexes naming models that are not safe ids.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from bridge.access import StreamTokens
from bridge.redis_select import make_client
from bridge.settings import Settings
from bridge.streams.codec import EventType, StreamEvent, to_fields
from bridge.streams.keys import Keys
from bridge.streams.processor import GenerationContext
from bridge.streams.producer import StreamProducer
from tests.servers import BridgeProcess, bridge_env, open_stream, serving

pytestmark = pytest.mark.integration

SECRET = b"test-secret"  # what bridge_env configures

HOSTILE_TEXT = [
    "a\nb",
    "\r",
    "\r\n\r\n",
    "data: injected\n\n",
    "event: complete\nid: mock:1-1\n\n",
    "\nretry: 1\n",
    ": comment\n",
    "\u2028\u2029\u0085",
    "\x00\x1b[2J",
    "🙂 e\u0301 \u202e",
    "\ufeffBOM",
    '\\n\\r"',
    "x" * 10_000,
]


@pytest.fixture(scope="module")
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture(scope="module")
def server(
    redis_url: str, prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    """One `bridge serve` with no API keys configured (open)."""
    env = bridge_env(redis_url, prefix)
    with serving(
        ["serve"], env, str(tmp_path_factory.mktemp("logs") / "open.log"), redis_url, prefix
    ) as process:
        yield process


@pytest.fixture
async def store(
    redis_url: str, settings: Settings, prefix: str
) -> AsyncIterator[tuple[aioredis.Redis, Keys]]:
    client = make_client(redis_url, settings)
    yield client, Keys(prefix)
    await client.aclose()


def stream_url(server: BridgeProcess, session: str) -> str:
    token = StreamTokens([SECRET], ttl_s=600).issue(session)
    return f"{server.base_url}/api/sse/stream/{session}?token={token}"


def new_session() -> str:
    return f"s_{uuid.uuid4().hex[:10]}"


def entry(kind: str, seq: int, content: str = "", **data: object) -> dict[str, str]:
    event = StreamEvent(EventType(kind), "r1", seq, 1.0, content=content, data=data or None)
    fields = to_fields(event)
    return dict(zip(fields[::2], fields[1::2], strict=True))


async def test_the_open_service_says_so_loudly_and_works_without_keys(
    server: BridgeProcess,
) -> None:
    """With no API keys the start-up log warns that the service is open; chat/start needs no
    key, and reads still need the stream token."""
    warnings = [
        json.loads(line)
        for line in server.log().splitlines()
        if "running_open_without_api_keys" in line
    ]
    assert len(warnings) == 1
    assert warnings[0]["level"] == "warning"
    assert "BRIDGE_API_KEYS" in warnings[0]["detail"]
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        body = {"sessionId": new_session(), "modelId": "mock", "prompt": "hi"}
        response = await http.post("/api/chat/start", json=body)
        assert response.status_code == 202
        assert (await http.get(f"/api/sse/stream/{body['sessionId']}")).status_code == 401


async def test_token_text_that_looks_like_sse_framing_arrives_intact(
    server: BridgeProcess, store: tuple[aioredis.Redis, Keys], settings: Settings
) -> None:
    """Tokens holding newlines, CRs, `data:`/`event:`/`id:` lines, BOMs and control bytes are
    delivered as exactly those strings, one event each, over a real SSE connection."""
    redis, keys = store
    session = new_session()
    await redis.hset(keys.generation("r1"), mapping={"epoch": 1, "status": "running", "seq": 0})
    await redis.xadd(keys.session_index(session), {"m": "mock", "r": "r1"})
    producer = StreamProducer(
        redis, keys, msgspec.structs.replace(settings, key_prefix=keys.prefix)
    )
    writer = producer.writer(GenerationContext(session, "mock", "r1", "w", 1))
    for text in HOSTILE_TEXT:
        await writer.token(text)
    await writer.finish(EventType.COMPLETE, {"finishReason": "stop"})
    async with open_stream(stream_url(server, session)) as tab:
        await tab.wait_terminal()
    contents = [json.loads(e.data)["content"] for e in tab.events if e.event == "token"]
    assert contents == HOSTILE_TEXT
    assert [e.event for e in tab.events] == ["token"] * len(HOSTILE_TEXT) + ["complete"]
    assert tab.parser.retry_ms == settings.sse_retry_ms  # no token text reset it


async def announce(redis: aioredis.Redis, keys: Keys, session: str, model: str) -> None:
    """Publish on the session's channel what no append script would: unreadable messages,
    then one whose `prev` lies past everything written, so the live reader must read the
    stream itself to deliver the entries the test wrote."""
    channel = keys.live_channel(session)
    far = 2**62
    for hostile in (
        b"",
        b"x",
        b"a:b\n0-0\n1\n1-1\n[]",
        b"\xff\xfe",
        f"{model}\n0-0\nx\n1-1\n[]".encode(),
        f"{model}\n0-0\n9\n{far}-0\n[[1]]".encode(),
    ):
        await redis.publish(channel, hostile)
    await redis.publish(channel, f"{model}\n{far}-0\n1\n{far}-1\n[]".encode())


async def fanout_restarts(server: BridgeProcess) -> int:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        report = (await http.get("/health")).json()
    restarts: int = report["tasks"]["fanout-reader"]["restarts"]
    return restarts


async def test_entries_with_unexpected_or_missing_fields_are_skipped(
    server: BridgeProcess, store: tuple[aioredis.Redis, Keys]
) -> None:
    """Catch-up and live delivery skip undecodable entries, ignore extra fields, and keep
    going: the reader delivers everything decodable and never restarts."""
    redis, keys = store
    session = new_session()
    key = keys.stream(session, "mock")
    await redis.xadd(keys.session_index(session), {"m": "mock", "r": "r1"})
    bad: list[dict[str, str | bytes]] = [
        {"t": "bogus", "r": "r1", "s": "2", "ts": "1"},
        {"t": "token", "r": "r1"},
        {"t": "token", "r": "r1", "s": "x", "ts": "1"},
        {"t": "token", "r": "r1", "s": "2", "ts": "1", "c": b"\xff\xfe"},
        {"t": "error", "r": "r1", "s": "2", "ts": "1", "d": "[1, 2]"},
        {"t": "error", "r": "r1", "s": "2", "ts": "1", "d": "{not json"},
        {"x": "y"},
    ]
    await redis.xadd(key, {**entry("token", 1, "one"), "extra": "ignored", "t2": "x"})
    for fields in bad:
        await redis.xadd(key, fields)  # type: ignore[arg-type]
    before = await fanout_restarts(server)
    async with open_stream(stream_url(server, session)) as tab:
        await tab.wait_for(lambda events: any(e.event == "token" for e in events))
        for fields in bad:
            await redis.xadd(key, fields)  # type: ignore[arg-type]
        await redis.xadd(key, entry("token", 2, "two"))
        await redis.xadd(key, entry("complete", 3, finishReason="stop"))
        await announce(redis, keys, session, "mock")
        await tab.wait_terminal()
    contents = [json.loads(e.data)["content"] for e in tab.events if e.event == "token"]
    assert contents == ["one", "two"]
    assert await fanout_restarts(server) == before


@pytest.mark.parametrize("model", [b"\xff\xfe", b"a:b", b"a,b", b"*", b"", b"..", b"x" * 200])
async def test_unsafe_model_names_in_a_session_index_are_ignored(
    server: BridgeProcess, store: tuple[aioredis.Redis, Keys], model: bytes
) -> None:
    """A session index naming a model that is not a safe id (bad UTF-8, separators, globs)
    breaks neither catch-up nor the live reader; the real model's events still arrive."""
    redis, keys = store
    session = new_session()
    index = keys.session_index(session)
    await redis.xadd(index, {"m": model, "r": "r0"})
    await redis.xadd(index, {"m": "mock", "r": "r1"})
    await redis.xadd(keys.stream(session, "mock"), entry("token", 1, "one"))
    before = await fanout_restarts(server)
    async with open_stream(stream_url(server, session)) as tab:
        await tab.wait_for(lambda events: any(e.event == "token" for e in events))
        await redis.xadd(index, {"m": model, "r": "r2"})
        # the live reader meets it in a message
        await redis.publish(keys.live_channel(session), model + b"\n0-0\n1\n1-1\n[]")
        await redis.xadd(keys.stream(session, "mock"), entry("token", 2, "two"))
        await redis.xadd(keys.stream(session, "mock"), entry("complete", 3, finishReason="stop"))
        await announce(redis, keys, session, "mock")
        await tab.wait_terminal()
    assert tab.status == 200
    contents = [json.loads(e.data)["content"] for e in tab.events if e.event == "token"]
    assert contents == ["one", "two"]
    assert all(e.id.startswith("mock:") for e in tab.events if e.event == "token")
    assert await fanout_restarts(server) == before
