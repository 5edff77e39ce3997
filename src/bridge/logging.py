"""structlog set-up: JSON lines in production, readable console output on a terminal.

Every log line, bridge's own and the libraries' (uvicorn, redis, httpx) that go through the
standard `logging` module, passes the same chain: context bound with
`structlog.contextvars` (`http_request_id`, `session_id`, `request_id` of the generation,
`connection_id`), level, logger name, UTC timestamp, then `Redactor`, then the renderer.
bridge's own lines are rendered by structlog and written straight to the stream; only the
libraries' pass through `logging`'s handler (two fifths of a line's cost, measured, went to the
handler's machinery: an access line fell from 25 to 15 us).

What is never logged: provider keys and stream secrets (their values are scrubbed from every
string, tracebacks included), credential-like fields, and prompts unless `BRIDGE_LOG_PROMPTS`
is on. Streaming routes log one line per connection, never one per chunk, and no bodies.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

REDACTED = "[redacted]"
OMITTED = "[omitted]"
#: fields whose value is a credential whatever it holds
SECRET_FIELDS = frozenset(
    {"api_key", "authorization", "password", "secret", "stream_secret", "token", "stream_token"}
)
#: fields holding what users wrote to the model: logged only with BRIDGE_LOG_PROMPTS
PROMPT_FIELDS = frozenset({"prompt", "messages"})
_MIN_SECRET_CHARS = 8  # shorter values would scrub innocent text
_NOISY_LIBRARIES = ("httpx", "httpcore", "asyncio")


class Redactor:
    """A structlog processor that keeps credentials and (by default) prompts out of logs."""

    def __init__(self, secrets: Iterable[str] = (), *, log_prompts: bool = False) -> None:
        self._secrets = tuple(s for s in secrets if len(s) >= _MIN_SECRET_CHARS)
        self._log_prompts = log_prompts

    def __call__(self, _logger: Any, _method: str, event_dict: EventDict) -> EventDict:
        for key, value in event_dict.items():
            if key in SECRET_FIELDS:
                event_dict[key] = REDACTED
            elif key in PROMPT_FIELDS and not self._log_prompts:
                event_dict[key] = OMITTED
            elif self._secrets and isinstance(value, str):
                event_dict[key] = self.scrub(value)
        return event_dict

    def scrub(self, text: str) -> str:
        """`text` with every configured secret replaced by `[redacted]`."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text


class _NamedWriter(structlog.WriteLogger):
    """structlog's direct writer, with the name `add_logger_name` reads."""

    def __init__(self, file: TextIO, name: str) -> None:
        super().__init__(file)
        self.name = name


def use_console(log_format: str, stream: Any = None) -> bool:
    """Console output for `console`, JSON for `json`; `auto` picks console on a terminal."""
    if log_format != "auto":
        return log_format == "console"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def configure_logging(
    log_format: str = "auto",
    level: str = "info",
    *,
    secrets: Iterable[str] = (),
    log_prompts: bool = False,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and the standard `logging` root logger to write to `stream`.

    `log_format` is auto, json or console; `secrets` are values scrubbed from every line;
    `stream` defaults to stderr.
    """
    stream = sys.stderr if stream is None else stream
    console = use_console(log_format, stream)
    numeric_level = logging.getLevelName(level.upper())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Processor] = [Redactor(secrets, log_prompts=log_prompts)]
    if console:
        tail.append(structlog.dev.ConsoleRenderer())
    else:
        tail = [structlog.processors.format_exc_info, *tail, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[*shared, structlog.processors.StackInfoRenderer(), *tail],
        logger_factory=lambda name="", *_: _NamedWriter(stream, name),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(max(numeric_level, logging.WARNING))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers = []
        uvicorn_logger.propagate = True
