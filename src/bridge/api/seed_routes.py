"""The routes of the seed systems (docs/seeds.md), mounted next to the core's."""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

from bridge.api.generate import cancel_generate, generate
from bridge.api.jobs import JobController
from bridge.api.page import test_page
from bridge.api.ws import ws_endpoint

SEED_ROUTES: list[ControllerRouterHandler] = [
    JobController,
    ws_endpoint,
    generate,
    cancel_generate,
    test_page,
]
