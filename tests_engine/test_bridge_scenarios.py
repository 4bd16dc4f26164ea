"""The stdio ⇄ MQTT bridge end to end: real Mosquitto, real stdio MCP server children.

ClientSession → McpMqttClientTransport → MqttClient → Mosquitto → MqttClient →
McpMqttServer → StdioHost → child (``stdio_servers/echo.py`` or
``npx -y @modelcontextprotocol/server-everything``), on mcp 1.x and 2.x:
tools, resources, prompts, progress / logging / list-changed notifications, a
sampling request answered by the client, pings both ways, 100 concurrent
requests and two interleaved clients without misrouting, a child killed in
the middle of a request, a broker restart, and a client written from the
specification text with plain paho (not the project's MQTT client).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from importlib.metadata import version
import json
import os
from pathlib import Path
import queue
import shutil
import signal
import threading
import time
from typing import Any
import warnings

from mcp import ClientSession, types
from mqtt_bridge_engine.mcp_mqtt import (
    CLIENT_ID,
    COMPONENT_TYPE,
    McpMqttClientTransport,
    McpMqttServer,
)
from mqtt_bridge_engine.stdio_host import (
    EXITED_MESSAGE,
    INTERNAL_ERROR,
    StdioHost,
    StdioServerConfig,
)
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions as PahoSubscribeOptions
import pytest

from devkit.mosquitto import Mosquitto

from .common import (  # noqa: F401 - no_leftovers: autouse fixture
    mqtt_client,
    no_leftovers,
    uid,
    wait_for,
)
from .test_mcp_mqtt import Recorder, hosted
from .test_stdio_host import FAST, _host, _text

pytestmark = pytest.mark.timeout(20)

# ClientSession's read timeout: a timedelta on mcp 1.x, seconds on 2.x
READ_TIMEOUT: Any = (
    8.0 if int(version("mcp").split(".")[0]) >= 2 else timedelta(seconds=8)
)


def _children(pid: int) -> dict[int, int]:
    """Map pid → parent pid of every process (Linux ``/proc``)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int | None = None) -> set[int]:
    """Every living process below ``pid`` (default: this test process)."""
    root = os.getpid() if pid is None else pid
    parents = _children(root)
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture(autouse=True)
def no_leftover_processes(mosquitto: Mosquitto) -> Iterator[None]:
    """No child process (stdio server, npx, node) outlives a test."""
    before = descendants()
    yield
    deadline = time.monotonic() + 3
    while (extra := descendants() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert extra == set()


@asynccontextmanager
async def bridge(
    broker: Mosquitto, host: StdioHost, **kwargs: Any
) -> AsyncIterator[tuple[McpMqttServer, str]]:
    """``host`` served on MQTT under a fresh server-name."""
    name = f"scenario/{uid()}"
    async with hosted(broker, name, handler=host.serve_session, **kwargs) as server:
        yield server, name


@asynccontextmanager
async def client(
    broker: Mosquitto, name: str, **session_kwargs: Any
) -> AsyncIterator[tuple[ClientSession, McpMqttClientTransport]]:
    """An initialized ClientSession over its own MqttClient (mcp-client-id)."""
    cid = f"cli-{uid()}"
    will = McpMqttClientTransport.client_will(cid)
    async with mqtt_client(broker, cid, will) as mqtt:
        transport = McpMqttClientTransport(mqtt, name, timeout=5)
        async with (
            transport as (read, write),
            ClientSession(
                read, write, read_timeout_seconds=READ_TIMEOUT, **session_kwargs
            ) as session,
        ):
            await session.initialize()
            yield session, transport


def code_of(error: BaseException) -> int:
    """The JSON-RPC error code of an SDK error (1.x ``McpError.error``, 2.x ``MCPError.code``)."""
    code = getattr(error, "code", None)
    if code is None:
        code = error.error.code  # type: ignore[attr-defined]
    return int(code)


def name_of(message: Any) -> str:
    return type(getattr(message, "root", message)).__name__


# --------------------------------------------------------------------------- #


async def test_echo_server_through_the_bridge(mosquitto: Mosquitto) -> None:
    """Tools, resources, prompts, notifications, sampling, pings, capability topics."""
    host = _host()
    logs: list[Any] = []
    steps: list[tuple[float, float | None, str | None]] = []
    asked: list[str] = []
    received: list[str] = []

    async def logging_callback(params: Any) -> None:
        logs.append(params.data)

    async def sampling_callback(_context: Any, params: Any) -> Any:
        asked.append(params.messages[0].content.text)
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text="sampled answer"),
            model="test-model",
        )

    async def message_handler(message: Any) -> None:
        received.append(name_of(message))

    async def on_progress(
        progress: float, total: float | None, text: str | None
    ) -> None:
        steps.append((progress, total, text))

    async with (
        mqtt_client(mosquitto) as observer,
        bridge(mosquitto, host) as (server, name),
        client(
            mosquitto,
            name,
            logging_callback=logging_callback,
            sampling_callback=sampling_callback,
            message_handler=message_handler,
        ) as (session, transport),
    ):
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"echo", "progress", "sample", "ping_client", "changed"} <= tools
        assert _text(await session.call_tool("echo", {"text": "über"})) == "über"

        resources = (await session.list_resources()).resources
        assert [str(r.uri) for r in resources] == ["echo://greeting"]
        read = await session.read_resource(resources[0].uri)
        assert read.contents[0].text == "hello from echo"  # type: ignore[union-attr]

        prompts = (await session.list_prompts()).prompts
        assert [p.name for p in prompts] == ["greet"]
        prompt = await session.get_prompt("greet", {"name": "Ada"})
        assert prompt.messages[0].content.text == "Say hello to Ada"  # type: ignore[union-attr]

        result = await session.call_tool(
            "progress", {"steps": 3}, progress_callback=on_progress
        )
        assert _text(result) == "3 steps"
        assert steps == [(n, 3, f"step {n}") for n in (1, 2, 3)]
        assert logs == [f"step {n} of 3" for n in (1, 2, 3)]

        result = await session.call_tool("sample", {"prompt": "What is MQTT?"})
        assert _text(result) == "sampled answer"
        assert asked == ["What is MQTT?"]

        # ping both ways
        assert (await session.send_ping()).model_dump(exclude_none=True) == {}
        assert _text(await session.call_tool("ping_client", {})) == "pong"

        # list_changed: on the server capability topic, then to the session
        server_capability = Recorder(
            observer, f"$mcp-server/capability/{server.server_id}/{name}"
        )
        client_capability = Recorder(
            observer, f"$mcp-client/capability/{transport.client_id}"
        )
        await asyncio.gather(
            server_capability.sub.wait_granted(), client_capability.sub.wait_granted()
        )
        assert _text(await session.call_tool("changed", {})) == "sent"
        changed = await server_capability.next()
        assert json.loads(changed.payload)["method"] == (
            "notifications/tools/list_changed"
        )
        await wait_for(lambda: "ToolListChangedNotification" in received)
        # a client capability change goes to $mcp-client/capability/{cid}
        with warnings.catch_warnings():  # mcp 2.x: roots are deprecated (SEP-2577)
            warnings.simplefilter("ignore")
            await session.send_roots_list_changed()
        roots = await client_capability.next()
        assert json.loads(roots.payload)["method"] == "notifications/roots/list_changed"
        assert dict(roots.properties.user_properties) == {  # type: ignore[union-attr]
            COMPONENT_TYPE: "mcp-client",
            CLIENT_ID: transport.client_id,
        }
        # the child still answers after it
        assert _text(await session.call_tool("echo", {"text": "end"})) == "end"
        assert transport.stats.errors == 0
        assert host.stats.restarts == 0
    assert host.stats.running == 0


