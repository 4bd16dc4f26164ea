"""Benchmark of the virtual node (sharing the node): latency and CPU per packet.

Run from the repository root::

    .venv/bin/python bench/vnode.py            # full run, about 1 min
    .venv/bin/python bench/vnode.py --quick    # smoke run, < 30 s
    .venv/bin/python bench/vnode.py --wait-quiet 300   # first wait for idle CPUs

Processes (``bench/_vnode_children.py``): two node simulators (``sim``, each
alone in a process, ``devkit.meshsim``), and the engine (``vnode``: one
``NodeLink`` to the second simulator and one ``VirtualNodeServer``, loaded
without Home Assistant) in a process of its own, so its CPU time is its own.
This process holds the clients: raw stream-API clients on asyncio protocols
(wake bytes, ``want_config_id``, then they only read), which stamp each
arrival with ``time.monotonic_ns()`` (``CLOCK_MONOTONIC``, system-wide) before
anything else.

Measured:

1. **Latency node → client**, sequential (one text in flight), p50/p99: a
   simulator hears a text whose payload carries its ``monotonic_ns`` and hands
   it to its client at once. *Direct*: one client connected to the first
   simulator. *Virtual node*: 1, then 5 clients of the engine connected to the
   second one (every client must get every text; each arrival counts).
   Direct and virtual node take turns in blocks of 50 texts, so machine load
   hits both alike; each client count has its own direct baseline from the
   same window. Targets: virtual node p50 ≤ 1.5 x direct p50, and flat with
   the number of clients (p50 with 5 clients ≤ 1.25 x p50 with 1). For
   scale, a third path takes its turns too: one client of a byte-for-byte
   asyncio relay process (``relay``: no parsing at all) to a third simulator,
   the floor of any relay hop in Python on this machine.
2. **CPU per packet** of the engine process (``time.process_time()`` read in
   the process before and after): bursts of texts at a fixed rate with the
   server's port closed (the link alone: what Home Assistant does anyway), open
   with 0, 1 and 5 clients; median of three bursts each. The extra CPU of
   sharing is the difference to the link alone, per packet and per client copy.

One markdown table is printed at the end (``bench/_report.py`` conventions);
the exit code is 1 when a target failed.
"""

# ruff: noqa: E402  (sys.path is set up before the project imports)

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
import os
from pathlib import Path
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf.internal import api_implementation
from meshtastic.protobuf import mesh_pb2

from bench import _child

_child.load_engine()

from bench import _report
from bench._report import QUIET_LIMIT, Row, percentile
from bench.proxy import proc_cpu_seconds, system_busy_seconds
from custom_components.mqtt_bridge.engine.stream import (
    WAKE_BYTES,
    FrameDecoder,
    encode_frame,
)

CHILD = ROOT / "bench" / "_vnode_children.py"
LATENCY_FACTOR = 1.5  # virtual node p50 <= 1.5 x direct p50
FLAT_FACTOR = 1.25  # p50 with 5 clients <= 1.25 x p50 with 1 client
BLOCK = 50  # sequential texts per path before the other path's turn
MARK = b"VNB "
MARK_LEN = 32  # "VNB " + 8-digit sequence + " " + 19-digit nanoseconds
NA = "-"


@dataclass(frozen=True, slots=True)
class Config:
    """What one run does (``--quick`` shrinks it)."""

    quick: bool
    n: int  # sequential texts per path and client count
    warmup: int
    burst: int  # texts per CPU burst
    rate: float  # texts per second in a burst
    bursts: int  # bursts per configuration (median)

    @classmethod
    def make(cls, *, quick: bool) -> Config:
        """Return the full or the quick configuration."""
        if quick:
            return cls(True, 300, 50, 1000, 1000.0, 3)
        return cls(False, 1000, 200, 3000, 1000.0, 3)


# -- children ----------------------------------------------------------------------


