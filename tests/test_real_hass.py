"""The MCP endpoint of an "MQTT broker" entry in a real ``hass`` process.

One Home Assistant per module (``devkit.hass_runner``): ``hass -c DIR
--skip-pip`` on a throw-away configuration directory with a private Mosquitto,
an "MQTT broker" config entry written into ``.storage`` (rules: read+write
``demo/#``, read ``sensors/#``), the login ``admin`` (an administrator, from
the first login) and a non-administrator ``agent`` created through the
websocket API, each with a long-lived access token
(``auth/long_lived_access_token``). Everything talks to it over 127.0.0.1 as an
external client would:

* the ``mcp`` SDK (``streamablehttp_client`` + ``ClientSession``): initialize,
  tools/list, resources, tools/call publish (a peer subscriber receives it),
  retained read, query against a responder, a denied call that reaches nothing;
* raw HTTP: 401 without or with a bad token, JSON-RPC errors (-32700, -32600,
  -32601, -32602, 202 for a notification), 405 for GET, 403 for a foreign Origin;
* the options flow over the REST API, applied live: "administrators only" and
  an imported rule list, without a reconnection to the broker;
* the ``mqtt_bridge_tool_call`` event on the websocket, with the caller's user id;
* with ``npx`` (Node.js): the MCP Inspector CLI (tools/list, tools/call,
  resources/list) and the ``@modelcontextprotocol/conformance`` server
  scenarios that apply to a tools-only stateless server (see
  :data:`CONFORMANCE_SCENARIOS`); skipped with a reason when ``npx`` is missing.
  The first run downloads both packages (about 20 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
import contextlib
from dataclasses import dataclass
import json
import os
from pathlib import Path
import shutil
import tempfile
from typing import Any

import aiohttp
from aiohttp import web
import aiomqtt
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import AnyUrl
import pytest

from custom_components.mqtt_bridge.engine.tool_specs import TOOL_NAMES
from devkit.hass_runner import (
    INSPECTOR_PACKAGE,
    HassProcess,
    HassWebSocket,
    broker_entry,
    create_long_lived_token,
    create_user,
    get_json,
    integration_log_lines,
    login,
    mcp_session,
    prepare_minimal_config,
    wait_for_entries,
    wait_for_http,
    write_login,
)
from devkit.mosquitto import Mosquitto, free_port
from tests.common import wait_for

ADMIN, ADMIN_PASSWORD = "admin", "admin-password"
AGENT, AGENT_PASSWORD = "agent", "agent-password"
TITLE = "Real broker"
RULES = [
    {
        "pattern": "demo/#",
        "permissions": ["read", "write"],
        "description": "demo topics",
    },
    {"pattern": "sensors/#", "permissions": ["read"], "description": "sensor values"},
]
V5 = aiomqtt.ProtocolVersion.V5

#: Pinned: the newest Inspector whose CLI runs on Node 20 and has ``--header``
#: (``shared/reference/mcp-over-mqtt.md`` §6); the demo prints the same.
INSPECTOR = INSPECTOR_PACKAGE
#: Pinned: 0.1.14 and later need Node 22 (``fs.globSync``); 0.1.13 is the
#: newest that runs on Node 20.
CONFORMANCE = "@modelcontextprotocol/conformance@0.1.13"

#: Server scenarios of CONFORMANCE that apply to this endpoint (a stateless,
#: JSON-only Streamable HTTP server with tools and one resource). Each must pass.
CONFORMANCE_SCENARIOS = (
    "server-initialize",
    "ping",
    "tools-list",
    "resources-list",
    "dns-rebinding-protection",
)
#: Every other server scenario of CONFORMANCE, and why it does not apply.
_FIXTURE = "calls a fixture of the SDK's 'everything' test server"
CONFORMANCE_NOT_APPLICABLE = {
    "logging-set-level": "needs the logging capability (the server has no log stream)",
    "completion-complete": "needs the completions capability and a fixture prompt",
    "tools-call-simple-text": f"{_FIXTURE} (tool test_simple_text)",
    "tools-call-image": f"{_FIXTURE} (tool test_image_content)",
    "tools-call-audio": f"{_FIXTURE} (tool test_audio_content)",
    "tools-call-embedded-resource": f"{_FIXTURE} (tool test_embedded_resource)",
    "tools-call-mixed-content": f"{_FIXTURE} (tool test_multiple_content_types)",
    "tools-call-error": f"{_FIXTURE} (tool test_error_handling)",
    "tools-call-with-logging": "server-to-client log notifications need an SSE stream",
    "tools-call-with-progress": "progress notifications need an SSE stream",
    "tools-call-sampling": "server-to-client requests need an SSE stream",
    "tools-call-elicitation": "server-to-client requests need an SSE stream",
    "json-schema-2020-12": f"{_FIXTURE} (tool json_schema_2020_12_tool)",
    "elicitation-sep1034-defaults": "server-to-client requests need an SSE stream",
    "elicitation-sep1330-enums": "server-to-client requests need an SSE stream",
    "server-sse-polling": "SSE responses only (this server answers JSON)",
    "server-sse-multiple-streams": "SSE streams and sessions only (stateless, JSON)",
    "resources-read-text": f"{_FIXTURE} (resource test://static-text)",
    "resources-read-binary": f"{_FIXTURE} (resource test://static-binary)",
    "resources-templates-read": f"{_FIXTURE} (resource template test://template/...)",
    "resources-subscribe": "needs resources.subscribe and notifications (no stream)",
    "resources-unsubscribe": "needs resources.subscribe and notifications (no stream)",
    "prompts-list": "no prompts capability (tools and resources only)",
    "prompts-get-simple": "no prompts capability",
    "prompts-get-with-args": "no prompts capability",
    "prompts-get-embedded-resource": "no prompts capability",
    "prompts-get-with-image": "no prompts capability",
}

needs_npx = pytest.mark.skipif(
    shutil.which("npx") is None,
    reason="npx (Node.js) is not installed: the MCP Inspector CLI and the "
    "conformance suite are npm packages",
)


@dataclass
class RealHass:
    """The module's Home Assistant, broker, entry and (after :func:`server`) tokens."""

    process: HassProcess
    broker: Mosquitto
    entry_id: str
    admin_token: str = ""
    agent_token: str = ""
    agent_id: str = ""

    @property
    def base(self) -> str:
        return self.process.base_url

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/api/mqtt_bridge/mcp/{self.entry_id}"


