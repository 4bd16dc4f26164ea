"""Benchmark of the stdio ⇄ MQTT bridge: a stdio MCP server called directly and over MQTT.

Run from the repository root::

    .venv/bin/python bench/bridge.py              # about 50 s on 2 cores
    .venv/bin/python bench/bridge.py --calls 300  # shorter
    .venv/bin/python bench/bridge.py --wait-quiet 300  # first wait for idle CPUs
    .venv/bin/python bench/bridge.py --profile /tmp/bridge.prof  # cProfile of the bridge

The same stdio MCP server (``bench/_fastmcp_echo.py``, FastMCP, one tool
``echo(text)``, a child process per session) is called with a stock
``mcp.ClientSession`` from this process in three ways:

* **direct** (the baseline): ``mcp.client.stdio.stdio_client``, as any MCP
  host calls a stdio server;
* **through the bridge, QoS 0 and QoS 1**: ``ClientSession`` →
  ``McpMqttClientTransport`` on its own ``MqttClient`` (one per session, as
  the spec's mcp-client-id requires) → a private Mosquitto
  (``devkit.mosquitto``, random port, ``TCP_NODELAY``) → ``McpMqttServer`` on
  its own ``MqttClient`` → ``StdioHost`` → the child. The server side runs
  alone in a child process (``bench/_bridge_worker.py``: one MqttClient,
  McpMqttServer and StdioHost per QoS, on one standard asyncio loop), as it
  runs inside Home Assistant, apart from the MCP client; the client side (the
  session, its transport and MqttClient) runs in this process, as an agent
  would run it. Both QoS levels are set on both ends (server and transport).

Measured, in this order:

1. latency, ``tools/call`` → result (``time.perf_counter_ns`` around the
   awaited ``call_tool``), one call in flight, ``--calls`` per path after
   ``--warmup`` warm-up calls; the paths take turns in blocks of 50 so that
   changes in machine load hit all alike; p50/p99 and their ratio to direct;
2. sustained calls/s with one client: the latency sessions calling back to
   back (one call in flight), the paths taking turns in slices;
3. sustained calls/s with 10 concurrent clients: per path, 10 new sessions
   (10 stdio children; through the bridge 10 MqttClients and 10 children in
   the worker), each calling back to back for ``--seconds``.

Every call's argument is unique (path, client, sequence number); a result
that is not its own argument is counted as misrouted, an error result or a
failed call as failed: both must be 0. The target (issue 7): bridged p50 ≤
1.3x direct p50. One markdown table is printed; exit code 1 when a target
failed.
"""

# ruff: noqa: E402  (sys.path and the engine loader come before the project imports)

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable
import contextlib
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
import json
import logging
import math
import os
from pathlib import Path
import sys
import tempfile
import time
from typing import Any
import uuid

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _child

_child.load_engine()

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from bench import _report
from custom_components.mqtt_bridge.engine.mcp_mqtt import (
    CLIENT_COMPONENT,
    CLIENT_ID,
    COMPONENT_TYPE,
    McpMqttClientTransport,
)
from custom_components.mqtt_bridge.engine.mqtt_client import (
    Message,
    MqttClient,
    MqttSettings,
    PublishProperties,
)
from custom_components.mqtt_bridge.engine.subscriptions import SubscribeOptions
from devkit.mosquitto import Mosquitto

ECHO_SERVER = Path(__file__).resolve().parent / "_fastmcp_echo.py"
WORKER = Path(__file__).resolve().parent / "_bridge_worker.py"
TARGET = 1.3  # bridged p50 <= 1.3 x direct stdio p50 (issue 7)
CLIENTS = 10  # concurrent clients of the last phase
BLOCK = 50  # sequential calls of one path before the next path's turn
SLICES = 3  # turns per path in the one-client rate phase
CALL_TIMEOUT = 10.0  # seconds; a call taking longer counts as failed
CLK_TCK = os.sysconf("SC_CLK_TCK")
NA = "-"

