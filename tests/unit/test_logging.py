"""structlog set-up: JSON or console output, bound context, and what is never logged."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from bridge.logging import OMITTED, REDACTED, Redactor, configure_logging, use_console

SECRET = "sk-live-abcdefghijklmnop"


@pytest.fixture
def stderr() -> Iterator[io.StringIO]:
    """A stream for the logging output; the global configuration is restored after."""
    buffer = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield buffer
    finally:
        root.handlers, root.level = handlers, level
        structlog.reset_defaults()
        structlog.contextvars.clear_contextvars()


def lines(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_json_lines_carry_context_level_logger_and_time(stderr: io.StringIO) -> None:
    """In JSON mode every line, bridge's and the standard library's, is one JSON object."""
    configure_logging("json", "info", stream=stderr)
    structlog.contextvars.bind_contextvars(http_request_id="r1", session_id="s1")
    structlog.get_logger("bridge.unit").info("something_happened", count=3)
    logging.getLogger("uvicorn.error").warning("from the stdlib %s", "logger")
    first, second = lines(stderr)
    assert first["event"] == "something_happened"
    assert first["count"] == 3
    assert first["http_request_id"] == "r1"
    assert first["session_id"] == "s1"
    assert first["level"] == "info"
    assert first["logger"] == "bridge.unit"
    assert str(first["timestamp"]).endswith("Z")
    assert second["event"] == "from the stdlib logger"
    assert second["logger"] == "uvicorn.error"
    assert second["session_id"] == "s1"


def test_the_level_filters_bridge_and_library_lines(stderr: io.StringIO) -> None:
    """Below the configured level nothing is written."""
    configure_logging("json", "warning", stream=stderr)
    structlog.get_logger("bridge.unit").info("quiet")
    logging.getLogger("some.library").info("quiet too")
    structlog.get_logger("bridge.unit").warning("loud")
    assert [line["event"] for line in lines(stderr)] == ["loud"]


def test_secrets_never_reach_the_output_even_in_tracebacks(stderr: io.StringIO) -> None:
    """A configured secret is scrubbed from messages, fields and formatted exceptions."""
    configure_logging("json", "info", secrets=[SECRET], stream=stderr)
    log = structlog.get_logger("bridge.unit")
    try:
        raise RuntimeError(f"upstream said: bad key {SECRET}")
    except RuntimeError:
        log.exception("call_failed", detail=f"key={SECRET}", api_key=SECRET)
    logging.getLogger("httpx").error("header Bearer %s", SECRET)
    output = stderr.getvalue()
    assert SECRET not in output
    first = lines(stderr)[0]
    assert first["api_key"] == REDACTED
    assert first["detail"] == f"key={REDACTED}"
    assert "RuntimeError" in str(first["exception"])


def test_prompts_are_omitted_unless_opted_in() -> None:
    """`prompt`/`messages` fields are replaced unless BRIDGE_LOG_PROMPTS is on."""
    event = {"event": "x", "prompt": "my question", "messages": [{"content": "q"}]}
    hidden = Redactor()(None, "info", dict(event))
    assert hidden["prompt"] == OMITTED
    assert hidden["messages"] == OMITTED
    shown = Redactor(log_prompts=True)(None, "info", dict(event))
    assert shown["prompt"] == "my question"


def test_short_secrets_are_not_used_for_scrubbing() -> None:
    """A secret too short to be one would scrub innocent text: it is ignored."""
    assert Redactor(["abc"]).scrub("abcdef") == "abcdef"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_output_is_chosen_on_a_terminal_and_can_be_forced() -> None:
    """auto: console on a TTY, JSON otherwise; json/console override the detection."""
    assert use_console("auto", _Terminal())
    assert not use_console("auto", io.StringIO())
    assert not use_console("json", _Terminal())
    assert use_console("console", io.StringIO())


def test_console_mode_renders_readable_lines(stderr: io.StringIO) -> None:
    """Console mode writes human-readable key=value lines, not JSON."""
    configure_logging("console", "info", secrets=[SECRET], stream=stderr)
    structlog.get_logger("bridge.unit").info("readable", token=SECRET, where=SECRET)
    output = stderr.getvalue()
    assert "readable" in output
    assert SECRET not in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output.splitlines()[0])


def test_capture_logs_sees_bound_context() -> None:
    """Tests can assert on log events, context included, with capture_logs."""
    structlog.contextvars.bind_contextvars(connection_id="sse_1")
    try:
        with capture_logs([structlog.contextvars.merge_contextvars]) as logs:
            structlog.get_logger("bridge.unit").info("sse_closed", reason="shutdown")
    finally:
        structlog.contextvars.clear_contextvars()
    assert logs == [
        {"event": "sse_closed", "reason": "shutdown", "connection_id": "sse_1", "log_level": "info"}
    ]
