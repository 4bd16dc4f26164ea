"""Performance benchmark of the Meshtastic MQTT client proxy engine.

Run from the repository root::

    .venv/bin/python bench/proxy.py            # full run, about 1.5 min on 2 cores
    .venv/bin/python bench/proxy.py --quick    # smoke run, < 60 s

One process (this one) runs a private Mosquitto (``devkit.mosquitto``), the node
simulator (``devkit.meshsim``) and two plain MQTT clients (a QoS-1 subscriber and
a QoS-1 publisher, both with ``TCP_NODELAY``). The proxy engine runs alone in a
child process (``bench/_worker.py``), so its CPU time (``/proc/<pid>/stat``
utime+stime) and RSS (``/proc/<pid>/status`` VmRSS) are measured on their own.

Measured, in this order:

1. latency, sequential (one message in flight), p50/p99: the baseline (a direct
   publish -> subscriber through the same broker, QoS 1), uplink (node frame ->
   broker subscriber) and downlink (broker publish -> node frame), taking turns
   in blocks; the targets compare the proxy's p50 with the baseline's;
2. highest sustained rate per direction: the offered rate is stepped (paced
   open-loop); a step passes when every message arrived and p99 < 50 ms; the
   proxy's CPU share at the target rate is the median of several runs;
3. memory: proxy RSS before and after 100 000 uplinks and an overload burst;
4. (beyond the targets) proxy RSS during a downlink flood.

Timestamps are ``time.monotonic_ns()`` (``CLOCK_MONOTONIC``, system-wide on Linux)
taken in this process at send and at arrival; each payload carries its send
time, a run id and a sequence number. One markdown table is printed at the end.
"""

# ruff: noqa: E402  (sys.path is set up before the project imports)

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field
import gc
import math
import os
from pathlib import Path
import socket
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiomqtt
from google.protobuf.internal import api_implementation
from meshtastic.protobuf import mesh_pb2, mqtt_pb2, portnums_pb2
from paho.mqtt import client as paho

from bench import _child, _report
from devkit.meshsim import SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto

# -- constants ---------------------------------------------------------------------

REMOTE_NUM = 0xCAFE0001
REMOTE_ID = "!cafe0001"
CHANNEL = "LongFast"
BASELINE_TOPIC = "bench/baseline"
DOWNLINK_TOPIC = f"msh/2/e/{CHANNEL}/{REMOTE_ID}"
BROADCAST = 0xFFFFFFFF
TEXT_LEN = 48  # bytes of the text payload: a short chat message
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
CLK_TCK = os.sysconf("SC_CLK_TCK")

LATENCY_FACTOR = 2.0  # proxy p50 <= 2 x baseline p50
STEP_P99_LIMIT_MS = 50.0
UPLINK_TARGET = 2000
DOWNLINK_TARGET = 1000
CPU_LIMIT = 50.0  # % of one core at the target rate
RSS_FLAT_LIMIT_MIB = 4.0  # growth allowed over the memory burst
NA = "-"  # table cell of a column that does not apply
HARNESS_BACKLOG_LIMIT = 200  # bench-side queue beyond which a step is harness-bound
LATENCY_BLOCK = 50  # sequential messages per direction before the next one's turn
SPEED_SPREAD = 1.5  # max/min speed-check ratio tolerated without a warning
CPU_RUNS = 5  # runs at the target rate; the CPU verdict uses their median
MEMORY_WINDOW = 256  # uplinks outstanding at most during the memory push


@dataclass(frozen=True, slots=True)
class Config:
    """What one run does (``--quick`` shrinks everything)."""

    quick: bool
    n: int
    warmup: int
    step_seconds: float
    rates_up: tuple[int, ...]
    rates_down: tuple[int, ...]
    memory_messages: int
    profile: Path | None = None
    wait_quiet: float = 0.0

    @classmethod
    def make(
        cls, *, quick: bool, profile: Path | None = None, wait_quiet: float = 0.0
    ) -> Config:
        """Return the full or the quick configuration."""
        rates = (250, 500, 1000, 2000, 3000, 4000, 6000, 8000)
        if quick:
            return cls(True, 200, 50, 1.0, rates, rates, 20_000, profile, wait_quiet)
        return cls(False, 1000, 200, 3.0, rates, rates, 100_000, profile, wait_quiet)


