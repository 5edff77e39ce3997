"""Fault injection for integration tests: Redis servers to kill or pause, a TCP proxy to cut,
fleets of real bridge processes, and waits on what those outside processes do."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import psutil
import redis
import redis.asyncio as aioredis

from bridge.redis_server import _die_with_parent, find_server_binary
from bridge.sse_client import SSEEvent
from tests.redis_fixtures import free_port
from tests.servers import BridgeProcess, start_bridge, wait_ready

POLL_S = 0.05  # only for waiting on outside processes


def new_session() -> str:
    """A session id no other test uses."""
    return f"s_{uuid.uuid4().hex[:10]}"


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str = "condition"
) -> None:
    """Poll an outside process's state until `condition()` holds, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(POLL_S)


def logged_events(process: BridgeProcess) -> list[dict[str, Any]]:
    """The JSON log lines a bridge process wrote so far."""
    events = []
    for line in process.log().splitlines():
        with contextlib.suppress(ValueError):
            item = json.loads(line)
            if isinstance(item, dict):
                events.append(item)
    return events


async def wait_for_log(process: BridgeProcess, event: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until `process` logs `event`; return that log line."""
    found: list[dict[str, Any]] = []

    async def logged() -> bool:
        found[:] = [e for e in logged_events(process) if e.get("event") == event]
        return bool(found)

    try:
        await wait_until(logged, timeout, f"log event {event!r}")
    except TimeoutError:
        raise TimeoutError(f"{event!r} not logged; log ends:\n{process.log()[-3000:]}") from None
    return found[0]


class RedisProcess:
    """A Redis server the test owns, on a TCP port, that can be killed, restarted or paused.

    With `persistent=True` it writes an append-only file fsynced on every write, so a restart
    (even after SIGKILL) keeps every write Redis acknowledged.
    """

    def __init__(self, directory: Path, *, persistent: bool) -> None:
        self.directory = directory
        self.persistent = persistent
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self) -> Self:
        """Launch the server and wait until it answers (loading its data first)."""
        self._spawn()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        try:
            while True:
                self._check_alive()
                with contextlib.suppress(redis.RedisError):
                    if client.ping():
                        return self
                if time.monotonic() > deadline:
                    raise TimeoutError("redis did not start")
                time.sleep(POLL_S)
        finally:
            client.close()

    async def astart(self) -> Self:
        """`start()` without blocking the running event loop."""
        self._spawn()
        client = aioredis.Redis.from_url(self.url)

        async def answers() -> bool:
            self._check_alive()
            try:
                return bool(await client.ping())
            except redis.RedisError:
                return False

        try:
            await wait_until(answers, 20, "redis start")
        finally:
            await client.aclose()
        return self

    def _check_alive(self) -> None:
        assert self._process is not None
        if self._process.poll() is not None:
            raise RuntimeError(f"redis exited: {(self.directory / 'redis.log').read_text()}")

    def _spawn(self) -> None:
        args = [str(find_server_binary()), "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--dir", str(self.directory), "--save", "", "--daemonize", "no"]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent()
        )
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server (SIGKILL by default) and wait for it to be gone."""
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(sig)
            self._process.wait(10)


class TcpProxy:
    """A TCP proxy in its own thread; `cut()` resets every connection and refuses new ones.

    It runs its own event loop so the test's awaits (or blocking calls) never stall traffic.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> Self:
        self._thread.start()
        self.restore()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    def restore(self) -> None:
        """Listen again on the same port."""
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, upstream = await asyncio.open_connection(*self.target)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._pipes.discard(task)
            for end in (writer, upstream):
                if end is not None:
                    end.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.transport.abort()


class Fleet:
    """Real `bridge serve` and `bridge worker` processes on one environment; stops them all."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.processes: list[BridgeProcess] = []

    def serve(self, *, worker: bool = False, **extra: str) -> BridgeProcess:
        args = ["serve"] if worker else ["serve", "--no-worker"]
        return self._start(args, extra)

    def worker(self, **extra: str) -> BridgeProcess:
        return self._start(["worker"], extra)

    def _start(self, args: list[str], extra: dict[str, str]) -> BridgeProcess:
        name = f"{args[0]}-{len(self.processes)}.log"
        process = start_bridge(args, {**self.env, **extra}, str(self.log_dir / name))
        self.processes.append(process)
        return process

    async def ready(self, *processes: BridgeProcess) -> None:
        """Wait until each API answers ready and each worker logged its start."""
        for process in processes:
            if "serve" in process.proc.args:  # type: ignore[operator]
                await wait_ready(process, timeout=60)
            else:
                await wait_for_log(process, "worker_started", timeout=60)

    def owner(self, worker_field: bytes | str) -> BridgeProcess:
        """The process whose worker name (`host-pid-suffix`) is `worker_field`."""
        text = worker_field.decode() if isinstance(worker_field, bytes) else worker_field
        pid = int(text.rsplit("-", 2)[1])
        return next(p for p in self.processes if p.proc.pid == pid)

    def stop_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                process.kill(signal.SIGCONT)
            process.stop()


@contextlib.contextmanager
def fleet(env: dict[str, str], log_dir: Path) -> Iterator[Fleet]:
    running = Fleet(env, log_dir)
    try:
        yield running
    finally:
        running.stop_all()


class RssSampler:
    """Samples a process's resident memory in a background thread; `peak` is the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.02) -> None:
        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


@contextlib.contextmanager
def upstream_process() -> Iterator[str]:
    """The fake OpenAI-compatible upstream in its own process; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.openai_upstream", "--port", str(free_port())],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline().decode().strip()
        assert line.startswith("READY "), line
        yield line.removeprefix("READY ")
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def request_events(events: list[SSEEvent], request_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) of every stream event of one request, in arrival order."""
    out = []
    for event in events:
        if event.event in ("token", "seam", "complete", "error", "cancelled"):
            payload = json.loads(event.data)
            if payload.get("requestId") == request_id:
                out.append((event.event, payload))
    return out


def answer_text(events: list[SSEEvent], request_id: str) -> str:
    """The answer a client shows when it follows the seam rule of docs/reliability.md:
    on a `seam` with `mode: restart`, drop the text of that request received so far."""
    text: list[str] = []
    for name, payload in request_events(events, request_id):
        if name == "token":
            text.append(payload["content"])
        elif name == "seam" and payload["mode"] == "restart":
            text.clear()
    return "".join(text)


def strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))
