"""The MCP endpoint ``POST /api/mqtt_bridge/mcp/{entry_id}`` against a real Mosquitto.

A stock ``mcp`` ``ClientSession`` over the SDK's ``streamablehttp_client`` talks
to Home Assistant's aiohttp test server (``hass_client``) with an access token:
initialize, tools/list, tools/call allowed and denied (a peer on the broker
sees what gets through and nothing else), a retained read, the rules resource.
Raw POSTs check the HTTP rules: authentication, the "administrators only"
option, 404/405/406/413/415/503, the Origin check, JSON-RPC errors, 202 for
notifications; and the ``mqtt_bridge_tool_call`` audit event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
import json
import os
from pathlib import Path
import sys
from typing import Any

from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from homeassistant.auth.models import User
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers.network import NoURLAvailableError
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError
from pydantic import AnyUrl
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_capture_events,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.mqtt_bridge import http as mcp_http
from custom_components.mqtt_bridge.broker_runtime import RESOURCE_ACL_RULES
from custom_components.mqtt_bridge.const import (
    CONF_REQUIRE_ADMIN,
    EVENT_TOOL_CALL,
)
from custom_components.mqtt_bridge.engine.tool_specs import TOOL_NAMES
from devkit.mosquitto import Mosquitto
from tests.common import add_node_entry, wait_for
from tests.test_broker_runtime import setup_broker
from tests.test_mqtt_client import peer, unique

RULES = [
    {
        "pattern": "sensors/+/temperature",
        "permissions": ["read"],
        "description": "Room temperatures",
    },
    {"pattern": "cmd/#", "permissions": ["write"], "description": "Commands"},
    {"pattern": "state/#", "permissions": ["read", "write"], "description": "State"},
]

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
JSON_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
}

type Client = TestClient  # the aiohttp test client of hass_client()


def path_of(entry_id: str) -> str:
    return f"/api/mqtt_bridge/mcp/{entry_id}"


@pytest.fixture
async def entry(hass: HomeAssistant, mosquitto: Mosquitto) -> MockConfigEntry:
    """A loaded broker entry with RULES, connected to the session Mosquitto."""
    return await setup_broker(hass, mosquitto.port, rules=RULES)


@pytest.fixture
async def client(hass_client: ClientSessionGenerator) -> Client:
    return await hass_client()


@contextlib.asynccontextmanager
async def mcp_session(
    client: Client, entry_id: str, token: str
) -> AsyncIterator[ClientSession]:
    """An initialised MCP client session on the entry's endpoint."""
    url = str(client.make_url(path_of(entry_id)))
    async with (
        streamablehttp_client(url, headers={"Authorization": f"Bearer {token}"}) as (
            read,
            write,
            _session_id,
        ),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def dump(model: Any) -> dict[str, Any]:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


async def post(
    client: Client,
    entry_id: str,
    body: Any = INIT,
    *,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> ClientResponse:
    return await client.post(
        path_of(entry_id),
        data=raw if raw is not None else json.dumps(body).encode(),
        headers=JSON_HEADERS if headers is None else headers,
    )


# -- a real MCP client -------------------------------------------------------------


async def test_mcp_client_session(
    hass: HomeAssistant,
    mosquitto: Mosquitto,
    entry: MockConfigEntry,
    client: Client,
    *,
    hass_access_token: str,
    hass_admin_user: User,
) -> None:
    """initialize, tools/list, calls allowed and denied, retained read, resources."""
    events = async_capture_events(hass, EVENT_TOOL_CALL)
    room_topic = f"sensors/{unique('room')}/temperature"
    async with peer(mosquitto, "#") as watcher:
        await watcher.client.publish(room_topic, b"21.5", qos=1, retain=True)
        async with mcp_session(client, entry.entry_id, hass_access_token) as session:
            listed = dump(await session.list_tools())
            allowed = dump(
                await session.call_tool(
                    "mqtt_publish", {"topic": "cmd/lamp", "payload": "on", "qos": 1}
                )
            )
            denied = dump(
                await session.call_tool(
                    "mqtt_publish", {"topic": "secret/door", "payload": "open"}
                )
            )
            read = dump(
                await session.call_tool(
                    "mqtt_read", {"topic": room_topic, "timeout": 5}
                )
            )
            resources = dump(await session.list_resources())
            rules = dump(await session.read_resource(AnyUrl(RESOURCE_ACL_RULES)))
            with pytest.raises(McpError) as unknown:
                await session.call_tool("mqtt_nope", {})
            # One more allowed publish after the denied one: once it arrived,
            # the denied one would have arrived before it (same connection).
            await session.call_tool(
                "mqtt_publish", {"topic": "cmd/end", "payload": "x", "qos": 1}
            )
        await wait_for(lambda: b"x" in watcher.payloads())
    received = {str(m.topic): bytes(m.payload) for m in watcher.messages}  # type: ignore[arg-type]

    tools = {tool["name"]: tool for tool in listed["tools"]}
    assert list(tools) == list(TOOL_NAMES)
    for tool in tools.values():
        assert tool["inputSchema"]["type"] == "object"
        assert tool["description"]
        assert tool["annotations"]["openWorldHint"] is True
    assert "cmd/#" in tools["mqtt_publish"]["description"]
    assert "Commands" in tools["mqtt_publish"]["description"]
    assert "sensors/+/temperature" in tools["mqtt_read"]["description"]
    assert "Room temperatures" in tools["mqtt_read"]["description"]
    assert "state/#" in tools["mqtt_subscribe"]["description"]
    assert "sensors/+/temperature" not in tools["mqtt_publish"]["description"]
    assert tools["mqtt_publish"]["inputSchema"]["required"] == ["topic", "payload"]
    assert tools["mqtt_publish"]["annotations"]["readOnlyHint"] is False
    assert tools["mqtt_publish"]["annotations"]["destructiveHint"] is True
    for name in ("mqtt_read", "mqtt_subscribe", "mqtt_topics"):
        assert tools[name]["annotations"]["readOnlyHint"] is True
        assert tools[name]["annotations"]["destructiveHint"] is False

    assert allowed["isError"] is False
    assert allowed["structuredContent"]["topic"] == "cmd/lamp"
    assert allowed["structuredContent"]["published"] is True
    assert received["cmd/lamp"] == b"on"

    assert denied["isError"] is True
    text = denied["content"][0]["text"]
    assert "write" in text
    assert "secret/door" in text
    assert "cmd/#" in text
    assert denied["structuredContent"]["error"] == "permission_denied"
    assert "secret/door" not in received

    assert read["isError"] is False
    assert read["structuredContent"]["message"]["payload"] == "21.5"
    assert read["structuredContent"]["message"]["topic"] == room_topic
    assert read["structuredContent"]["message"]["retain"] is True

    assert [r["uri"] for r in resources["resources"]] == [RESOURCE_ACL_RULES]
    assert json.loads(rules["contents"][0]["text"]) == RULES
    assert unknown.value.error.code == -32602

    await hass.async_block_till_done()
    assert [(e.data["tool"], e.data["allowed"]) for e in events] == [
        ("mqtt_publish", True),
        ("mqtt_publish", False),
        ("mqtt_read", True),
        ("mqtt_publish", True),
    ]
    for event in events:
        assert event.data["source"] == "mcp"
        assert event.data["user_id"] == hass_admin_user.id
        assert event.data["entry_id"] == entry.entry_id
        assert event.context.user_id == hass_admin_user.id
    assert events[1].data["topic"] == "secret/door"

    # Clean the retained value up for other tests.
    async with peer(mosquitto) as cleaner:
        await cleaner.client.publish(room_topic, b"", qos=1, retain=True)


async def test_initialize_names_the_entry(
    entry: MockConfigEntry, client: Client
) -> None:
    response = await post(client, entry.entry_id)
    assert response.status == 200
    answer = await response.json()
    assert answer["id"] == 1
    result = answer["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["serverInfo"]["name"] == "Test Broker"
    assert result["serverInfo"]["version"] == "0.1.0"
    assert "tools" in result["capabilities"]
    assert "resources" in result["capabilities"]


async def test_large_payload_publish(
    mosquitto: Mosquitto, entry: MockConfigEntry, client: Client
) -> None:
    """A body of several network chunks is read whole (a 60 KB payload)."""
    payload = "p" * 60000
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "mqtt_publish",
            "arguments": {"topic": "cmd/big", "payload": payload, "qos": 1},
        },
    }
    async with peer(mosquitto, "cmd/big") as watcher:
        response = await post(client, entry.entry_id, body)
        assert response.status == 200
        answer = await response.json()
        assert answer["result"]["isError"] is False, answer
        await wait_for(lambda: len(watcher.messages) == 1)
    assert watcher.payloads() == [payload.encode()]


async def test_chunked_body(entry: MockConfigEntry, client: Client) -> None:
    """A body without Content-Length (chunked) is read whole too."""
    raw = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {
                "name": "mqtt_publish",
                "arguments": {"topic": "cmd/chunked", "payload": "q" * 30000},
            },
        }
    ).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 4096):
            yield raw[start : start + 4096]
            # Let the server see each piece on its own.
            await asyncio.sleep(0.005)

    response = await client.post(
        path_of(entry.entry_id), data=chunks(), headers=JSON_HEADERS
    )
    assert response.status == 200
    answer = await response.json()
    assert answer["result"]["isError"] is False, answer