# -- /proc readers -----------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """Return utime + stime of process ``pid`` (all threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    """Return VmRSS of process ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def system_busy_seconds() -> float:
    """Return the CPU time all processes used (``/proc/stat``: not idle/iowait), in s."""
    with Path("/proc/stat").open() as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def run_queue_wait_seconds(pid: int) -> float:
    """Return how long ``pid``'s main thread waited for a CPU (``schedstat``), in s."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    return 0.0


@dataclass(slots=True)
class CpuWindow:
    """CPU shares (% of one core) of several processes over one wall-clock window.

    Besides the named processes it reports ``others`` (everything else on the
    machine: a busy machine makes the numbers meaningless) and ``proxy_wait``
    (the share of the window the engine's event-loop thread sat runnable but
    without a CPU).
    """

    pids: dict[str, int]
    start_wall: float = 0.0
    start_cpu: dict[str, float] = field(default_factory=dict)
    start_system: float = 0.0
    start_wait: float = 0.0

    def start(self) -> None:
        """Open the window."""
        self.start_wall = time.monotonic()
        self.start_cpu = {k: proc_cpu_seconds(p) for k, p in self.pids.items()}
        self.start_system = system_busy_seconds()
        self.start_wait = run_queue_wait_seconds(self.pids["proxy"])

    def shares(self) -> dict[str, float]:
        """Return CPU shares since :meth:`start`, in % of one core."""
        cpu = {k: proc_cpu_seconds(p) for k, p in self.pids.items()}
        system = system_busy_seconds()
        wait = run_queue_wait_seconds(self.pids["proxy"])
        wall = max(1e-6, time.monotonic() - self.start_wall)
        out = {k: 100.0 * (cpu[k] - self.start_cpu[k]) / wall for k in self.pids}
        ours = sum(cpu[k] - self.start_cpu[k] for k in self.pids)
        out["others"] = max(0.0, 100.0 * (system - self.start_system - ours) / wall)
        out["proxy_wait"] = 100.0 * (wait - self.start_wait) / wall
        out["wall"] = wall
        return out


# -- payloads and arrival tracking -------------------------------------------------


def make_envelope(gateway: str, sender: int, run: int, seq: int, sent_ns: int) -> bytes:
    """Return a ServiceEnvelope with a decoded text packet carrying run/seq/time."""
    env = mqtt_pb2.ServiceEnvelope(channel_id=CHANNEL, gateway_id=gateway)
    packet = env.packet
    setattr(packet, "from", sender)
    packet.to = BROADCAST
    packet.id = ((run << 20) ^ seq ^ 0x5A5A5A5A) & 0xFFFFFFFF or 1
    packet.hop_limit = 3
    packet.hop_start = 3
    packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
    text = b"%04d:%08d:%019d " % (run, seq, sent_ns)
    packet.decoded.payload = text.ljust(TEXT_LEN, b".")
    return env.SerializeToString()


def read_envelope(payload: bytes) -> tuple[int, int, int] | None:
    """Return ``(run, seq, sent_ns)`` from a bench envelope, ``None`` if foreign."""
    try:
        text = mqtt_pb2.ServiceEnvelope.FromString(payload).packet.decoded.payload
        return int(text[0:4]), int(text[5:13]), int(text[14:33])
    except Exception:  # ValueError, protobuf's DecodeError and the like
        return None


class Tracker:
    """Latencies and arrivals of one phase (one run id, ``expected`` messages)."""

    def __init__(self, run: int, expected: int) -> None:
        """Expect sequence numbers ``0 .. expected-1`` tagged with ``run``."""
        self.run = run
        self.expected = expected
        self.seen = bytearray(expected)
        self.received = 0
        self.duplicates = 0
        self.latencies_ns: list[int] = []
        self.last_arrival = 0.0
        self.done = asyncio.Event()
        self.waiter: asyncio.Future[None] | None = None

    def record(self, seq: int, sent_ns: int, now_ns: int) -> None:
        """Count one arrival."""
        if not 0 <= seq < self.expected or self.seen[seq]:
            self.duplicates += 1
            return
        self.seen[seq] = 1
        self.received += 1
        self.latencies_ns.append(now_ns - sent_ns)
        self.last_arrival = time.monotonic()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.received == self.expected:
            self.done.set()


def speed_check() -> float:
    """Return the thread CPU time, in ms, of a fixed pure-Python workload.

    On a virtual machine the same work can cost more CPU time when the host
    is busy, which inflates every CPU figure; this makes that visible. The
    fastest of three samples of about 7 ms each (sporadic interference drops out).
    """
    samples = []
    enabled = gc.isenabled()
    gc.disable()  # a collection of the bench's heap would be counted otherwise
    try:
        for _ in range(3):
            start = time.thread_time()
            acc = 0
            for i in range(100_000):
                acc += i * i % 7
            samples.append((time.thread_time() - start) * 1000)
    finally:
        if enabled:
            gc.enable()
    return min(samples)


@dataclass(slots=True)
class Latency:
    """p50/p99 of one sequential phase, in microseconds."""

    p50_us: float
    p99_us: float
    n: int


@dataclass(slots=True)
class Step:
    """One paced step of the throughput search."""

    rate: int
    sent: int
    received: int
    offered_rate: float
    p99_ms: float
    cpu: dict[str, float]
    proxy_drops: int
    harness_backlog: int
    speed_ms: float

    @property
    def harness_limited(self) -> bool:
        """The bench's own clients fell behind: the step says little about the proxy."""
        return self.harness_backlog > HARNESS_BACKLOG_LIMIT

    @property
    def cpu_us_per_msg(self) -> float:
        """Proxy CPU time per message offered, in microseconds."""
        return self.cpu["proxy"] / 100 * self.cpu["wall"] / max(1, self.sent) * 1e6

    @property
    def ok(self) -> bool:
        """Nothing lost and p99 below the limit."""
        return self.received == self.sent and self.p99_ms < STEP_P99_LIMIT_MS