@pytest.fixture(scope="module")
def real_hass(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealHass]:
    """Start Mosquitto and ``hass`` once for the module; stop both afterwards."""
    broker = Mosquitto()
    broker.start()
    config_dir = tmp_path_factory.mktemp("real_hass")
    port = free_port()
    try:
        [entry_id] = prepare_minimal_config(
            config_dir,
            port,
            [broker_entry("127.0.0.1", broker.port, RULES, title=TITLE)],
            log_level="debug",
        )
        write_login(config_dir, ADMIN, ADMIN_PASSWORD)
        process = HassProcess(config_dir, port=port)
        process.start()
    except BaseException:
        broker.cleanup()
        raise
    try:
        yield RealHass(process, broker, entry_id)
    finally:
        process.stop()
        broker.cleanup()


@pytest.fixture
async def server(real_hass: RealHass) -> RealHass:
    """The running Home Assistant with tokens; the first use waits and logs in."""
    if not real_hass.admin_token:
        async with aiohttp.ClientSession() as session:
            base = real_hass.base
            await wait_for_http(session, base, timeout=60, process=real_hass.process)
            access = await login(session, base, ADMIN, ADMIN_PASSWORD)
            admin_token = await create_long_lived_token(
                session, base, access, client_name="test_real_hass admin"
            )
            real_hass.agent_id = await create_user(
                session,
                base,
                access,
                name="Agent",
                username=AGENT,
                password=AGENT_PASSWORD,
            )
            agent_access = await login(session, base, AGENT, AGENT_PASSWORD)
            real_hass.agent_token = await create_long_lived_token(
                session, base, agent_access, client_name="test_real_hass agent"
            )
            states = await wait_for_entries(
                session, base, admin_token, [real_hass.entry_id], timeout=30
            )
            assert states[real_hass.entry_id][0] == "loaded", states
            real_hass.admin_token = admin_token
    assert real_hass.process.running, real_hass.process.log_tail()
    return real_hass


