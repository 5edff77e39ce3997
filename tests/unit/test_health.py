"""The health monitor's housekeeping and the background-task supervisor, without Redis."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bridge import metrics, supervisor
from bridge.connections.manager import ConnectionManager
from bridge.errors import CloseReason
from bridge.health import LIVE_STALL_S, HealthMonitor
from bridge.runtime import Runtime
from bridge.settings import Settings


def monitor_for(manager: ConnectionManager) -> HealthMonitor:
    runtime = SimpleNamespace(manager=manager, settings=Settings.from_env({}))
    return HealthMonitor(cast(Runtime, runtime))


async def test_sweep_closes_stalled_connections_and_spares_healthy_ones() -> None:
    """A writer that has not asked for more within the stall time is closed as STALLED."""
    manager = ConnectionManager(queue_size=8)
    stuck = await manager.connect("s1", {})
    healthy = await manager.connect("s1", {})
    monitor = monitor_for(manager)
    reasons: list[CloseReason] = []
    stuck.on_close = reasons.append
    now = healthy.last_progress + monitor.stall_after_s / 2
    stuck.last_progress = now - monitor.stall_after_s - 1

    assert monitor.sweep(now) == 1
    assert stuck.closed is CloseReason.STALLED
    assert reasons == [CloseReason.STALLED]
    assert healthy.closed is None
    assert manager.connection_count == 2  # its writer unregisters it once cancelled


async def test_sweep_drops_closed_connections_their_writer_never_unregistered() -> None:
    """A closed connection still registered long after its stall time is removed."""
    manager = ConnectionManager(queue_size=8)
    leaked = await manager.connect("s1", {})
    leaked.close(CloseReason.SLOW_CONSUMER)
    monitor = monitor_for(manager)
    assert monitor.sweep(leaked.last_progress + monitor.stall_after_s + 1) == 0
    assert manager.connection_count == 1  # still within its writer's grace
    monitor.sweep(leaked.last_progress + 2 * monitor.stall_after_s + 1)
    assert manager.connection_count == 0


def test_liveness_fails_only_after_the_loop_stalled_for_long() -> None:
    """Liveness fails slow: a tick older than LIVE_STALL_S, not a brief hiccup."""
    monitor = monitor_for(ConnectionManager(queue_size=8))
    assert monitor.liveness()[0].ok
    monitor.last_tick -= LIVE_STALL_S / 2
    assert monitor.liveness()[0].ok
    monitor.last_tick -= LIVE_STALL_S
    check = monitor.liveness()[0]
    assert (check.name, check.ok) == ("event_loop", False)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "INITIAL_BACKOFF_S", 0.001)


@pytest.mark.usefixtures("fast_backoff")
async def test_a_crashed_task_is_restarted_and_counted() -> None:
    """A task that raises (or returns) is restarted with backoff; restarts are counted."""
    calls = 0
    third_run = asyncio.Event()

    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        if calls == 2:
            return  # a task that must run forever ended: also restarted
        third_run.set()
        await asyncio.Event().wait()

    task = supervisor.BackgroundTask("unit-flaky", flaky)
    before = metrics.BACKGROUND_TASK_RESTARTS.labels("unit-flaky")._value.get()
    task.start()
    try:
        await asyncio.wait_for(third_run.wait(), 10)
        assert task.alive
        assert task.restarts == 2
        assert task.last_error == "returned"
        restarts: Any = metrics.BACKGROUND_TASK_RESTARTS.labels("unit-flaky")._value.get()
        assert restarts == before + 2
    finally:
        await task.stop()
    assert not task.alive


async def test_a_task_waiting_to_restart_is_not_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """During the backoff after a crash, `alive` is False, so readiness names the task."""
    monkeypatch.setattr(supervisor, "INITIAL_BACKOFF_S", 60.0)
    crashed = asyncio.Event()

    async def crash() -> None:
        crashed.set()
        raise RuntimeError("boom")

    task = supervisor.BackgroundTask("unit-crash", crash)
    task.start()
    try:
        await asyncio.wait_for(crashed.wait(), 10)
        assert not task.alive
        assert task.last_error == "RuntimeError: boom"
    finally:
        await task.stop()