# -- authentication and the admin option -------------------------------------------


async def test_no_token_401(
    entry: MockConfigEntry, hass_client_no_auth: ClientSessionGenerator
) -> None:
    client = await hass_client_no_auth()
    response = await post(client, entry.entry_id)
    assert response.status == 401
    response = await client.post(
        path_of(entry.entry_id),
        data=json.dumps(INIT),
        headers={**JSON_HEADERS, "Authorization": "Bearer not-a-token"},
    )
    assert response.status == 401


async def test_require_admin(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    hass_client: ClientSessionGenerator,
    hass_read_only_access_token: str,
) -> None:
    """A non-admin token works unless the option is on (applied live)."""
    user_client = await hass_client(hass_read_only_access_token)
    admin_client = await hass_client()

    response = await post(user_client, entry.entry_id)
    assert response.status == 200

    hass.config_entries.async_update_entry(
        entry, options={**entry.options, CONF_REQUIRE_ADMIN: True}
    )
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    response = await post(user_client, entry.entry_id)
    assert response.status == 403
    answer = await response.json()
    assert answer["error"]["code"] == -32600
    assert "administrator" in answer["error"]["message"]
    response = await post(admin_client, entry.entry_id)
    assert response.status == 200

    hass.config_entries.async_update_entry(
        entry, options={**entry.options, CONF_REQUIRE_ADMIN: False}
    )
    await hass.async_block_till_done()
    response = await post(user_client, entry.entry_id)
    assert response.status == 200


