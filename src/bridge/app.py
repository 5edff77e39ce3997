"""`create_app(settings)`: the Litestar application, its routes and its lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import structlog
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.exceptions import HTTPException
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.types import ControllerRouterHandler, Scope
from redis.exceptions import RedisError

from bridge import __version__
from bridge.api.cancel import cancel_chat
from bridge.api.chat import ChatController
from bridge.api.health import HealthController
from bridge.api.metrics import metrics_endpoint
from bridge.api.observability import ObservabilityMiddleware
from bridge.api.problems import EXCEPTION_HANDLERS
from bridge.api.seed_routes import SEED_ROUTES
from bridge.api.stream import STREAM_PATH, sse_stream
from bridge.api.stream_direct import serve_directly
from bridge.auth import ApiKeys
from bridge.client_limits import HeaderSizeLimit
from bridge.errors import BridgeError
from bridge.runtime import Runtime
from bridge.settings import Settings

log = structlog.get_logger("bridge.app")


def create_app(
    settings: Settings | None = None, *, with_api: bool = True, with_worker: bool = True
) -> Litestar:
    """Build the app; the runtime (Redis, fan-out reader, worker) starts with its lifespan.

    `with_api=False` serves only the operations routes (health and metrics): the listener
    of `bridge worker`.
    """
    settings = settings or Settings.from_env()
    api_keys = ApiKeys(settings.api_keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if not api_keys.enabled:
            log.warning(
                "running_open_without_api_keys",
                detail="BRIDGE_API_KEYS is not set: anyone who reaches this service may start "
                "generations. Configure API keys (see `bridge hash-key`) before exposing it.",
            )
        async with Runtime.running(settings, with_api=with_api, with_worker=with_worker) as rt:
            app.state.runtime = rt
            yield

    def runtime_dependency() -> Runtime:
        runtime: Runtime = app.state.runtime
        return runtime

    handlers: list[ControllerRouterHandler] = [HealthController, metrics_endpoint]
    if with_api:
        handlers[:0] = [ChatController, cancel_chat, sse_stream, *SEED_ROUTES]
    # the direct path of the stream route exists only where the route does
    app_class = BridgeApp if with_api else Litestar
    app = app_class(
        route_handlers=handlers,
        dependencies={"runtime": Provide(runtime_dependency, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        after_exception=[_log_unexpected],
        middleware=[
            ObservabilityMiddleware(),
            DefineMiddleware(HeaderSizeLimit, max_bytes=settings.max_header_bytes),
        ],
        # bridge.logging configures the logging of every library; Litestar must not redo it
        logging_config=None,
        lifespan=[lifespan],
        guards=[api_keys.guard],
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins))
        if settings.cors_origins
        else None,
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(
            title="bridge",
            version=__version__,
            path="/schema",
            openapi_router=Router("/schema", route_handlers=[], opt={"auth": "public"}),
        ),
    )
    return app


class BridgeApp(Litestar):
    """The Litestar app, with the direct path of SSE streams in front (`stream_direct`)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].startswith(STREAM_PATH)
            and await serve_directly(self, scope, receive, send)
        ):
            return
        await super().__call__(scope, receive, send)


async def _log_unexpected(exc: Exception, scope: Scope) -> None:
    """Log errors that become a 500; expected ones (4xx, Redis down) are mapped and logged."""
    if not isinstance(exc, HTTPException | BridgeError | RedisError):
        log.error("unhandled_error", path=scope.get("path"), exc_info=exc)
