"""Seed 000's Redis-native interface: `summary_requests` and `question_requests` in,
`llm_results` out, for services that talk to Redis and not HTTP.

Each request stream is served by a `Worker` of its own with this module's decoder, so its
entries are read by the `workers` consumer group and get the chat requests' guarantees:
acknowledged only after the result is published, reclaimed from dead workers, dead-lettered
(to `<stream>:dead`) after `max_deliveries`. A request becomes a generation in the `reply`
mode, with a request id derived from its entry id (a redelivery is the same generation) and
a session of its own; `ReplyMode.settled` publishes the result once, whatever the number
of deliveries.

Request fields: `content` (required), `question` (question_requests only, required),
`model` (an alias such as `chatgpt`; default `BRIDGE_SEED_MODEL`), `request_id` (echoed;
default the entry id). Result fields: `request_id`, `type`, `model`, `upstream_model`,
`status` (completed, failed, cancelled), `result` (the text), `prompt_tokens`,
`completion_tokens`, `total_tokens`, and `error`/`error_code` when it failed.
"""

from __future__ import annotations

from typing import Any

import structlog
from redis.asyncio import Redis

from bridge.errors import BadRequest
from bridge.modes import Outcome, RunProvider
from bridge.providers.base import Message
from bridge.providers.registry import ProviderRegistry
from bridge.settings import Settings
from bridge.streams.answers import FINAL_STATUS, answer_text, generation_events, terminal_event
from bridge.streams.codec import EventType, now_ms
from bridge.streams.consumer import Delivery
from bridge.streams.jobs import GenerationJob
from bridge.streams.keys import Keys, check_id

log = structlog.get_logger("bridge.seed_requests")

SUMMARY_SYSTEM = "You are a helpful assistant that summarizes content concisely and accurately."
QUESTION_SYSTEM = (
    "You are a helpful assistant that answers questions about the provided content. "
    "Answer only from the content."
)

PUBLISH_SCRIPT = """
-- KEYS: generation hash, results stream. ARGV: maxlen, then field/value pairs.
-- Publishes at most once per generation (a redelivered request finds `published` set).
if redis.call('HSETNX', KEYS[1], 'published', '1') == 0 then return false end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
return redis.call(unpack(args))
"""


class SeedRequestDecoder:
    """Turns an entry of a seed request stream into a `reply` generation; never raises.

    A request that cannot be served (no content, unknown model, ...) still becomes a
    generation, one that fails at once, so its sender gets a `failed` result saying why.
    """

    def __init__(self, kind: str, providers: ProviderRegistry, settings: Settings) -> None:
        if kind not in ("summary", "question"):
            raise ValueError(f"unknown seed request kind {kind!r}")
        self.kind = kind
        self._providers = providers
        self._settings = settings

    def __call__(self, delivery: Delivery) -> GenerationJob:
        fields = {
            key.decode("utf-8", "replace"): value.decode("utf-8", "replace")
            for key, value in delivery.fields.items()
        }
        request_id = f"{self.kind}.{delivery.entry_id}"
        model = fields.get("model") or self._settings.seed_model
        meta = {
            "type": self.kind,
            "request_id": fields.get("request_id") or delivery.entry_id,
            "model": model,
        }
        try:
            model_id = check_id("model", model)
            meta["upstream_model"] = self._providers.resolve(model_id)[1]
            messages = self._messages(fields)
        except BadRequest as exc:
            meta["error"] = exc.detail
            model_id, messages = "none", ()
        return GenerationJob(
            request_id=request_id,
            session_id=f"seed.{request_id}",
            model_id=model_id,
            messages=messages,
            created_ms=now_ms(),
            mode="reply",
            meta=meta,
        )

    def _messages(self, fields: dict[str, str]) -> tuple[Message, ...]:
        content = fields.get("content", "")
        if not content.strip():
            raise BadRequest("the request has no `content`")
        if self.kind == "summary":
            system, user = SUMMARY_SYSTEM, "Please summarize the following content:\n\n" + content
        else:
            question = fields.get("question", "")
            if not question.strip():
                raise BadRequest("a question request needs a `question`")
            system = QUESTION_SYSTEM
            user = "Content:\n" + content + "\n\nQuestion: " + question
        if len(user) > self._settings.max_prompt_chars:
            limit = self._settings.max_prompt_chars
            raise BadRequest(f"the request holds {len(user)} characters; at most {limit} allowed")
        return (Message("system", system), Message("user", user))


class ReplyMode:
    """Runs seed-000 requests and publishes each result to the results stream once."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._publish = redis.register_script(PUBLISH_SCRIPT)

    async def run(self, job: GenerationJob, writer: Any, run_provider: RunProvider) -> Outcome:
        """A request the decoder marked bad fails at once; any other is a plain generation."""
        if "error" in job.meta:
            return EventType.ERROR, {"code": "bad_request", "message": job.meta["error"]}
        return await run_provider(job, writer)

    async def settled(self, job: GenerationJob) -> None:
        """Publish the result (text, usage, status) to the results stream, at most once."""
        events = await generation_events(self._redis, self._keys, job)
        terminal = terminal_event(events)
        if terminal is None:
            log.warning("seed_request_terminal_missing", request_id=job.request_id)
            return
        data = terminal.data or {}
        usage = data.get("usage") or {}
        fields = {
            "request_id": job.meta.get("request_id", job.request_id),
            "type": job.meta.get("type", ""),
            "model": job.meta.get("model", job.model_id),
            "upstream_model": job.meta.get("upstream_model", ""),
            "status": FINAL_STATUS[terminal.type],
            "result": answer_text(events),
            "prompt_tokens": int(usage.get("promptTokens", 0)),
            "completion_tokens": int(usage.get("completionTokens", 0)),
            "total_tokens": int(usage.get("totalTokens", 0)),
        }
        if terminal.type is EventType.ERROR:
            fields["error"] = str(data.get("message", ""))
            fields["error_code"] = str(data.get("code", "error"))
        args: list[Any] = [self._settings.stream_maxlen]
        for name, value in fields.items():
            args += [name, value]
        await self._publish(
            keys=[self._keys.generation(job.request_id), self._settings.results_stream], args=args
        )