@pytest.mark.skipif(
    shutil.which("npx") is None, reason="npx (Node.js) is not installed"
)
async def test_server_everything_through_the_bridge(mosquitto: Mosquitto) -> None:
    """The reference server of the MCP project, started with npx, behind the bridge."""
    host = StdioHost(
        StdioServerConfig(
            "npx",
            ("-y", "@modelcontextprotocol/server-everything"),
            env={
                "npm_config_prefer_offline": "true",
                "npm_config_update_notifier": "false",
            },
        ),
        name="everything",
        restart_backoff=FAST,
    )
    async with (
        bridge(mosquitto, host) as (_server, name),
        client(mosquitto, name) as (session, _transport),
    ):
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"echo", "get-sum"} <= tools
        assert _text(await session.call_tool("echo", {"message": "hi"})) == "Echo: hi"
        sum_text = _text(await session.call_tool("get-sum", {"a": 2, "b": 40}))
        assert "42" in sum_text
        resources = (await session.list_resources()).resources
        assert resources
        read = await session.read_resource(resources[0].uri)
        assert str(read.contents[0].uri) == str(resources[0].uri)
        prompts = {p.name for p in (await session.list_prompts()).prompts}
        assert "args-prompt" in prompts
        prompt = await session.get_prompt("args-prompt", {"city": "Bern"})
        assert "Bern" in prompt.messages[0].content.text  # type: ignore[union-attr]
    assert host.stats.running == 0
    assert host.stats.errors == 0