class Child(_child.ChildProcess):
    """A child process of ``_vnode_children.py``; its ready line in :attr:`ready`."""

    stop_timeout = 5.0

    def __init__(self, log: Path, role: str) -> None:
        """Prepare (not start) a ``role`` child (sim, vnode or relay) logging to ``log``."""
        super().__init__(log)
        self.label = role
        self.role = role
        self.ready: dict[str, Any] = {}

    async def start(self, *args: str) -> None:
        """Start ``_vnode_children.py role *args`` and wait for its ready line."""
        self.ready = await self.launch([str(CHILD), self.role, *args])

    @property
    def port(self) -> int:
        """The TCP port the child listens on."""
        return int(self.ready["port"])


# -- clients -----------------------------------------------------------------------


class Client(asyncio.Protocol):
    """A raw stream-API client: handshake, then stamp each bench text's arrival."""

    def __init__(self, on_text: Callable[[Client, int, int, int], None]) -> None:
        """``on_text(client, seq, sent_ns, arrived_ns)`` is called per bench text."""
        self.on_text = on_text
        self.transport: asyncio.Transport | None = None
        self.decoder: FrameDecoder | None = FrameDecoder()
        self.nonce = 0
        self.live: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Stamp first; during the handshake look for ``config_complete_id``."""
        now = time.monotonic_ns()
        if self.decoder is not None:
            for payload in self.decoder.feed(data):
                message = mesh_pb2.FromRadio.FromString(payload)
                if message.config_complete_id == self.nonce and self.nonce:
                    self.decoder = None
                    if not self.live.done():
                        self.live.set_result(None)
            return
        buf = self.buffer + data if self.buffer else data
        pos = 0
        while True:
            i = buf.find(MARK, pos)
            if i < 0:
                self.buffer = buf[-(len(MARK) - 1) :]
                return
            if i + MARK_LEN > len(buf):
                self.buffer = buf[i:]
                return
            seq, sent = int(buf[i + 4 : i + 12]), int(buf[i + 13 : i + 32])
            self.on_text(self, seq, sent, now)
            pos = i + MARK_LEN

    @classmethod
    async def connect(
        cls, port: int, nonce: int, on_text: Callable[[Client, int, int, int], None]
    ) -> Client:
        """Connect to 127.0.0.1:``port`` and complete a handshake."""
        loop = asyncio.get_running_loop()
        _transport, client = await loop.create_connection(
            lambda: cls(on_text), "127.0.0.1", port
        )
        client.nonce = nonce
        assert client.transport is not None
        request = mesh_pb2.ToRadio(want_config_id=nonce).SerializeToString()
        client.transport.write(WAKE_BYTES + encode_frame(request))
        async with asyncio.timeout(10):
            await client.live
        return client

    def close(self) -> None:
        """Close the connection."""
        if self.transport is not None:
            self.transport.close()


@dataclass(slots=True)
class Waiter:
    """Arrivals of one text at the clients that must all get it."""

    need: int
    latencies_us: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Arrivals:
    """Routes each client's arrivals to the text it belongs to."""

    def __init__(self) -> None:
        """No text is awaited yet."""
        self.waiting: dict[int, Waiter] = {}
        self.counts: dict[Client, int] = {}

    def on_text(self, client: Client, seq: int, sent_ns: int, arrived_ns: int) -> None:
        """Record one arrival."""
        self.counts[client] = self.counts.get(client, 0) + 1
        waiter = self.waiting.get(seq)
        if waiter is None:
            return
        waiter.latencies_us.append((arrived_ns - sent_ns) / 1000)
        if len(waiter.latencies_us) >= waiter.need:
            waiter.done.set()


# -- phases ------------------------------------------------------------------------


@dataclass(slots=True)
class Latency:
    """Sequential latencies of one path (all client arrivals), microseconds."""

    all_us: list[float] = field(default_factory=list)
    last_us: list[float] = field(default_factory=list)  # slowest client per text

    @property
    def p50(self) -> float:
        """Median over all arrivals."""
        return percentile(self.all_us, 0.5)

    @property
    def p99(self) -> float:
        """99th percentile over all arrivals."""
        return percentile(self.all_us, 0.99)


