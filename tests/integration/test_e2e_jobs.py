"""Seed 003's job API end to end, through a real `bridge serve` process."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.seed_server import SeedServer, seed_server
from tests.servers import StreamReader, payloads

pytestmark = pytest.mark.integration
__all__ = ["seed_server"]

SEED_TEXT = "I loved the clinic. Dr. Rao was kind. Waiting time was 10 minutes."
HEX_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
async def api(seed_server: SeedServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=seed_server.base_url, timeout=10) as http:
        yield http


async def submit(api: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> str:
    response = await api.post("/llm/submit", json=body, headers=headers)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


async def finished(seed_server: SeedServer, job_id: str, timeout: float = 30.0) -> StreamReader:
    """Follow the job's SSE progress until its terminal event."""
    reader = StreamReader(f"{seed_server.base_url}/llm/stream/{job_id}")
    async with reader:
        await reader.wait_terminal(timeout=timeout)
    return reader


async def test_the_seed_example_submit_status_result(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """The seed's three curl calls: submit -> {job_id}; status -> {job_id, status, stage};
    result -> {job_id, result} with a validated summary, sentiment, tags and entities."""
    response = await api.post("/llm/submit", json={"text": SEED_TEXT})
    assert response.status_code == 200
    assert list(response.json()) == ["job_id"]
    job_id = response.json()["job_id"]
    assert HEX_ID.match(job_id)
    early = (await api.get(f"/llm/status/{job_id}")).json()
    assert early["job_id"] == job_id
    assert early["status"] in {"queued", "in_progress", "completed"}
    assert "stage" in early
    progress = await finished(seed_server, job_id)
    status = await api.get(f"/llm/status/{job_id}")
    assert status.status_code == 200
    assert status.json() == {
        "job_id": job_id,
        "status": "completed",
        "stage": "done",
        "attempts": 1,
    }
    result = await api.get(f"/llm/result/{job_id}")
    assert result.status_code == 200
    body = result.json()
    assert list(body) == ["job_id", "result"]
    assert body["job_id"] == job_id
    structured = body["result"]
    assert structured["summary"] == SEED_TEXT
    assert structured["sentiment"] == "positive"
    assert 1 <= len(structured["tags"]) <= 5
    assert "clinic" in structured["tags"]
    assert structured["entities"] == [{"type": "person", "value": "Dr. Rao", "confidence": 0.9}]
    complete = payloads(progress.events, "complete")[0]
    assert complete["result"] == structured
    text = "".join(p["content"] for p in payloads(progress.events))
    assert json.loads(text) == structured


async def test_stages_are_reported_while_the_model_answers(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """While tokens stream the job is `in_progress` at stage `calling_llm`."""
    job_id = await submit(api, {"text": SEED_TEXT, "params": {"mockDelayMs": 150}})
    async with StreamReader(f"{seed_server.base_url}/llm/stream/{job_id}") as reader:
        await reader.wait_for(lambda events: any(e.event == "token" for e in events))
        during = (await api.get(f"/llm/status/{job_id}")).json()
        await reader.wait_terminal(timeout=60)
    assert during == {
        "job_id": job_id,
        "status": "in_progress",
        "stage": "calling_llm",
        "attempts": 1,
    }


async def test_invalid_output_is_reasked_with_the_validation_error(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """A first answer that fails validation is re-asked; the SSE stream shows a retry seam."""
    job_id = await submit(api, {"text": SEED_TEXT, "params": {"mockInvalidOutputs": 1}})
    progress = await finished(seed_server, job_id)
    seam = payloads(progress.events, "seam")
    assert len(seam) == 1
    assert seam[0]["mode"] == "retry"
    assert seam[0]["attempt"] == 2
    assert "Invalid enum value 'ecstatic'" in seam[0]["reason"]
    status = (await api.get(f"/llm/status/{job_id}")).json()
    assert status["status"] == "completed"
    assert status["attempts"] == 2
    assert (await api.get(f"/llm/result/{job_id}")).json()["result"]["sentiment"] == "positive"


async def test_output_still_invalid_after_the_retry_limit_fails_with_the_reason(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """Three invalid answers (the limit): `failed`, with the last validation error as reason."""
    job_id = await submit(api, {"text": SEED_TEXT, "params": {"mockInvalidOutputs": 5}})
    progress = await finished(seed_server, job_id)
    assert len(payloads(progress.events, "seam")) == 2
    error = payloads(progress.events, "error")[0]
    assert error["code"] == "invalid_output"
    status = (await api.get(f"/llm/status/{job_id}")).json()
    assert status["status"] == "failed"
    assert status["attempts"] == 3
    assert status["error"].startswith("the output failed validation 3 times; last: ")
    assert "$.sentiment" in status["error"]
    result = await api.get(f"/llm/result/{job_id}")
    assert result.status_code == 404
    assert "status=failed" in result.json()["detail"]


async def test_idempotency_key(api: httpx.AsyncClient) -> None:
    """Same key and body: the same job; same key, other body: 409; no key: a new job."""
    key = {"Idempotency-Key": f"key-{uuid.uuid4()}"}
    first = await submit(api, {"text": "one"}, **key)
    assert await submit(api, {"text": "one"}, **key) == first
    conflict = await api.post("/llm/submit", json={"text": "two"}, headers=key)
    assert conflict.status_code == 409
    assert conflict.headers["content-type"].startswith("application/problem+json")
    assert "different body" in conflict.json()["detail"]
    assert await submit(api, {"text": "one"}) != first


async def test_batch_submit_queues_one_job_per_text(
    api: httpx.AsyncClient, seed_server: SeedServer
) -> None:
    """An array of texts gives one job id per text, in order, each with its own result."""
    texts = ["The food was great.", "The wait was terrible.", "It is a building."]
    response = await api.post("/llm/submit/batch", json={"texts": texts})
    assert response.status_code == 200
    job_ids = response.json()["job_ids"]
    assert len(set(job_ids)) == 3
    sentiments = []
    for job_id, text in zip(job_ids, texts, strict=True):
        await finished(seed_server, job_id)
        result = (await api.get(f"/llm/result/{job_id}")).json()["result"]
        assert result["summary"] == text
        sentiments.append(result["sentiment"])
    assert sentiments == ["positive", "negative", "neutral"]


async def test_cancel_a_running_job(api: httpx.AsyncClient, seed_server: SeedServer) -> None:
    """Cancel stops a running job: `cancelled` status, no result; cancelling again is 409."""
    job_id = await submit(api, {"text": SEED_TEXT, "params": {"mockDelayMs": 200}})
    async with StreamReader(f"{seed_server.base_url}/llm/stream/{job_id}") as reader:
        await reader.wait_for(lambda events: any(e.event == "token" for e in events))
        cancel = await api.post(f"/llm/cancel/{job_id}")
        assert cancel.status_code == 202
        assert cancel.json() == {"job_id": job_id, "status": "cancelling"}
        await reader.wait_terminal()
    assert reader.events[-1].event == "cancelled"
    status = (await api.get(f"/llm/status/{job_id}")).json()
    assert status["status"] == "cancelled"
    again = await api.post(f"/llm/cancel/{job_id}")
    assert again.status_code == 409
    assert again.json()["detail"] == "the job already ended: cancelled"
    assert (await api.get(f"/llm/result/{job_id}")).status_code == 404


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/llm/status/0123456789abcdef0123456789abcdef"),
        ("GET", "/llm/result/0123456789abcdef0123456789abcdef"),
        ("POST", "/llm/cancel/0123456789abcdef0123456789abcdef"),
        ("GET", "/llm/stream/0123456789abcdef0123456789abcdef"),
    ],
)
async def test_unknown_jobs_are_404(api: httpx.AsyncClient, method: str, path: str) -> None:
    """Every route answers 404 problem+json for a job id it does not know."""
    response = await api.request(method, path)
    assert response.status_code == 404
    assert response.json()["detail"] == "job 0123456789abcdef0123456789abcdef not found"


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/llm/submit", {}, 400, "text"),
        ("/llm/submit", {"text": ""}, 400, "text"),
        ("/llm/submit", {"text": 5}, 400, "text"),
        ("/llm/submit", {"text": "x", "model": "gpt-9"}, 400, "known models"),
        ("/llm/submit", {"text": "x", "extra": 1}, 400, "extra"),
        ("/llm/submit", {"text": "x" * 40_000}, 413, "at most 32000"),
        ("/llm/submit/batch", {"texts": []}, 400, "texts"),
        ("/llm/submit/batch", {"texts": ["x"] * 101}, 413, "at most 100 texts"),
    ],
)
async def test_bad_submissions_are_rejected(
    api: httpx.AsyncClient, path: str, body: dict[str, Any], status: int, needle: str
) -> None:
    """Invalid bodies get a problem+json 4xx naming the problem."""
    response = await api.post(path, json=body)
    assert response.status_code == status, response.text
    assert needle in response.text


async def test_a_malformed_job_id_is_400(api: httpx.AsyncClient) -> None:
    """Ids that could not be keys are rejected before touching Redis."""
    response = await api.get("/llm/status/a:b")
    assert response.status_code == 400
    assert "job_id must match" in response.json()["detail"]
