"""``mqtt-bridge-mcp`` (engine/cli.py) against a real Mosquitto and real child processes.

The commands run as real subprocesses (``cli_support/launch.py``, the console
script without installation): ``connect`` driven by a stock ``mcp``
``ClientSession`` over ``stdio_client``, ``serve`` reached by the engine's
MCP-over-MQTT client transport and, with ``--request-topic``, by a simple
device (``SimpleMcpMqttClient``: MQTT 5 Response Topic and Correlation Data,
no ``initialize``), and stopped with SIGTERM, ``list`` as table and
JSON, and the error exits. The same code paths also run in-process (``main()``
and the async cores with pipes), which is what the coverage gate measures.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
import functools
import io
import json
import logging
import os
from pathlib import Path
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.message import SessionMessage
from mqtt_bridge_engine import cli
from mqtt_bridge_engine.cli import BrokerOptions, CliError
from mqtt_bridge_engine.hosted_stdio import HostedStdioConfig
from mqtt_bridge_engine.mcp_mqtt import McpMqttServer, discover
from mqtt_bridge_engine.mcp_mqtt_simple import SimpleMcpMqttClient
from mqtt_bridge_engine.mqtt_client import MqttClient, MqttSettings, ProtocolVersion
from mqtt_bridge_engine.subscriptions import SubscriptionRefusedError
from pydantic import TypeAdapter
import pytest

from devkit.mosquitto import Mosquitto, free_port

from .common import ECHO, mqtt_client, uid
from .test_mcp_mqtt import hosted, session
from .test_stdio_host import _alive, _host, _text

pytestmark = pytest.mark.timeout(30)

LAUNCHER = str(Path(__file__).parent / "cli_support" / "launch.py")
STDIN_THREAD = f"{cli.PROG} stdin"


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """No thread outlives a test (stdin readers end at end of stream)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3
    while True:
        extra = [
            t
            for t in set(threading.enumerate()) - before
            if t.is_alive() and not t.name.startswith("asyncio_")
        ]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert extra == []


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker variables of the machine running the tests do not leak in."""
    for name in list(os.environ):
        if name.startswith("MQTT_"):
            monkeypatch.delenv(name)


def args(broker: Mosquitto) -> list[str]:
    return ["--host", "127.0.0.1", "--port", str(broker.port)]


def options(broker: Mosquitto, **kwargs: Any) -> BrokerOptions:
    kwargs.setdefault("timeout", 3.0)
    return BrokerOptions(MqttSettings("127.0.0.1", broker.port), **kwargs)


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MQTT_")}


async def run_cli(*argv: str, timeout: float = 15) -> tuple[int, str, str]:
    """Run the CLI as a subprocess to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        LAUNCHER,
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def announced(broker: Mosquitto, name: str) -> list[Any]:
    async with mqtt_client(broker) as client:
        return await discover(client, name, timeout=0.2)


async def wait_announced(broker: Mosquitto, name: str, timeout: float = 10) -> Any:
    async with asyncio.timeout(timeout):
        while not (found := await announced(broker, name)):
            pass
    return found[0]


