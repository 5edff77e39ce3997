"""The connection manager (hub): every live connection of this process, grouped by session."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Protocol

import structlog

from bridge import metrics
from bridge.errors import CloseReason, RateLimited
from bridge.streams.codec import Batch, Cursor, EntryId

from .recent import Recent
from .subscriber import Envelope, Subscriber

log = structlog.get_logger("bridge.connections")

CONNECTION_RETRY_S = 5


class SessionTracker(Protocol):
    """What the hub needs from the fan-out reader."""

    async def track(self, session: str) -> None: ...

    def untrack(self, session: str) -> None: ...


class ConnectionManager:
    """Registers connections, feeds them live events, and closes them.

    The first connection of a session makes the fan-out reader tail that session; `linger_s`
    after the last one left (with nobody back), the tailing stops. Connections arriving while
    tracking starts wait for it, so none of them can begin its catch-up before the reader's
    start position is fixed (no gap between the two).

    The linger spares a reconnecting client (a dropped network, EventSource's retry) the
    re-tracking round trips. Events read while a session has no connection reach nobody
    here: they stay in Redis (and, for a while, in `recent`), and a connection that comes back
    registers before it replays from its cursor, so its catch-up finds them (the same seam as
    a first connection).
    """

    def __init__(
        self,
        *,
        queue_size: int,
        max_per_session: int = 0,
        max_per_address: int = 0,
        linger_s: float = 0.0,
        recent_s: float = 0.0,
    ) -> None:
        self._queue_size = queue_size
        self._max_per_session = max_per_session  # open connections; 0: no limit
        self._max_per_address = max_per_address
        self._per_address: dict[str, int] = {}
        self._address_of: dict[Subscriber, str] = {}
        self._sessions: dict[str, list[Subscriber]] = {}  # lists: most sessions have one
        self._tracking: dict[str, asyncio.Future[None]] = {}  # track() under way
        self._tracked: set[str] = set()  # track() done (a set: a done task per session is ~1 KiB)
        self._linger_s = linger_s
        self._lingering: dict[str, asyncio.TimerHandle] = {}  # tracked, nobody connected
        self.tracker: SessionTracker | None = None
        self.recent = Recent(window_s=recent_s)
        self.overflows = 0

    async def connect(
        self, session: str, cursor: Cursor, *, transport: str = "sse", address: str | None = None
    ) -> Subscriber:
        """Register a new connection of `session` from `address`, resuming after `cursor`.

        Raises RateLimited when the session or the address already has its maximum open.
        """
        self._check_limits(session, address)
        lingering = self._lingering.pop(session, None)
        if lingering is not None:
            lingering.cancel()
        sub = Subscriber(session, cursor, queue_size=self._queue_size, transport=transport)
        self._sessions.setdefault(session, []).append(sub)
        if address is not None:
            self._address_of[sub] = address
            self._per_address[address] = self._per_address.get(address, 0) + 1
        metrics.transport_meter(transport).opened()
        try:
            await self._ensure_tracked(session)
        except BaseException:
            self.disconnect(sub)
            raise
        return sub

    def disconnect(self, sub: Subscriber) -> None:
        """Forget a connection; the last one of a session stops its tailing."""
        address = self._address_of.pop(sub, None)
        if address is not None:
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left
        subs = self._sessions.get(sub.session)
        if subs is None or sub not in subs:
            return
        subs.remove(sub)
        reason = sub.closed.value if sub.closed is not None else "ended"
        metrics.transport_meter(sub.transport).closed(reason)
        if not subs:
            del self._sessions[sub.session]
            if self._linger_s > 0 and sub.session in self._tracked:
                self._lingering[sub.session] = asyncio.get_running_loop().call_later(
                    self._linger_s, self._untrack, sub.session
                )
            else:
                self._untrack(sub.session)

    def _untrack(self, session: str) -> None:
        """Stop tailing `session`, which has no connection (now, or all through its linger)."""
        self._lingering.pop(session, None)
        if session in self._sessions:
            return
        self._tracking.pop(session, None)
        self._tracked.discard(session)
        self.recent.forget(session)  # tailed again, the reader starts from the streams' ends
        if self.tracker is not None:
            self.tracker.untrack(session)

    def deliver(self, session: str, model: str, after: EntryId, batch: Batch) -> None:
        """Hand live events to every local connection of `session` (the reader's callback)."""
        self.recent.record(session, model, after, batch)
        subs = self._sessions.get(session)
        if not subs:
            return
        envelopes = [Envelope(model, entry_id, event) for entry_id, event in batch]
        for sub in subs:
            if sub.closed is None and not sub.offer(envelopes):
                self.overflows += 1
                log.info("slow_consumer_closed", connection_id=sub.id, queued=sub.queued)

    def close_all(self, reason: CloseReason) -> int:
        """Close every connection (shutdown, Redis loss); returns how many were open."""
        count = 0
        for subs in self._sessions.values():
            for sub in subs:
                sub.close(reason)
                count += 1
        return count

    def _check_limits(self, session: str, address: str | None) -> None:
        if self._max_per_session and len(self._sessions.get(session, ())) >= self._max_per_session:
            raise RateLimited(
                "open connections per session",
                CONNECTION_RETRY_S,
                f"this session already has {self._max_per_session} open connections",
            )
        if (
            self._max_per_address
            and address is not None
            and self._per_address.get(address, 0) >= self._max_per_address
        ):
            raise RateLimited(
                "open connections per client address",
                CONNECTION_RETRY_S,
                f"this address already has {self._max_per_address} open connections",
            )

    def connections(self) -> list[Subscriber]:
        """Every registered connection (a snapshot)."""
        return [sub for subs in self._sessions.values() for sub in subs]

    @property
    def connection_count(self) -> int:
        return sum(len(subs) for subs in self._sessions.values())

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    @property
    def lingering_count(self) -> int:
        """Sessions still tailed for a while after their last connection left."""
        return len(self._lingering)

    async def _ensure_tracked(self, session: str) -> None:
        if self.tracker is None or session in self._tracked:
            return
        future = self._tracking.get(session)
        if future is None:
            future = asyncio.ensure_future(self.tracker.track(session))
            self._tracking[session] = future
            future.add_done_callback(partial(self._tracking_done, session))
        await asyncio.shield(future)

    def _tracking_done(self, session: str, future: asyncio.Future[None]) -> None:
        # Runs before the waiting connections resume (its callback was added first).
        if self._tracking.get(session) is not future:
            return  # untracked while it ran: every connection of the session left
        del self._tracking[session]  # on failure, the next connection tries again
        if not future.cancelled() and future.exception() is None:
            self._tracked.add(session)
