"""`bridge serve | worker | chat`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import structlog

from bridge.errors import BridgeError
from bridge.logging import configure_logging
from bridge.settings import Settings

log = structlog.get_logger("bridge.cli")
T = TypeVar("T")

SHUTDOWN_GRACE_S = 10


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bridge` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
        if args.command == "serve":
            return serve(settings, args.host, args.port, with_worker=not args.no_worker)
        if args.command == "worker":
            return run_async(run_worker(settings))
        from bridge.chat_client import run_chat

        return run_async(run_chat(args))
    except BridgeError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed (it halves event-loop overhead), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def serve(settings: Settings, host: str, port: int, *, with_worker: bool) -> int:
    """Run the HTTP API (and, unless told otherwise, a worker) under uvicorn."""
    import uvicorn

    from bridge.app import create_app

    app = create_app(settings, with_worker=with_worker)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn swallows lifespan start-up failures into a non-zero exit of its own
    return 0 if server.started else 1


async def run_worker(settings: Settings) -> int:
    """Run generation workers only, until SIGINT/SIGTERM."""
    from bridge.runtime import Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime.running(settings, with_api=False, with_worker=True):
        await stop.wait()
        log.info("worker_stopping")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP API and an in-process worker")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--no-worker", action="store_true", help="API only, no generations")
    commands.add_parser("worker", help="run generation workers only")
    chat = commands.add_parser("chat", help="start a chat and print tokens as they arrive")
    chat.add_argument("prompt", nargs="?", help="the prompt (omit with --resume)")
    chat.add_argument("--url", default="http://127.0.0.1:8000", help="the bridge server")
    chat.add_argument("--session", default=None, help="session id (default: a new one)")
    chat.add_argument("--model", default="mock", help="model id (default: mock)")
    chat.add_argument(
        "--resume",
        metavar="STREAM_URL",
        help="attach to an existing stream (the streamUrl a chat printed) instead of starting one",
    )
    chat.add_argument("--last-event-id", default=None, help="with --resume: continue after it")
    return parser


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
