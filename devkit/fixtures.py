"""pytest fixtures for a real Mosquitto, shared by ``tests/`` and ``tests_engine/``.

Both ``conftest.py`` files import them (``from devkit.fixtures import ...``);
this module imports nothing from Home Assistant, so the engine tests can use it
with the Home Assistant plugin disabled.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devkit.mosquitto import Mosquitto


@pytest.fixture(scope="session")
def mosquitto_session() -> Iterator[Mosquitto]:
    """One anonymous Mosquitto for the whole session, on a random port (started on first use)."""
    broker = Mosquitto()
    broker.start()
    yield broker
    broker.cleanup()


@pytest.fixture
def mosquitto(mosquitto_session: Mosquitto) -> Mosquitto:
    """The session broker; restarted if a test left it stopped."""
    if mosquitto_session.proc is None or mosquitto_session.proc.poll() is not None:
        mosquitto_session.proc = None
        mosquitto_session.start()
    return mosquitto_session
