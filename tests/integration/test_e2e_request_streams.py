"""Seed 000's Redis request streams end to end: entries in, `llm_results` out, through a real
`bridge serve` process, with nothing but Redis between the test and the bridge."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from bridge.providers.mock import mock_answer
from bridge.streams.seed_requests import QUESTION_SYSTEM, SUMMARY_SYSTEM
from tests.seed_server import SeedServer, seed_server

pytestmark = pytest.mark.integration
__all__ = ["seed_server"]

CONTENT = "Redis Streams are an append-only log with consumer groups."


async def read_result(
    redis: aioredis.Redis, stream: str, request_id: str, timeout: float = 30.0
) -> dict[str, str]:
    """Block on the results stream until the result for `request_id` arrives."""
    return await read_entry(redis, stream, "request_id", request_id, timeout)


async def read_entry(
    redis: aioredis.Redis, stream: str, field: str, value: str, timeout: float = 30.0
) -> dict[str, str]:
    """Block on `stream` until an entry whose `field` is `value` arrives; return its fields."""
    deadline = time.monotonic() + timeout
    position = "0-0"
    while time.monotonic() < deadline:
        reply: Any = await redis.xread({stream: position}, count=100, block=1000)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                position = entry_id
                decoded = {k.decode(): v.decode() for k, v in fields.items()}
                if decoded.get(field) == value:
                    return decoded
    raise TimeoutError(f"no entry with {field}={value!r} on {stream} in {timeout} s")


def words(*texts: str) -> int:
    return sum(len(text.split()) for text in texts)


async def test_a_summary_request_is_answered_on_llm_results(seed_server: SeedServer) -> None:
    """`summary_requests` entry -> `llm_results` entry with the request id, model, text and
    usage (prompt, completion, total tokens)."""
    async with seed_server.redis() as redis:
        await redis.xadd(
            seed_server.stream("summary_requests"),
            {"request_id": "sum-1", "content": CONTENT, "model": "chatgpt"},
        )
        result = await read_result(redis, seed_server.stream("llm_results"), "sum-1")
    prompt = words(SUMMARY_SYSTEM, "Please summarize the following content:", CONTENT)
    assert result == {
        "request_id": "sum-1",
        "type": "summary",
        "model": "chatgpt",
        "upstream_model": "gpt-4o",
        "status": "completed",
        "result": mock_answer(24),
        "prompt_tokens": str(prompt),
        "completion_tokens": "24",
        "total_tokens": str(prompt + 24),
    }


async def test_a_question_request_uses_the_default_model(seed_server: SeedServer) -> None:
    """`question_requests` entry without a model: answered by BRIDGE_SEED_MODEL (chatgpt)."""
    async with seed_server.redis() as redis:
        await redis.xadd(
            seed_server.stream("question_requests"),
            {"request_id": "q-1", "content": CONTENT, "question": "What are they?"},
        )
        result = await read_result(redis, seed_server.stream("llm_results"), "q-1")
    assert result["type"] == "question"
    assert result["model"] == "chatgpt"
    assert result["status"] == "completed"
    assert result["result"] == mock_answer(24)
    prompt = words(QUESTION_SYSTEM, "Content:", CONTENT, "Question: What are they?")
    assert result["prompt_tokens"] == str(prompt)


@pytest.mark.parametrize(
    ("stream", "fields", "error"),
    [
        ("question_requests", {"content": CONTENT}, "a question request needs a `question`"),
        ("summary_requests", {"content": " "}, "the request has no `content`"),
        ("summary_requests", {"content": CONTENT, "model": "gpt-9"}, "unknown model 'gpt-9'"),
        ("summary_requests", {"content": CONTENT, "model": "a:b"}, "model must match"),
    ],
)
async def test_a_bad_request_gets_a_failed_result_saying_why(
    seed_server: SeedServer, stream: str, fields: dict[str, str], error: str
) -> None:
    """A request that cannot run is answered `failed` with the reason; without `request_id`
    the entry id stands in for it."""
    async with seed_server.redis() as redis:
        entry_id = (await redis.xadd(seed_server.stream(stream), fields)).decode()
        result = await read_result(redis, seed_server.stream("llm_results"), entry_id)
    assert result["status"] == "failed"
    assert result["error_code"] == "bad_request"
    assert error in result["error"]
    assert result["result"] == ""
    assert result["total_tokens"] == "0"


async def deliver_to_a_dead_consumer(
    redis: aioredis.Redis, stream: str, fields: dict[str, str], retries: int = 0
) -> str:
    """Add an entry and hand it, in the same transaction, to a consumer that will never ack."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xadd(stream, fields)
        pipe.xreadgroup("workers", "ghost", {stream: ">"}, count=1)
        added, _ = await pipe.execute()
    entry_id: str = added.decode()
    if retries:
        await redis.xclaim(stream, "workers", "ghost-2", 0, [entry_id], retrycount=retries)
    return entry_id


async def test_a_request_held_by_a_dead_worker_is_reclaimed(seed_server: SeedServer) -> None:
    """An entry delivered to a worker that died is reclaimed after the idle time and answered."""
    stream = seed_server.stream("summary_requests")
    async with seed_server.redis() as redis:
        await deliver_to_a_dead_consumer(
            redis, stream, {"request_id": "orphan-1", "content": CONTENT}
        )
        result = await read_result(redis, seed_server.stream("llm_results"), "orphan-1")
        pending = await redis.xpending_range(stream, "workers", "-", "+", 10, consumername="ghost")
    assert result["status"] == "completed"
    assert result["result"] == mock_answer(24)
    assert pending == []


async def test_a_request_delivered_too_often_is_dead_lettered(seed_server: SeedServer) -> None:
    """Past BRIDGE_MAX_DELIVERIES the entry moves to `<stream>:dead` and the sender gets a
    `failed` result saying so."""
    stream = seed_server.stream("summary_requests")
    async with seed_server.redis() as redis:
        entry_id = await deliver_to_a_dead_consumer(
            redis, stream, {"request_id": "poison-1", "content": CONTENT}, retries=3
        )
        result = await read_result(redis, seed_server.stream("llm_results"), "poison-1")
        dead = await read_entry(redis, f"{stream}:dead", "origin_id", entry_id)
    assert result["status"] == "failed"
    assert result["error_code"] == "max_deliveries"
    assert dead["dead_reason"] == "max_deliveries"
    assert dead["request_id"] == "poison-1"
    assert dead["content"] == CONTENT