#: The paths, in the order they take turns: direct stdio, bridge QoS 0, QoS 1.
KINDS = ("direct", "q0", "q1")
LABELS = {
    "direct": "direct stdio (`stdio_client`), the baseline",
    "q0": "through the MQTT bridge, QoS 0",
    "q1": "through the MQTT bridge, QoS 1",
    "floor": "MQTT alone (info): `MqttClient` → Mosquitto → the bridge process's "
    "`MqttClient` echoes → back; QoS 0, same user properties, a `tools/call` "
    "request as payload, no MCP",
}


class BenchError(RuntimeError):
    """Something the benchmark needs did not work."""


@dataclass(frozen=True, slots=True)
class Config:
    """What one run does."""

    calls: int  # sequential calls per path (latency)
    warmup: int  # per path, not counted
    seconds: float  # per path and rate phase
    clients: int = CLIENTS
    profile: Path | None = None
    wait_quiet: float = 0.0


def system_busy_seconds() -> float:
    """CPU time all processes used (``/proc/stat`` user + nice + system), in s.

    Interrupt and softirq time (this bench's own loopback traffic is partly
    processed there) and the hypervisor's steal time are left out: no
    process's utime/stime contains them.
    """
    with Path("/proc/stat").open() as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return sum(values[:3]) / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    """CPU time of ``root`` and its descendants, reaped ones included, in s.

    utime + stime + cutime + cstime of every live process of the tree (a
    reaped child's time is in its parent's cutime/cstime).
    """
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = (entry / "stat").read_text()
            fields = text[text.rindex(")") + 2 :].split()
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            times[pid] = sum(int(v) for v in fields[11:15]) / CLK_TCK
    total = 0.0
    for pid, seconds in times.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        if ancestor == root:
            total += seconds
    return total


class Load:
    """What other processes used of the CPUs while the bench ran."""

    def __init__(self) -> None:
        """Start measuring now."""
        self.wall = time.monotonic()
        self.system = system_busy_seconds()
        self.ours = tree_cpu_seconds(os.getpid())

    def others_percent(self) -> float:
        """Other processes' CPU since the start, in % of one core."""
        wall = max(1e-6, time.monotonic() - self.wall)
        ours = tree_cpu_seconds(os.getpid()) - self.ours
        return max(0.0, 100.0 * (system_busy_seconds() - self.system - ours) / wall)