def _namespace(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(list(argv))


def tool_text(answer: dict[str, Any]) -> str:
    """The text of a simple device's ``tools/call`` answer (a JSON-RPC dict)."""
    return str(answer["result"]["content"][0]["text"])


async def call_tool(
    device: SimpleMcpMqttClient, tool: str, **arguments: Any
) -> dict[str, Any]:
    """``tools/call`` from a simple device, without ``initialize``.

    The bridge subscribes its request topic in the same loop iteration as the
    MCP server's control topic, before the presence is published, so once the
    presence is seen the request topic is subscribed; the bridge keeps the
    request until its shared session is initialized.
    """
    return await device.request(
        "tools/call", {"name": tool, "arguments": arguments}, timeout=20
    )


# --------------------------------------------------------------------------- #
# Subprocess: the console script as users run it
# --------------------------------------------------------------------------- #


async def test_connect_driven_by_a_stdio_client_session(mosquitto: Mosquitto) -> None:
    """Claude Desktop's view: a stdio MCP server that is really on MQTT."""
    name = f"test/{uid()}/echo"
    host = _host()
    notes: list[Any] = []

    async def logging_callback(params: Any) -> None:
        notes.append(params.data)

    async def list_roots_callback(_context: Any) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri="file:///srv/data")])  # type: ignore[arg-type]

    parameters = StdioServerParameters(
        command=sys.executable,
        args=[LAUNCHER, *args(mosquitto), "--timeout", "5", "connect", name],
        env=child_env(),
    )
    async with (
        hosted(mosquitto, name, handler=host.serve_session) as server,
        stdio_client(parameters) as (read, write),
        ClientSession(
            read,
            write,
            logging_callback=logging_callback,
            list_roots_callback=list_roots_callback,
        ) as client,
    ):
        await client.initialize()
        tools = await client.list_tools()
        assert {"echo", "pid", "log"} <= {tool.name for tool in tools.tools}
        result = await client.call_tool("echo", {"text": "through the CLI"})
        assert _text(result) == "through the CLI"
        # a notification and a server->client request pass through as well
        assert _text(await client.call_tool("log", {"text": "note"})) == "logged"
        assert notes == ["note"]
        assert _text(await client.call_tool("roots", {})) == "file:///srv/data"
        assert len(server.sessions) == 1
        assert host.stats.running == 1
    # stdin closed → the CLI said goodbye, the server ended the session
    async with asyncio.timeout(5):
        while host.stats.running:
            await asyncio.sleep(0.02)