@contextlib.asynccontextmanager
async def peer(broker: Mosquitto, *topics: str) -> AsyncIterator[list[aiomqtt.Message]]:
    """An MQTT 5 client on the broker collecting what it receives on ``topics``."""
    received: list[aiomqtt.Message] = []
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=V5) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)

        async def read() -> None:
            async for message in client.messages:
                received.append(message)

        reader = asyncio.create_task(read())
        try:
            yield received
        finally:
            reader.cancel()
            await asyncio.wait({reader})


@contextlib.asynccontextmanager
async def responder(broker: Mosquitto, request_topic: str) -> AsyncIterator[None]:
    """An MQTT 5 responder: answers "pong:<request>" on the Response Topic."""
    async with aiomqtt.Client("127.0.0.1", broker.port, protocol=V5) as client:
        await client.subscribe(request_topic, qos=1)

        async def serve() -> None:
            async for message in client.messages:
                props = message.properties
                topic = getattr(props, "ResponseTopic", None)
                if topic is None:
                    continue
                answer = Properties(PacketTypes.PUBLISH)
                correlation = getattr(props, "CorrelationData", None)
                if correlation is not None:
                    answer.CorrelationData = correlation
                payload = bytes(message.payload)
                await client.publish(
                    topic, b"pong:" + payload, qos=1, properties=answer
                )

        task = asyncio.create_task(serve())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})


def structured(result: Any) -> dict[str, Any]:
    """The ``structuredContent`` of a tool result (a dict)."""
    assert isinstance(result.structuredContent, dict), result
    return result.structuredContent


async def post_raw(
    url: str,
    body: bytes | str,
    *,
    token: str | None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """POST ``body`` to ``url``; return the status and the JSON body (else text or None)."""
    sent = {"Content-Type": "application/json", "Accept": "application/json"}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    sent.update(headers or {})
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=sent) as resp,
    ):
        text = await resp.text()
        if resp.content_type != "application/json":
            return resp.status, text or None
        return resp.status, json.loads(text)


# --------------------------------------------------------------------------
# The mcp SDK client against the real process
# --------------------------------------------------------------------------


async def test_initialize_tools_list_and_resources(server: RealHass) -> None:
    async with mcp_session(server.mcp_url, server.admin_token) as session:
        tools = (await session.list_tools()).tools
        resources = (await session.list_resources()).resources
        rules = await session.read_resource(AnyUrl("mqtt-bridge://acl/rules"))
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == set(TOOL_NAMES)
    publish = by_name["mqtt_publish"]
    assert publish.description is not None
    assert "demo/#: demo topics" in publish.description
    assert publish.inputSchema["required"] == ["topic", "payload"]
    assert publish.annotations is not None
    assert publish.annotations.readOnlyHint is False
    read = by_name["mqtt_read"]
    assert read.annotations is not None
    assert read.annotations.readOnlyHint is True
    assert read.description is not None
    assert "sensors/#: sensor values" in read.description
    assert [str(r.uri) for r in resources] == ["mqtt-bridge://acl/rules"]
    text = rules.contents[0].text  # type: ignore[union-attr]
    assert json.loads(text) == RULES