@dataclass(slots=True)
class Memory:
    """Proxy RSS around the 100k push and the overload burst, and what they did."""

    startup_kib: int
    before_kib: int
    after_push_kib: int
    peak_kib: int
    after_kib: int
    messages: int
    delivered: int
    dropped: int
    seconds: float
    burst: int
    burst_delivered: int
    burst_dropped: int


def paho_baseline(port: int, n: int, warmup: int) -> Latency:
    """Sequential QoS-1 publish -> receive with paho ``loop_start`` threads.

    The method of ``shared/reference/mqtt-broker.md`` §7 (TCP_NODELAY set in
    ``on_socket_open``); blocking, run it in a thread. For information: the
    latency targets use the asyncio baseline measured with the bench's own
    clients, whose end points are the same as the proxy measurements'.
    """
    arrived = threading.Event()
    stamps: list[int] = []

    def nodelay(_client: paho.Client, _userdata: object, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def on_message(_client: paho.Client, _userdata: object, msg: Any) -> None:
        stamps.append(time.monotonic_ns())
        arrived.set()

    subscribed = threading.Event()
    sub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho-sub")
    pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-paho-pub")
    for client in (sub, pub):
        client.on_socket_open = nodelay
    sub.on_message = on_message
    sub.on_subscribe = lambda *_args: subscribed.set()
    latencies: list[float] = []
    try:
        sub.connect("127.0.0.1", port)
        pub.connect("127.0.0.1", port)
        sub.loop_start()
        pub.loop_start()
        sub.subscribe("bench/paho", qos=1)
        if not subscribed.wait(5.0):
            raise RuntimeError("paho baseline: no SUBACK")
        for seq in range(warmup + n):
            arrived.clear()
            sent = time.monotonic_ns()
            info = pub.publish("bench/paho", b"x" * 100, qos=1)
            if not arrived.wait(5.0):
                raise RuntimeError("paho baseline: message lost")
            info.wait_for_publish(5.0)
            if seq >= warmup:
                latencies.append((stamps[-1] - sent) / 1000)
    finally:
        for client in (sub, pub):
            client.disconnect()
            client.loop_stop()
    return Latency(
        _report.percentile(latencies, 0.5), _report.percentile(latencies, 0.99), n
    )


@dataclass(slots=True)
class Flood:
    """The downlink flood: what arrived and the proxy's RSS around it (KiB)."""

    messages: int
    delivered: int
    dropped: int
    seconds: float
    before_kib: int
    peak_kib: int
    after_kib: int


# -- the simulated node's arrival hook ---------------------------------------------


class _DownlinkHook(list[mesh_pb2.MqttClientProxyMessage]):
    """Replaces ``SimulatedNode.downlinks``: timestamps each accepted proxy ToRadio.

    The simulator appends every proxy message it accepts (firmware
    ``MQTT::onClientProxyReceive``) to ``node.downlinks``; this list stamps the
    arrival with ``time.monotonic_ns()`` and reports it instead of storing it.
    """

    def __init__(self, on_arrival: Callable[[bytes, int], None]) -> None:
        super().__init__()
        self._on_arrival = on_arrival
        self.count = 0

    def append(self, item: mesh_pb2.MqttClientProxyMessage) -> None:
        """Stamp and report one downlink (not stored: the bench sends 100k+)."""
        now = time.monotonic_ns()
        self.count += 1
        self._on_arrival(item.data, now)


# -- the engine child process ------------------------------------------------------


class Worker(_child.ChildProcess):
    """The proxy engine in a child process (``bench/_worker.py``)."""

    label = "worker"

    def __init__(self, node_port: int, profile: Path | None, log: Path) -> None:
        """Prepare; :meth:`start` launches it."""
        super().__init__(log)
        self.node_port = node_port
        self.profile = profile
        self.ready: dict[str, Any] = {}

    async def start(self) -> None:
        """Launch the worker and wait for its ``ready`` line (link + broker up)."""
        argv = [str(ROOT / "bench" / "_worker.py")]
        argv += ["--node-port", str(self.node_port)]
        if self.profile is not None:
            argv += ["--profile", str(self.profile)]
        self.ready = await self.launch(argv)

    async def stats(self) -> dict[str, Any]:
        """Return the engine's counters."""
        return await self.ask("stats")


# -- the bench ---------------------------------------------------------------------


class Bench:
    """Broker, node simulator, MQTT clients and the engine worker of one run."""

    def __init__(self, config: Config, workdir: Path) -> None:
        """Prepare (nothing starts until :meth:`setup`)."""
        self.config = config
        self.workdir = workdir
        self.broker = Mosquitto()
        self.node: SimulatedNode | None = None
        self.worker: Worker | None = None
        self.sub: aiomqtt.Client | None = None
        self.pub: aiomqtt.Client | None = None
        self.trackers: dict[str, Tracker | None] = {
            "up": None,
            "down": None,
            "base": None,
        }
        self.hook: _DownlinkHook | None = None
        self._run = 0
        self._stack = contextlib.AsyncExitStack()
        self._publishes: set[asyncio.Task[None]] = set()
        self.publish_errors = 0

    # -- lifecycle -----------------------------------------------------------------

    async def setup(self) -> None:
        """Start broker, node, clients and worker; wait until the proxy is live."""
        self.broker.start()
        node = SimulatedNode(
            default_profile(mqtt_address=f"127.0.0.1:{self.broker.port}")
        )
        self.node = node
        node_port = await node.start_tcp()
        self.hook = _DownlinkHook(self._on_downlink)
        node.downlinks = self.hook
        self.sub = await self._stack.enter_async_context(
            aiomqtt.Client(
                "127.0.0.1",
                self.broker.port,
                identifier="bench-sub",
                socket_options=NODELAY,
            )
        )
        await self.sub.subscribe(
            [(node.topic_for(0), 1), (BASELINE_TOPIC, 1)]  # type: ignore[list-item]
        )
        reader = asyncio.create_task(self._read_sub(self.sub), name="bench sub")
        self._stack.push_async_callback(self._cancel, reader)
        self.pub = await self._stack.enter_async_context(
            aiomqtt.Client(
                "127.0.0.1",
                self.broker.port,
                identifier="bench-pub",
                socket_options=NODELAY,
                max_inflight_messages=100,
            )
        )
        self.pub.pending_calls_threshold = 1 << 30
        self.worker = Worker(
            node_port, self.config.profile, self.workdir / "worker.log"
        )
        await self.worker.start()

    async def teardown(self) -> None:
        """Stop everything this run started (worker, clients, node, broker)."""
        try:
            if self.worker is not None:
                await self.worker.stop()
        finally:
            try:
                for task in list(self._publishes):
                    task.cancel()
                with contextlib.suppress(Exception):
                    await self._stack.aclose()
                if self.node is not None:
                    await self.node.stop()
            finally:
                self.broker.cleanup()

    @staticmethod
    async def _cancel(task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.wait({task})

    # -- arrivals --------------------------------------------------------------------

    async def _read_sub(self, client: aiomqtt.Client) -> None:
        """Dispatch subscriber messages: baseline topic or the node's uplink topic."""
        async for message in client.messages:
            now = time.monotonic_ns()
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                continue
            kind = "base" if message.topic.value == BASELINE_TOPIC else "up"
            self._arrival(kind, bytes(payload), now)

    def _on_downlink(self, data: bytes, now_ns: int) -> None:
        self._arrival("down", data, now_ns)

    def _arrival(self, kind: str, payload: bytes, now_ns: int) -> None:
        tracker = self.trackers[kind]
        if tracker is None:
            return
        parsed = read_envelope(payload)
        if parsed is None or parsed[0] != tracker.run:
            return
        tracker.record(parsed[1], parsed[2], now_ns)

    # -- senders ---------------------------------------------------------------------

    def _send_uplink(self, run: int, seq: int) -> None:
        node = self.node
        assert node is not None
        sent = time.monotonic_ns()
        node.inject_uplink(
            node.topic_for(0),
            data=make_envelope(node.node_id, REMOTE_NUM, run, seq, sent),
        )

    def _publish(self, topic: str, gateway: str, run: int, seq: int) -> None:
        assert self.pub is not None
        sent = time.monotonic_ns()
        payload = make_envelope(gateway, REMOTE_NUM, run, seq, sent)
        # eager_task_factory: paho's publish() runs before create_task returns.
        task = asyncio.create_task(
            self.pub.publish(topic, payload, qos=1, timeout=math.inf)
        )
        if task.done():
            self._published(task)
        else:
            self._publishes.add(task)
            task.add_done_callback(self._published)

    def _published(self, task: asyncio.Task[None]) -> None:
        """Forget a finished publish; count it if it failed (not lost silently)."""
        self._publishes.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.publish_errors += 1

    def _send_downlink(self, run: int, seq: int) -> None:
        self._publish(DOWNLINK_TOPIC, REMOTE_ID, run, seq)

    def _send_baseline(self, run: int, seq: int) -> None:
        self._publish(BASELINE_TOPIC, REMOTE_ID, run, seq)

    def sender(self, kind: str) -> Callable[[int, int], None]:
        """Return the send function of a direction."""
        return {
            "up": self._send_uplink,
            "down": self._send_downlink,
            "base": self._send_baseline,
        }[kind]

    def _new_tracker(self, kind: str, expected: int) -> Tracker:
        self._run = (self._run + 1) % 10_000
        tracker = Tracker(self._run, expected)
        self.trackers[kind] = tracker
        return tracker

    # -- phases ----------------------------------------------------------------------

    async def sequential(self, kinds: tuple[str, ...]) -> dict[str, Latency]:
        """One message in flight, ``warmup + n`` per direction; p50/p99 of the last n.

        The directions take turns in blocks of :data:`LATENCY_BLOCK` messages
        (baseline, uplink, downlink, baseline, ...), so a change in the
        machine's load during the phase affects the baseline and the proxy
        alike, while within a block each path runs on its own as it would alone.
        """
        cfg = self.config
        total = cfg.warmup + cfg.n
        trackers = {kind: self._new_tracker(kind, total) for kind in kinds}
        loop = asyncio.get_running_loop()
        for first in range(0, total, LATENCY_BLOCK):
            for kind in kinds:
                tracker = trackers[kind]
                send = self.sender(kind)
                for seq in range(first, min(total, first + LATENCY_BLOCK)):
                    waiter: asyncio.Future[None] = loop.create_future()
                    tracker.waiter = waiter
                    send(tracker.run, seq)
                    async with asyncio.timeout(5.0):
                        await waiter
                    if self._publishes:
                        await asyncio.wait(set(self._publishes))  # PUBACK too
        result: dict[str, Latency] = {}
        for kind, tracker in trackers.items():
            self.trackers[kind] = None
            lat = [v / 1000 for v in tracker.latencies_ns[cfg.warmup :]]
            result[kind] = Latency(
                _report.percentile(lat, 0.5), _report.percentile(lat, 0.99), len(lat)
            )
        return result

    async def step(self, kind: str, rate: int, seconds: float | None = None) -> Step:
        """Offer ``rate`` msg/s open-loop for ``seconds``; measure p99, loss, CPU."""
        assert self.worker is not None
        assert self.broker.proc is not None
        send = self.sender(kind)
        total = max(1, round(rate * (seconds or self.config.step_seconds)))
        speed = speed_check()
        before = await self.worker.stats()
        tracker = self._new_tracker(kind, total)
        window = CpuWindow(
            {
                "proxy": self.worker.pid,
                "bench": os.getpid(),
                "mosquitto": self.broker.proc.pid,
            }
        )
        window.start()
        start = time.monotonic()
        sent = 0
        backlog = 0
        while sent < total:
            due = min(total, int((time.monotonic() - start) * rate) + 1)
            while sent < due:
                send(tracker.run, sent)
                sent += 1
            backlog = max(backlog, self.harness_backlog(kind))
            await asyncio.sleep(0.0005)
        send_end = time.monotonic()
        drain = max(2.0, self.config.step_seconds)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain):
                await tracker.done.wait()
        cpu = window.shares()
        self.trackers[kind] = None
        after = await self.worker.stats()
        if tracker.received < total:
            await self._settle()
        lat_ms = [v / 1e6 for v in tracker.latencies_ns]
        return Step(
            rate,
            total,
            tracker.received,
            total / max(1e-6, send_end - start),
            _report.percentile(lat_ms, 0.99),
            cpu,
            _drops(after) - _drops(before),
            backlog,
            speed,
        )

    def harness_backlog(self, kind: str) -> int:
        """Messages queued in this process's own clients (not the proxy's).

        Downlink: publishes the bench's publisher has not had acknowledged;
        uplink: messages the bench's subscriber received but not yet handled.
        """
        if kind == "down":
            return len(self._publishes)
        assert self.sub is not None
        return self.sub._queue.qsize()

    async def _settle(self, quiet: float = 1.0, limit: float | None = None) -> None:
        """Wait until a backlog has drained: engine counters still, bench queues empty.

        Gives up after ``limit`` seconds (default 5 with ``--quick``, else 20).
        """
        assert self.worker is not None
        if limit is None:
            limit = 5.0 if self.config.quick else 20.0
        deadline = time.monotonic() + limit
        last: tuple[int, int] | None = None
        while time.monotonic() < deadline:
            stats = await self.worker.stats()
            now = (stats["broker_published"], stats["downlink_messages"])
            idle = not self._publishes and not self.harness_backlog("up")
            if now == last and idle:
                return
            last = now
            await asyncio.sleep(quiet)

    async def search(self, kind: str) -> list[Step]:
        """Step the offered rate up until a step fails (late or lossy)."""
        rates = self.config.rates_up if kind == "up" else self.config.rates_down
        steps: list[Step] = []
        for rate in rates:
            result = await self.step(kind, rate)
            steps.append(result)
            if not result.ok:
                break
            await asyncio.sleep(0.2)
        return steps

    async def cpu_probe(self, kind: str, rate: int, steps: list[Step]) -> list[Step]:
        """Return :data:`CPU_RUNS` steps at ``rate``: the search's own plus repeats.

        CPU time per message moves with the machine's load (cache, scheduling),
        so the CPU verdict uses the median of several runs at the target rate.
        """
        runs = [s for s in steps if s.rate == rate]
        if not runs or not runs[0].ok:
            return runs
        seconds = max(2.0, self.config.step_seconds)
        while len(runs) < CPU_RUNS:
            await asyncio.sleep(0.2)
            runs.append(await self.step(kind, rate, seconds))
        return runs

    async def memory(self, startup_kib: int) -> Memory:
        """Push ``memory_messages`` uplinks, then an overload burst; RSS around both.

        The push keeps at most :data:`MEMORY_WINDOW` uplinks outstanding, so all
        of them travel the whole path (node -> engine -> broker -> subscriber)
        as fast as it goes. The burst then writes ``memory_messages / 5`` more
        uplinks unpaced, faster than any broker takes them, so the engine's
        bounded drop-oldest uplink queue has to hold the line.
        """
        assert self.worker is not None
        pid = self.worker.pid
        total = self.config.memory_messages
        before_stats = await self.worker.stats()
        before = proc_rss_kib(pid)
        peak = before
        tracker = self._new_tracker("up", total)
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        for seq in range(total):
            if seq - tracker.received >= MEMORY_WINDOW:
                tracker.waiter = loop.create_future()
                try:
                    async with asyncio.timeout(10.0):
                        await tracker.waiter
                except TimeoutError:
                    break  # something was lost; reported as delivered < total
            self._send_uplink(tracker.run, seq)
            if seq % 10_000 == 9_999:
                peak = max(peak, proc_rss_kib(pid))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10.0):
                await tracker.done.wait()
        seconds = max(tracker.last_arrival, start) - start
        self.trackers["up"] = None
        await self._settle(quiet=0.3)
        pushed_stats = await self.worker.stats()
        after_push = proc_rss_kib(pid)
        peak = max(peak, after_push)
        # Overload burst: unpaced, 100 per event-loop turn.
        burst = total // 5
        burst_tracker = self._new_tracker("up", burst)
        for seq in range(burst):
            self._send_uplink(burst_tracker.run, seq)
            if seq % 100 == 99:
                await asyncio.sleep(0)
            if seq % 5_000 == 4_999:
                peak = max(peak, proc_rss_kib(pid))
        peak = max(peak, proc_rss_kib(pid))
        await self._settle(quiet=0.5)
        self.trackers["up"] = None
        after_stats = await self.worker.stats()
        after = proc_rss_kib(pid)
        return Memory(
            startup_kib,
            before,
            after_push,
            max(peak, after),
            after,
            total,
            tracker.received,
            _drops(pushed_stats) - _drops(before_stats),
            seconds,
            burst,
            burst_tracker.received,
            _drops(after_stats) - _drops(pushed_stats),
        )

    async def downlink_flood(self) -> Flood:
        """Publish ``memory_messages / 5`` downlinks as fast as the bench can; RSS.

        Beyond the brief's targets: shows whether anything between the broker
        socket and the engine's bounded downlink queue (256, drop-oldest) grows
        without bound when the broker delivers faster than the engine drains.
        """
        assert self.worker is not None
        assert self.node is not None
        pid = self.worker.pid
        total = self.config.memory_messages // 5
        before_stats = await self.worker.stats()
        before = proc_rss_kib(pid)
        peak = before
        tracker = self._new_tracker("down", total)
        start = time.monotonic()
        for seq in range(total):
            self._send_downlink(tracker.run, seq)
            if seq % 200 == 199:
                await asyncio.sleep(0)
                peak = max(peak, proc_rss_kib(pid))
        last = -1
        while tracker.received != last and tracker.received < total:
            last = tracker.received
            for _ in range(5):
                await asyncio.sleep(0.1)
                peak = max(peak, proc_rss_kib(pid))
        seconds = max(tracker.last_arrival, start) - start
        await self._settle(quiet=0.3)
        self.trackers["down"] = None
        self.node.mesh_injected.clear()  # the simulator keeps these; 20k+ here
        after_stats = await self.worker.stats()
        return Flood(
            total,
            tracker.received,
            _drops(after_stats) - _drops(before_stats),
            seconds,
            before,
            max(peak, proc_rss_kib(pid)),
            proc_rss_kib(pid),
        )


