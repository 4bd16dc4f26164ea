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

from pathlib import Path
import sys

ROOT = Path(__file__).resolve().parents[1]

if str(ROOT) not in sys.path:  # devkit/, tests_engine/
    sys.path.insert(0, str(ROOT))

from tests_engine.cli_support.launch import register_engine  # noqa: E402

register_engine()

from devkit import fixtures  # noqa: E402

# The session broker and its per-test check, shared with tests/.
mosquitto_session = fixtures.mosquitto_session
mosquitto = fixtures.mosquitto
