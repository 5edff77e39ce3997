"""`create_app(settings)`: the Litestar application, its routes and its lifespan."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from bridge import __version__
from bridge.api.chat import ChatController
from bridge.api.health import HealthController
from bridge.api.problems import EXCEPTION_HANDLERS
from bridge.api.seed_routes import SEED_ROUTES
from bridge.api.stream import sse_stream
from bridge.runtime import Runtime
from bridge.settings import Settings


def create_app(settings: Settings | None = None, *, with_worker: bool = True) -> Litestar:
    """Build the app; the runtime (Redis, fan-out reader, worker) starts with its lifespan."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
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
        request_max_body_size=settings.max_body_bytes,
        openapi_config=OpenAPIConfig(title="bridge", version=__version__, path="/schema"),
    )
    return app