async def test_serve_subprocess_reached_over_mqtt_then_sigterm(
    mosquitto: Mosquitto,
) -> None:
    name = f"test/{uid()}/served"
    request_topic = f"test/{uid()}/simple/request"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        LAUNCHER,
        *args(mosquitto),
        "serve",
        "--server-name",
        name,
        "--description",
        "echo via the CLI",
        "--env",
        "CONFIGURED=yes",
        "--request-topic",
        request_topic,
        "--",
        sys.executable,
        str(ECHO),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
    )
    try:
        presence = await wait_announced(mosquitto, name)
        assert presence.description == "echo via the CLI"
        assert presence.server_id.startswith("mqtt-bridge-mcp-")
        # `list` (another subprocess) sees the served server meanwhile
        listing = asyncio.create_task(
            run_cli(
                *args(mosquitto), "list", "--json", "--filter", name, "--wait", "0.3"
            )
        )
        async with (
            session(mosquitto, name) as (client, transport),
            mqtt_client(mosquitto) as device_mqtt,
            SimpleMcpMqttClient(device_mqtt, request_topic) as device,
        ):
            code, out, err = await listing
            assert code == 0, err
            assert [s["server_id"] for s in json.loads(out)] == [presence.server_id]
            assert transport.server_id == presence.server_id
            assert _text(await client.call_tool("echo", {"text": "hi"})) == "hi"
            assert _text(await client.call_tool("env", {"name": "CONFIGURED"})) == "yes"
            pid = int(_text(await client.call_tool("pid", {})))
            assert _alive(pid)
            # a simple device, next to it: its own (shared) child
            answer = await call_tool(device, "env", name="CONFIGURED")
            assert tool_text(answer) == "yes"
            simple_pid = int(tool_text(await call_tool(device, "pid")))
            assert simple_pid != pid
            assert _alive(simple_pid)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                served_out, served_err = await proc.communicate()
        assert proc.returncode == 0, served_err
        assert not _alive(pid)  # the children were stopped
        assert not _alive(simple_pid)
        assert await announced(mosquitto, name) == []  # presence cleared
        assert served_out == b""
        assert f"serving {name!r}" in served_err.decode()
        assert f"simple devices on {request_topic!r}" in served_err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_list_subprocess_table(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/listed"
    async with hosted(mosquitto, name) as server:
        code, out, err = await run_cli(
            *args(mosquitto), "list", "--filter", "test/#", "--wait", "0.3"
        )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SERVER-NAME", "SERVER-ID", "DESCRIPTION"]
    row = next(line for line in lines if line.startswith(name))
    assert row.split() == [name, server.server_id, "test", "server"]


async def test_list_subprocess_json(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/listed"
    async with hosted(mosquitto, name) as server:
        code, out, err = await run_cli(
            *args(mosquitto), "list", "--json", "--filter", name, "--wait", "0.3"
        )
    assert code == 0, err
    assert json.loads(out) == [
        {
            "server_name": name,
            "server_id": server.server_id,
            "description": "test server",
            "meta": {"v": 1},
        }
    ]


async def test_subprocess_broker_unreachable() -> None:
    closed = str(free_port())
    code, out, err = await run_cli("--host", "127.0.0.1", "--port", closed, "list")
    assert code == 2
    assert out == ""
    assert f"cannot connect to the MQTT broker mqtt://127.0.0.1:{closed}" in err


async def test_subprocess_server_not_found(mosquitto: Mosquitto) -> None:
    code, out, err = await run_cli(
        *args(mosquitto), "--timeout", "1", "connect", "test/nobody/here"
    )
    assert code == 3
    assert out == ""  # stdout is the MCP stream
    assert (
        f"MCP server 'test/nobody/here' not found on broker 127.0.0.1:{mosquitto.port}"
        " within 1 s" in err
    )


async def test_subprocess_bad_server_name(mosquitto: Mosquitto) -> None:
    code, _out, err = await run_cli(
        *args(mosquitto), "serve", "--server-name", "bad/+/name", "--", "true"
    )
    assert code == 2
    assert "invalid --server-name" in err
    assert "wildcard" in err


# --------------------------------------------------------------------------- #
# In-process: connect with pipes
# --------------------------------------------------------------------------- #


class Pipes:
    """stdin/stdout pipes for an in-process ``connect``; the test is the MCP client."""

    def __init__(self) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        self.cli_stdin = os.fdopen(in_r, "rb")
        self.cli_stdout = os.fdopen(out_w, "wb")
        self.to_cli = os.fdopen(in_w, "wb")
        self.from_cli = os.fdopen(out_r, "rb")

    def send(self, body: dict[str, Any] | bytes) -> None:
        line = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.to_cli.write(line + b"\n")
        self.to_cli.flush()

    async def recv(self) -> dict[str, Any]:
        async with asyncio.timeout(15):  # the echo child starts first
            line = await asyncio.to_thread(self.from_cli.readline)
        assert line, "stdout closed"
        body: dict[str, Any] = json.loads(line)
        return body

    def close(self) -> None:
        # write ends first: the readers see end of stream and let go
        for stream in (self.to_cli, self.cli_stdout, self.cli_stdin, self.from_cli):
            stream.close()


@asynccontextmanager
async def piped_connect(
    broker: BrokerOptions, name: str
) -> AsyncIterator[tuple[Pipes, asyncio.Task[int]]]:
    pipes = Pipes()
    task = asyncio.create_task(
        cli.connect(broker, name, stdin=pipes.cli_stdin, stdout=pipes.cli_stdout)
    )
    try:
        yield pipes, task
    finally:
        pipes.to_cli.close()
        async with asyncio.timeout(10):
            await asyncio.wait({task})
        pipes.close()


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "pipes", "version": "1"},
    },
}


async def initialize(pipes: Pipes) -> None:
    pipes.send(INITIALIZE)
    answer = await pipes.recv()
    assert answer["id"] == 1
    assert answer["result"]["serverInfo"]["name"] == "echo"
    pipes.send({"jsonrpc": "2.0", "method": "notifications/initialized"})


async def echo(pipes: Pipes, request_id: int, text: str) -> str:
    pipes.send(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": text}},
        }
    )
    answer = await pipes.recv()
    assert answer["id"] == request_id, answer
    return str(answer["result"]["content"][0]["text"])


async def test_connect_in_process(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_bridge_engine.cli")
    name = f"test/{uid()}/pipes"
    host = _host()
    async with (
        hosted(mosquitto, name, handler=host.serve_session),
        piped_connect(options(mosquitto), name) as (pipes, task),
    ):
        await initialize(pipes)
        pipes.send(b"this is not JSON-RPC")
        pipes.send(
            {
                "jsonrpc": "2.0",
                "id": "call-1",
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "piped"}},
            }
        )
        answer = await pipes.recv()
        assert answer["id"] == "call-1"
        assert answer["result"]["content"][0]["text"] == "piped"
        pipes.to_cli.close()  # the MCP client goes away
        async with asyncio.timeout(5):
            assert await task == cli.EXIT_OK
        pipes.cli_stdout.close()
        assert pipes.from_cli.read() == b""  # nothing but JSON-RPC on stdout
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped a line that is not JSON-RPC" in m for m in messages)
    assert (
        "3 messages to the server, 2 to the client, 1 invalid stdin lines" in messages
    )


