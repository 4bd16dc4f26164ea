"""The engine is a package of its own: pip-installable, importable without Home Assistant.

`pyproject.toml` maps the package ``mqtt_bridge_engine`` onto
``custom_components/mqtt_bridge/engine`` (one source tree for the HACS folder and
for command-line tools). The test builds and installs it with pip into a
temporary directory and imports every module there in a fresh interpreter in
which any ``homeassistant`` import fails.
"""

from __future__ import annotations

import os
from pathlib import Path
import shutil
import subprocess
import sys

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = r"""
import importlib, importlib.abc, pkgutil, sys

class NoHomeAssistant(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "homeassistant" or name.startswith("homeassistant."):
            raise ImportError(f"the engine imported {name}")
        return None

sys.meta_path.insert(0, NoHomeAssistant())
import mqtt_bridge_engine
names = sorted(m.name for m in pkgutil.iter_modules(mqtt_bridge_engine.__path__))
for name in names:
    importlib.import_module(f"mqtt_bridge_engine.{name}")
assert not any(m.startswith("homeassistant") for m in sys.modules)
assert "custom_components" not in sys.modules
print(" ".join(names))
"""


def test_engine_installs_with_pip_and_imports_without_home_assistant(
    tmp_path: Path,
) -> None:
    # Build from a copy, so that setuptools' build/ and egg-info stay out of the tree.
    source = tmp_path / "source"
    engine = Path("custom_components", "mqtt_bridge", "engine")
    shutil.copytree(
        ROOT / engine, source / engine, ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        # Not measured by pytest-cov's subprocess hook: the copy is not the code.
        env={k: v for k, v in os.environ.items() if not k.startswith("COV_CORE")},
    )
    assert (target / "mqtt_bridge_engine" / "mqtt_client.py").is_file()
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    modules = set(result.stdout.split())
    assert {"mqtt_client", "subscriptions", "topics", "proxy", "node_link"} <= modules
    assert {"cli", "mcp_mqtt", "mcp_mqtt_simple", "stdio_host"} <= modules
    # The console script of pyproject.toml's [project.scripts].
    script = target / "bin" / "mqtt-bridge-mcp"
    assert script.is_file()
    assert "mqtt_bridge_engine.cli" in script.read_text()
    help_text = subprocess.run(
        [sys.executable, str(script), "--help"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    ).stdout
    assert all(command in help_text for command in ("connect", "serve", "list"))
