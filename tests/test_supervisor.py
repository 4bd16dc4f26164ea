"""supervise()/TaskHealth: failing tasks are logged, recorded and restarted."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from custom_components.mqtt_bridge.engine import supervisor
from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.supervisor import TaskHealth, supervise
from tests.common import wait_for


class RecordingBackoff(Backoff):
    """A fixed small delay; remembers every delay handed out and every reset."""

    def __init__(self, delay: float = 0.01) -> None:
        super().__init__(base=delay, cap=delay, rng=random.Random(0))
        self.delays: list[float] = []
        self.resets = 0

    def next_delay(self) -> float:
        delay = Backoff.next_delay(self)
        self.delays.append(delay)
        return delay

    def reset(self) -> None:
        self.resets += 1
        Backoff.reset(self)


async def _stop(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.wait({task})


async def test_raising_task_is_restarted_after_backoff(caplog) -> None:
    runs: list[int] = []
    release = asyncio.Event()
    changes: list[list[str]] = []
    health = TaskHealth(lambda: changes.append(list(health.restarting)))
    backoff = RecordingBackoff(0.05)

    async def work() -> None:
        runs.append(len(runs) + 1)
        if len(runs) == 1:
            raise RuntimeError("boom")
        await release.wait()  # the second run serves until cancelled

    with caplog.at_level(logging.ERROR):
        task = asyncio.create_task(supervise("worker", work, health, backoff=backoff))
        try:
            await wait_for(lambda: "worker" in health.failures)
            failure = health.failures["worker"]
            assert failure.count == 1
            assert failure.last_error == "RuntimeError: boom"
            assert failure.restarting is True
            assert health.restarting == ["worker"]
            assert health.last_error == "worker: RuntimeError: boom"
            assert runs == [1]  # not restarted before the backoff delay
            await wait_for(lambda: runs == [1, 2])
            assert failure.restarting is False
            assert health.restarting == []
            assert failure.count == 1  # history kept
            assert len(backoff.delays) == 1
            assert 0.025 <= backoff.delays[0] <= 0.05
        finally:
            await _stop(task)
    assert task.cancelled()
    # on_change: once when it failed, once when it runs again.
    assert changes == [["worker"], []]
    (record,) = [r for r in caplog.records if "worker failed" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert "Traceback" in caplog.text
    assert "boom" in caplog.text
    data = health.as_dict()
    assert data["worker"]["count"] == 1
    assert data["worker"]["last_error"] == "RuntimeError: boom"
    assert data["worker"]["restarting"] is False
    assert isinstance(data["worker"]["last_failed"], float)


async def test_returning_task_counts_as_failure(caplog) -> None:
    health = TaskHealth()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1

    with caplog.at_level(logging.ERROR):
        task = asyncio.create_task(
            supervise("loop", work, health, backoff=RecordingBackoff(0.005))
        )
        try:
            await wait_for(lambda: runs >= 3)
        finally:
            await _stop(task)
    assert health.failures["loop"].count >= 2
    assert health.failures["loop"].last_error == "stopped unexpectedly"
    assert "loop stopped unexpectedly; restarting it" in caplog.text


async def test_repeated_failures_back_off_exponentially_and_count() -> None:
    health = TaskHealth()
    backoff = Backoff(base=0.001, cap=0.004, rng=random.Random(3))
    seen: list[int] = []

    async def work() -> None:
        seen.append(backoff.attempt)
        raise ValueError(f"failure {len(seen)}")

    task = asyncio.create_task(supervise("flaky", work, health, backoff=backoff))
    try:
        await wait_for(lambda: len(seen) >= 5)
    finally:
        await _stop(task)
    assert seen[:5] == [0, 1, 2, 3, 4]  # never reset: it never ran long
    failure = health.failures["flaky"]
    assert failure.count >= 4
    assert failure.last_error.startswith("ValueError: failure ")


async def test_backoff_reset_after_healthy_run(monkeypatch) -> None:
    monkeypatch.setattr(supervisor, "HEALTHY_AFTER", 0.05)
    backoff = RecordingBackoff(0.001)
    durations = [0.0, 0.0, 0.1, 0.0]
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(durations[min(runs - 1, 3)])
        raise RuntimeError("again")

    task = asyncio.create_task(
        supervise("sometimes", work, TaskHealth(), backoff=backoff)
    )
    try:
        await wait_for(lambda: runs >= 4)
    finally:
        await _stop(task)
    # Only the third run lasted longer than HEALTHY_AFTER.
    assert backoff.resets == 1


async def test_cancellation_passes_through_while_running() -> None:
    health = TaskHealth()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(
        supervise("svc", work, health, backoff=RecordingBackoff())
    )
    await asyncio.wait_for(started.wait(), 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set()
    assert health.failures == {}  # a cancellation is not a failure


async def test_cancellation_passes_through_during_backoff() -> None:
    health = TaskHealth()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        raise RuntimeError("down")

    task = asyncio.create_task(
        supervise("svc", work, health, backoff=RecordingBackoff(30.0))
    )
    await wait_for(lambda: "svc" in health.failures)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert runs == 1
    assert health.restarting == ["svc"]  # it was waiting, never restarted


async def test_cancelled_error_raised_inside_task_ends_supervision() -> None:
    health = TaskHealth()

    async def work() -> None:
        raise asyncio.CancelledError

    task = asyncio.create_task(
        supervise("svc", work, health, backoff=RecordingBackoff())
    )
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert health.failures == {}


async def test_default_backoff_is_one_to_sixty_seconds(monkeypatch) -> None:
    made: list[tuple[float, float]] = []

    def fake_backoff(*, base: float, cap: float) -> Backoff:
        made.append((base, cap))
        return Backoff(base=0.001, cap=0.001)

    monkeypatch.setattr(supervisor, "Backoff", fake_backoff)
    health = TaskHealth()

    async def work() -> None:
        raise RuntimeError("x")

    task = asyncio.create_task(supervise("svc", work, health))
    try:
        await wait_for(lambda: health.failures.get("svc") is not None)
    finally:
        await _stop(task)
    assert made == [(1.0, 60.0)]


def test_task_health_reports_latest_failure_and_survives_bad_callback(
    caplog,
) -> None:
    def broken() -> None:
        raise RuntimeError("callback bug")

    health = TaskHealth(broken)
    assert health.last_error is None
    assert health.restarting == []
    with caplog.at_level(logging.ERROR):
        health.failed("a", "E1")
        health.failed("b", "E2")
    assert health.last_error == "b: E2"
    assert sorted(health.restarting) == ["a", "b"]
    health.restarted("b")
    health.restarted("never-failed")  # unknown names are ignored
    assert health.restarting == ["a"]
    health.failed("a", "E3")
    assert health.failures["a"].count == 2
    assert health.last_error == "a: E3"
    assert "task health callback failed" in caplog.text
