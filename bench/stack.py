"""The processes one scenario runs against: a private Redis, the fake upstream, the bridge.

Everything here is started by the bench and stopped by it: Redis is an `EmbeddedRedis` on a
private unix socket (never a shared server), the fake upstream and the bridge are child
processes on free loopback ports. Their CPU time and memory are read with psutil.

Layouts (what a user would run on one small box):
- `split` (default): `bridge serve --no-worker` and `bridge worker`, two processes, so the
  API's fan-out and the worker's upstream parsing and appends use both cores;
- `single`: `bridge serve` with its in-process worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import psutil
from redis.asyncio import Redis

from bench.loadgen import get_request
from bridge.access import StreamTokens
from bridge.redis_select import make_client
from bridge.redis_server import EmbeddedRedis, _die_with_parent
from bridge.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret"
KEY_PREFIX = "bench:"
HOST = "127.0.0.1"
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 15.0
LAYOUTS = ("split", "single")
WARM_UP = (5, 100.0)  # (tokens, rate) of the generation that warms a fresh stack up


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def model_name(tokens: int, rate: float) -> str:
    """The bench model id streaming `tokens` stamped tokens at `rate` per second."""
    return f"t{tokens}r{rate:g}".replace(".", "_")


def model_route(tokens: int, rate: float) -> str:
    delay_ms = 1000.0 / rate
    return f"{model_name(tokens, rate)}=openai:bench?tokens={tokens}&delay_ms={delay_ms:g}&stamp=1"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child: this checkout's code first, no stray bridge settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    paths = [str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Stack:
    """Redis, the fake upstream and the bridge, started together; see the module docstring."""

    log_dir: Path
    shapes: list[tuple[int, float]]  # (tokens, rate) of every model the scenarios use
    layout: str = "split"
    settings: dict[str, str] = field(default_factory=dict)  # BRIDGE_* for the bridge's processes
    redis_server: EmbeddedRedis | None = None
    redis: Redis | None = None
    upstream_port: int = 0
    bridge_port: int = 0
    children: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    tokens: StreamTokens = field(default_factory=lambda: StreamTokens([SECRET.encode()], 86_400))

    async def start(self) -> None:
        """Start everything and wait until the bridge says it is ready."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.redis_server = await EmbeddedRedis().astart()
        settings = Settings.from_env({})
        self.redis = make_client(self.redis_server.url, settings)
        self.upstream_port = free_port()
        upstream = await self._spawn(
            "upstream",
            [
                sys.executable,
                "-m",
                "tests.fakes.openai_upstream",
                "--port",
                str(self.upstream_port),
            ],
            child_env(),
            stdout=asyncio.subprocess.PIPE,
        )
        assert upstream.stdout is not None
        async with asyncio.timeout(_READY_TIMEOUT_S):
            line = (await upstream.stdout.readline()).decode().strip()
        if not line.startswith("READY "):
            raise RuntimeError(f"the fake upstream did not start: {line!r}")
        self.bridge_port = free_port()
        env = child_env(
            REDIS_URL=self.redis_server.url,
            BRIDGE_KEY_PREFIX=KEY_PREFIX,
            BRIDGE_STREAM_SECRET=SECRET,
            BRIDGE_WORKER_CONCURRENCY="2048",
            # every bench client comes from 127.0.0.1: the per-address cap would stop S5 at 1,000
            BRIDGE_MAX_SSE_PER_ADDRESS="0",
            BRIDGE_MODELS=",".join(model_route(t, r) for t, r in sorted({WARM_UP, *self.shapes})),
            OPENAI_BASE_URL=line.removeprefix("READY "),
            BRIDGE_LOG_FORMAT="json",
            **self.settings,
        )
        serve = [sys.executable, "-m", "bridge.cli", "serve", "--port", str(self.bridge_port)]
        if self.layout == "split":
            await self._spawn("serve", [*serve, "--no-worker"], env)
            await self._spawn("worker", [sys.executable, "-m", "bridge.cli", "worker"], env)
        else:
            await self._spawn("serve", serve, env)
        await self._wait_ready()

    async def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], **kw: Any
    ) -> asyncio.subprocess.Process:
        log = _open_log(self.log_dir / f"{name}.log")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=ROOT,
                stdin=asyncio.subprocess.DEVNULL,
                stderr=log,
                # killed with the bench, even when the bench itself is killed outright
                preexec_fn=_die_with_parent(),
                **({"stdout": log} | kw),
            )
        finally:
            log.close()  # the child holds its own descriptor
        self.children[name] = proc
        return proc

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        request = get_request(f"{HOST}:{self.bridge_port}", "/health/ready")
        while time.monotonic() < deadline:
            for name, proc in self.children.items():
                if proc.returncode is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}; see {self.log_dir}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection(HOST, self.bridge_port)
                writer.write(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                status_line = await reader.readline()
                writer.close()
                if b" 200 " in status_line:
                    return
            await asyncio.sleep(0.1)  # waiting on outside processes to come up
        raise TimeoutError(f"the bridge was not ready in {_READY_TIMEOUT_S:g} s")

    def stream_path(self, session: str, last_event_id: str | None = None) -> str:
        path = f"/api/sse/stream/{session}?token={self.tokens.issue(session)}"
        return path + (f"&last_event_id={last_event_id}" if last_event_id else "")

    def processes(self) -> dict[str, psutil.Process]:
        """Every measured process by role; `loadgen` is the bench itself."""
        procs = {name: psutil.Process(p.pid) for name, p in self.children.items()}
        if self.redis_server is not None:
            procs["redis"] = psutil.Process(self.redis_server.pid)
        procs["loadgen"] = psutil.Process()
        return procs

    async def redis_clients(self) -> int:
        """Connected Redis clients, the bench's own one excluded."""
        assert self.redis is not None
        info: dict[str, Any] = await self.redis.info("clients")
        return int(info["connected_clients"]) - 1

    async def stop(self) -> None:
        """Stop the bridge first (it drains to Redis), then the upstream, then Redis."""
        for name in ("serve", "worker", "upstream"):
            proc = self.children.pop(name, None)
            if proc is None or proc.returncode is not None:
                continue
            proc.terminate()
            try:
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self.redis is not None:
            await self.redis.aclose()
            self.redis = None
        if self.redis_server is not None:
            await self.redis_server.astop()
            self.redis_server = None


def _open_log(path: Path) -> BinaryIO:
    return path.open("ab")


class Meter:
    """CPU seconds (user + system) of every process of a stack, between two readings."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self._processes = processes
        self._start = self._read()
        self._wall = time.perf_counter()

    def _read(self) -> dict[str, float]:
        readings = {}
        for name, proc in self._processes.items():
            times = proc.cpu_times()
            readings[name] = times.user + times.system
        return readings

    def stop(self) -> tuple[dict[str, float], float]:
        """CPU seconds per process since the start, and the wall seconds."""
        end = self._read()
        wall = time.perf_counter() - self._wall
        return {name: end[name] - self._start[name] for name in end}, wall