async def test_initialize_result(server: RealHass) -> None:
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with (
        streamablehttp_client(server.mcp_url, headers=headers) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        init = await session.initialize()
    assert init.serverInfo.name == TITLE
    assert init.protocolVersion == "2025-06-18"
    assert init.capabilities.tools is not None
    assert init.capabilities.resources is not None


async def test_publish_reaches_a_peer(server: RealHass) -> None:
    async with (
        peer(server.broker, "demo/#") as received,
        mcp_session(server.mcp_url, server.admin_token) as session,
    ):
        result = await session.call_tool(
            "mqtt_publish",
            {"topic": "demo/e2e/lamp", "payload": "on", "qos": 1},
        )
        assert result.isError is False, result
        assert structured(result)["published"] is True
        await wait_for(lambda: any(m.topic.value == "demo/e2e/lamp" for m in received))
    message = next(m for m in received if m.topic.value == "demo/e2e/lamp")
    assert message.payload == b"on"


async def test_read_retained_and_query_a_responder(server: RealHass) -> None:
    async with aiomqtt.Client("127.0.0.1", server.broker.port, protocol=V5) as pub:
        await pub.publish("sensors/kitchen/temperature", b"21.5", qos=1, retain=True)
    try:
        async with (
            responder(server.broker, "demo/rpc/request"),
            mcp_session(server.mcp_url, server.admin_token) as session,
        ):
            read = await session.call_tool(
                "mqtt_read", {"topic": "sensors/+/temperature", "timeout": 5}
            )
            query = await session.call_tool(
                "mqtt_query",
                {"request_topic": "demo/rpc/request", "payload": "ping", "timeout": 5},
            )
    finally:
        async with aiomqtt.Client("127.0.0.1", server.broker.port) as pub:
            await pub.publish("sensors/kitchen/temperature", b"", qos=1, retain=True)
    assert read.isError is False, read
    message = structured(read)["message"]
    assert message["topic"] == "sensors/kitchen/temperature"
    assert message["payload"] == "21.5"
    assert message["retain"] is True
    assert query.isError is False, query
    answer = structured(query)
    assert answer["timed_out"] is False
    assert answer["correlated_by"] == "correlation_data"
    assert answer["response"]["payload"] == "pong:ping"


async def test_denied_calls_reach_nothing(server: RealHass) -> None:
    async with (
        peer(server.broker, "#") as received,
        mcp_session(server.mcp_url, server.admin_token) as session,
    ):
        publish = await session.call_tool(
            "mqtt_publish", {"topic": "secret/door", "payload": "open"}
        )
        read = await session.call_tool("mqtt_read", {"topic": "#", "timeout": 1})
        # Something allowed afterwards: once it arrives, the denied one would have.
        marker = await session.call_tool(
            "mqtt_publish", {"topic": "demo/marker", "payload": "x"}
        )
        assert marker.isError is False
        await wait_for(lambda: any(m.topic.value == "demo/marker" for m in received))
    assert publish.isError is True
    text = publish.content[0].text  # type: ignore[union-attr]
    assert "write" in text
    assert "secret/door" in text
    assert "demo/#" in text
    assert structured(publish)["error"] == "permission_denied"
    assert read.isError is True
    assert structured(read)["permission"] == "read"
    assert not [m for m in received if m.topic.value.startswith("secret/")]


async def test_concurrent_calls(server: RealHass) -> None:
    async with mcp_session(server.mcp_url, server.agent_token) as session:
        results = await asyncio.gather(
            *(
                session.call_tool(
                    "mqtt_publish", {"topic": f"demo/burst/{i}", "payload": str(i)}
                )
                for i in range(30)
            )
        )
    assert all(result.isError is False for result in results)


# --------------------------------------------------------------------------
# Raw HTTP
# --------------------------------------------------------------------------

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


async def test_no_token_or_a_bad_one_is_401(server: RealHass) -> None:
    body = json.dumps(INITIALIZE)
    status, _ = await post_raw(server.mcp_url, body, token=None)
    assert status == 401
    status, _ = await post_raw(server.mcp_url, body, token="not-a-token")
    assert status == 401
    status, answer = await post_raw(server.mcp_url, body, token=server.agent_token)
    assert status == 200
    assert answer["result"]["serverInfo"]["name"] == TITLE


async def test_bad_json_rpc(server: RealHass) -> None:
    url, token = server.mcp_url, server.admin_token
    status, answer = await post_raw(url, b'{"jsonrpc": "2.0", "id": 1,', token=token)
    assert status == 400
    assert answer["id"] is None
    assert answer["error"]["code"] == -32700
    status, answer = await post_raw(url, json.dumps([INITIALIZE]), token=token)
    assert (status, answer["error"]["code"]) == (400, -32600)
    status, answer = await post_raw(
        url, json.dumps({"jsonrpc": "1.0", "id": 7, "method": "ping"}), token=token
    )
    assert (status, answer["id"], answer["error"]["code"]) == (400, 7, -32600)
    status, answer = await post_raw(
        url, json.dumps({"jsonrpc": "2.0", "id": 2, "method": "no/such"}), token=token
    )
    assert (status, answer["id"], answer["error"]["code"]) == (200, 2, -32601)
    status, answer = await post_raw(
        url,
        json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {}}),
        token=token,
    )
    assert (status, answer["id"], answer["error"]["code"]) == (200, 3, -32602)
    status, answer = await post_raw(
        url,
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 4,
                "method": "tools/call",
                "params": {"name": "no_such_tool", "arguments": {}},
            }
        ),
        token=token,
    )
    assert (status, answer["error"]["code"]) == (200, -32602)
    status, answer = await post_raw(
        url,
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        token=token,
    )
    assert (status, answer) == (202, None)
    status, answer = await post_raw(
        url, json.dumps(INITIALIZE), token=token, headers={"Content-Type": "text/plain"}
    )
    assert status == 415
    status, answer = await post_raw(
        url,
        json.dumps(INITIALIZE),
        token=token,
        headers={"Origin": "http://evil.example.com"},
    )
    assert status == 403
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert resp.status == 405


