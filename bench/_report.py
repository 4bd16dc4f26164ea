"""What every benchmark table starts with: the machine and the versions measured."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from pathlib import Path
import platform
import subprocess

from devkit.mosquitto import find_mosquitto


def version(dist: str) -> str:
    """Return the installed version of distribution ``dist``, ``?`` if absent."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def machine_line(bench: str, quick: bool, versions: str) -> str:
    """One line: benchmark, mode, CPU, cores, OS, Python, ``versions``, Mosquitto."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mosq = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [find_mosquitto(), "-h"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        ).stdout
        mosq = out.splitlines()[0].replace("mosquitto version ", "") if out else "?"
    cores = len(os.sched_getaffinity(0))
    return (
        f"**{bench} {'--quick' if quick else '(full)'}** · {model}, {cores} cores"
        f" · Linux {platform.release()} · Python {platform.python_version()}"
        f" · {versions} · Mosquitto {mosq}"
    )


def mark(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"