def _drops(stats: dict[str, Any]) -> int:
    return int(sum(stats.get("dropped", {}).values()))


# -- report ------------------------------------------------------------------------


def machine_line(quick: bool) -> str:
    """One line: CPU, cores, OS, Python and the versions that matter."""
    return _report.machine_line(
        "bench/proxy.py",
        quick,
        f"aiomqtt {_report.version('aiomqtt')} · paho-mqtt {_report.version('paho-mqtt')}"
        f" · protobuf {_report.version('protobuf')} ({api_implementation.Type()})"
        f" · meshtastic {_report.version('meshtastic')}",
    )


def _sustained(steps: list[Step]) -> tuple[Step | None, bool]:
    """Return the highest passing step (all lower ones passed) and if all passed."""
    best: Step | None = None
    for s in steps:
        if not s.ok:
            return best, False
        best = s
    return best, True


def _steps_cell(steps: list[Step]) -> str:
    parts = []
    for s in steps:
        lost = s.sent - s.received
        short = s.offered_rate < 0.95 * s.rate
        parts.append(
            f"{s.rate}{f' (offered {s.offered_rate:.0f})' if short else ''}: "
            f"p99 {s.p99_ms:.1f} ms, "
            f"{'0 lost' if not lost else f'{lost} lost'}"
            f"{f' ({s.proxy_drops} dropped by proxy)' if s.proxy_drops else ''}, "
            f"CPU proxy {s.cpu['proxy']:.0f} ({s.cpu_us_per_msg:.0f} µs/msg) / bench {s.cpu['bench']:.0f} / "
            f"mosq {s.cpu['mosquitto']:.0f} / other procs {s.cpu['others']:.0f} %, "
            f"proxy waited for a CPU {s.cpu['proxy_wait']:.0f} %"
            + (
                f" **[bench's own client backlog {s.harness_backlog}: harness-bound]**"
                if s.harness_limited
                else ""
            )
        )
    return "<br>".join(parts)