# --------------------------------------------------------------------------
# Options applied live, audit events
# --------------------------------------------------------------------------


async def options_flow(server: RealHass, step: str, data: dict[str, Any]) -> Any:
    """Run the entry's options flow over REST as the admin: menu → ``step`` → ``data``."""
    base = f"{server.base}/api/config/config_entries/options/flow"
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(base, json={"handler": server.entry_id}) as resp:
            resp.raise_for_status()
            menu = await resp.json()
        assert menu["type"] == "menu", menu
        flow = f"{base}/{menu['flow_id']}"
        async with session.post(flow, json={"next_step_id": step}) as resp:
            resp.raise_for_status()
            form = await resp.json()
        assert (form["type"], form["step_id"]) == ("form", step), form
        async with session.post(flow, json=data) as resp:
            resp.raise_for_status()
            return await resp.json()


def broker_connections(broker: Mosquitto) -> int:
    """How many times Home Assistant's client connected to the broker so far."""
    return broker.log_path.read_text(errors="replace").count(" as ha-mqtt-bridge-")


async def test_require_admin_option_live(server: RealHass) -> None:
    body = json.dumps(INITIALIZE)
    status, _ = await post_raw(server.mcp_url, body, token=server.agent_token)
    assert status == 200
    result = await options_flow(
        server, "settings", {"require_admin": True, "include_assist_tools": False}
    )
    assert result["type"] == "create_entry", result
    try:
        status, answer = await post_raw(server.mcp_url, body, token=server.agent_token)
        assert status == 403
        assert "administrator" in answer["error"]["message"]
        async with mcp_session(server.mcp_url, server.admin_token) as session:
            assert len((await session.list_tools()).tools) == len(TOOL_NAMES)
    finally:
        await options_flow(
            server, "settings", {"require_admin": False, "include_assist_tools": False}
        )
    status, _ = await post_raw(server.mcp_url, body, token=server.agent_token)
    assert status == 200


async def test_imported_rules_apply_to_the_next_call(server: RealHass) -> None:
    connections = broker_connections(server.broker)
    assert connections >= 1
    lab = {"pattern": "lab/#", "permissions": ["write"], "description": "the lab"}
    async with mcp_session(server.mcp_url, server.admin_token) as session:
        before = await session.call_tool(
            "mqtt_publish", {"topic": "lab/x", "payload": "1"}
        )
        result = await options_flow(
            server, "import_rules", {"rules": json.dumps([*RULES, lab])}
        )
        assert result["type"] == "create_entry", result
        try:
            after = await session.call_tool(
                "mqtt_publish", {"topic": "lab/x", "payload": "1"}
            )
            tools = (await session.list_tools()).tools
        finally:
            await options_flow(server, "import_rules", {"rules": json.dumps(RULES)})
        restored = await session.call_tool(
            "mqtt_publish", {"topic": "lab/x", "payload": "1"}
        )
    assert before.isError is True
    assert after.isError is False, after
    assert restored.isError is True
    publish = next(tool for tool in tools if tool.name == "mqtt_publish")
    assert "lab/#: the lab" in (publish.description or "")
    # Applied live: the entry stayed loaded on the same broker session.
    assert broker_connections(server.broker) == connections
    async with aiohttp.ClientSession() as session:
        entries = await get_json(
            session,
            f"{server.base}/api/config/config_entries/entry?domain=mqtt_bridge",
            server.admin_token,
        )
    assert [entry["state"] for entry in entries] == ["loaded"]


