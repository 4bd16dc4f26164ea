"""Fixtures for the Home-Assistant-independent engine tests.

These tests import the engine as ``mqtt_bridge_engine`` (the name it has when
pip-installed, see ``pyproject.toml``). When that name does not resolve to this
working tree's ``custom_components/mqtt_bridge/engine``, the directory is
registered under it here, without executing ``custom_components/__init__.py``
or ``custom_components/mqtt_bridge/__init__.py`` (which import Home Assistant).

``pytest.ini`` beside this file disables the Home Assistant pytest plugin, so
the same tests run in ``.venv`` (HA's pins, mcp 1.12) and in ``.venv-latest``
(``scripts/test-engine-latest``: newest mcp, no Home Assistant).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:  # devkit/, tests_engine/
    sys.path.insert(0, str(ROOT))

from tests_engine.cli_support.launch import register_engine  # noqa: E402

register_engine()

from devkit.mosquitto import Mosquitto  # noqa: E402


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