def rate_rows(
    label: str,
    steps: list[Step],
    probe: list[Step],
    target: int,
    rates: tuple[int, ...],
) -> list[tuple[str, str, str, str, str]]:
    """Table rows of one direction's rate search."""
    best, all_ok = _sustained(steps)
    rows: list[tuple[str, str, str, str, str]] = []
    if best is None:
        value = "< lowest step"
    else:
        more = " (highest step tried)" if all_ok and best.rate == rates[-1] else ""
        value = (
            f"{'≥ ' if more else ''}{best.rate} msg/s{more}; "
            f"p99 {best.p99_ms:.1f} ms, 0 lost, proxy CPU {best.cpu['proxy']:.0f} % "
            "of one core"
        )
    if not all_ok:
        failed = steps[-1]
        lost = failed.sent - failed.received
        value += f" (next step {failed.rate}: p99 {failed.p99_ms:.0f} ms, {lost} lost"
        if failed.harness_limited:
            value += "; limited by the bench's own clients, not the proxy"
        if failed.cpu["others"] > _report.QUIET_LIMIT:
            value += (
                f"; other processes used {failed.cpu['others']:.0f} % of a core, "
                f"proxy waited for a CPU {failed.cpu['proxy_wait']:.0f} % of the time"
            )
        value += ")"
    rows.append(
        (
            f"{label}: highest sustained rate (p99 < {STEP_P99_LIMIT_MS:.0f} ms, no loss)",
            value,
            NA,
            f"≥ {target} msg/s",
            _report.mark(best is not None and best.rate >= target),
        )
    )
    if not probe:
        rows.append(
            (
                f"{label}: proxy CPU at {target} msg/s",
                "not reached",
                NA,
                f"< {CPU_LIMIT:.0f} %",
                "FAIL",
            )
        )
    else:
        ordered = sorted(probe, key=lambda s: s.cpu["proxy"])
        mid = ordered[len(ordered) // 2]
        runs = ", ".join(f"{s.cpu['proxy']:.0f}" for s in probe)
        speeds = ", ".join(f"{s.speed_ms:.0f}" for s in probe)
        rows.append(
            (
                f"{label}: proxy CPU at {target} msg/s (median of {len(probe)} runs)",
                f"{mid.cpu['proxy']:.1f} % of one core (runs: {runs} %, speed "
                f"check {speeds} ms; {mid.cpu_us_per_msg:.0f} µs CPU/msg: one "
                f"core ≈ {1e6 / max(mid.cpu_us_per_msg, 1e-6):,.0f} msg/s)",
                NA,
                f"< {CPU_LIMIT:.0f} %",
                _report.mark(all(s.ok for s in probe) and mid.cpu["proxy"] < CPU_LIMIT),
            )
        )
    rows.append(
        (
            f"{label}: steps (offered msg/s: p99, loss, CPU % of one core)",
            _steps_cell(steps),
            NA,
            "info",
            NA,
        )
    )
    return rows


def latency_row(
    label: str, proxy: Latency, base: Latency
) -> list[tuple[str, str, str, str, str]]:
    """Rows of one direction's sequential latency."""
    ratio = proxy.p50_us / base.p50_us
    return [
        (
            f"{label} latency p50 (n={proxy.n}, sequential, QoS 1)",
            f"{proxy.p50_us:.0f} µs",
            f"{base.p50_us:.0f} µs",
            f"{ratio:.2f}x (≤ {LATENCY_FACTOR:.0f}x)",
            _report.mark(ratio <= LATENCY_FACTOR),
        ),
        (
            f"{label} latency p99",
            f"{proxy.p99_us:.0f} µs",
            f"{base.p99_us:.0f} µs",
            f"{proxy.p99_us / base.p99_us:.2f}x (info)",
            NA,
        ),
    ]


def memory_rows(mem: Memory) -> list[tuple[str, str, str, str, str]]:
    """Rows of the memory phase."""
    growth = (mem.after_kib - mem.before_kib) / 1024
    return [
        (
            f"proxy RSS before → after {mem.messages:,} uplinks → after a "
            f"{mem.burst:,}-uplink overload burst",
            f"{mem.before_kib / 1024:.1f} → {mem.after_push_kib / 1024:.1f} → "
            f"{mem.after_kib / 1024:.1f} MiB ({growth:+.1f} MiB; peak "
            f"{mem.peak_kib / 1024:.1f}; {mem.startup_kib / 1024:.1f} at start)",
            NA,
            f"flat (growth < {RSS_FLAT_LIMIT_MIB:.0f} MiB)",
            _report.mark(growth < RSS_FLAT_LIMIT_MIB),
        ),
        (
            "memory phase traffic",
            f"push: {mem.delivered:,}/{mem.messages:,} delivered in "
            f"{mem.seconds:.1f} s ({mem.delivered / max(mem.seconds, 1e-6):,.0f} "
            f"msg/s, ≤ {MEMORY_WINDOW} outstanding), {mem.dropped} dropped; burst: "
            f"{mem.burst_delivered:,} delivered, {mem.burst_dropped:,} dropped "
            "(drop-oldest uplink queue, 1000)",
            NA,
            "info",
            NA,
        ),
    ]


def flood_row(flood: Flood) -> tuple[str, str, str, str, str]:
    """Row of the downlink flood (not one of the brief's targets: WARN, not FAIL)."""
    growth = (flood.peak_kib - flood.before_kib) / 1024
    return (
        f"proxy RSS during a {flood.messages:,}-downlink flood (beyond the targets)",
        f"{flood.before_kib / 1024:.1f} → peak {flood.peak_kib / 1024:.1f} → "
        f"{flood.after_kib / 1024:.1f} MiB; {flood.delivered:,} delivered in "
        f"{flood.seconds:.1f} s, {flood.dropped:,} dropped by the proxy",
        NA,
        f"bounded (peak growth < {RSS_FLAT_LIMIT_MIB:.0f} MiB)",
        "OK" if growth < RSS_FLAT_LIMIT_MIB else "WARN: grows with the backlog",
    )


def load_row(
    load: dict[str, float], steps: list[Step]
) -> tuple[str, str, str, str, str]:
    """Row saying whether other processes or a slow host distorted the run."""
    worst = max((s.cpu["others"] for s in steps), default=0.0)
    speeds = [s.speed_ms for s in steps] or [math.nan]
    varied = max(speeds) > SPEED_SPREAD * min(speeds)
    quiet = load["others"] < _report.QUIET_LIMIT
    verdict = "OK"
    if not quiet:
        verdict = "WARN: contended, numbers pessimistic"
    elif varied:
        verdict = "WARN: machine speed varied, CPU figures noisy"
    return (
        "machine: other processes' CPU; speed check (fixed workload, ms)",
        f"others {load['others']:.0f} % of one core on average, {worst:.0f} % in "
        f"the busiest step; proxy waited for a CPU {load['proxy_wait']:.1f} % of "
        f"the time; speed check {min(speeds):.0f}-{max(speeds):.0f} ms",
        NA,
        f"others < {_report.QUIET_LIMIT:.0f} %, speed within {SPEED_SPREAD:.1f}x",
        verdict,
    )


# -- main --------------------------------------------------------------------------


async def run(config: Config) -> tuple[str, bool]:
    """Run every phase; return the report and whether all targets passed."""
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)
    if config.wait_quiet > 0:
        await _report.wait_quiet(config.wait_quiet, system_busy_seconds)
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        bench = Bench(config, Path(tmp))
        try:
            await bench.setup()
            assert bench.worker is not None
            assert bench.broker.proc is not None
            startup = proc_rss_kib(bench.worker.pid)
            whole = CpuWindow(
                {
                    "proxy": bench.worker.pid,
                    "bench": os.getpid(),
                    "mosquitto": bench.broker.proc.pid,
                }
            )
            whole.start()
            latency = await bench.sequential(("base", "up", "down"))
            base, up, down = latency["base"], latency["up"], latency["down"]
            base_paho = await asyncio.to_thread(
                paho_baseline, bench.broker.port, config.n, config.warmup
            )
            up_steps = await bench.search("up")
            up_cpu = await bench.cpu_probe("up", UPLINK_TARGET, up_steps)
            down_steps = await bench.search("down")
            down_cpu = await bench.cpu_probe("down", DOWNLINK_TARGET, down_steps)
            mem = await bench.memory(startup)
            flood = await bench.downlink_flood()
            load = whole.shares()
        finally:
            await bench.teardown()
    rows = latency_row("uplink (node frame → subscriber)", up, base)
    rows += latency_row("downlink (publish → node frame)", down, base)
    rows.append(
        (
            "baseline measured with paho loop_start threads instead (info)",
            NA,
            f"p50 {base_paho.p50_us:.0f} µs, p99 {base_paho.p99_us:.0f} µs",
            f"proxy p50 = {up.p50_us / base_paho.p50_us:.1f}x (up), "
            f"{down.p50_us / base_paho.p50_us:.1f}x (down) of this",
            NA,
        )
    )
    rows += rate_rows("uplink", up_steps, up_cpu, UPLINK_TARGET, config.rates_up)
    rows += rate_rows(
        "downlink", down_steps, down_cpu, DOWNLINK_TARGET, config.rates_down
    )
    rows += memory_rows(mem)
    rows.append(flood_row(flood))
    rows.append(load_row(load, up_steps + up_cpu + down_steps + down_cpu))
    passed = all(r[4] != "FAIL" for r in rows)
    return _report.table(machine_line(config.quick), "proxy", "baseline", rows), passed


def main() -> int:
    """Parse arguments, run, print the table; exit 1 when a target failed."""
    parser = argparse.ArgumentParser(description="Benchmark the proxy engine.")
    parser.add_argument("--quick", action="store_true", help="smoke run, < 60 s")
    _report.add_run_options(parser, "the engine process")
    args = parser.parse_args()
    profile = args.profile.resolve() if args.profile else None
    config = Config.make(quick=args.quick, profile=profile, wait_quiet=args.wait_quiet)
    return _report.run_main(run(config), "worker, simulator and broker")


if __name__ == "__main__":
    sys.exit(main())