class Bench:
    """The children, the clients and the phases."""

    def __init__(self, config: Config, logs: Path, profile: Path | None = None) -> None:
        """Nothing runs until :meth:`setup`; children log to files in ``logs``.

        ``profile``: cProfile file of the engine.
        """
        self.config = config
        self.logs = logs
        self.profile = profile
        self.arrivals = Arrivals()
        self.children: list[Child] = []
        self.direct_sim: Child | None = None
        self.shared_sim: Child | None = None
        self.vnode: Child | None = None
        self.relay_sim: Child | None = None
        self.relay: Child | None = None
        self.direct: Client | None = None
        self.relayed: Client | None = None
        self.clients: list[Client] = []
        self.seq = 0

    async def child(self, role: str, *args: str) -> Child:
        """Start a ``role`` child with ``args``; :meth:`teardown` stops it."""
        child = Child(self.logs / f"{len(self.children)}-{role}.log", role)
        self.children.append(child)
        await child.start(*args)
        return child

    async def setup(self) -> None:
        """Start the simulators, the engine and the relay; connect the single clients."""
        self.direct_sim = await self.child("sim")
        self.shared_sim = await self.child("sim")
        profile = ["--profile", str(self.profile)] if self.profile else []
        self.vnode = await self.child(
            "vnode", "--node-port", str(self.shared_sim.port), *profile
        )
        if self.vnode.ready.get("homeassistant_imported"):
            raise RuntimeError("the engine process imported Home Assistant")
        self.direct = await Client.connect(
            self.direct_sim.port, 1, self.arrivals.on_text
        )
        self.relay_sim = await self.child("sim")
        self.relay = await self.child("relay", "--node-port", str(self.relay_sim.port))
        self.relayed = await Client.connect(self.relay.port, 2, self.arrivals.on_text)

    async def teardown(self) -> None:
        """Close clients and children."""
        for client in [self.direct, self.relayed, *self.clients]:
            if client is not None:
                client.close()
        for child in reversed(self.children):
            await child.stop()

    async def shared_clients(self, count: int) -> None:
        """Connect or close virtual node clients until ``count`` are connected."""
        assert self.vnode is not None
        while len(self.clients) < count:
            client = await Client.connect(
                self.vnode.port, 1000 + len(self.clients), self.arrivals.on_text
            )
            self.clients.append(client)
        while len(self.clients) > count:
            self.clients.pop().close()
        async with asyncio.timeout(5):
            while (await self.vnode.ask("cpu"))["clients"] != count:  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    async def one_text(self, sim: Child, need: int) -> list[float]:
        """Have ``sim`` hear one text; return its latencies at ``need`` clients."""
        self.seq += 1
        waiter = Waiter(need)
        self.arrivals.waiting[self.seq] = waiter
        sim.send(f"lat {self.seq}")
        try:
            async with asyncio.timeout(5):
                await waiter.done.wait()
        finally:
            del self.arrivals.waiting[self.seq]
        return waiter.latencies_us

    async def latency(self) -> list[Latency]:
        """Direct, virtual node and relay latency, taking turns in blocks."""
        assert self.direct_sim is not None
        assert self.shared_sim is not None
        assert self.relay_sim is not None
        paths = [
            (self.direct_sim, 1),
            (self.shared_sim, len(self.clients)),
            (self.relay_sim, 1),
        ]
        results = [Latency() for _ in paths]
        total = self.config.warmup + self.config.n
        done = 0
        while done < total:
            block = min(BLOCK, total - done)
            for (sim, need), into in zip(paths, results, strict=True):
                for i in range(block):
                    values = await self.one_text(sim, need)
                    if done + i >= self.config.warmup:
                        into.all_us.extend(values)
                        into.last_us.append(max(values))
            done += block
        return results

    async def cpu_burst(self) -> tuple[float, float]:
        """One burst; return (engine CPU µs per packet, seconds the burst took)."""
        assert self.shared_sim is not None
        assert self.vnode is not None
        count = self.config.burst
        before = await self.vnode.ask("cpu")
        counts = {
            client: self.arrivals.counts.get(client, 0) for client in self.clients
        }
        seq0 = self.seq + 1
        self.seq += count
        answer = await self.shared_sim.ask(
            f"burst {count} {self.config.rate} {seq0}", timeout=60
        )
        async with asyncio.timeout(30):
            while True:
                now = await self.vnode.ask("cpu")
                arrived = all(
                    self.arrivals.counts.get(client, 0) - counts[client] >= count
                    for client in self.clients
                )
                if now["frames_rx"] - before["frames_rx"] >= count and arrived:
                    break
                await asyncio.sleep(0.01)
        if now["dropped_slow"]:
            raise RuntimeError("a bench client was dropped as slow")
        return (now["cpu"] - before["cpu"]) / count * 1e6, float(answer["seconds"])

    async def cpu(self, label: str) -> tuple[str, float, float]:
        """Median CPU per packet of ``config.bursts`` bursts."""
        runs = [await self.cpu_burst() for _ in range(self.config.bursts)]
        return label, statistics.median(r[0] for r in runs), max(r[1] for r in runs)