async def test_new_non_admin_user_with_mcp_client(
    hass: HomeAssistant,
    mosquitto: Mosquitto,
    hass_client: ClientSessionGenerator,
) -> None:
    """A fresh non-admin user's token: refused with the option, served without."""
    entry = await setup_broker(
        hass, mosquitto.port, rules=RULES, options={CONF_REQUIRE_ADMIN: True}
    )
    user = await hass.auth.async_create_user("Agent", group_ids=["system-users"])
    assert not user.is_admin
    refresh = await hass.auth.async_create_refresh_token(user, "https://agent.test/")
    token = hass.auth.async_create_access_token(refresh)
    client = await hass_client(token)
    events = async_capture_events(hass, EVENT_TOOL_CALL)

    response = await post(client, entry.entry_id)
    assert response.status == 403

    hass.config_entries.async_update_entry(
        entry, options={**entry.options, CONF_REQUIRE_ADMIN: False}
    )
    await hass.async_block_till_done()
    async with mcp_session(client, entry.entry_id, token) as session:
        result = dump(
            await session.call_tool("mqtt_read", {"topic": "a/b", "timeout": 1})
        )
    assert result["isError"] is True
    assert "read" in result["content"][0]["text"]
    await hass.async_block_till_done()
    assert len(events) == 1
    assert events[0].data["user_id"] == user.id
    assert events[0].data["allowed"] is False
    assert events[0].data["source"] == "mcp"


# -- HTTP rules ---------------------------------------------------------------------


async def test_get_405(entry: MockConfigEntry, client: Client) -> None:
    response = await client.get(
        path_of(entry.entry_id), headers={"Accept": "text/event-stream"}
    )
    assert response.status == 405
    assert response.headers["Allow"] == "POST"


async def test_not_a_broker_entry_404(
    hass: HomeAssistant, entry: MockConfigEntry, client: Client
) -> None:
    node = add_node_entry(hass, 4403)
    other = MockConfigEntry(domain="mqtt", data={})
    other.add_to_hass(hass)
    for entry_id in ("no-such-entry", node.entry_id, other.entry_id):
        response = await post(client, entry_id)
        assert response.status == 404, entry_id
        answer = await response.json()
        assert answer["id"] is None
        assert answer["error"]["code"] == -32600