async def test_tool_call_event_names_the_caller(server: RealHass) -> None:
    async with (
        aiohttp.ClientSession() as session,
        HassWebSocket(session, server.base, server.admin_token) as ws,
    ):
        await ws.subscribe_events("mqtt_bridge_tool_call")
        async with mcp_session(server.mcp_url, server.agent_token) as mcp:
            await mcp.call_tool("mqtt_publish", {"topic": "secret/x", "payload": "1"})
        event = await ws.next_event(timeout=5)
    data = event["data"]
    assert event["event_type"] == "mqtt_bridge_tool_call"
    assert data["entry_id"] == server.entry_id
    assert data["tool"] == "mqtt_publish"
    assert data["topic"] == "secret/x"
    assert data["allowed"] is False
    assert data["source"] == "mcp"
    assert data["user_id"] == server.agent_id
    assert event["context"]["user_id"] == server.agent_id
    assert data["duration_ms"] >= 0


# --------------------------------------------------------------------------
# Node.js tools: MCP Inspector CLI and the conformance suite
# --------------------------------------------------------------------------


async def npx(*args: str, cwd: Path, timeout: float = 90) -> tuple[int, str, str]:
    """Run ``npx -y ARGS``; return the exit code, stdout and stderr (npm noise dropped)."""
    proc = await asyncio.create_subprocess_exec(
        "npx",
        "-y",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "npm_config_update_notifier": "false",
            "npm_config_fund": "false",
            "npm_config_audit": "false",
            "NO_COLOR": "1",
        },
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    noise = ("npm warn", "npm WARN")
    err_text = "\n".join(
        line
        for line in err.decode(errors="replace").splitlines()
        if not line.startswith(noise)
    )
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err_text


@pytest.fixture
def npx_dir() -> Iterator[Path]:
    """An empty working directory for npx (no package.json to pick up)."""
    with tempfile.TemporaryDirectory(prefix="npx-") as path:
        yield Path(path)


@needs_npx
async def test_mcp_inspector_cli(server: RealHass, npx_dir: Path) -> None:
    base = [
        INSPECTOR,
        "--cli",
        server.mcp_url,
        "--transport",
        "http",
        "--header",
        f"Authorization: Bearer {server.admin_token}",
    ]
    # One run first: it downloads the package on a fresh machine.
    code, out, err = await npx(*base, "--method", "tools/list", cwd=npx_dir)
    assert code == 0, err
    listed = json.loads(out)
    async with peer(server.broker, "demo/#") as received:
        runs = await asyncio.gather(
            npx(
                *base,
                "--method",
                "tools/call",
                "--tool-name",
                "mqtt_publish",
                "--tool-arg",
                "topic=demo/inspector",
                "--tool-arg",
                "payload=from the inspector",
                cwd=npx_dir,
            ),
            npx(
                *base,
                "--method",
                "tools/call",
                "--tool-name",
                "mqtt_publish",
                "--tool-arg",
                "topic=secret/inspector",
                "--tool-arg",
                "payload=x",
                cwd=npx_dir,
            ),
            npx(*base, "--method", "resources/list", cwd=npx_dir),
            npx(
                INSPECTOR,
                "--cli",
                server.mcp_url,
                "--transport",
                "http",
                "--method",
                "tools/list",
                cwd=npx_dir,
            ),
        )
        await wait_for(lambda: any(m.topic.value == "demo/inspector" for m in received))
    (c1, allowed, e1), (c2, denied, e2), (c3, resources, e3), (c4, _, e4) = runs
    assert [tool["name"] for tool in listed["tools"]] == list(TOOL_NAMES)
    assert all(tool["inputSchema"]["type"] == "object" for tool in listed["tools"])
    assert c1 == 0, e1
    allowed_result = json.loads(allowed)
    assert allowed_result["isError"] is False
    assert allowed_result["structuredContent"]["topic"] == "demo/inspector"
    assert c2 == 0, e2
    denied_result = json.loads(denied)
    assert denied_result["isError"] is True
    assert denied_result["structuredContent"]["error"] == "permission_denied"
    assert c3 == 0, e3
    assert json.loads(resources)["resources"][0]["uri"] == "mqtt-bridge://acl/rules"
    # Without the token the Inspector cannot connect: HA answers 401.
    assert c4 != 0
    assert "401" in e4
    message = next(m for m in received if m.topic.value == "demo/inspector")
    assert message.payload == b"from the inspector"