async def test_concurrent_requests_are_not_misrouted(mosquitto: Mosquitto) -> None:
    """100 concurrent calls from one client, then two clients interleaved."""
    host = _host()
    async with bridge(mosquitto, host) as (server, name):
        async with client(mosquitto, name) as (one, _t1):
            # ClientSession lists the tools once for their output schemas
            await one.list_tools()
            texts = [f"one-{n}" for n in range(100)]
            results = await asyncio.gather(
                *(one.call_tool("echo", {"text": text}) for text in texts)
            )
            assert [_text(r) for r in results] == texts
            async with client(mosquitto, name) as (two, _t2):
                await two.list_tools()
                assert host.stats.running == 2  # one child per client session
                calls = [
                    (session, f"{tag}-{n}")
                    for n in range(50)
                    for session, tag in ((one, "a"), (two, "b"))
                ]
                results = await asyncio.gather(
                    *(s.call_tool("echo", {"text": text}) for s, text in calls)
                )
                assert [_text(r) for r in results] == [text for _s, text in calls]
        assert server.stats.errors == 0
        assert server.stats.parse_errors == 0
    assert host.stats.requests >= 200


async def test_child_killed_mid_request(mosquitto: Mosquitto) -> None:
    """SIGKILL while a request is in flight: an error answer, then a restarted child."""
    host = _host()
    async with (
        bridge(mosquitto, host) as (_server, name),
        client(mosquitto, name) as (session, _transport),
    ):
        pid = int(_text(await session.call_tool("pid", {})))
        requests = host.stats.requests
        slow = asyncio.create_task(session.call_tool("sleep", {"seconds": 30}))
        await wait_for(lambda: host.stats.requests > requests)  # at the child
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Exception, match=EXITED_MESSAGE) as failed:
            await asyncio.wait_for(slow, 5)
        assert code_of(failed.value) == INTERNAL_ERROR
        # the next call waits for the restarted, re-initialized child
        assert _text(await session.call_tool("echo", {"text": "again"})) == "again"
        assert int(_text(await session.call_tool("pid", {}))) != pid
        assert host.stats.restarts == 1
    assert host.stats.running == 0


async def online_again(presence: Recorder) -> None:
    """Wait for a non-empty presence (the server re-announced itself)."""
    async with asyncio.timeout(8):
        while not (await presence.next(timeout=8)).payload:
            pass