@pytest.mark.parametrize(
    ("headers", "raw", "status"),
    [
        # Content-Type
        ({"Content-Type": "text/plain"}, None, 415),
        ({}, None, 415),
        (
            {"Content-Type": "application/json; charset=utf-8", "Accept": "*/*"},
            None,
            200,
        ),
        # Accept
        (
            {"Content-Type": "application/json", "Accept": "text/event-stream"},
            None,
            406,
        ),
        ({"Content-Type": "application/json", "Accept": "text/html"}, None, 406),
        ({"Content-Type": "application/json", "Accept": "application/*"}, None, 200),
        ({"Content-Type": "application/json"}, None, 200),
        # Size (Content-Length says it)
        (JSON_HEADERS, b" " * (mcp_http.MAX_BODY + 1), 413),
        (JSON_HEADERS, b" " * 1000 + json.dumps(INIT).encode(), 200),
    ],
)
async def test_http_rules(
    entry: MockConfigEntry,
    client: Client,
    headers: dict[str, str],
    raw: bytes | None,
    status: int,
) -> None:
    if not headers:
        # aiohttp adds application/octet-stream to bytes without a type.
        headers = {"Accept": "application/json"}
    response = await post(client, entry.entry_id, headers=headers, raw=raw)
    assert response.status == status
    answer = await response.json()
    if status == 200:
        assert answer["result"]["serverInfo"]["name"] == "Test Broker"
    else:
        assert answer["error"]["code"] == -32600
        assert answer["id"] is None


async def test_too_large_chunked_body_413(
    entry: MockConfigEntry, client: Client
) -> None:
    """Without Content-Length the body is cut off after MAX_BODY bytes: 413."""

    async def chunks() -> AsyncIterator[bytes]:
        block = b" " * 65536
        for _ in range(mcp_http.MAX_BODY // len(block) + 2):
            yield block

    response = await client.post(
        path_of(entry.entry_id), data=chunks(), headers=JSON_HEADERS
    )
    assert response.status == 413


async def test_origin(
    hass: HomeAssistant, entry: MockConfigEntry, client: Client
) -> None:
    """Another site's Origin is refused (DNS rebinding); HA's own origins pass."""
    own = f"http://{client.host}:{client.port}"
    await hass.config.async_update(
        internal_url="http://ha.local:8123", external_url="https://ha.example.com:443"
    )
    for origin, status in (
        ("https://evil.example", 403),
        ("http://127.0.0.1:1", 403),
        ("null", 403),
        ("http://[bad", 403),
        (own, 200),
        ("http://ha.local:8123", 200),
        ("https://ha.example.com", 200),
    ):
        response = await post(
            client, entry.entry_id, headers={**JSON_HEADERS, "Origin": origin}
        )
        assert response.status == status, origin
        if status == 403:
            answer = await response.json()
            assert origin in answer["error"]["message"]


async def test_dns_rebinding_refused(
    hass: HomeAssistant, entry: MockConfigEntry, client: Client
) -> None:
    """An attacker's host name resolving to HA: Host and Origin agree, still 403.

    Only IP literals, ``localhost`` and the configured URLs count as HA's own.
    """
    await hass.config.async_update(internal_url="http://ha.local:8123")
    port = client.port
    for host, origin, status in (
        (f"rebind.evil.example:{port}", f"http://rebind.evil.example:{port}", 403),
        (f"localhost:{port}", f"http://localhost:{port}", 200),
        (f"[::1]:{port}", f"http://[::1]:{port}", 200),
        (f"127.0.0.1:{port}", "http://127.0.0.1", 403),
        ("ha.local:8123", "http://ha.local:8123", 200),
        # The configured URL's default port may be spelt out or not.
        (f"127.0.0.1:{port}", "http://HA.local:8123", 200),
    ):
        response = await post(
            client,
            entry.entry_id,
            headers={**JSON_HEADERS, "Host": host, "Origin": origin},
        )
        assert response.status == status, (host, origin)
    # Without an Origin (non-browser clients) the Host does not matter.
    response = await post(
        client,
        entry.entry_id,
        headers={**JSON_HEADERS, "Host": f"rebind.evil.example:{port}"},
    )
    assert response.status == 200


async def test_origin_without_configured_urls(
    entry: MockConfigEntry, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No internal/external URL known: the request's own host is still accepted."""

    def no_url(*_args: Any, **_kwargs: Any) -> str:
        raise NoURLAvailableError

    monkeypatch.setattr(mcp_http, "get_url", no_url)
    own = f"http://{client.host}:{client.port}"
    response = await post(
        client, entry.entry_id, headers={**JSON_HEADERS, "Origin": own}
    )
    assert response.status == 200
    response = await post(
        client,
        entry.entry_id,
        headers={**JSON_HEADERS, "Origin": "http://homeassistant.local:8123"},
    )
    assert response.status == 403


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, -32700),
        (b"\xff\xfe", 400, -32700),
        (b"[]", 400, -32600),
        (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}', 400, -32600),
        (b'{"jsonrpc": "2.0", "id": 1, "method": "no/such"}', 200, -32601),
        (
            b'{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {}}',
            200,
            -32602,
        ),
    ],
)
async def test_json_rpc_errors(
    entry: MockConfigEntry, client: Client, raw: bytes, status: int, code: int
) -> None:
    response = await post(client, entry.entry_id, raw=raw)
    assert response.status == status
    answer = await response.json()
    assert answer["jsonrpc"] == "2.0"
    assert answer["error"]["code"] == code


