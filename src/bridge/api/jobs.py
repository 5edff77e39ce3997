"""The job API of seed 003: submit text, poll status, fetch the validated structured result.

Field names are the seed's (snake_case). The job id is the capability to read a job (see
DESIGN.md, "Access"), so these routes take no stream token.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post
from litestar.exceptions import ServiceUnavailableException
from litestar.params import HeaderParameter, QueryParameter

from bridge.api.schemas import GenerationParams, Id
from bridge.auth import principal
from bridge.connections.sse import SSEResponse, SSEStream
from bridge.errors import BadRequest
from bridge.jobs.store import JobStatus, JobStore, session_of
from bridge.runtime import Runtime
from bridge.streams.codec import parse_cursor
from bridge.streams.history import replay
from bridge.streams.keys import check_id

Text = Annotated[str, msgspec.Meta(min_length=1, description="Free-form user text")]


class LLMInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`POST /llm/submit`: the text to structure; `model` and `params` are optional."""

    text: Text
    model: Id | None = None
    params: GenerationParams | None = None


class BatchInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`POST /llm/submit/batch`: one job per text."""

    texts: Annotated[list[Text], msgspec.Meta(min_length=1)]
    model: Id | None = None
    params: GenerationParams | None = None


class SubmitResponse(msgspec.Struct, frozen=True):
    job_id: str


class BatchResponse(msgspec.Struct, frozen=True):
    job_ids: list[str]


class CancelResponse(msgspec.Struct, frozen=True):
    job_id: str
    status: str


CAPABILITY = {"auth": "capability"}  # the job id, minted at random, is the right to read it

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(name="Idempotency-Key", required=False, max_length=256),
]


class JobController(Controller):
    """Structured-output jobs."""

    path = "/llm"
    tags = ["jobs"]

    @post("/submit", status_code=200, summary="Queue a job that structures the text")
    async def submit(
        self,
        data: LLMInput,
        runtime: Runtime,
        request: Request[Any, Any, Any],
        idempotency_key: IdempotencyKey = None,
    ) -> SubmitResponse:
        ids = await _submit(runtime, request, [data.text], data, idempotency_key)
        return SubmitResponse(job_id=ids[0])

    @post("/submit/batch", status_code=200, summary="Queue one job per text")
    async def submit_batch(
        self,
        data: BatchInput,
        runtime: Runtime,
        request: Request[Any, Any, Any],
        idempotency_key: IdempotencyKey = None,
    ) -> BatchResponse:
        if len(data.texts) > runtime.settings.job_max_batch:
            limit = runtime.settings.job_max_batch
            raise BadRequest(f"at most {limit} texts per batch", status_code=413)
        ids = await _submit(runtime, request, data.texts, data, idempotency_key)
        return BatchResponse(job_ids=ids)

    @get("/status/{job_id:str}", summary="The job's status and stage", opt=CAPABILITY)
    async def status(self, job_id: str, runtime: Runtime) -> JobStatus:
        return await _store(runtime).status(check_id("job_id", job_id))

    @get(
        "/result/{job_id:str}", summary="The validated result (404 until completed)", opt=CAPABILITY
    )
    async def result(self, job_id: str, runtime: Runtime) -> dict[str, Any]:
        job_id = check_id("job_id", job_id)
        return {"job_id": job_id, "result": await _store(runtime).result(job_id)}

    @post("/cancel/{job_id:str}", status_code=202, summary="Stop a queued or running job")
    async def cancel(self, job_id: str, runtime: Runtime) -> CancelResponse:
        job_id = check_id("job_id", job_id)
        return CancelResponse(job_id=job_id, status=await _store(runtime).cancel(job_id))

    @get(
        "/stream/{job_id:str}",
        media_type="text/event-stream",
        summary="The job's progress as Server-Sent Events (resumable)",
        opt=CAPABILITY,
    )
    async def stream(
        self,
        job_id: str,
        request: Request[Any, Any, Any],
        runtime: Runtime,
        last_event_id: Annotated[str | None, QueryParameter(name="last_event_id")] = None,
    ) -> SSEResponse:
        job_id = check_id("job_id", job_id)
        await _store(runtime).status(job_id)  # 404 for unknown jobs
        cursor = parse_cursor(request.headers.get("last-event-id") or last_event_id or "")
        session = session_of(job_id)
        address = request.client.host if request.client else None
        sub = await runtime.manager.connect(session, cursor, address=address)
        return SSEResponse(
            SSEStream(
                sub=sub,
                manager=runtime.manager,
                history=partial(replay, runtime.redis, runtime.keys, session),
                heartbeat_s=runtime.settings.sse_heartbeat_s,
                retry_ms=runtime.settings.sse_retry_ms,
            )
        )


def _store(runtime: Runtime) -> JobStore:
    return JobStore(runtime.redis, runtime.keys, runtime.settings)


async def _submit(
    runtime: Runtime,
    request: Request[Any, Any, Any],
    texts: list[str],
    body: LLMInput | BatchInput,
    idempotency_key: str | None,
) -> list[str]:
    if runtime.stopping:
        raise ServiceUnavailableException("this process is shutting down")
    limit = runtime.settings.max_prompt_chars
    for text in texts:
        if len(text) > limit:
            raise BadRequest(
                f"a text holds {len(text)} characters; at most {limit} are allowed",
                status_code=413,
            )
    model = body.model or runtime.settings.job_model
    runtime.providers.resolve(model)  # unknown model: 400 naming the known ones
    return await _store(runtime).submit(
        texts,
        model=model,
        params=body.params.for_provider() if body.params else {},
        idempotency_key=idempotency_key,
        body=msgspec.json.encode(body),
        tenant=principal(request),
        limits=runtime.limits,
    )