async def test_broker_restart(mosquitto: Mosquitto) -> None:
    """Mosquitto crashes, then restarts cleanly: sessions recover or end cleanly, never hang.

    A crash (SIGKILL) publishes no will: the request in flight gets an error at
    once (this connection's answers are lost), the server re-announces itself
    and the same MCP session (same child) goes on. A clean stop (SIGTERM) makes
    Mosquitto publish the wills of its clients, among them the server's empty
    presence: the client session may then end (a clear error, no hang) and a
    new one works.
    """
    broker = Mosquitto()
    await asyncio.to_thread(broker.start)
    host = _host()
    try:
        async with (
            mqtt_client(broker) as observer,
            bridge(broker, host) as (server, name),
            client(broker, name) as (session, transport),
        ):
            presence = Recorder(observer, f"$mcp-server/presence/+/{name}")
            assert (await presence.next()).payload
            pid = int(_text(await session.call_tool("pid", {})))
            requests = host.stats.requests
            slow = asyncio.create_task(session.call_tool("sleep", {"seconds": 5}))
            await wait_for(lambda: host.stats.requests > requests)
            await asyncio.to_thread(broker.kill)
            with pytest.raises(Exception, match="connection to the broker was lost"):
                await asyncio.wait_for(slow, 3)  # at once, not after the 8 s timeout
            await asyncio.to_thread(broker.start)
            await online_again(presence)
            result = await asyncio.wait_for(
                session.call_tool("echo", {"text": "after restart"}), 8
            )
            assert _text(result) == "after restart"
            # the same MCP session and child: nothing was re-initialized
            assert int(_text(await session.call_tool("pid", {}))) == pid
            assert list(server.sessions) == [transport.client_id]
            assert transport.closed_reason is None
            assert transport.stats.errors == 1

            presence.messages.clear()
            await asyncio.to_thread(broker.restart)  # clean stop, then start
            await online_again(presence)
            started = time.monotonic()
            try:
                result = await session.call_tool("echo", {"text": "after stop"})
            except Exception:  # the server's will ended the session
                assert transport.closed_reason is not None
                assert "went offline" in transport.closed_reason
                assert time.monotonic() - started < 1
                async with client(broker, name) as (fresh, _t):
                    result = await fresh.call_tool("echo", {"text": "after stop"})
            assert _text(result) == "after stop"
    finally:
        await asyncio.to_thread(broker.cleanup)
    assert host.stats.running == 0


# --------------------------------------------------------------------------- #
# A client written from the specification text only, on plain paho-mqtt.