async def test_notification_and_response_202(
    entry: MockConfigEntry, client: Client
) -> None:
    for body in (
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 9, "result": {}},
    ):
        response = await post(client, entry.entry_id, body)
        assert response.status == 202
        assert await response.read() == b""


async def test_ping_and_protocol_header(entry: MockConfigEntry, client: Client) -> None:
    ping = {"jsonrpc": "2.0", "id": "p", "method": "ping"}
    response = await post(
        client,
        entry.entry_id,
        ping,
        headers={**JSON_HEADERS, "MCP-Protocol-Version": "2025-06-18"},
    )
    assert response.status == 200
    assert await response.json() == {"jsonrpc": "2.0", "id": "p", "result": {}}
    response = await post(
        client,
        entry.entry_id,
        ping,
        headers={**JSON_HEADERS, "MCP-Protocol-Version": "1999-01-01"},
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == -32600


async def test_unloaded_entry_503(
    hass: HomeAssistant, entry: MockConfigEntry, client: Client
) -> None:
    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    response = await post(client, entry.entry_id)
    assert response.status == 503
    answer = await response.json()
    assert answer["error"]["code"] == -32600
    assert "not loaded" in answer["error"]["message"]
    # Loaded again: served again.
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    response = await post(client, entry.entry_id)
    assert response.status == 200


async def test_rule_change_shows_in_next_request(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    client: Client,
    hass_access_token: str,
) -> None:
    """tools/list and the rules resource follow option changes without reload."""
    new_rules = [{"pattern": "lights/#", "permissions": ["write"], "description": "L"}]
    async with mcp_session(client, entry.entry_id, hass_access_token) as session:
        before = dump(await session.list_tools())
        hass.config_entries.async_update_entry(
            entry, options={**entry.options, "rules": new_rules}
        )
        await hass.async_block_till_done()
        after = dump(await session.list_tools())
        rules = dump(await session.read_resource(AnyUrl(RESOURCE_ACL_RULES)))
        result = dump(
            await session.call_tool(
                "mqtt_publish", {"topic": "cmd/lamp", "payload": "on"}
            )
        )
    assert "cmd/#" in before["tools"][0]["description"]
    assert "cmd/#" not in after["tools"][0]["description"]
    assert "lights/#" in after["tools"][0]["description"]
    assert json.loads(rules["contents"][0]["text"]) == new_rules
    assert result["isError"] is True


_NO_IMPORT_IN_REQUESTS = """
import asyncio, importlib, json
import custom_components.mqtt_bridge  # what Home Assistant imports, off its loop
from custom_components.mqtt_bridge.engine.acl import Acl
from custom_components.mqtt_bridge.engine.mcp_server import build_server, handle_post
from custom_components.mqtt_bridge.engine.mqtt_tools import MqttTools

calls = []
original = importlib.import_module


def spy(name, package=None):
    calls.append(name)
    return original(name, package)


importlib.import_module = spy
tools = MqttTools(None, acl=lambda: Acl([]))


async def main():
    for method, params in (
        ("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                        "clientInfo": {"name": "t", "version": "1"}}),
        ("tools/list", None),
        ("resources/list", None),
    ):
        body = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            body["params"] = params
        status, answer = await handle_post(
            json.dumps(body).encode(),
            lambda: build_server(tools, "t", resources=dict, version="1"),
            protocol_version=None if method == "initialize" else "2025-06-18",
        )
        assert status == 200 and "result" in answer, answer
    print(json.dumps(calls))


asyncio.run(main())
"""


async def test_requests_import_nothing_in_the_event_loop() -> None:
    """HA reports ``import_module`` in its loop as a blocking call: none per request.

    A fresh interpreter (the SDK's version table is cached per process):
    import the integration as Home Assistant does, then answer requests.
    """
    root = Path(__file__).parent.parent
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _NO_IMPORT_IN_REQUESTS,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == []
