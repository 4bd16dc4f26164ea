"""Benchmark of the MQTT tools for AI agents: the MCP endpoint and the LLM API.

Run from the repository root::

    .venv/bin/python bench/tools.py            # full run, about 1 min
    .venv/bin/python bench/tools.py --quick    # smoke run, < 60 s

What runs (all on 127.0.0.1, one private Mosquitto):

* **HTTP**: a real ``hass`` process (``devkit.hass_runner``: throw-away config
  directory, an "MQTT broker" entry with read+write on ``bench/http/#``, a
  long-lived access token made through the login flow and the websocket API),
  called by a stock ``mcp`` ``ClientSession`` over ``streamablehttp_client``
  from this process, as an external MCP client would;
* **LLM API**: an in-process Home Assistant
  (``pytest_homeassistant_custom_component.common.async_test_home_assistant``,
  as the tests use) with its own broker entry on ``bench/llm/#``, called through
  ``llm.async_get_api(...).async_call_tool(...)`` as a conversation agent does
  (the API instance is fetched once, as once per conversation turn);
* **baselines**, in the same run: raw aiomqtt (paho) MQTT 5 clients, a publish →
  receive and a request → response (Response Topic + Correlation Data, QoS 0),
  and a minimal FastMCP stdio server (``bench/_fastmcp_echo.py``, one ``echo``
  tool) called through ``mcp.client.stdio.stdio_client``: the floor any stdio
  MCP server pays;
* a responder (aiomqtt, MQTT 5) answering every request on ``bench/+/request``
  on its Response Topic with its Correlation Data.

Latency is call → result (``time.perf_counter_ns`` around the awaited call),
sequential (one call in flight), the kinds taking turns in blocks so that
changes in machine load hit all alike. ``mqtt_publish`` uses QoS 0 (its
default) with a 32-byte payload; every published message must reach a
subscriber. Then 100 concurrent tool calls (50 ``mqtt_publish`` + 50
``mqtt_query``) per path, and ``mqtt_query`` as the first call of 20 fresh MCP
sessions. One markdown table is printed, with PASS/FAIL per target; the exit
code is 1 when a target failed.
"""

# ruff: noqa: E402  (sys.path is set up before the project imports)

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
import contextlib
from dataclasses import dataclass, field
import json
import logging
import math
import os
from pathlib import Path
import socket
import sys
import tempfile
import time
from typing import Any
import uuid

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp
import aiomqtt
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamablehttp_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench import _report

# The project's custom_components package is imported before PHCC's own
# (imported lazily in llm_api()), so it wins (shared/reference/home-assistant.md §7.1).
import custom_components.mqtt_bridge.const  # noqa: F401
from devkit.hass_runner import (
    HassProcess,
    broker_entry,
    create_long_lived_token,
    login,
    mcp_session,
    mcp_url,
    prepare_minimal_config,
    wait_for_entries,
    wait_for_http,
    write_login,
)
from devkit.mosquitto import Mosquitto, free_port

V5 = aiomqtt.ProtocolVersion.V5
#: Every bench MQTT client, like the integration's, sends at once (no Nagle).
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
PAYLOAD = "x" * 32  # bytes of every published payload and request
ECHO_SERVER = Path(__file__).resolve().parent / "_fastmcp_echo.py"
USERNAME, PASSWORD = "bench", "bench-password"

PUBLISH_FACTOR = 1.0  # mqtt_publish via HTTP p50 <= 1.0 x FastMCP stdio echo p50
QUERY_EXTRA_MS = 1.0  # mqtt_query p50 <= raw request/response p50 + 1 ms
CONCURRENT = 100  # tool calls in flight at once, per path
FRESH_SESSIONS = 20  # mqtt_query as the first call of a fresh MCP session
NA = "-"

#: mcpMQTT, for scale (shared/reference/mcp-over-mqtt.md §2.1, measured there).
MCPMQTT_PUBLISH_VS_RAW = 13.5
MCPMQTT_PUBLISH_VS_FASTMCP = 1.09

