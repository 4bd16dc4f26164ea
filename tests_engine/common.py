"""Helpers shared by the engine tests (real Mosquitto, real stdio children).

- :func:`no_leftovers`: autouse fixture for a test module (import it, with
  ``# noqa: F401``): no asyncio task and no thread outlives a test.
- :func:`uid`: 8 hex characters, for unique client ids and topics.
- :func:`wait_for`: poll a condition every 10 ms; ``TimeoutError`` after
  ``timeout`` seconds.
- :func:`running`: a task for a coroutine, cancelled and awaited when the
  block ends;
- :func:`mqtt_client`: a connected :class:`MqttClient` on the broker fixture,
  its ``run()`` task cancelled and awaited when the block ends.
- :func:`echo_host`: a :class:`StdioHost` running ``stdio_servers/echo.py``
  (works on mcp 1.x and 2.x), restarting fast (:data:`FAST`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
import sys
import threading
from typing import Any
import uuid

from mqtt_bridge_engine.backoff import Backoff
from mqtt_bridge_engine.mqtt_client import MqttClient, MqttSettings, Will
from mqtt_bridge_engine.stdio_host import StdioHost, StdioServerConfig
import pytest

from devkit.mosquitto import Mosquitto

ECHO = Path(__file__).parent / "stdio_servers" / "echo.py"
FAST = Backoff(base=0.05, cap=0.1)


@pytest.fixture(autouse=True)
async def no_leftovers() -> AsyncIterator[None]:
    """No task or thread outlives a test."""
    threads = set(threading.enumerate())
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current and not t.done()] == []
    # the loop's default executor (paho's blocking connect) ends with the loop
    extra = set(threading.enumerate()) - threads
    assert [t for t in extra if not t.name.startswith("asyncio_")] == []


def uid() -> str:
    """8 random hex characters."""
    return uuid.uuid4().hex[:8]


async def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Return once ``condition()`` is true; ``TimeoutError`` after ``timeout`` s."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task for the block; cancel and await it on exit."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})


@asynccontextmanager
async def mqtt_client(
    broker: Mosquitto,
    client_id: str | None = None,
    will: Will | None = None,
    **kwargs: Any,
) -> AsyncIterator[MqttClient]:
    """A running MqttClient (default id ``t-<uid>``), connected within 10 s."""
    client = MqttClient(
        MqttSettings("127.0.0.1", broker.port),
        client_id=client_id or f"t-{uid()}",
        will=will,
        **kwargs,
    )
    async with running(client.run()):
        async with asyncio.timeout(10):
            await client.wait_connected()
        yield client


def echo_host(
    *,
    env: dict[str, str] | None = None,
    restart_backoff: Backoff = FAST,
    **kwargs: Any,
) -> StdioHost:
    """A StdioHost named ``echo`` for ``stdio_servers/echo.py`` (``env`` added)."""
    return StdioHost(
        StdioServerConfig(sys.executable, (str(ECHO),), env=env or {}),
        name="echo",
        restart_backoff=restart_backoff,
        **kwargs,
    )