async def wait_pumping() -> None:
    """Until ``connect`` pumps (its stdin thread runs; the presence watch is granted)."""
    async with asyncio.timeout(5):
        while not any(t.name == STDIN_THREAD for t in threading.enumerate()):
            await asyncio.sleep(0.01)


async def test_connect_ends_when_the_server_goes_offline(
    mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """No session yet: the cleared presence ends ``connect``."""
    name = f"test/{uid()}/offline"
    async with piped_connect(options(mosquitto), name) as (_pipes, task):
        async with hosted(mosquitto, name) as server:
            await wait_pumping()
        async with asyncio.timeout(5):
            assert await task == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"MCP server {name!r} ({server.server_id}) went offline" in err


async def test_connect_ends_when_the_server_ends_the_session(
    mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server says notifications/disconnected (spec §1.5 "Shutdown")."""
    name = f"test/{uid()}/ends"
    disconnected = TypeAdapter(types.JSONRPCMessage).validate_python(
        {"jsonrpc": "2.0", "method": "notifications/disconnected"}
    )

    async def handler(_cid: str, read: Any, write: Any) -> None:
        async with read, write:
            await read.receive()  # initialize
            await write.send(SessionMessage(disconnected))
            async for _item in read:
                pass

    async with (
        hosted(mosquitto, name, handler=handler) as server,
        piped_connect(options(mosquitto), name) as (pipes, task),
    ):
        pipes.send(INITIALIZE)
        async with asyncio.timeout(5):
            assert await task == cli.EXIT_FAILURE
    err = capsys.readouterr().err
    assert f"MCP server {name!r} ({server.server_id}) ended the session" in err


async def test_connect_answers_requests_in_flight_when_the_server_goes(
    mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """The transport's error answer reaches stdout before ``connect`` exits."""
    name = f"test/{uid()}/inflight"
    async with piped_connect(options(mosquitto), name) as (pipes, task):
        async with hosted(mosquitto, name, handler=_host().serve_session) as server:
            await initialize(pipes)
            pipes.send(
                {
                    "jsonrpc": "2.0",
                    "id": 7,
                    "method": "tools/call",
                    "params": {"name": "sleep", "arguments": {"seconds": 30}},
                }
            )
            async with asyncio.timeout(10):
                while server.stats.requests < 2:  # initialize, tools/call
                    await asyncio.sleep(0.02)
        answer = await pipes.recv()
        assert answer["id"] == 7
        assert answer["error"]["code"] == -32000
        async with asyncio.timeout(5):
            assert await task == cli.EXIT_FAILURE
    assert f"MCP server {name!r} ({server.server_id})" in capsys.readouterr().err


async def test_connect_raises_what_a_pump_raises(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any) -> None:
        raise RuntimeError("pump broke")

    monkeypatch.setattr(cli, "_stdin_to_server", broken)
    name = f"test/{uid()}/broken"
    async with (
        hosted(mosquitto, name),
        piped_connect(options(mosquitto), name) as (_pipes, task),
    ):
        await asyncio.wait({task})
        with pytest.raises(RuntimeError, match="pump broke"):
            task.result()


async def test_connect_survives_a_broker_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mqtt_bridge_engine.cli")
    name = f"test/{uid()}/restart"
    with Mosquitto() as broker:
        async with (
            hosted(broker, name, handler=_host().serve_session),
            piped_connect(options(broker, timeout=15), name) as (pipes, task),
        ):
            await initialize(pipes)
            assert await echo(pipes, 2, "before") == "before"
            await asyncio.to_thread(broker.kill)  # no wills, no goodbyes
            await asyncio.to_thread(broker.start)
            assert await echo(pipes, 3, "again") == "again"
            assert not task.done()
            pipes.to_cli.close()
            async with asyncio.timeout(5):
                assert await task == cli.EXIT_OK
    messages = [r.getMessage() for r in caplog.records]
    where = f"mqtt://127.0.0.1:{broker.port}"
    assert f"lost the connection to the MQTT broker {where}; reconnecting" in messages
    assert f"reconnected to the MQTT broker {where}" in messages


async def test_connect_errors(mosquitto: Mosquitto) -> None:
    with pytest.raises(CliError, match="invalid SERVER_NAME") as err:
        await cli.connect(options(mosquitto), "a/#")
    assert err.value.code == cli.EXIT_USAGE
    started = time.monotonic()
    with pytest.raises(CliError, match="not found on broker") as err:
        await cli.connect(options(mosquitto, timeout=0.3), "test/nobody/here")
    assert err.value.code == cli.EXIT_NOT_FOUND
    assert time.monotonic() - started < 2  # the timeout, plus connecting


async def test_line_reader() -> None:
    """stdin lines arrive as text; the end of the stream or a read error ends them."""
    read_fd, write_fd = os.pipe()
    try:
        reader = cli._LineReader(read_fd)
        os.write(write_fd, b'{"a": 1}\n\xff\nno newline at the end')
        assert await anext(reader) == '{"a": 1}\n'
        assert await anext(reader) == "\ufffd\n"  # bad UTF-8 replaced
        os.close(write_fd)
        assert [line async for line in reader] == ["no newline at the end"]
        reader.thread.join(2)
    finally:
        os.close(read_fd)
    # an invalid descriptor: os.read fails, the lines end
    assert [line async for line in cli._LineReader(1_000_000)] == []


def test_line_reader_outlives_its_loop() -> None:
    read_fd, write_fd = os.pipe()
    try:

        async def start() -> Any:
            return cli._LineReader(read_fd)

        reader = asyncio.run(start())
        os.write(write_fd, b"late line\n")  # no loop to take it: the thread ends
        reader.thread.join(2)
        assert not reader.thread.is_alive()
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_unowned_text_wrapper_leaves_the_stream_open() -> None:
    raw = io.BytesIO()
    text = cli._UnownedTextWrapper(raw, encoding="utf-8")
    text.write("x")
    text.close()
    text.close()  # already detached
    assert not raw.closed
    assert raw.getvalue() == b"x"


def test_main_interrupted_and_console_entry(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def interrupted(*_args: Any, **_kwargs: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "list_servers", interrupted)
    assert cli.main(["list"]) == cli.EXIT_INTERRUPTED
    monkeypatch.setattr(sys, "argv", ["mqtt-bridge-mcp", "--help"])
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 0


# --------------------------------------------------------------------------- #
# In-process: serve and list
# --------------------------------------------------------------------------- #


async def test_serve_in_process(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/inproc"
    stop = asyncio.Event()
    served = HostedStdioConfig(
        name, sys.executable, (str(ECHO),), description="in-process"
    )
    task = asyncio.create_task(cli.serve(options(mosquitto), served, stop))
    try:
        presence = await wait_announced(mosquitto, name)
        assert presence.description == "in-process"
        async with session(mosquitto, name) as (client, _transport):
            assert _text(await client.call_tool("echo", {"text": "x"})) == "x"
    finally:
        stop.set()
        async with asyncio.timeout(10):
            assert await task == cli.EXIT_OK
    assert await announced(mosquitto, name) == []


async def test_serve_in_process_with_simple_devices(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """``--request-topic``: a simple device calls a tool without ``initialize``."""
    caplog.set_level(logging.INFO, logger=cli.__name__)
    name = f"test/{uid()}/simple"
    request_topic = f"test/{uid()}/devices/request"
    stop = asyncio.Event()
    served = HostedStdioConfig(
        name, sys.executable, (str(ECHO),), request_topic=request_topic
    )
    task = asyncio.create_task(cli.serve(options(mosquitto, qos=0), served, stop))
    try:
        await wait_announced(mosquitto, name)
        async with (
            mqtt_client(mosquitto) as client,
            SimpleMcpMqttClient(client, request_topic, qos=0) as device,
        ):
            answer = await call_tool(device, "echo", text="simple")
            assert tool_text(answer) == "simple"
            # two devices may use the same JSON-RPC id: the bridge namespaces them
            answer = await device.request(
                "tools/call",
                {"name": "echo", "arguments": {"text": "again"}},
                request_id=1,
            )
            assert answer["id"] == 1
            assert tool_text(answer) == "again"
            simple_pid = int(tool_text(await call_tool(device, "pid")))
            assert _alive(simple_pid)
            # the spec layout is served next to it
            async with session(mosquitto, name) as (spec, _transport):
                assert _text(await spec.call_tool("echo", {"text": "x"})) == "x"
    finally:
        stop.set()
        async with asyncio.timeout(10):
            assert await task == cli.EXIT_OK
    assert not _alive(simple_pid)
    assert await announced(mosquitto, name) == []
    assert "simple devices: 3 requests, 0 error answers, 0 bad messages" in (
        caplog.text
    )


async def test_list_in_process(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/multi"
    broker = options(mosquitto)
    async with hosted(mosquitto, name) as server:
        server.description = "two\nlines"
        server._publish_presence()
        out = io.StringIO()
        assert await cli.list_servers(broker, name, wait=0.2, out=out) == 0
        assert out.getvalue().splitlines()[1].split() == [
            name,
            server.server_id,
            "two",
            "lines",
        ]
        out = io.StringIO()
        assert (
            await cli.list_servers(broker, name, wait=0.2, as_json=True, out=out) == 0
        )
        assert json.loads(out.getvalue())[0]["description"] == "two\nlines"
    with pytest.raises(CliError, match="invalid --filter"):
        await cli.list_servers(broker, "a/#/b", wait=0.1)


def test_main_list_none_and_errors(
    mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    base = args(mosquitto)
    assert cli.main([*base, "list", "--filter", f"none/{uid()}/#", "--wait", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no MCP servers announced matching" in captured.err
    assert cli.main([*base, "list", "--json", "--wait", "0", "--filter", "x/y"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert "no MCP servers announced matching 'x/y'" in captured.err

    assert cli.main(["--help"]) == 0
    assert cli.main(["list", "--nonsense"]) == 2
    assert cli.main([]) == 2
    capsys.readouterr()
    assert cli.main([*base, "--timeout", "0.5", "connect", "test/nobody/here"]) == 3
    assert "not found" in capsys.readouterr().err
    assert cli.main(["--port", str(free_port()), "--qos", "0", "list"]) == 2
    assert "cannot connect to the MQTT broker" in capsys.readouterr().err
    assert cli.main([*base, "serve", "--server-name", "ok/name"]) == 2
    assert "serve needs a command" in capsys.readouterr().err


def test_main_serve_until_sigterm(
    mosquitto: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    """``main`` installs SIGINT/SIGTERM handlers; SIGTERM stops serving with exit 0."""
    name = f"test/{uid()}/signal"
    sent: list[bool] = []

    def stop_when_announced() -> None:
        async def watch() -> None:
            await wait_announced(mosquitto, name)

        try:
            asyncio.run(watch())
        except TimeoutError:
            return  # serve failed; the test fails on its exit code
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_when_announced)
    watcher.start()
    try:
        code = cli.main(
            [*args(mosquitto), "-v", "serve", "--server-name", name, "--", "true"]
        )
    finally:
        watcher.join()
    assert sent == [True]
    assert code == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert f"serving {name!r}" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Options
# --------------------------------------------------------------------------- #


def test_broker_options_flags_environment_defaults(tmp_path: Path) -> None:
    default = cli.broker_options(_namespace("list"), {})
    assert default == BrokerOptions(MqttSettings("localhost", 1883))
    assert default.new_client_id().startswith("mqtt-bridge-mcp-")
    assert default.new_client_id() != default.new_client_id()

    ca = tmp_path / "ca.pem"
    ca.write_text("")
    env = {
        "MQTT_HOST": "broker.lan",
        "MQTT_USERNAME": "user",
        "MQTT_PASSWORD": "secret",
        "MQTT_CA_FILE": str(ca),
        "MQTT_QOS": "0",
        "MQTT_CLIENT_ID_PREFIX": "desk",
        "MQTT_TIMEOUT": "2.5",
    }
    from_env = cli.broker_options(_namespace("list"), env)
    assert from_env.settings == MqttSettings(
        "broker.lan",
        8883,
        tls=True,
        username="user",
        password="secret",
        ca_file=str(ca),
    )
    assert (from_env.qos, from_env.client_id_prefix, from_env.timeout) == (
        0,
        "desk",
        2.5,
    )
    assert "secret" not in repr(from_env)

    # flags win, before or after the command
    flags = _namespace(
        "--host", "a", "list", "--port", "1884", "--qos", "1", "--insecure"
    )
    chosen = cli.broker_options(flags, env)
    assert chosen.settings.host == "a"
    assert chosen.settings.port == 1884
    assert chosen.settings.tls
    assert not chosen.settings.verify_tls
    assert chosen.qos == 1
    assert cli.broker_options(_namespace("list", "--tls"), {}).settings.port == 8883
    assert cli.broker_options(_namespace("list"), {"MQTT_TLS": "yes"}).settings.tls
    assert cli.broker_options(_namespace("list"), {"MQTT_INSECURE": "on"}).settings.tls


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--port", "0"], {}, "port '0' is out of range"),
        (["--port", "x"], {}, "port 'x' is not a number"),
        ([], {"MQTT_PORT": "70000"}, "out of range"),
        (["--qos", "2"], {}, "QoS '2' is out of range"),
        (["--timeout", "0"], {}, "timeout '0' is out of range"),
        ([], {"MQTT_TLS": "maybe"}, "MQTT_TLS='maybe' is not a boolean"),
        (["--ca-file", "/nonexistent/ca.pem"], {}, "does not exist"),
        (["--client-id-prefix", "a/b"], {}, "client id prefix 'a/b'"),
    ],
)
def test_broker_options_errors(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(CliError, match=message) as err:
        cli.broker_options(_namespace(*argv, "list"), env)
    assert err.value.code == cli.EXIT_USAGE


def test_serve_options(tmp_path: Path) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\n")
    served = cli.serve_options(
        _namespace(
            "serve",
            "--server-name",
            "home/time",
            "--env",
            "A=1=2",
            "--env",
            "EMPTY=",
            "--cwd",
            str(tmp_path),
            "--",
            "./server.sh",
            "--flag",
            "--env",
        )
    )
    assert served == HostedStdioConfig(
        "home/time",
        "./server.sh",
        ("--flag", "--env"),
        env={"A": "1=2", "EMPTY": ""},
        cwd=str(tmp_path),
    )
    # without "--" the command starts at the first positional argument
    assert cli.serve_options(
        _namespace("serve", "--server-name", "a/b", "sh", "-c", "x")
    ).args == ("-c", "x")
    simple = cli.serve_options(
        _namespace(
            "serve", "--server-name", "a/b", "--request-topic", "mcp/a/req", "--", "sh"
        )
    )
    assert simple.request_topic == "mcp/a/req"
    assert simple.command == "sh"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--server-name", "$bad"], "starts with \\$"),
        (["--server-name", "a/b"], "serve needs a command"),
        (["--server-name", "a/b", "--env", "NOVALUE", "--", "sh"], "is not KEY=VALUE"),
        (["--server-name", "a/b", "--env", "=x", "--", "sh"], "is not KEY=VALUE"),
        (["--server-name", "a/b", "--cwd", "/nonexistent", "--", "sh"], "not a dir"),
        (["--server-name", "a/b", "--", "no-such-command-x"], "not found"),
        (["--server-name", "a/b", "--", "./no-such-file"], "not found"),
        (["--server-name", "a/b", "--env", "PATH=/nonexistent", "--", "sh"], "found"),
        (["--server-name", "a/b", "--max-sessions", "0", "--", "sh"], "positive"),
        (["--server-name", "a/b", "--request-topic", "a/+", "--", "sh"], "wildcard"),
        (
            ["--server-name", "a/b", "--request-topic", "$SYS/x", "--", "sh"],
            "starts with \\$",
        ),
        (["--server-name", "a/b", "--request-topic", "", "--", "sh"], "empty"),
        (
            ["--server-name", "a/b", "--request-topic", "x" * 65_530, "--", "sh"],
            "too long",
        ),
    ],
)
def test_serve_options_errors(argv: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message) as err:
        cli.serve_options(_namespace("serve", *argv))
    assert err.value.code == cli.EXIT_USAGE


async def test_serve_refuses_an_invalid_configuration() -> None:
    """In-process callers get the engine's message as a usage error, before any connection."""
    closed = BrokerOptions(MqttSettings("127.0.0.1", free_port()), timeout=0.3)
    with pytest.raises(CliError, match="the command is empty") as err:
        await cli.serve(closed, HostedStdioConfig("a/b", ""), asyncio.Event())
    assert err.value.code == cli.EXIT_USAGE


# --------------------------------------------------------------------------- #
# Broker failures
# --------------------------------------------------------------------------- #


async def test_credentials_refused_and_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with Mosquitto(users={"alice": "right-password"}) as broker:
        wrong = BrokerOptions(
            MqttSettings("127.0.0.1", broker.port, username="alice", password="nope"),
            timeout=3,
        )
        with pytest.raises(CliError, match="refused the credentials") as err:
            await cli.list_servers(wrong, wait=0)
        assert "nope" not in str(err.value)
        assert "mqtt://alice@127.0.0.1" in str(err.value)
        monkeypatch.setenv("MQTT_PASSWORD", "right-password")
        namespace = _namespace(
            "--port",
            str(broker.port),
            "--host",
            "127.0.0.1",
            "--username",
            "alice",
            "list",
        )
        right = cli.broker_options(namespace)
        assert await cli.list_servers(right, wait=0, out=io.StringIO()) == 0


async def test_tls(tmp_path: Path) -> None:
    with Mosquitto(tls=True) as broker:
        assert broker.tls_port is not None

        def at(**kwargs: Any) -> BrokerOptions:
            settings = MqttSettings(
                "127.0.0.1", broker.tls_port or 0, tls=True, **kwargs
            )
            return BrokerOptions(settings, timeout=3)

        out = io.StringIO()
        assert (
            await cli.list_servers(at(ca_file=str(broker.cert_path)), wait=0, out=out)
            == 0
        )
        assert await cli.list_servers(at(verify_tls=False), wait=0, out=out) == 0
        with pytest.raises(CliError, match=r"cannot connect .*mqtts://"):
            await cli.list_servers(at(), wait=0, out=out)


async def test_subscriptions_refused(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that refuses the $mcp-… subscriptions (SUBACK 0x87, e.g. EMQX ACLs).

    Mosquitto 2.0 grants every subscription and filters on delivery, so the
    refusal is simulated where the engine raises it.
    """
    refused = SubscriptionRefusedError("broker refused '$mcp-…': Not authorized")

    async def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise refused

    broker = options(mosquitto)
    monkeypatch.setattr(cli, "discover", refuse)
    with pytest.raises(CliError, match=r"ACL must allow \$mcp-server/#"):
        await cli.list_servers(broker, wait=0)
    monkeypatch.setattr(cli.McpMqttClientTransport, "__aenter__", refuse)
    with pytest.raises(CliError, match="Not authorized"):
        await cli.connect(broker, "home/time")

    async def too_slow(*_args: Any, **_kwargs: Any) -> Any:
        raise TimeoutError

    monkeypatch.setattr(cli.McpMqttClientTransport, "__aenter__", too_slow)
    with pytest.raises(CliError, match="did not confirm the subscriptions"):
        await cli.connect(broker, "home/time")
    monkeypatch.setattr(McpMqttServer, "run", refuse)
    served = HostedStdioConfig("home/time", sys.executable, (str(ECHO),))
    with pytest.raises(CliError, match="Not authorized") as err:
        await cli.serve(broker, served, asyncio.Event())
    assert err.value.code == cli.EXIT_USAGE


async def test_broker_without_mqtt5_and_no_connection(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        cli, "MqttClient", functools.partial(MqttClient, protocol=ProtocolVersion.V311)
    )
    with pytest.raises(CliError, match="does not accept MQTT 5"):
        await cli.list_servers(options(mosquitto), wait=0)

    async def reachable(*_args: Any, **_kwargs: Any) -> None:
        return None

    monkeypatch.setattr(cli, "check_connection", reachable)
    closed = BrokerOptions(MqttSettings("127.0.0.1", free_port()), timeout=0.3)
    with pytest.raises(
        CliError, match=r"no connection to the MQTT broker .* within 0\.3 s"
    ):
        await cli.list_servers(closed, wait=0)
