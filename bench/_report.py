"""What the benchmarks share: the table's machine line, PASS/FAIL, percentiles, a quiet wait.

- :func:`machine_line`: the machine and the versions measured (every table's first line);
- :func:`percentile`: nearest-rank, NaN for no samples;
- :func:`wait_quiet`: wait for other processes to idle before measuring.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import contextlib
import importlib.metadata
import math
import os
from pathlib import Path
import platform
import subprocess
import time

from devkit.mosquitto import find_mosquitto

QUIET_LIMIT = 10.0  # % of one core other processes may use without a warning


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


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of ``values``; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def wait_quiet(limit_s: float, busy_seconds: Callable[[], float]) -> float:
    """Wait (up to ``limit_s``) for a 1-s window in which other processes are idle.

    ``busy_seconds()`` is the machine's busy CPU time so far, in s (each bench
    reads ``/proc/stat`` its own way). Returns the last window's busy share in
    % of one core; idle means below :data:`QUIET_LIMIT`.
    """
    deadline = time.monotonic() + limit_s
    while True:
        before = busy_seconds()
        await asyncio.sleep(1.0)
        busy = 100.0 * (busy_seconds() - before)
        if busy < QUIET_LIMIT or time.monotonic() >= deadline:
            return busy
