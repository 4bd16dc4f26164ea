"""Long-running tasks that are restarted, not lost, when they end unexpectedly.

:func:`supervise` runs a coroutine factory until cancelled. If the coroutine
raises (or returns, which a serving loop never should), the failure is logged
with its traceback, recorded in a :class:`TaskHealth` (shown by the proxy
status and diagnostics) and the task is started again after a backoff delay
(1 s doubling to 60 s, reset after :data:`HEALTHY_AFTER` seconds of running).

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
import logging
import time
from typing import Any, Final

from .backoff import Backoff

_LOGGER = logging.getLogger(__name__)

# Seconds a restarted task must run before its backoff starts from 1 s again.
HEALTHY_AFTER: Final = 60.0


@dataclass(slots=True)
class TaskFailure:
    """How often one task failed: ``last_failed`` is a POSIX time in seconds."""

    count: int
    last_error: str
    last_failed: float
    restarting: bool


class TaskHealth:
    """The failures of a group of supervised tasks.

    ``on_change()`` is called whenever a task fails or is started again.
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        """Start with no failures."""
        self.failures: dict[str, TaskFailure] = {}
        self._on_change = on_change

    @property
    def restarting(self) -> list[str]:
        """Names of the tasks that failed and wait to be started again."""
        return [name for name, f in self.failures.items() if f.restarting]

    @property
    def last_error(self) -> str | None:
        """``"name: error"`` of the most recent failure, or ``None``."""
        if not self.failures:
            return None
        name, failure = max(self.failures.items(), key=lambda i: i[1].last_failed)
        return f"{name}: {failure.last_error}"

    def failed(self, name: str, error: str) -> None:
        """Record that task ``name`` ended with ``error``."""
        failure = self.failures.get(name)
        if failure is None:
            failure = self.failures[name] = TaskFailure(0, error, 0.0, True)
        failure.count += 1
        failure.last_error = error
        failure.last_failed = time.time()
        failure.restarting = True
        self._changed()

    def restarted(self, name: str) -> None:
        """Record that task ``name`` runs again."""
        failure = self.failures.get(name)
        if failure is not None and failure.restarting:
            failure.restarting = False
            self._changed()

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Return the failures as JSON-serialisable data (for diagnostics)."""
        return {
            name: {
                "count": f.count,
                "last_error": f.last_error,
                "last_failed": f.last_failed,
                "restarting": f.restarting,
            }
            for name, f in self.failures.items()
        }

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                _LOGGER.exception("task health callback failed")


async def supervise(
    name: str,
    factory: Callable[[], Coroutine[Any, Any, None]],
    health: TaskHealth,
    *,
    backoff: Backoff | None = None,
) -> None:
    """Run ``factory()`` until cancelled, restarting it whenever it ends.

    ``name`` names the task in logs and in ``health``. Cancellation is passed
    through; any other ending is logged, recorded and followed by a restart
    after ``backoff`` (default 1 s to 60 s).
    """
    backoff = backoff or Backoff(base=1.0, cap=60.0)
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as err:
            _LOGGER.exception("%s failed; restarting it", name)
            error = f"{type(err).__name__}: {err}"
        else:
            _LOGGER.error("%s stopped unexpectedly; restarting it", name)
            error = "stopped unexpectedly"
        if loop.time() - started > HEALTHY_AFTER:
            backoff.reset()
        health.failed(name, error)
        await asyncio.sleep(backoff.next_delay())
        health.restarted(name)
