"""`bridge serve | worker | chat`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import structlog

from bridge.errors import BridgeError
from bridge.logging import configure_logging
from bridge.settings import Settings

log = structlog.get_logger("bridge.cli")

SHUTDOWN_GRACE_S = 10


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bridge` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return hash_key_command(args.tenant, generate=args.generate)
    try:
        settings = Settings.from_env()
        configure_logging(settings.log_format, settings.log_level)
        if args.command == "serve":
            return serve(settings, args.host, args.port, with_worker=not args.no_worker)
        if args.command == "worker":
            return asyncio.run(run_worker(settings))
        from bridge.chat_client import run_chat

        return asyncio.run(run_chat(args))
    except BridgeError as exc:
        print(f"bridge: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


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
        # bound what uvicorn buffers before the app's own, precise limits apply
        h11_max_incomplete_event_size=max(2 * settings.max_header_bytes, 16 * 1024),
        ws_max_size=max(settings.ws_max_message_bytes, 1024),
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


def hash_key_command(tenant: str | None, *, generate: bool) -> int:
    """Print the BRIDGE_API_KEYS entry of a key read from stdin (or of a new one).

    The key is read from stdin, never from the command line, so it stays out of shell
    history and process listings.
    """
    from bridge.auth import generate_key, hash_key, parse_api_keys

    if generate:
        key = generate_key()
        print(f"key: {key}", file=sys.stderr)
    else:
        if sys.stdin.isatty():
            import getpass

            key = getpass.getpass("API key: ")
        else:
            key = sys.stdin.readline().rstrip("\r\n")
        if not key:
            print("bridge: no key on stdin", file=sys.stderr)
            return 2
    entry = hash_key(key)
    if tenant:
        entry = f"{tenant}:{entry}"
        try:
            parse_api_keys(entry)
        except BridgeError as exc:
            print(f"bridge: {exc}", file=sys.stderr)
            return 2
    print(entry)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP API and an in-process worker")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--no-worker", action="store_true", help="API only, no generations")
    commands.add_parser("worker", help="run generation workers only")
    hash_cmd = commands.add_parser(
        "hash-key", help="print the BRIDGE_API_KEYS entry for an API key read from stdin"
    )
    hash_cmd.add_argument("--tenant", help="prefix the hash with tenant: (a ready entry)")
    hash_cmd.add_argument(
        "--generate", action="store_true", help="make a new key (printed to stderr) instead"
    )
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
