"""`bridge serve | worker | chat | probe`: the command line."""

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
from bridge.heap import freeze_startup_heap
from bridge.logging import configure_logging
from bridge.settings import Settings

log = structlog.get_logger("bridge.cli")
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bridge` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return hash_key_command(args.tenant, generate=args.generate)
    if args.command == "probe":
        return probe(args.port, args.path, args.timeout)
    try:
        settings = Settings.from_env()
        configure_logging(
            settings.log_format,
            settings.log_level,
            secrets=_secrets(settings),
            log_prompts=settings.log_prompts,
        )
        if args.command == "serve":
            return serve(settings, args.host, args.port, with_worker=not args.no_worker)
        if args.command == "worker":
            port = args.metrics_port or settings.metrics_port
            if port:
                return serve(settings, args.metrics_host, port, with_api=False)
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


def serve(
    settings: Settings, host: str, port: int, *, with_api: bool = True, with_worker: bool = True
) -> int:
    """Run the app under uvicorn until SIGTERM/SIGINT, then shut down gracefully.

    `with_api=False` serves only health and metrics: `bridge worker` with a metrics port.
    """
    from bridge.app import create_app
    from bridge.serving import serve_app

    app = create_app(settings, with_api=with_api, with_worker=with_worker)
    freeze_startup_heap()
    # uvicorn swallows lifespan start-up failures into a non-zero exit of its own
    started = serve_app(
        app,
        host,
        port,
        delay_s=settings.shutdown_delay_s,
        # bound what uvicorn buffers before the app's own, precise limits apply
        h11_max_incomplete_event_size=max(2 * settings.max_header_bytes, 16 * 1024),
        ws_max_size=max(settings.ws_max_message_bytes, 1024),
    )
    return 0 if started else 1


async def run_worker(settings: Settings) -> int:
    """Run generation workers only, without HTTP, until SIGINT/SIGTERM; then drain."""
    from bridge.runtime import Runtime

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Runtime.running(settings, with_api=False, with_worker=True) as runtime:
        freeze_startup_heap()
        await stop.wait()
        log.info("stop_signal_received")
        await runtime.drained()
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


def probe(port: int, path: str, timeout_s: float) -> int:
    """Exit 0 if `http://127.0.0.1:<port><path>` answers 200 (container health checks)."""
    import httpx

    try:
        response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout_s)
    except httpx.HTTPError as exc:
        print(f"bridge probe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"bridge probe: HTTP {response.status_code}: {response.text}", file=sys.stderr)
        return 1
    return 0


def _secrets(settings: Settings) -> list[str]:
    """Values no log line may contain."""
    values = [settings.openai_api_key or ""]
    values += (settings.stream_secret or "").split(",")
    return [value.strip() for value in values if value.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bridge", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="run the HTTP API and an in-process worker")
    serve_cmd.add_argument("--host", default="127.0.0.1")
    serve_cmd.add_argument("--port", type=int, default=8000)
    serve_cmd.add_argument("--no-worker", action="store_true", help="API only, no generations")
    worker_cmd = commands.add_parser("worker", help="run generation workers only")
    worker_cmd.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve /metrics and /health/* on this port (default: BRIDGE_METRICS_PORT; "
        "neither: no HTTP listener)",
    )
    worker_cmd.add_argument("--metrics-host", default="127.0.0.1")
    probe_cmd = commands.add_parser("probe", help="check a local bridge's health endpoint")
    probe_cmd.add_argument("--port", type=int, default=8000)
    probe_cmd.add_argument("--path", default="/health/live")
    probe_cmd.add_argument("--timeout", type=float, default=3.0)
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
