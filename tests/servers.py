"""Real processes for end-to-end tests: `bridge serve`/`bridge worker`, and an SSE reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bridge.sse_client import SSEEvent, SSEParser
from tests.redis_fixtures import free_port

TERMINAL = {"complete", "error", "cancelled"}


@dataclass
class BridgeProcess:
    """A running `bridge` command."""

    proc: subprocess.Popen[bytes]
    base_url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            return handle.read()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)


def bridge_env(redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    """Environment for a bridge process on the test Redis and the test's key prefix."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    env.update(
        REDIS_URL=redis_url,
        BRIDGE_KEY_PREFIX=key_prefix,
        BRIDGE_LOG_FORMAT="json",
        BRIDGE_MOCK_DELAY_MS="2",
        BRIDGE_STREAM_SECRET="test-secret",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def start_bridge(
    args: list[str], env: Mapping[str, str], log_path: str, *, port: int | None = None
) -> BridgeProcess:
    """Start `bridge <args>`; for `serve`, on a free port (not yet waited for)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "bridge.cli", *args]
    if args[0] == "serve":
        argv += ["--port", str(port)]
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return BridgeProcess(proc, f"http://127.0.0.1:{port}", log_path)


async def wait_ready(
    server: BridgeProcess, timeout: float = 30.0, *, path: str = "/health/ready"
) -> None:
    """Wait until `path` answers 200: readiness (the worker heartbeat included) by default;
    `/health/live` for a process without a worker, which never becomes ready."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=server.base_url, timeout=2.0) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"bridge exited {server.proc.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(path)).status_code == 200:
                    return
            await asyncio.sleep(0.05)  # waiting on an external process coming up
    raise TimeoutError(f"bridge not answering {path} in {timeout} s:\n{server.log()}")


@contextlib.contextmanager
def running(processes: list[BridgeProcess]) -> Iterator[list[BridgeProcess]]:
    try:
        yield processes
    finally:
        for process in processes:
            process.stop()


@dataclass
class StreamReader:
    """Reads one SSE connection into a list of events, in the background."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    events: list[SSEEvent] = field(default_factory=list)
    status: int | None = None
    parser: SSEParser = field(default_factory=SSEParser)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    ended: bool = False

    async def __aenter__(self) -> StreamReader:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # a connection its server broke has ended already; wait_for reports that
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await self._task

    async def _run(self) -> None:
        timeout = httpx.Timeout(5.0, read=None)
        try:
            async with (
                httpx.AsyncClient(timeout=timeout) as http,
                http.stream("GET", self.url, headers=self.headers) as response,
            ):
                self.status = response.status_code
                self._changed.set()
                async for chunk in response.aiter_raw():
                    new = self.parser.feed(chunk)
                    if new:
                        self.events.extend(new)
                        self._changed.set()
        finally:
            self.ended = True
            self._changed.set()

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> list[SSEEvent]:
        """Wait until `predicate(events)` holds; raise TimeoutError with what was seen."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate(self.events):
                    if self.ended and self._task is not None and self._task.done():
                        self._task.result()
                        raise AssertionError(f"stream ended early: {self.summary()}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"condition not met; saw {self.summary()}") from None
        return self.events

    async def wait_closed(self, timeout: float = 20.0) -> None:
        """Wait until the server ends the connection (or it breaks); no error either way."""
        assert self._task is not None
        async with asyncio.timeout(timeout):
            with contextlib.suppress(httpx.HTTPError):
                await asyncio.shield(self._task)

    async def wait_terminal(self, count: int = 1, timeout: float = 20.0) -> list[SSEEvent]:
        return await self.wait_for(lambda evs: terminals(evs) >= count, timeout)

    def summary(self) -> str:
        return f"status={self.status} events={[(e.event, e.data[:60]) for e in self.events][-8:]}"


def terminals(events: list[SSEEvent]) -> int:
    return sum(1 for e in events if e.event in TERMINAL)


def payloads(events: list[SSEEvent], kind: str = "token") -> list[dict[str, Any]]:
    return [json.loads(e.data) for e in events if e.event == kind]


def tokens(events: list[SSEEvent]) -> list[tuple[str, int, str]]:
    """(requestId, sequence, content) of each token event."""
    return [(p["requestId"], p["sequence"], p["content"]) for p in payloads(events)]


@contextlib.asynccontextmanager
async def open_stream(url: str, **headers: str) -> AsyncIterator[StreamReader]:
    async with StreamReader(url, headers=dict(headers)) as reader:
        yield reader


async def start_chat(
    http: httpx.AsyncClient, session: str, model: str = "mock", **body: Any
) -> dict[str, Any]:
    payload = {"sessionId": session, "modelId": model, "prompt": "hello", **body}
    response = await http.post("/api/chat/start", json=payload)
    assert response.status_code == 202, response.text
    started: dict[str, Any] = response.json()
    return started


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def serving(
    args: list[str], env: Mapping[str, str], log_path: str, redis_url: str, prefix: str
) -> Iterator[BridgeProcess]:
    """A ready `bridge <args>` process; afterwards it is stopped and its prefix's keys deleted."""
    from tests.redis_fixtures import delete_prefixed

    process = start_bridge(args, env, log_path)
    try:
        asyncio.run(wait_ready(process))
        yield process
    finally:
        process.stop()

        async def clean() -> None:
            import redis.asyncio as aioredis

            client = aioredis.Redis.from_url(redis_url)
            await delete_prefixed(client, prefix)
            await client.aclose()

        asyncio.run(clean())


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(server: BridgeProcess) -> tuple[str, Samples]:
    """The text of `/metrics`, and its samples parsed by the Prometheus text parser."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(server.base_url + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)