def proc_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` (all its threads, not its children), in seconds.

    The scheduler's run time (``/proc/<pid>/task/*/schedstat``, ns), exact
    where utime/stime are sampled at clock ticks (10 ms).
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# -- results ------------------------------------------------------------------------


@dataclass(slots=True)
class Rate:
    """Calls completed over a wall-clock time; this process's and the bridge's CPU."""

    calls: int = 0
    seconds: float = 0.0
    client_cpu: float = 0.0  # s, this process (the MCP client side)
    worker_cpu: float = 0.0  # s, the bridge process (NaN for the direct path)

    @property
    def per_second(self) -> float:
        """Calls per second."""
        return self.calls / self.seconds if self.seconds > 0 else math.nan

    @property
    def client_us_per_call(self) -> float:
        """This process's CPU per call, in µs."""
        return self.client_cpu / self.calls * 1e6 if self.calls else math.nan

    @property
    def worker_us_per_call(self) -> float:
        """Bridge process CPU per call, in µs (NaN for the direct path)."""
        return self.worker_cpu / self.calls * 1e6 if self.calls else math.nan


@dataclass(slots=True)
class PathResult:
    """Everything measured for one path."""

    latency_ms: list[float] = field(default_factory=list)
    one: Rate = field(default_factory=Rate)
    many: Rate = field(default_factory=Rate)
    calls: int = 0  # every call made, warm-up included
    misrouted: int = 0
    failed: int = 0
    first_problem: str = ""

    @property
    def p50(self) -> float:
        """Median latency, in ms."""
        return _report.percentile(self.latency_ms, 0.50)

    @property
    def p99(self) -> float:
        """99th percentile latency, in ms."""
        return _report.percentile(self.latency_ms, 0.99)


class Caller:
    """Calls ``echo`` on one session with unique arguments and checks each result."""

    def __init__(self, session: ClientSession, tag: str, result: PathResult) -> None:
        """Arguments are ``{tag}:{sequence number}``; counts go to ``result``."""
        self.session = session
        self.tag = tag
        self.result = result
        self.seq = 0

    async def call(self) -> float:
        """One ``tools/call``; return its latency in ms (also when it failed)."""
        self.seq += 1
        text = f"{self.tag}:{self.seq}"
        result = self.result
        result.calls += 1
        start = time.perf_counter_ns()
        try:
            answer = await self.session.call_tool("echo", {"text": text})
        except Exception as err:  # McpError, timeouts, a closed transport
            elapsed = (time.perf_counter_ns() - start) / 1e6
            result.failed += 1
            result.first_problem = result.first_problem or f"{self.tag}: {err!r}"
            return elapsed
        elapsed = (time.perf_counter_ns() - start) / 1e6
        if answer.isError:
            result.failed += 1
            result.first_problem = result.first_problem or f"{text}: {answer.content}"
            return elapsed
        content = answer.content[0] if answer.content else None
        got = getattr(content, "text", None)
        if got != text:
            result.misrouted += 1
            result.first_problem = result.first_problem or f"{text} answered {got!r}"
        return elapsed


class FloorCaller:
    """The MQTT round trip alone: a request echoed by the bridge process's MqttClient."""

    def __init__(self, client: MqttClient, floor: str, result: PathResult) -> None:
        """Publish on ``floor/request``; the echo comes back on ``floor/response``."""
        self.client = client
        self.topic = f"{floor}/request"
        self.result = result
        self.seq = 0
        self.props = PublishProperties(
            user_properties=(
                (COMPONENT_TYPE, CLIENT_COMPONENT),
                (CLIENT_ID, client.client_id),
            )
        )
        self.waiters: dict[bytes, asyncio.Future[None]] = {}
        self.subscription = client.subscribe(
            f"{floor}/response", self._on_response, SubscribeOptions(qos=0)
        )

    def _on_response(self, message: Message) -> None:
        waiter = self.waiters.pop(message.payload, None)
        if waiter is None:
            self.result.misrouted += 1
        elif not waiter.done():
            waiter.set_result(None)

    async def call(self) -> float:
        """One request → echo; return its latency in ms."""
        self.seq += 1
        payload = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": self.seq,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": f"floor:{self.seq}"}},
            }
        ).encode()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters[payload] = waiter
        self.result.calls += 1
        start = time.perf_counter_ns()
        self.client.publish(self.topic, payload, qos=0, properties=self.props)
        try:
            async with asyncio.timeout(CALL_TIMEOUT):
                await waiter
        except TimeoutError:
            self.waiters.pop(payload, None)
            self.result.failed += 1
        return (time.perf_counter_ns() - start) / 1e6


# -- sessions -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stdio_session() -> AsyncIterator[ClientSession]:
    """The echo server as a child process of this one, with an initialized session."""
    params = StdioServerParameters(command=sys.executable, args=[str(ECHO_SERVER)])
    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230 (one open per session)
        async with (
            stdio_client(params, errlog=devnull) as (read, write),
            ClientSession(
                read, write, read_timeout_seconds=timedelta(seconds=CALL_TIMEOUT)
            ) as session,
        ):
            await session.initialize()
            await session.list_tools()  # as clients do; caches the output schema
            yield session


@contextlib.asynccontextmanager
async def mqtt_session(port: int, name: str, qos: int) -> AsyncIterator[ClientSession]:
    """A session through the bridge: its own MqttClient (client id = mcp-client-id)."""
    client_id = f"bench-cli-{uuid.uuid4().hex[:12]}"
    client = MqttClient(
        MqttSettings("127.0.0.1", port),
        client_id=client_id,
        will=McpMqttClientTransport.client_will(client_id),
    )
    task = asyncio.create_task(client.run(), name=f"mqtt {client_id}")
    try:
        async with asyncio.timeout(10):
            await client.wait_connected()
        transport = McpMqttClientTransport(client, name, timeout=10, qos=qos)
        async with (
            transport as (read, write),
            ClientSession(
                read, write, read_timeout_seconds=timedelta(seconds=CALL_TIMEOUT)
            ) as session,
        ):
            await session.initialize()
            await session.list_tools()
            yield session
    finally:
        task.cancel()
        await asyncio.wait({task})


@contextlib.asynccontextmanager
async def floor_caller(
    port: int, floor: str, result: PathResult
) -> AsyncIterator[FloorCaller]:
    """A :class:`FloorCaller` on its own MqttClient, subscribed."""
    client = MqttClient(
        MqttSettings("127.0.0.1", port), client_id=f"bench-floor-{uuid.uuid4().hex[:8]}"
    )
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(10):
            await client.wait_connected()
            caller = FloorCaller(client, floor, result)
            await caller.subscription.wait_granted()
        yield caller
    finally:
        task.cancel()
        await asyncio.wait({task})


Opener = Callable[[], AbstractAsyncContextManager[ClientSession]]


# -- the bridge worker --------------------------------------------------------------


class Worker(_child.ChildProcess):
    """``bench/_bridge_worker.py``: the bridge's server side in its own process."""

    label = "bridge worker"
    error = BenchError
    stop_timeout = 20.0  # it stops its children first

    def __init__(
        self, port: int, names: list[str], floor: str, log: Path, profile: Path | None
    ) -> None:
        """Prepare (not start) the worker for broker ``port`` and the server-names."""
        super().__init__(log)
        self.port = port
        self.names = names
        self.floor = floor
        self.profile = profile

    async def start(self) -> dict[str, Any]:
        """Start it and wait for its ready line (returned)."""
        args = [str(WORKER), "--port", str(self.port), "--server", str(ECHO_SERVER)]
        for name in self.names:
            args += ["--name", name]
        args += ["--floor", self.floor]
        if self.profile is not None:
            args += ["--profile", str(self.profile)]
        return await self.launch(args)

    async def stats(self) -> dict[str, Any]:
        """The worker's counters (see ``_bridge_worker.py``)."""
        return await self.ask("stats")

    async def wait_children(self, qos: int, running: int, timeout: float = 15) -> None:
        """Wait until the host of ``qos`` runs at most ``running`` children."""
        deadline = time.monotonic() + timeout
        while True:
            stats = await self.stats()
            now = stats["servers"][qos]["host"]["running"]
            if now <= running:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"QoS {qos} host still runs {now} children")
            await asyncio.sleep(0.05)

    def cpu(self) -> float:
        """The worker's CPU time so far, in s."""
        return proc_cpu_seconds(self.pid)


# -- phases -------------------------------------------------------------------------


async def latency(config: Config, callers: dict[str, Caller | FloorCaller]) -> None:
    """Sequential calls, one in flight; the paths take turns in blocks of ``BLOCK``."""
    for caller in callers.values():
        for _ in range(config.warmup):
            await caller.call()
    remaining = dict.fromkeys(callers, config.calls)
    while any(remaining.values()):
        for kind, caller in callers.items():
            samples = caller.result.latency_ms
            for _ in range(min(BLOCK, remaining[kind])):
                samples.append(await caller.call())
            remaining[kind] -= min(BLOCK, remaining[kind])


async def one_client_rate(
    config: Config, callers: dict[str, Caller | FloorCaller], worker: Worker
) -> None:
    """Back-to-back calls on one session; the paths take turns in ``SLICES`` slices."""
    slice_s = config.seconds / SLICES
    for _ in range(SLICES):
        for kind, caller in callers.items():
            rate = caller.result.one
            cpu, own = worker.cpu(), time.process_time()
            start = time.monotonic()
            deadline = start + slice_s
            while time.monotonic() < deadline:
                await caller.call()
                rate.calls += 1
            rate.seconds += time.monotonic() - start
            rate.client_cpu += time.process_time() - own
            if kind != "direct":
                rate.worker_cpu += worker.cpu() - cpu


async def many_clients_rate(
    config: Config, kind: str, opener: Opener, result: PathResult, worker: Worker
) -> None:
    """``config.clients`` sessions of their own, all calling back to back at once."""
    opened = 0
    all_open = asyncio.Event()
    go = asyncio.Event()
    deadline = math.inf
    finished: list[float] = []
    counts: list[int] = []
    errors: list[BaseException] = []
    stopped = asyncio.Event()  # every client finished calling (or failed)

    def arrived() -> None:
        nonlocal opened
        opened += 1
        if opened == config.clients:
            all_open.set()

    async def client(index: int) -> None:
        try:
            async with opener() as session:
                caller = Caller(session, f"{kind}-{index}", result)
                for _ in range(5):  # warm-up of this session
                    await caller.call()
                arrived()
                await go.wait()
                done = 0
                while time.monotonic() < deadline:
                    await caller.call()
                    done += 1
                finished.append(time.monotonic())
                counts.append(done)
                if len(finished) + len(errors) == config.clients:
                    stopped.set()
        except Exception as err:
            errors.append(err)
            if not all_open.is_set():
                arrived()
            if len(finished) + len(errors) == config.clients:
                stopped.set()

    tasks = [asyncio.create_task(client(i)) for i in range(config.clients)]
    try:
        async with asyncio.timeout(90):
            await all_open.wait()
        if errors:
            raise BenchError(f"{kind}: a client failed to start: {errors[0]!r}")
        cpu, own = worker.cpu(), time.process_time()
        start = time.monotonic()
        deadline = start + config.seconds
        go.set()
        async with asyncio.timeout(config.seconds + 3 * CALL_TIMEOUT):
            await stopped.wait()
        # (the sessions close after this: their CPU is not counted)
        result.many = Rate(
            sum(counts),
            max(finished, default=start) - start,
            time.process_time() - own,
            worker.cpu() - cpu if kind != "direct" else math.nan,
        )
        await asyncio.gather(*tasks)
        if errors:
            raise BenchError(f"{kind}: a client failed: {errors[0]!r}")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


# -- report -------------------------------------------------------------------------


def ms(value: float) -> str:
    """A duration in ms for the table."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


def ratio(value: float, base: float) -> str:
    """``value / base`` as ``1.23x``."""
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def report(
    config: Config, results: dict[str, PathResult], seconds: float, others: float
) -> tuple[str, bool]:
    """The header lines and the table; whether every target passed."""
    base = results["direct"]
    rows: list[tuple[str, ...]] = []
    passed = True
    for kind in KINDS:
        res = results[kind]
        clean = res.misrouted == 0 and res.failed == 0
        one, many = res.one, res.many
        if kind == "direct":
            vs = "1.00x (baseline)"
            worker_cpu = NA
            ok = clean
            mark = NA if ok else "FAIL"
        else:
            vs = f"**{ratio(res.p50, base.p50)}** (≤ {TARGET:g}x)"
            worker_cpu = f"{one.worker_us_per_call:.0f} µs"
            ok = res.p50 <= TARGET * base.p50 and clean
            mark = _report.mark(ok)
        passed = passed and ok
        rows.append(
            (
                LABELS[kind],
                ms(res.p50),
                vs,
                f"{ms(res.p99)} ({ratio(res.p99, base.p99)})",
                f"{one.per_second:.0f} ({ratio(one.per_second, base.one.per_second)})",
                f"{many.per_second:.0f} "
                f"({ratio(many.per_second, base.many.per_second)})",
                f"{one.client_us_per_call:.0f} µs / {worker_cpu}",
                f"{res.misrouted} / {res.failed} of {res.calls}",
                mark,
            )
        )
    floor = results["floor"]
    rows.append(
        (
            LABELS["floor"],
            ms(floor.p50),
            f"{ratio(floor.p50, base.p50)} (info)",
            f"{ms(floor.p99)} ({ratio(floor.p99, base.p99)})",
            NA,
            NA,
            NA,
            f"{floor.misrouted} / {floor.failed} of {floor.calls}",
            NA,
        )
    )
    header = _report.machine_line(
        "bench/bridge.py",
        False,
        f"mcp {_report.version('mcp')} · anyio {_report.version('anyio')}"
        f" · paho-mqtt {_report.version('paho-mqtt')}",
    )
    lines = [
        header,
        "",
        f"`tools/call` of `echo` (FastMCP, `bench/_fastmcp_echo.py`, a child "
        f"process per session). Latency: n={config.calls} sequential calls per "
        f"path after {config.warmup} warm-up, the paths taking turns in blocks "
        f"of {BLOCK}. Calls/s: back to back, one call in flight per client, "
        f"{config.seconds:g} s per path; 1 client = the latency session, "
        f"{config.clients} clients = new sessions, each with its own child (and "
        "through the bridge its own `MqttClient`). CPU per call: this process "
        "(the MCP client side) / the bridge process (server side, alone in its "
        "process), 1 client.",
        "",
        f"| path | p50 | p50 vs direct | p99 (vs direct) | calls/s, 1 client "
        f"| calls/s, {config.clients} clients | CPU per call: client / bridge "
        "| misrouted / failed of all calls | pass |",
        "|---|---|---|---|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    problems = [
        f"{kind}: {results[kind].first_problem}"
        for kind in (*KINDS, "floor")
        if results[kind].first_problem
    ]
    if problems:
        lines += ["", "First problem per path: " + "; ".join(problems)]
    verdict = "all targets met" if passed else "some targets FAILED"
    load = f"other processes used {others:.0f} % of a core on average" + (
        ""
        if others < _report.QUIET_LIMIT
        else " (WARN: contended, numbers pessimistic)"
    )
    lines += ["", f"_{seconds:.0f} s; {load}; {verdict}_"]
    return "\n".join(lines), passed


# -- main ---------------------------------------------------------------------------


async def run(config: Config) -> tuple[str, bool]:
    """Run every phase; return the report and whether all targets passed."""
    if config.wait_quiet > 0:
        await _report.wait_quiet(config.wait_quiet, system_busy_seconds)
    started = time.monotonic()
    load = Load()
    results = {kind: PathResult() for kind in (*KINDS, "floor")}
    prefix = f"bench/{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}/echo-q0", f"{prefix}/echo-q1"]
    floor = f"{prefix}/floor"
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp:
        broker = Mosquitto(workdir=Path(tmp))
        broker.start()
        worker = Worker(
            broker.port, names, floor, Path(tmp) / "worker.log", config.profile
        )
        try:
            ready = await worker.start()
            if ready.get("homeassistant_imported"):
                raise BenchError("the bridge worker imported Home Assistant")
            openers: dict[str, Opener] = {
                "direct": stdio_session,
                "q0": lambda: mqtt_session(broker.port, names[0], 0),
                "q1": lambda: mqtt_session(broker.port, names[1], 1),
            }
            async with contextlib.AsyncExitStack() as stack:
                callers: dict[str, Caller | FloorCaller] = {
                    kind: Caller(
                        await stack.enter_async_context(openers[kind]()),
                        f"{kind}-seq",
                        results[kind],
                    )
                    for kind in KINDS
                }
                callers["floor"] = await stack.enter_async_context(
                    floor_caller(broker.port, floor, results["floor"])
                )
                await latency(config, callers)
                del callers["floor"]
                await one_client_rate(config, callers, worker)
                for kind in KINDS:
                    await many_clients_rate(
                        config, kind, openers[kind], results[kind], worker
                    )
                    if kind != "direct":  # only the latency session's child left
                        await worker.wait_children(int(kind[1]), 1)
        finally:
            await worker.stop()
            broker.stop()
        others = load.others_percent()
    return report(config, results, time.monotonic() - started, others)


def main() -> int:
    """Parse arguments, run, print the table; exit 1 when a target failed."""
    parser = argparse.ArgumentParser(description="Benchmark the stdio ⇄ MQTT bridge.")
    parser.add_argument(
        "--calls",
        type=int,
        default=1000,
        metavar="N",
        help="sequential calls per path for the latency (default 1000)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=100,
        metavar="N",
        help="warm-up calls per path, not counted (default 100)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=2.0,
        help="seconds per path in each calls/s phase (default 2)",
    )
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help="concurrent clients (default 10)"
    )
    _report.add_run_options(parser, "the bridge process")
    args = parser.parse_args()
    if args.calls < 1 or args.warmup < 0 or args.seconds <= 0 or args.clients < 1:
        parser.error("--calls, --seconds and --clients must be positive")
    logging.basicConfig(level=logging.ERROR)
    config = Config(
        args.calls,
        args.warmup,
        args.seconds,
        args.clients,
        args.profile.resolve() if args.profile else None,
        args.wait_quiet,
    )
    return _report.run_main(run(config), "worker and broker", footer=False)


if __name__ == "__main__":
    sys.exit(main())
