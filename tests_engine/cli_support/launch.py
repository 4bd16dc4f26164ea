"""Run ``mqtt-bridge-mcp`` from this working tree without installing it.

``python tests_engine/cli_support/launch.py ARGS...`` behaves like the
installed console script ``mqtt-bridge-mcp ARGS...``: the engine directory is
registered as the package ``mqtt_bridge_engine`` (as ``tests_engine/conftest.py``
does, without importing ``custom_components/__init__.py``, which needs Home
Assistant) and ``mqtt_bridge_engine.cli.run()`` is called. Nothing is printed
to stdout here: for ``connect`` it is the MCP stream.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
import sys

ENGINE = (
    Path(__file__).resolve().parents[2] / "custom_components" / "mqtt_bridge" / "engine"
)
PACKAGE = "mqtt_bridge_engine"


def register_engine() -> None:
    """Make ``import mqtt_bridge_engine`` load this working tree's engine."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and str(ENGINE) in (spec.submodule_search_locations or []):
        return
    spec = importlib.util.spec_from_file_location(
        PACKAGE, ENGINE / "__init__.py", submodule_search_locations=[str(ENGINE)]
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


if __name__ == "__main__":
    register_engine()
    from mqtt_bridge_engine import cli

    cli.run()
