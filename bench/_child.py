"""What a bench and its child process share: engine loading and the line protocol.

Engine loading (:func:`load_engine`): ``custom_components/__init__`` and
``custom_components/mqtt_bridge/__init__`` import Home Assistant; registering
the two parent packages as bare namespaces lets
``custom_components.mqtt_bridge.engine.*`` be imported on its own, so neither a
bench nor its child pays for ``homeassistant`` (the engine imports nothing
from it).

The line protocol between a bench and its child:

* the child's stdout: one JSON object per line (:func:`emit`), first
  ``{"event": "ready", ...}``, then one answer per command;
* the child's stdin: one command per line, ``NAME ARG…`` (:func:`serve_commands`
  answers them), ``quit`` or EOF ends it;
* :func:`run_profiled` runs the child's main coroutine, with ``--profile FILE``
  a cProfile dump timed with ``time.process_time`` (CPU time of the child only,
  so preemption on a busy machine and idle waits do not count);
* :class:`ChildProcess` is the bench's side: start, ask, stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
import contextlib
import cProfile
import inspect
import json
from pathlib import Path
import sys
import time
import types
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_engine() -> None:
    """Register the two parent packages as bare namespaces (idempotent); ROOT on sys.path."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for name, path in (
        ("custom_components", ROOT / "custom_components"),
        ("custom_components.mqtt_bridge", ROOT / "custom_components" / "mqtt_bridge"),
    ):
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module


# -- the child's side ---------------------------------------------------------------


def emit(obj: dict[str, Any]) -> None:
    """Write one JSON line to stdout (the bench reads it)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    """Return an asyncio reader on stdin."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    return reader


async def serve_commands(
    stdin: asyncio.StreamReader, commands: Mapping[str, Callable[..., Any]]
) -> None:
    """Answer each command line until ``quit`` or EOF.

    A line is ``NAME ARG…``: ``commands[NAME](*ARGS)`` (the words as strings)
    returns the answer to emit, a coroutine giving it, or ``None`` for a
    command that is not answered. An unknown command is answered
    ``{"event": "error", "message": ...}``.
    """
    while True:
        words = (await stdin.readline()).decode().split()
        if not words or words[0] == "quit":
            return
        command = commands.get(words[0])
        if command is None:
            emit({"event": "error", "message": f"unknown command {words[0]!r}"})
            continue
        answer = command(*words[1:])
        if inspect.isawaitable(answer):
            answer = await answer
        if answer is not None:
            emit(answer)


def run_profiled(main: Coroutine[Any, Any, None], profile: Path | None) -> None:
    """``asyncio.run(main)``; with ``profile``, a cProfile dump (CPU-time clock) at exit."""
    # CPU-time clock: the profile attributes CPU, not time spent preempted or idle.
    profiler = cProfile.Profile(time.process_time) if profile else None
    if profiler is not None:
        profiler.enable()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main)
    finally:
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)


# -- the bench's side ---------------------------------------------------------------


class ChildProcess:
    """A child speaking the line protocol; stderr goes to ``log``.

    ``error`` is the exception raised when it does not start or exits early
    (its message ends with the log's tail); ``stop_timeout`` is how long
    :meth:`stop` waits after ``quit`` before killing it, in s.
    """

    label = "child"
    error: type[Exception] = RuntimeError
    stop_timeout = 10.0

    def __init__(self, log: Path) -> None:
        """Prepare (not start) a child logging to ``log``."""
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The child's process id."""
        assert self.proc is not None
        return self.proc.pid

    async def launch(self, argv: list[str], timeout: float = 30.0) -> dict[str, Any]:
        """Start ``python argv…`` and return its ready line (``error`` if another)."""
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        ready = await self.read(timeout)
        if ready.get("event") != "ready":
            raise self.error(f"{self.label} did not start: {ready}; see {self.log}")
        return ready

    async def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; ``error`` (with the log's tail) at EOF."""
        assert self.proc is not None
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout):
            line = await self.proc.stdout.readline()
        if not line:
            raise self.error(
                f"{self.label} exited ({self.proc.returncode}):\n"
                + self.log.read_text()[-3000:]
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def send(self, command: str) -> None:
        """Write one command line (for a command that is not answered)."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")

    async def ask(self, command: str, timeout: float = 10.0) -> dict[str, Any]:
        """Send one command line and return the answer line."""
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.send(command)
        await self.proc.stdin.drain()
        return await self.read(timeout)

    async def stop(self) -> None:
        """Ask it to quit, then wait ``stop_timeout``; kill it if it hangs."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.write(b"quit\n")
            await proc.stdin.drain()
            proc.stdin.close()
        try:
            async with asyncio.timeout(self.stop_timeout):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
