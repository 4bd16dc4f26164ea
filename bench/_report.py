"""What the benchmarks share: the table's machine line, PASS/FAIL, percentiles, a quiet wait.

- :func:`machine_line`: the machine and the versions measured (every table's first line);
- :func:`percentile`: nearest-rank, NaN for no samples;
- :func:`wait_quiet`: wait for other processes to idle before measuring;
- :func:`table`: the header line and the five-column markdown table;
- :func:`add_run_options`, :func:`run_main`: the ``--profile`` / ``--wait-quiet``
  options and ``main()``'s run-print-exit code.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
import contextlib
import importlib.metadata
import math
import os
from pathlib import Path
import platform
import subprocess
import sys
import time
from typing import Any

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


Row = tuple[str, str, str, str, str]  # metric, measured, baseline, ratio / target, pass


def table(header: str, measured: str, baseline: str, rows: list[Row]) -> str:
    """Return ``header`` and the markdown table of ``rows``.

    ``measured`` and ``baseline`` name the second and third column; a row
    whose last cell is ``FAIL`` is a missed target.
    """
    lines = [
        header,
        "",
        f"| metric | {measured} | {baseline} | ratio / target | pass |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def add_run_options(parser: argparse.ArgumentParser, process: str) -> None:
    """Add ``--profile FILE`` (cProfile of ``process``) and ``--wait-quiet SECONDS``."""
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help=f"write a cProfile dump (CPU time) of {process} to this file",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for other processes to leave the CPUs idle",
    )


def run_main(
    main: Coroutine[Any, Any, tuple[str, bool]], stopped: str, *, footer: bool = True
) -> int:
    """Run a bench's ``run()``, print its report; return the exit code.

    0 when every target passed, 1 when one failed, 130 on Ctrl-C (``stopped``
    says what was stopped). ``footer``: end with a line of the seconds taken
    and the verdict (for reports that do not state it themselves).
    """
    started = time.monotonic()
    try:
        report, passed = asyncio.run(main)
    except KeyboardInterrupt:
        print(f"interrupted; {stopped} stopped", file=sys.stderr)
        return 130
    print(report)
    if footer:
        verdict = "all targets met" if passed else "some targets FAILED"
        print(f"\n_{time.monotonic() - started:.0f} s; {verdict}_")
    return 0 if passed else 1
