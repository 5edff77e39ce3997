"""A fake OpenAI-compatible streaming server on loopback, on raw asyncio with no dependencies.

In-process::

    async with FakeUpstream(port=0, tokens=5) as up:
        OpenAIProvider(up.base_url, ...)   # up.requests records what it received

As a process (prints ``READY <base_url>`` once listening, stops on SIGTERM/SIGINT)::

    python -m tests.fakes.openai_upstream --port 8600 --tokens 64 --delay-ms 5

``POST /v1/chat/completions`` with ``"stream": true`` streams one chunk per token (text
``f"t{i} "``, each with the write time in ``bridge_ts``), a chunk with the finish reason, a
usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``. Each
request may change that through `Behaviour` fields, given either in the model name as a
query (``"gpt?tokens=3&break_after=2"``, which also fits a BRIDGE_MODELS route) or in a
``"fake": {...}`` object in the body, which wins. ``stamp=1`` puts the write time into the
token text itself (``t<i>@<epoch us> ``), which passes through the bridge unchanged: the
benchmark (``python -m bench``) measures each token's added latency with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http
import itertools
import json
import signal
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

_MAX_HEAD = 64 * 1024
_READ_SIZE = 64 * 1024


@dataclasses.dataclass(frozen=True)
class Behaviour:
    """How the fake answers one request."""

    tokens: int = 8
    delay_ms: float = 0.0  # before each token chunk
    status: int | None = None  # answer with this HTTP status and an OpenAI-style error body
    error_message: str = "fake upstream error"
    break_after: int | None = None  # close the connection mid-body after this many tokens
    malformed_after: int | None = None  # send a chunk that is not JSON after this many tokens
    hang: bool = False  # accept the request and never answer
    finish_reason: str | None = "stop"  # None: send no finish chunk
    done: bool = True  # send `data: [DONE]`
    content: tuple[str, ...] | None = None  # token texts instead of t0, t1, ...
    stamp: bool = False  # token texts `t<i>@<epoch microseconds at write> ` (the benchmark's)
    pad: int = 0  # pad each default token text with "x" to this many characters

    def token(self, index: int) -> str:
        """The text of token `index`."""
        if self.stamp:
            return f"t{index}@{time.time_ns() // 1000} "
        if self.content is not None:
            return self.content[index]
        return f"t{index} ".ljust(self.pad, "x")


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _maybe(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value in (None, "", "none") else convert(value)


_FIELDS: dict[str, Callable[[Any], Any]] = {
    "tokens": int,
    "delay_ms": float,
    "status": _maybe(int),
    "error_message": str,
    "break_after": _maybe(int),
    "malformed_after": _maybe(int),
    "hang": _flag,
    "finish_reason": _maybe(str),
    "done": _flag,
    "content": lambda value: tuple(str(item) for item in value),
    "stamp": _flag,
    "pad": int,
}


def resolve_behaviour(default: Behaviour, model: str, overrides: dict[str, Any]) -> Behaviour:
    """Apply the model name's query, then the body's `fake` object, to `default`."""
    changes: dict[str, Any] = dict(parse_qsl(model.partition("?")[2]))
    changes.update(overrides)
    unknown = set(changes) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown fake behaviour fields: {', '.join(sorted(unknown))}")
    converted = {key: _FIELDS[key](value) for key, value in changes.items()}
    if "content" in converted and "tokens" not in converted:
        converted["tokens"] = len(converted["content"])
    return dataclasses.replace(default, **converted)


@dataclasses.dataclass
class ReceivedRequest:
    """One request the fake received; `disconnected` is set if the client left mid-answer."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any
    connection: int  # which TCP connection (1, 2, ...) carried it
    disconnected: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    completed: bool = False  # the whole response was written


