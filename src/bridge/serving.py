"""Serving the app under uvicorn with a graceful shutdown that open SSE streams cannot stall.

Left to itself, uvicorn answers SIGTERM by closing its listener and waiting for every open
connection to end before it runs the lifespan shutdown, and SSE streams never end on their
own. So the first SIGTERM (or SIGINT) is taken here instead:

1. at once, `Runtime.begin_shutdown()`: readiness turns 503, new generations and streams are
   refused, open streams get a final `reconnect` event (reason `shutdown`) and close, and
   the worker, if any, stops taking requests;
2. the listener stays open (answering 503 to readiness, so load balancers notice) for
   `BRIDGE_SHUTDOWN_DELAY_S`, and until the worker's running generations end or
   `BRIDGE_SHUTDOWN_TIMEOUT_S` passes;
3. then uvicorn stops as usual: generations still running are cancelled and stay pending
   in the consumer group, where another worker reclaims them.

A second signal is uvicorn's own: the listener closes at once (running generations still get
their deadline), and a second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
from types import FrameType

import structlog
import uvicorn
from litestar import Litestar

from bridge.api.stream_front import stream_front
from bridge.app import BridgeApp
from bridge.runtime import Runtime

log = structlog.get_logger("bridge.serving")

#: how long uvicorn waits for connections still open once the listener closed
CONNECTIONS_GRACE_S = 10.0


class GracefulServer(uvicorn.Server):
    """`uvicorn.Server` whose first stop signal drains the app's runtime first."""

    def __init__(self, config: uvicorn.Config, app: Litestar, *, delay_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._delay_s = delay_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested = False
        self._stopper: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler, between two bytecodes of whatever the loop was doing:
        # hand the work to the loop.
        if self._loop is None or self._stop_requested or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._stop_requested = True
        # in a context of its own: not the one of whatever the signal interrupted
        self._loop.call_soon_threadsafe(self._begin_stop, sig, context=contextvars.Context())

    def _begin_stop(self, sig: int) -> None:
        runtime: Runtime | None = getattr(self._app.state, "runtime", None)
        if runtime is None:  # still starting: nothing to drain
            self.should_exit = True
            return
        log.info("stop_signal_received", signal=sig)
        runtime.begin_shutdown()
        self._stopper = asyncio.create_task(self._stop_when_drained(runtime))

    async def _stop_when_drained(self, runtime: Runtime) -> None:
        try:
            await asyncio.gather(asyncio.sleep(self._delay_s), runtime.drained())
        finally:
            self.should_exit = True


def serve_app(
    app: Litestar,
    host: str,
    port: int,
    *,
    delay_s: float,
    h11_max_incomplete_event_size: int | None = None,
    ws_max_size: int = 16 * 1024 * 1024,
) -> bool:
    """Serve `app` until a stop signal; True if it started at all."""
    config = uvicorn.Config(
        app,
        # live SSE streams are served in front of uvicorn's protocol (see `stream_front`)
        http=stream_front(app) if isinstance(app, BridgeApp) else "auto",  # type: ignore[arg-type]
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # ObservabilityMiddleware logs one line per request
        lifespan="on",
        timeout_graceful_shutdown=int(CONNECTIONS_GRACE_S),
        h11_max_incomplete_event_size=h11_max_incomplete_event_size,
        ws_max_size=ws_max_size,
    )
    server = GracefulServer(config, app, delay_s=delay_s)
    server.run()
    return server.started
