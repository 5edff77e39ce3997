"""`create_app(settings)`: the Litestar application, its routes and its lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig

from bridge import __version__
from bridge.api.chat import ChatController
from bridge.api.health import HealthController
from bridge.api.problems import EXCEPTION_HANDLERS
from bridge.api.seed_routes import SEED_ROUTES
from bridge.api.stream import sse_stream
from bridge.auth import ApiKeys
from bridge.client_limits import HeaderSizeLimit
from bridge.runtime import Runtime
from bridge.settings import Settings

log = structlog.get_logger("bridge.app")


def create_app(settings: Settings | None = None, *, with_worker: bool = True) -> Litestar:
    """Build the app; the runtime (Redis, fan-out reader, worker) starts with its lifespan."""
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
        async with Runtime.running(settings, with_worker=with_worker) as runtime:
            app.state.runtime = runtime
            yield

    def runtime_dependency() -> Runtime:
        runtime: Runtime = app.state.runtime
        return runtime

    app = Litestar(
        route_handlers=[ChatController, sse_stream, HealthController, *SEED_ROUTES],
        dependencies={"runtime": Provide(runtime_dependency, sync_to_thread=False)},
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        guards=[api_keys.guard],
        middleware=[DefineMiddleware(HeaderSizeLimit, max_bytes=settings.max_header_bytes)],
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