@contextlib.asynccontextmanager
async def token_proxy(target: str, token: str) -> AsyncIterator[str]:
    """A 127.0.0.1 HTTP front that adds ``Authorization`` and forwards to ``target``.

    The conformance CLI has no option for headers. Everything else (method,
    body, ``Host``, ``Origin``, ``Accept``, ...) is forwarded unchanged, so the
    DNS rebinding scenario tests Home Assistant's own checks.
    """
    hop_by_hop = {"content-length", "transfer-encoding", "connection", "keep-alive"}
    async with aiohttp.ClientSession(auto_decompress=False) as session:

        async def forward(request: web.Request) -> web.Response:
            headers = {
                key: value
                for key, value in request.headers.items()
                if key.lower() not in hop_by_hop
            }
            headers["Authorization"] = f"Bearer {token}"
            async with session.request(
                request.method, target, data=await request.read(), headers=headers
            ) as resp:
                body = await resp.read()
                keep = {
                    key: value
                    for key, value in resp.headers.items()
                    if key.lower() not in hop_by_hop
                }
                return web.Response(status=resp.status, body=body, headers=keep)

        app = web.Application()
        app.router.add_route("*", "/mcp", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            yield f"http://127.0.0.1:{port}/mcp"
        finally:
            await runner.cleanup()


def scenario_results(output: Path, scenario: str) -> list[dict[str, Any]]:
    """The checks of one scenario run (``server-<scenario>-<time>/checks.json``)."""
    [path] = output.glob(f"server-{scenario}-*/checks.json")
    checks: list[dict[str, Any]] = json.loads(path.read_text())
    return checks


@needs_npx
async def test_conformance_server_scenarios(server: RealHass, npx_dir: Path) -> None:
    code, out, err = await npx(CONFORMANCE, "list", cwd=npx_dir)
    assert code == 0, err
    section = out.split("Server scenarios", 1)[1].split("Client scenarios", 1)[0]
    listed = {
        line.strip()[2:]
        for line in section.splitlines()
        if line.strip().startswith("- ")
    }
    # Every scenario of the pinned version is either run here or explained.
    assert listed == set(CONFORMANCE_SCENARIOS) | set(CONFORMANCE_NOT_APPLICABLE)
    output = npx_dir / "results"
    async with token_proxy(server.mcp_url, server.admin_token) as url:
        runs = await asyncio.gather(
            *(
                npx(
                    CONFORMANCE,
                    "server",
                    "--url",
                    url,
                    "--scenario",
                    scenario,
                    "-o",
                    str(output),
                    cwd=npx_dir,
                )
                for scenario in CONFORMANCE_SCENARIOS
            )
        )
    failures = {}
    for scenario, (code, out, err) in zip(CONFORMANCE_SCENARIOS, runs, strict=True):
        checks = scenario_results(output, scenario)
        bad = [c for c in checks if c["status"] not in ("SUCCESS", "INFO")]
        if code != 0 or bad or not checks:
            failures[scenario] = {"exit": code, "checks": bad, "out": out, "err": err}
    assert not failures, json.dumps(failures, indent=2)


# --------------------------------------------------------------------------
# Last: the log of the whole module's run
# --------------------------------------------------------------------------


async def test_home_assistant_log_is_clean(server: RealHass) -> None:
    """No errors, and no blocking call in the event loop blamed on the integration."""
    log = server.process.config_dir / "home-assistant.log"
    lines = integration_log_lines(log, limit=1000)
    problems = [
        line
        for line in lines
        if " ERROR " in line
        or " CRITICAL " in line
        or ("Detected blocking call" in line and "mqtt_bridge" in line)
    ]
    assert not problems, "\n".join(problems)
