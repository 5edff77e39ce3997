"""Provider metrics without touching providers: a pass-through around one provider stream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from bridge import metrics
from bridge.errors import ProviderError
from bridge.providers.base import Delta, Finish
from bridge.streams.codec import now_ms


async def metered(
    stream: AsyncIterator[Delta | Finish],
    *,
    provider: str,
    model: str,
    created_ms: float | None,
) -> AsyncIterator[Delta | Finish]:
    """Yield what `stream` yields, recording the call's duration, outcome and tokens.

    `created_ms` is when the request was created (epoch ms): the first token observes the
    time to first token from there. Pass None for a generation taken over from another
    worker, whose first token is not the user's first.

    Outcomes: `ok` (the provider finished), `error` (a `ProviderError`, also counted by
    code) and `cancelled` (the consumer stopped early: cancel, deadline, fencing).
    """
    produced = metrics.TOKENS_PRODUCED.labels(model)
    started = time.perf_counter()
    outcome = "cancelled"
    try:
        async for item in stream:
            if isinstance(item, Delta) and item.text:
                produced.inc()
                if created_ms is not None:
                    delay_s = max(now_ms() - created_ms, 0.0) / 1000.0
                    metrics.TIME_TO_FIRST_TOKEN.labels(model).observe(delay_s)
                    created_ms = None
            elif isinstance(item, Finish):
                outcome = "ok"
            yield item
    except ProviderError as exc:
        outcome = "error"
        metrics.PROVIDER_ERRORS.labels(provider, exc.code).inc()
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.PROVIDER_REQUEST_DURATION.labels(provider, outcome).observe(elapsed)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