class _Connection:
    """A client connection with a byte buffer, so EOF can be watched between requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.buffer = reader, writer, bytearray()

    async def read_head(self) -> bytes | None:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            if len(self.buffer) > _MAX_HEAD or not await self._fill():
                return None
        head = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        return head

    async def read_body(self, size: int) -> bytes | None:
        while len(self.buffer) < size and await self._fill():
            pass
        if len(self.buffer) < size:
            return None
        body = bytes(self.buffer[:size])
        del self.buffer[:size]
        return body

    async def watch_eof(self, gone: asyncio.Event) -> None:
        while await self._fill():
            pass
        gone.set()

    async def _fill(self) -> bool:
        data = await self.reader.read(_READ_SIZE)
        self.buffer += data
        return bool(data)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def _sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    event = f"data: {text}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)


def _response(status: int, body: dict[str, Any]) -> bytes:
    content = json.dumps(body).encode()
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(content)}\r\n\r\n".encode() + content


def _error(status: int, message: str) -> bytes:
    return _response(status, {"error": {"message": message, "type": "fake_error"}})


class FakeUpstream:
    """The fake server; use as an async context manager. See the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: int = 8,
        delay_ms: float = 0.0,
        record: bool = True,
    ) -> None:
        self.host, self.port, self.record = host, port, record
        self.default = Behaviour(tokens=tokens, delay_ms=delay_ms)
        self.requests: list[ReceivedRequest] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """The OpenAI-style base URL, ending in /v1."""
        return f"http://{self.host}:{self.port}/v1"

    async def __aenter__(self) -> FakeUpstream:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        conn, conn_id = _Connection(reader, writer), next(self._ids)
        try:
            while (head := await conn.read_head()) is not None:
                if not await self._exchange(conn, conn_id, head):
                    break
        except (ConnectionError, ValueError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _exchange(self, conn: _Connection, conn_id: int, head: bytes) -> bool:
        """Read one request's body and answer it; False when the connection must close."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", ""):
            await conn.send(_error(411, "the fake needs a content-length"))
            return False
        raw = await conn.read_body(int(headers.get("content-length", "0")))
        if raw is None:
            return False
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            await conn.send(_error(400, "the body is not JSON"))
            return True
        request = ReceivedRequest(method, target.partition("?")[0], headers, body, conn_id)
        if self.record:
            self.requests.append(request)
        watcher = asyncio.create_task(conn.watch_eof(request.disconnected))
        try:
            keep_alive = await self._answer(conn, request)
        except ConnectionError:
            request.disconnected.set()
            raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        request.completed = keep_alive
        return keep_alive and headers.get("connection", "").lower() != "close"

    async def _answer(self, conn: _Connection, request: ReceivedRequest) -> bool:
        if (request.method, request.path) != ("POST", "/v1/chat/completions"):  # the only route
            await conn.send(_error(404, f"no route {request.method} {request.path}"))
            return True
        body = request.body if isinstance(request.body, dict) else {}
        try:
            how = resolve_behaviour(self.default, str(body.get("model", "")), body.get("fake", {}))
        except (TypeError, ValueError) as exc:
            await conn.send(_error(400, str(exc)))
            return True
        if how.hang:
            await request.disconnected.wait()
            return False
        if how.status is not None:
            await conn.send(_error(how.status, how.error_message))
            return True
        if body.get("stream") is not True:
            await conn.send(_error(400, "the fake only streams: send stream true"))
            return True
        return await self._stream(conn, request, how)

    async def _stream(self, conn: _Connection, request: ReceivedRequest, how: Behaviour) -> bool:
        body = request.body
        base: dict[str, Any] = {"id": f"chatcmpl-fake-{request.connection}"}
        base.update(object="chat.completion.chunk", model=str(body.get("model", "")))
        base["created"] = int(time.time())
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        await conn.send(f"{head}transfer-encoding: chunked\r\n\r\n".encode())
        # The chunk's fixed part is encoded once: thousands of streams run on one core.
        head_json = json.dumps(base, separators=(",", ":"))[:-1] + ',"choices":[{"index":0,'
        loop = asyncio.get_running_loop()
        due = loop.time()
        for index in range(how.tokens):
            if index == how.break_after:
                return False
            if index == how.malformed_after:
                await conn.send(_sse("{this is not json"))
            if how.delay_ms > 0:
                due += how.delay_ms / 1000  # paced, so a busy moment does not lower the rate
                await asyncio.sleep(max(due - loop.time(), 0.0))
            if request.disconnected.is_set():
                return False
            delta = {"content": how.token(index)}
            if index == 0:
                delta["role"] = "assistant"
            tail_json = f',"finish_reason":null}}],"bridge_ts":{time.time()!r}}}'
            await conn.send(_sse(head_json + '"delta":' + json.dumps(delta) + tail_json))
        if how.break_after is not None and how.break_after >= how.tokens:
            return False
        tail = b""
        if how.finish_reason is not None:
            choice = {"index": 0, "delta": {}, "finish_reason": how.finish_reason}
            tail += _sse({**base, "choices": [choice]})
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            usage = {"prompt_tokens": prompt, "completion_tokens": how.tokens}
            usage["total_tokens"] = prompt + how.tokens
            tail += _sse({**base, "choices": [], "usage": usage})
        if how.done:
            tail += _sse("[DONE]")
        await conn.send(tail + b"0\r\n\r\n")
        return True


async def _run(args: argparse.Namespace) -> None:
    async with FakeUpstream(
        args.host, args.port, tokens=args.tokens, delay_ms=args.delay_ms, record=False
    ) as upstream:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"READY {upstream.base_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Run the fake as a process until SIGTERM or SIGINT (on uvloop when it is installed)."""
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible streaming upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(_run(args))
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_run(args))


if __name__ == "__main__":
    main()