#: The kinds measured sequentially, in the order they take turns.
KINDS = (
    "raw_pub",
    "raw_rr",
    "echo",
    "echo_http",
    "http_ping",
    "http_pub",
    "http_post",
    "http_query",
    "llm_pub",
    "llm_query",
)


@dataclass(frozen=True, slots=True)
class Config:
    """What one run does (``--quick`` shrinks it)."""

    quick: bool
    n: int  # sequential calls per kind
    warmup: int  # per kind, not counted
    block: int  # calls of one kind before the next kind's turn

    @classmethod
    def make(cls, *, quick: bool) -> Config:
        """The full or the quick configuration."""
        if quick:
            return cls(True, 200, 30, 25)
        return cls(False, 1000, 100, 50)


@dataclass(slots=True)
class Latency:
    """Samples (ms) of one kind; p50/p99."""

    samples: list[float] = field(default_factory=list)

    @property
    def p50(self) -> float:
        """Median, in ms."""
        return _report.percentile(self.samples, 0.50)

    @property
    def p99(self) -> float:
        """99th percentile, in ms."""
        return _report.percentile(self.samples, 0.99)


def ms(value: float) -> str:
    """A duration in ms for the table."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f} ms" if value < 10 else f"{value:.1f} ms"


class BenchError(RuntimeError):
    """A call failed where the benchmark needs it to succeed."""


# -- MQTT: responder, raw baselines, delivery counter ----------------------------------


@contextlib.asynccontextmanager
async def responder(port: int) -> AsyncIterator[None]:
    """Answer every request on ``bench/+/request`` on its Response Topic."""
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        protocol=V5,
        identifier="bench-responder",
        socket_options=NODELAY,
    ) as client:
        await client.subscribe("bench/+/request", qos=0)

        async def serve() -> None:
            async for message in client.messages:
                props = message.properties
                topic = getattr(props, "ResponseTopic", None)
                if topic is None:
                    continue
                answer = Properties(PacketTypes.PUBLISH)
                answer.CorrelationData = props.CorrelationData  # type: ignore[union-attr]
                await client.publish(topic, message.payload, qos=0, properties=answer)

        task = asyncio.create_task(serve())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Raw:
    """The baselines: raw MQTT 5 publish → receive and request → response.

    Also counts what reaches ``bench/+/pub`` (the tools' publishes too).
    """

    def __init__(self, port: int) -> None:
        """Prepare (not connect) the clients."""
        self.port = port
        self.received: dict[str, int] = {"raw": 0, "http": 0, "llm": 0}
        self._waiters: dict[bytes, asyncio.Future[None]] = {}
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self.pub: aiomqtt.Client | None = None

    async def __aenter__(self) -> Raw:
        """Connect a publisher/requester and a subscriber."""
        stack = self._stack
        self.pub = await stack.enter_async_context(
            aiomqtt.Client(
                "127.0.0.1",
                self.port,
                protocol=V5,
                identifier="bench-pub",
                socket_options=NODELAY,
            )
        )
        sub = await stack.enter_async_context(
            aiomqtt.Client(
                "127.0.0.1",
                self.port,
                protocol=V5,
                identifier="bench-sub",
                socket_options=NODELAY,
            )
        )
        await sub.subscribe("bench/+/pub", qos=0)
        await self.pub.subscribe("bench/raw/response", qos=0)
        self._tasks = [
            asyncio.create_task(self._read_sub(sub)),
            asyncio.create_task(self._read_responses(self.pub)),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Disconnect."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._stack.aclose()

    async def _read_sub(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            path = message.topic.value.split("/")[1]
            self.received[path] = self.received.get(path, 0) + 1
            if path == "raw":
                payload = message.payload
                key = payload if isinstance(payload, bytes) else str(payload).encode()
                waiter = self._waiters.pop(key, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def _read_responses(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            data = getattr(message.properties, "CorrelationData", None)
            waiter = self._waiters.pop(bytes(data), None) if data else None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def publish(self) -> float:
        """One publish → receive; return the latency in ms."""
        assert self.pub is not None
        key = uuid.uuid4().hex[:32].encode()  # 32 bytes, like PAYLOAD
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        start = time.perf_counter_ns()
        await self.pub.publish("bench/raw/pub", key, qos=0)
        async with asyncio.timeout(5):
            await waiter
        return (time.perf_counter_ns() - start) / 1e6

    async def request(self) -> float:
        """One request → response (Response Topic + Correlation Data); ms."""
        assert self.pub is not None
        key = uuid.uuid4().hex.encode()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "bench/raw/response"
        props.CorrelationData = key
        start = time.perf_counter_ns()
        await self.pub.publish(
            "bench/raw/request", PAYLOAD.encode(), qos=0, properties=props
        )
        async with asyncio.timeout(5):
            await waiter
        return (time.perf_counter_ns() - start) / 1e6


# -- MCP clients ------------------------------------------------------------------------


def _check_call(result: Any, name: str) -> None:
    """Raise when an MCP tool result is an error or a query went unanswered."""
    if result.isError:
        raise BenchError(f"{name}: {result.content}")
    data = result.structuredContent or {}
    if data.get("timed_out"):
        raise BenchError(f"{name}: no answer ({data})")


@contextlib.asynccontextmanager
async def stdio_echo() -> AsyncIterator[ClientSession]:
    """A FastMCP ``echo`` server as a child process, with an initialized session."""
    params = StdioServerParameters(command=sys.executable, args=[str(ECHO_SERVER)])
    with open(os.devnull, "w") as devnull:  # noqa: ASYNC230 (one open at start-up)
        async with (
            stdio_client(params, errlog=devnull) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.list_tools()  # as clients do; caches the output schema
            yield session


@contextlib.asynccontextmanager
async def http_echo() -> AsyncIterator[ClientSession]:
    """The FastMCP ``echo`` server over stateless JSON Streamable HTTP, with a session."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ECHO_SERVER),
        "--http",
        str(port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(30):
            while True:
                if proc.returncode is not None:
                    raise BenchError(f"FastMCP HTTP echo exited ({proc.returncode})")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        async with (
            streamablehttp_client(f"http://127.0.0.1:{port}/mcp") as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            await session.list_tools()
            yield session
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


@contextlib.asynccontextmanager
async def raw_poster(
    url: str, token: str
) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """``mqtt_publish`` as one raw JSON-RPC POST (aiohttp, keep-alive; no SDK client)."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": "mqtt_publish",
                "arguments": {**PUBLISH_ARGS, "topic": "bench/http/pub"},
            },
        }
    )
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": "application/json",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2025-06-18",
    }
    async with aiohttp.ClientSession() as session:

        async def post() -> None:
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.json()
            if resp.status != 200 or answer["result"]["isError"]:
                raise BenchError(f"raw POST: {resp.status} {answer}")

        yield post


@contextlib.asynccontextmanager
async def real_hass(broker: Mosquitto, workdir: Path) -> AsyncIterator[tuple[str, str]]:
    """A ``hass`` process with a broker entry on ``bench/http/#``; yields (url, token)."""
    port = free_port()
    config_dir = workdir / "hass"
    rules = [{"pattern": "bench/http/#", "permissions": ["read", "write"]}]
    [entry_id] = prepare_minimal_config(
        config_dir,
        port,
        [broker_entry("127.0.0.1", broker.port, rules, title="bench HTTP")],
        log_level="warning",
    )
    write_login(config_dir, USERNAME, PASSWORD)
    process = HassProcess(config_dir, port=port)
    process.start()
    try:
        async with aiohttp.ClientSession() as session:
            base = process.base_url
            await wait_for_http(session, base, timeout=90, process=process)
            access = await login(session, base, USERNAME, PASSWORD)
            token = await create_long_lived_token(
                session, base, access, client_name="bench/tools.py"
            )
            states = await wait_for_entries(
                session, base, token, [entry_id], timeout=60
            )
            if states.get(entry_id, ("unknown",))[0] != "loaded":
                raise BenchError(f"broker entry not loaded: {states}")
        yield mcp_url(base, entry_id), token
    finally:
        process.stop()


# -- the in-process Home Assistant (LLM API) ------------------------------------------


@contextlib.asynccontextmanager
async def llm_api(broker: Mosquitto, workdir: Path) -> AsyncIterator[Any]:
    """An in-process HA with a broker entry on ``bench/llm/#``; yields its LLM API."""
    from homeassistant import loader
    from homeassistant.core import Context
    from homeassistant.helpers import llm
    from homeassistant.setup import async_setup_component
    from pytest_homeassistant_custom_component.common import (
        MockConfigEntry,
        async_test_home_assistant,
    )

    from custom_components.mqtt_bridge.compat import llm_context
    from custom_components.mqtt_bridge.llm_api import api_id

    config_dir = workdir / "in-process"
    config_dir.mkdir()
    spec = broker_entry(
        "127.0.0.1",
        broker.port,
        [{"pattern": "bench/llm/#", "permissions": ["read", "write"]}],
        title="bench LLM",
    )
    async with async_test_home_assistant(config_dir=str(config_dir)) as hass:
        try:
            hass.data.pop(loader.DATA_CUSTOM_COMPONENTS)  # enable custom integrations
            http = {"server_host": "127.0.0.1", "server_port": free_port()}
            if not await async_setup_component(hass, "http", {"http": http}):
                raise BenchError("http did not set up")
            entry = MockConfigEntry(
                domain="mqtt_bridge",
                version=1,
                minor_version=2,
                title=spec.title,
                unique_id=spec.unique_id,
                data=spec.data,
                options=spec.options,
            )
            entry.add_to_hass(hass)
            if not await hass.config_entries.async_setup(entry.entry_id):
                raise BenchError("the in-process broker entry did not set up")
            async with asyncio.timeout(10):
                while not entry.runtime_data.connected:  # noqa: ASYNC110 (a property)
                    await asyncio.sleep(0.01)
            context = llm_context("bench", Context())
            yield await llm.async_get_api(hass, api_id(entry.entry_id), context)
        finally:
            await hass.async_stop(force=True)


def llm_input(name: str, args: dict[str, Any]) -> Any:
    """An ``llm.ToolInput``."""
    from homeassistant.helpers import llm

    return llm.ToolInput(tool_name=name, tool_args=args)


def _check_llm(result: dict[str, Any], name: str) -> None:
    if "error" in result or result.get("timed_out"):
        raise BenchError(f"{name}: {result}")


# -- the benchmark --------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """Everything measured."""

    latency: dict[str, Latency] = field(
        default_factory=lambda: {kind: Latency() for kind in KINDS}
    )
    published: dict[str, int] = field(default_factory=dict)
    concurrent: dict[str, tuple[int, float, str]] = field(default_factory=dict)
    fresh: tuple[int, int, str] = (0, 0, "")
    delivered: dict[str, int] = field(default_factory=dict)


PUBLISH_ARGS = {"topic": "", "payload": PAYLOAD, "qos": 0}
QUERY_ARGS = {"request_topic": "", "payload": PAYLOAD, "timeout": 5}


def _args(base: dict[str, Any], key: str, topic: str) -> dict[str, Any]:
    return {**base, key: topic}


async def run(config: Config) -> tuple[str, bool]:
    """Run the benchmark; return the report and whether every target passed."""
    results = Results()
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir=workdir / "mosquitto")
        (workdir / "mosquitto").mkdir()
        broker.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                await stack.enter_async_context(responder(broker.port))
                raw = await stack.enter_async_context(Raw(broker.port))
                url, token = await stack.enter_async_context(real_hass(broker, workdir))
                api = await stack.enter_async_context(llm_api(broker, workdir))
                echo = await stack.enter_async_context(stdio_echo())
                echo_http = await stack.enter_async_context(http_echo())
                http = await stack.enter_async_context(mcp_session(url, token))
                await http.list_tools()  # as clients do
                post = await stack.enter_async_context(raw_poster(url, token))
                calls = callers(
                    echo=echo,
                    echo_http=echo_http,
                    http=http,
                    post=post,
                    api=api,
                    results=results,
                )
                await measure(config, results, raw, calls)
                await concurrency(results, http, api)
                await fresh_sessions(results, url, token)
                # Let the last publishes arrive before counting.
                await asyncio.sleep(0.5)
                results.delivered = dict(raw.received)
        finally:
            broker.cleanup()
    return report(config, results)


def callers(
    *,
    echo: ClientSession,
    echo_http: ClientSession,
    http: ClientSession,
    post: Callable[[], Awaitable[None]],
    api: Any,
    results: Results,
) -> dict[str, Callable[[], Awaitable[None]]]:
    """One awaitable call per kind (the timed part is the whole call)."""

    async def http_call(name: str, args: dict[str, Any]) -> None:
        _check_call(await http.call_tool(name, args), name)

    async def llm_call(name: str, args: dict[str, Any]) -> None:
        _check_llm(await api.async_call_tool(llm_input(name, args)), name)

    async def echo_call(session: ClientSession) -> None:
        result = await session.call_tool("echo", {"text": PAYLOAD})
        if result.isError:
            raise BenchError(f"echo: {result.content}")

    async def count(path: str, call: Awaitable[None]) -> None:
        await call
        results.published[path] = results.published.get(path, 0) + 1

    return {
        "echo": lambda: echo_call(echo),
        "echo_http": lambda: echo_call(echo_http),
        "http_ping": lambda: _ping(http),
        "http_post": lambda: count("http", post()),
        "http_pub": lambda: count(
            "http",
            http_call("mqtt_publish", _args(PUBLISH_ARGS, "topic", "bench/http/pub")),
        ),
        "http_query": lambda: http_call(
            "mqtt_query", _args(QUERY_ARGS, "request_topic", "bench/http/request")
        ),
        "llm_pub": lambda: count(
            "llm",
            llm_call("mqtt_publish", _args(PUBLISH_ARGS, "topic", "bench/llm/pub")),
        ),
        "llm_query": lambda: llm_call(
            "mqtt_query", _args(QUERY_ARGS, "request_topic", "bench/llm/request")
        ),
    }


async def _ping(session: ClientSession) -> None:
    await session.send_ping()


async def measure(
    config: Config,
    results: Results,
    raw: Raw,
    calls: dict[str, Callable[[], Awaitable[None]]],
) -> None:
    """Sequential latency of every kind, taking turns in blocks."""

    async def timed(kind: str) -> float:
        if kind == "raw_pub":
            results.published["raw"] = results.published.get("raw", 0) + 1
            return await raw.publish()
        if kind == "raw_rr":
            return await raw.request()
        start = time.perf_counter_ns()
        await calls[kind]()
        return (time.perf_counter_ns() - start) / 1e6

    for kind in KINDS:
        for _ in range(config.warmup):
            await timed(kind)
    done = 0
    while done < config.n:
        block = min(config.block, config.n - done)
        for kind in KINDS:
            samples = results.latency[kind].samples
            for _ in range(block):
                samples.append(await timed(kind))
        done += block


async def concurrency(results: Results, http: ClientSession, api: Any) -> None:
    """100 tool calls at once per path: half mqtt_publish, half mqtt_query."""

    async def outcome(call: Awaitable[None]) -> str | None:
        try:
            await call
        except Exception as err:  # counted, reported
            return f"{type(err).__name__}: {err}"
        return None

    async def http_call(name: str, args: dict[str, Any]) -> None:
        _check_call(await http.call_tool(name, args), name)

    async def llm_call(name: str, args: dict[str, Any]) -> None:
        _check_llm(await api.async_call_tool(llm_input(name, args)), name)

    for path, call in (("http", http_call), ("llm", llm_call)):
        batch = [
            call("mqtt_publish", _args(PUBLISH_ARGS, "topic", f"bench/{path}/pub"))
            if i % 2 == 0
            else call(
                "mqtt_query",
                _args(QUERY_ARGS, "request_topic", f"bench/{path}/request"),
            )
            for i in range(CONCURRENT)
        ]
        start = time.perf_counter()
        errors = [e for e in await asyncio.gather(*map(outcome, batch)) if e]
        wall = (time.perf_counter() - start) * 1000
        results.published[path] = results.published.get(path, 0) + CONCURRENT // 2
        results.concurrent[path] = (len(errors), wall, errors[0] if errors else "")


async def fresh_sessions(results: Results, url: str, token: str) -> None:
    """``mqtt_query`` as the first call of each of 20 fresh MCP sessions."""
    answered = 0
    first_error = ""
    for _ in range(FRESH_SESSIONS):
        try:
            async with mcp_session(url, token) as session:
                result = await session.call_tool(
                    "mqtt_query",
                    _args(QUERY_ARGS, "request_topic", "bench/http/request"),
                )
            _check_call(result, "mqtt_query")
            answered += 1
        except Exception as err:  # counted, reported
            first_error = first_error or f"{type(err).__name__}: {err}"
    results.fresh = (answered, FRESH_SESSIONS, first_error)


# -- report ---------------------------------------------------------------------------


def machine_line(quick: bool) -> str:
    """One line: CPU, cores, OS, Python and the versions that matter."""
    return _report.machine_line(
        "bench/tools.py",
        quick,
        f"Home Assistant {_report.version('homeassistant')} · mcp {_report.version('mcp')}"
        f" · aiomqtt {_report.version('aiomqtt')} · paho-mqtt {_report.version('paho-mqtt')}",
    )


Row = tuple[str, str, str, str, str]


def report(config: Config, results: Results) -> tuple[str, bool]:
    """The header line and the table; whether every target passed."""
    lat = results.latency
    n = f"n={config.n}, sequential"
    raw_pub, raw_rr = lat["raw_pub"], lat["raw_rr"]
    echo, echo_http = lat["echo"], lat["echo_http"]
    http_pub, http_post = lat["http_pub"], lat["http_post"]
    http_query, ping = lat["http_query"], lat["http_ping"]
    llm_pub, llm_query = lat["llm_pub"], lat["llm_query"]

    rows: list[Row] = [
        (
            f"`mqtt_publish` via HTTP (real `hass`, `mcp` ClientSession over "
            f"Streamable HTTP) p50 ({n})",
            ms(http_pub.p50),
            f"FastMCP stdio `echo` {ms(echo.p50)}",
            f"{http_pub.p50 / echo.p50:.2f}x (≤ {PUBLISH_FACTOR:g}x)",
            _report.mark(http_pub.p50 <= PUBLISH_FACTOR * echo.p50),
        ),
        (
            "`mqtt_publish` via HTTP p99",
            ms(http_pub.p99),
            f"FastMCP stdio `echo` {ms(echo.p99)}",
            f"{http_pub.p99 / echo.p99:.2f}x (info)",
            NA,
        ),
        (
            "FastMCP `echo` over Streamable HTTP (stateless, JSON; same client) "
            "p50 / p99: the HTTP floor of this client",
            f"{ms(echo_http.p50)} / {ms(echo_http.p99)}",
            f"FastMCP stdio `echo` {ms(echo.p50)} / {ms(echo.p99)}",
            f"{echo_http.p50 / echo.p50:.2f}x stdio; `mqtt_publish` via HTTP = "
            f"{http_pub.p50 / echo_http.p50:.2f}x this (info)",
            NA,
        ),
        (
            "`mqtt_publish` via HTTP as one raw JSON-RPC POST (aiohttp, no SDK "
            "client) p50 / p99",
            f"{ms(http_post.p50)} / {ms(http_post.p99)}",
            f"FastMCP stdio `echo` {ms(echo.p50)}",
            f"{http_post.p50 / echo.p50:.2f}x (info)",
            NA,
        ),
        (
            "`mqtt_publish` via HTTP against a raw publish → receive (p50)",
            ms(http_pub.p50),
            f"raw {ms(raw_pub.p50)} (p99 {ms(raw_pub.p99)})",
            f"{http_pub.p50 / raw_pub.p50:.1f}x (info; mcpMQTT "
            f"{MCPMQTT_PUBLISH_VS_RAW:g}x = {MCPMQTT_PUBLISH_VS_FASTMCP:g}x FastMCP)",
            NA,
        ),
        (
            f"`mqtt_publish` via the LLM API (in-process) p50 / p99 ({n})",
            f"{ms(llm_pub.p50)} / {ms(llm_pub.p99)}",
            f"raw {ms(raw_pub.p50)} / {ms(raw_pub.p99)}",
            f"{llm_pub.p50 / raw_pub.p50:.2f}x (info)",
            NA,
        ),
        (
            f"`mqtt_query` via the LLM API (in-process) p50 ({n})",
            ms(llm_query.p50),
            f"raw v5 request → response {ms(raw_rr.p50)}",
            f"+{llm_query.p50 - raw_rr.p50:.2f} ms (≤ +{QUERY_EXTRA_MS:g} ms)",
            _report.mark(llm_query.p50 <= raw_rr.p50 + QUERY_EXTRA_MS),
        ),
        (
            "`mqtt_query` via the LLM API p99",
            ms(llm_query.p99),
            f"raw {ms(raw_rr.p99)}",
            f"+{llm_query.p99 - raw_rr.p99:.2f} ms (info)",
            NA,
        ),
        (
            f"`mqtt_query` via HTTP p50 / p99 ({n})",
            f"{ms(http_query.p50)} / {ms(http_query.p99)}",
            f"raw {ms(raw_rr.p50)} / {ms(raw_rr.p99)}",
            f"+{http_query.p50 - raw_rr.p50:.2f} ms (info: the target is the "
            "tool's own cost, above; HTTP adds what `mqtt_publish` via HTTP shows)",
            NA,
        ),
        (
            "MCP `ping` via HTTP (same session; the endpoint without a tool) p50 / p99",
            f"{ms(ping.p50)} / {ms(ping.p99)}",
            f"FastMCP stdio `echo` {ms(echo.p50)}",
            f"{ping.p50 / echo.p50:.2f}x (info)",
            NA,
        ),
    ]
    for path, label in (
        ("http", "via HTTP (one MCP session)"),
        ("llm", "via the LLM API"),
    ):
        errors, wall, first = results.concurrent[path]
        rows.append(
            (
                f"{CONCURRENT} concurrent tool calls {label}: "
                f"{CONCURRENT // 2} `mqtt_publish` + {CONCURRENT // 2} `mqtt_query`",
                f"{errors} errors, all done in {wall:.0f} ms"
                + (f" (first: {first})" if first else ""),
                NA,
                "0 errors",
                _report.mark(errors == 0),
            )
        )
    answered, total, first = results.fresh
    rows.append(
        (
            "`mqtt_query` as the first call of a fresh MCP session (HTTP)",
            f"{answered} of {total} answered"
            + (f" (first error: {first})" if first else ""),
            NA,
            f"{total} of {total} (mcpMQTT: 0 of 20)",
            _report.mark(answered == total),
        )
    )
    paths = ("raw", "http", "llm")
    rows.append(
        (
            "published messages that reached the subscriber (raw / HTTP / LLM API)",
            " / ".join(
                f"{results.delivered.get(p, 0)} of {results.published.get(p, 0)}"
                for p in paths
            ),
            NA,
            "all",
            _report.mark(
                all(
                    results.delivered.get(p, 0) == results.published.get(p, 0)
                    for p in paths
                )
            ),
        )
    )
    passed = all(row[4] != "FAIL" for row in rows)
    lines = [
        machine_line(config.quick),
        "",
        "| metric | tools | baseline | ratio / target | pass |",
        "|---|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines), passed


def main() -> int:
    """Parse arguments, run, print the table; exit 1 when a target failed."""
    parser = argparse.ArgumentParser(description="Benchmark the MQTT tools.")
    parser.add_argument("--quick", action="store_true", help="smoke run, < 60 s")
    args = parser.parse_args()
    # Home Assistant (in-process) logs to the root logger; keep the table readable.
    logging.basicConfig(level=logging.ERROR)
    config = Config.make(quick=args.quick)
    started = time.monotonic()
    try:
        text, passed = asyncio.run(run(config))
    except KeyboardInterrupt:
        print("interrupted; Home Assistant and the broker stopped", file=sys.stderr)
        return 130
    print(text)
    verdict = "all targets met" if passed else "some targets FAILED"
    print(f"\n_{time.monotonic() - started:.0f} s; {verdict}_")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