# -- report ------------------------------------------------------------------------


def latency_rows(
    clients: int, direct: Latency, shared: Latency, relay: Latency
) -> list[Row]:
    """Rows of one client count's latency (``relay``: the floor, for scale)."""
    ratio = shared.p50 / direct.p50
    label = f"{clients} client{'s' if clients > 1 else ''}"
    return [
        (
            f"latency node → client p50, {label} (n={len(shared.all_us)} "
            "arrivals, sequential)",
            f"{shared.p50:.0f} µs",
            f"{direct.p50:.0f} µs",
            f"{ratio:.2f}x (≤ {LATENCY_FACTOR}x)",
            _report.mark(ratio <= LATENCY_FACTOR),
        ),
        (
            f"latency p99, {label}; slowest client per text p50",
            f"{shared.p99:.0f} µs; {percentile(shared.last_us, 0.5):.0f} µs",
            f"{direct.p99:.0f} µs",
            f"{shared.p99 / direct.p99:.2f}x (info)",
            NA,
        ),
        (
            f"latency added by the virtual node, {label}: p50, p99",
            f"+{shared.p50 - direct.p50:.0f} µs, +{shared.p99 - direct.p99:.0f} µs",
            NA,
            "info (a Wi-Fi hop is 1-10 ms, LoRa airtime 0.1-2 s)",
            NA,
        ),
        (
            "for scale: a byte-for-byte asyncio relay (no parsing, 1 client) "
            "in the same turns: p50",
            f"{relay.p50:.0f} µs (relay)",
            f"{direct.p50:.0f} µs",
            f"{relay.p50 / direct.p50:.2f}x (info: any relay hop in Python)",
            NA,
        ),
    ]


def cpu_rows(results: list[tuple[str, float, float]], config: Config) -> list[Row]:
    """Rows of the CPU phase (information: no target)."""
    base = results[0][1]
    rows: list[Row] = []
    for label, per_packet, seconds in results:
        extra = per_packet - base
        rows.append(
            (
                f"engine CPU per packet, {label} ({config.burst} texts at "
                f"{config.rate:.0f}/s, median of {config.bursts})",
                f"{per_packet:.1f} µs",
                f"{base:.1f} µs (link only)",
                NA if label.startswith("link") else f"+{extra:.1f} µs (info)",
                NA,
            )
        )
        del seconds
    five = results[-1][1]
    zero = results[1][1]
    rows.append(
        (
            "extra CPU per forwarded copy (5 clients vs 0, per client)",
            f"{(five - zero) / 5:.1f} µs",
            NA,
            "info",
            NA,
        )
    )
    return rows


