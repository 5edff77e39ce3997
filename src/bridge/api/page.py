"""`GET /`: the test page (seed 004), one self-contained HTML file shipped in the package."""

from __future__ import annotations

import functools
from importlib import resources

from litestar import MediaType, Response, get


@functools.cache
def page_html() -> bytes:
    """The page, read once from the package's resources."""
    return resources.files("bridge.web").joinpath("page.html").read_bytes()


@get("/", media_type=MediaType.HTML, include_in_schema=False, opt={"auth": "public"})
async def test_page() -> Response[bytes]:
    """Start a chat, watch its tokens live, open a second tab, cancel; try `/generate`."""
    return Response(
        page_html(),
        media_type=MediaType.HTML,
        headers={
            "Cache-Control": "no-cache",
            # everything is inline and same-origin; nothing else may load
            "Content-Security-Policy": (
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                "connect-src 'self'"
            ),
        },
    )