class SpecClient:
    """MCP over MQTT client side by the specification (§1.3-§1.5 of the reference), paho only."""

    def __init__(self, port: int, client_id: str) -> None:
        self.client_id = client_id
        self.port = port
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.acked = threading.Event()
        self.paho = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        will = Properties(PacketTypes.WILLMESSAGE)
        will.UserProperty = self.user_properties()
        self.paho.will_set(
            f"$mcp-client/presence/{client_id}",
            json.dumps({"jsonrpc": "2.0", "method": "notifications/disconnected"}),
            qos=1,
            properties=will,
        )
        self.paho.on_message = lambda _c, _u, message: self.messages.put(message)
        self.paho.on_subscribe = lambda *_args: self.acked.set()

    def user_properties(self) -> list[tuple[str, str]]:
        return [
            ("MCP-COMPONENT-TYPE", "mcp-client"),
            ("MCP-MQTT-CLIENT-ID", self.client_id),
        ]

    async def connect(self) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0
        properties.UserProperty = [
            ("MCP-COMPONENT-TYPE", "mcp-client"),
            ("MCP-META", json.dumps({"version": "0.1", "implementation": "spec-test"})),
        ]
        await asyncio.to_thread(
            self.paho.connect, "127.0.0.1", self.port, properties=properties
        )
        self.paho.loop_start()

    async def subscribe(self, topic_filter: str, *, no_local: bool = False) -> None:
        self.acked.clear()
        self.paho.subscribe(
            topic_filter, options=PahoSubscribeOptions(qos=1, noLocal=no_local)
        )
        assert await asyncio.to_thread(self.acked.wait, 5)

    def publish(self, topic: str, body: dict[str, Any] | bytes) -> None:
        properties = Properties(PacketTypes.PUBLISH)
        properties.UserProperty = self.user_properties()
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.paho.publish(topic, payload, qos=1, properties=properties)

    async def receive(self) -> paho.MQTTMessage:
        return await asyncio.to_thread(self.messages.get, True, 5)

    async def receive_json(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads((await self.receive()).payload)
        return body

    async def disconnect_with_will(self) -> None:
        # MQTT 5 DISCONNECT reason 0x04: the broker publishes the will
        self.paho.disconnect(
            ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
        )
        await asyncio.to_thread(self.paho.loop_stop)


async def test_client_from_the_specification_text(mosquitto: Mosquitto) -> None:
    """Discovery, initialize on the control topic, tools, ping, parse error, will."""
    host = _host()
    async with bridge(mosquitto, host) as (server, name):
        spec = SpecClient(mosquitto.port, f"spec-{uid()}")
        await spec.connect()
        try:
            # discovery: the retained presence names the server-id
            await spec.subscribe(f"$mcp-server/presence/+/{name}")
            online = await spec.receive()
            assert online.retain
            server_id = online.topic.split("/")[2]
            assert server_id == server.server_id
            assert json.loads(online.payload)["method"] == "notifications/server/online"
            assert dict(online.properties.UserProperty)["MCP-COMPONENT-TYPE"] == (
                "mcp-server"
            )
            rpc = f"$mcp-rpc/{spec.client_id}/{server_id}/{name}"
            await spec.subscribe(rpc, no_local=True)
            await spec.subscribe(
                f"$mcp-server/capability/{server_id}/{name}", no_local=True
            )
            # initialize on the control topic, answered on the RPC topic
            spec.publish(
                f"$mcp-server/{server_id}/{name}",
                {
                    "jsonrpc": "2.0",
                    "id": "init-1",
                    "method": "initialize",
                    "params": {
                        "protocolVersion": "2025-06-18",
                        "capabilities": {},
                        "clientInfo": {"name": "spec-test", "version": "0.1"},
                    },
                },
            )
            answer = await spec.receive()
            assert answer.topic == rpc
            assert dict(answer.properties.UserProperty) == {
                "MCP-COMPONENT-TYPE": "mcp-server",
                "MCP-MQTT-CLIENT-ID": server_id,
            }
            body = json.loads(answer.payload)
            assert body["id"] == "init-1"
            assert body["result"]["serverInfo"]["name"] == "echo"
            spec.publish(rpc, {"jsonrpc": "2.0", "method": "notifications/initialized"})
            spec.publish(
                rpc,
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tools/call",
                    "params": {"name": "echo", "arguments": {"text": "from paho"}},
                },
            )
            called = await spec.receive_json()
            assert called["id"] == 2
            assert called["result"]["content"][0]["text"] == "from paho"
            spec.publish(rpc, {"jsonrpc": "2.0", "id": 3, "method": "ping"})
            assert await spec.receive_json() == {
                "jsonrpc": "2.0",
                "id": 3,
                "result": {},
            }
            # malformed JSON: a parse error back, the bridge keeps serving
            spec.publish(rpc, b'{"jsonrpc": "2.0", "id": 4, "method": ')
            error = await spec.receive_json()
            assert (error["id"], error["error"]["code"]) == (None, -32700)
            spec.publish(rpc, {"jsonrpc": "2.0", "id": 5, "method": "tools/list"})
            listed = await spec.receive_json()
            assert listed["id"] == 5
            assert "echo" in {tool["name"] for tool in listed["result"]["tools"]}
            assert server.stats.parse_errors == 1
            assert host.stats.running == 1
        finally:
            await spec.disconnect_with_will()
        # the will ends the session: the child is stopped
        await wait_for(lambda: not server.sessions and host.stats.running == 0)