def machine_line(quick: bool) -> str:
    """One line: CPU, cores, OS, Python and the versions that matter."""
    return _report.machine_line(
        "bench/vnode.py",
        quick,
        f"protobuf {_report.version('protobuf')} ({api_implementation.Type()})"
        f" · meshtastic {_report.version('meshtastic')}",
    )


async def run(
    config: Config, profile: Path | None = None, quiet: float = 0.0
) -> tuple[str, bool]:
    """Run every phase; return the report and whether all targets passed.

    ``quiet``: first wait up to that many seconds for other processes to
    leave the CPUs idle.
    """
    if quiet > 0:
        await _report.wait_quiet(quiet, system_busy_seconds)
    with tempfile.TemporaryDirectory(prefix="bench-vnode-") as logs:
        return await _measure(Bench(config, Path(logs), profile))


async def _measure(bench: Bench) -> tuple[str, bool]:
    """Set ``bench`` up, run its phases, tear it down; return the report and verdict."""
    config = bench.config
    try:
        await bench.setup()
        pids = [os.getpid(), *(child.pid for child in bench.children)]
        ours_start = sum(proc_cpu_seconds(pid) for pid in pids)
        busy_start, wall_start = system_busy_seconds(), time.monotonic()
        await bench.shared_clients(1)
        direct1, shared1, relay1 = await bench.latency()
        await bench.shared_clients(5)
        direct5, shared5, relay5 = await bench.latency()
        ours = sum(proc_cpu_seconds(pid) for pid in pids) - ours_start
        others_seconds = system_busy_seconds() - busy_start - ours
        wall_latency = time.monotonic() - wall_start
        results = [await bench.cpu("5 clients")]
        await bench.shared_clients(1)
        results.append(await bench.cpu("1 client"))
        await bench.shared_clients(0)
        results.append(await bench.cpu("port open, 0 clients"))
        assert bench.vnode is not None
        await bench.vnode.ask("stop")
        results.append(await bench.cpu("link only (port closed)"))
    finally:
        await bench.teardown()
    ordered = [results[3], results[2], results[1], results[0]]
    rows = latency_rows(1, direct1, shared1, relay1)
    rows += latency_rows(5, direct5, shared5, relay5)
    flat = shared5.p50 / shared1.p50
    rows.append(
        (
            "flat with the number of clients: p50 5 clients / 1 client",
            f"{shared5.p50:.0f} / {shared1.p50:.0f} µs",
            f"{direct5.p50:.0f} / {direct1.p50:.0f} µs",
            f"{flat:.2f}x (≤ {FLAT_FACTOR}x)",
            _report.mark(flat <= FLAT_FACTOR),
        )
    )
    rows += cpu_rows(ordered, config)
    others = max(0.0, 100.0 * others_seconds / wall_latency)
    rows.append(
        (
            "machine: other processes' CPU during the latency phases",
            f"{others:.0f} % of one core",
            NA,
            f"< {QUIET_LIMIT:.0f} %",
            "OK" if others < QUIET_LIMIT else "WARN: contended, numbers noisy",
        )
    )
    passed = all(r[4] != "FAIL" for r in rows)
    return _report.table(
        machine_line(config.quick), "virtual node", "direct", rows
    ), passed


def main() -> int:
    """Parse arguments, run, print the table; exit 1 when a target failed."""
    parser = argparse.ArgumentParser(description="Benchmark the virtual node.")
    parser.add_argument("--quick", action="store_true", help="smoke run, < 30 s")
    _report.add_run_options(parser, "the engine process")
    args = parser.parse_args()
    config = Config.make(quick=args.quick)
    profile = args.profile.resolve() if args.profile else None
    return _report.run_main(run(config, profile, args.wait_quiet), "children")


if __name__ == "__main__":
    sys.exit(main())
