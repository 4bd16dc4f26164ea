"""Stdio MCP servers hosted by an MQTT broker entry (``stdio_server`` subentries).

Against a real Mosquitto and real child processes (``tests_engine/stdio_servers/
echo.py`` run with this interpreter): the subentry flow (every validation
error, reconfigure, the form as the frontend gets it over the HTTP API), and
the hosted servers: retained presence on the broker, a real MCP client
(``McpMqttClientTransport`` + ``mcp.ClientSession`` on an MQTT connection of
its own, found by server-name) calling a tool of the child, entities and
device per subentry, changes applied live (add, reconfigure, delete, each
touching only its server), unload (no presence left, no child process left),
diagnostics; the simple-device layout (``request_topic``) reached by a device
written with raw paho (MQTT 5 Response Topic and Correlation Data) and
turned off again by a reconfiguration. Presence is checked by a plain subscriber: retained messages
arrive before a marker message the subscriber publishes after its SUBACK, so
"no presence" is seen without waiting for a timeout. Throttled state writes
are flushed with ``async_fire_time_changed``, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
import json
import os
from pathlib import Path
import re
import sys
from typing import Any

from homeassistant.components.binary_sensor import BinarySensorDeviceClass
from homeassistant.components.sensor import SensorStateClass
from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    SOURCE_USER,
    ConfigEntryState,
    ConfigSubentry,
)
from homeassistant.const import STATE_OFF, STATE_ON
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import (
    device_registry as dr,
    entity_registry as er,
    translation,
)
from homeassistant.helpers.redact import REDACTED
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util
from mcp import ClientSession
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_fire_time_changed,
)
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.mqtt_bridge import (
    config_flow,  # registers the flow handler: entries read their subentry types
    hosted_servers as hosted_module,
)
from custom_components.mqtt_bridge.broker_runtime import BrokerRuntime
from custom_components.mqtt_bridge.const import (
    DOMAIN,
    SUBENTRY_STDIO_SERVER,
    UPDATE_THROTTLE,
)
from custom_components.mqtt_bridge.engine.mcp_mqtt import McpMqttClientTransport
from custom_components.mqtt_bridge.engine.mqtt_client import (
    ClientState,
)
from custom_components.mqtt_bridge.engine.subscriptions import SubscribeOptions
from custom_components.mqtt_bridge.flow_stdio import EnvError, env_text, parse_env
from custom_components.mqtt_bridge.hosted_servers import HostedServer
from devkit.mosquitto import Mosquitto
from tests.common import (
    ECHO,
    TRANSLATIONS,
    add_broker_entry,
    add_node_entry,
    mqtt_client,
    uid,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

STRINGS = TRANSLATIONS["config_subentries"][SUBENTRY_STDIO_SERVER]
HOSTED_KEYS = [
    ("binary_sensor", "running"),
    ("sensor", "active_sessions"),
    ("sensor", "requests"),
    ("sensor", "errors"),
    ("sensor", "restarts"),
]


def form_input(server_name: str, /, **values: Any) -> dict[str, Any]:
    """A complete, valid form for the echo server, with ``values`` replaced."""
    return {
        "name": "Echo",
        "command": sys.executable,
        "args": [ECHO],
        "env": "ECHO_TEST=hello\n",
        "server_name": server_name,
        "description": "Echo test server",
        **values,
    }


def subentry_data(server_name: str, /, **values: Any) -> dict[str, Any]:
    """Stored subentry data of the echo server."""
    return {
        "command": sys.executable,
        "args": [ECHO],
        "env": {"ECHO_TEST": "hello"},
        "cwd": None,
        "server_name": server_name,
        "description": "Echo test server",
        **values,
    }


def check_translated(result: Any) -> None:
    """Every step, field, error and abort of a subentry flow result has English text."""
    given = set(result.get("description_placeholders") or {})
    if result["type"] is FlowResultType.FORM:
        step = STRINGS["step"][result["step_id"]]
        assert step["title"]
        assert step["description"]
        for key in result["data_schema"].schema:
            assert step["data"][str(key)]
            assert step["data_description"][str(key)]
        for error in (result["errors"] or {}).values():
            text = STRINGS["error"][error]
            placeholders = {name.strip("{}") for name in _fields(text)}
            assert placeholders <= given, error
    elif result["type"] is FlowResultType.ABORT:
        assert STRINGS["abort"][result["reason"]]


def _fields(text: str) -> list[str]:
    return re.findall(r"\{\w+\}", text)


async def start_flow(
    hass: HomeAssistant, entry: MockConfigEntry, subentry_id: str | None = None
) -> Any:
    context: dict[str, Any] = {"source": SOURCE_USER}
    if subentry_id is not None:
        context = {"source": SOURCE_RECONFIGURE, "subentry_id": subentry_id}
    result = await hass.config_entries.subentries.async_init(
        (entry.entry_id, SUBENTRY_STDIO_SERVER), context=context
    )
    check_translated(result)
    return result


async def submit(hass: HomeAssistant, flow_id: str, user_input: dict[str, Any]) -> Any:
    result = await hass.config_entries.subentries.async_configure(flow_id, user_input)
    check_translated(result)
    return result


async def add_server(
    hass: HomeAssistant, entry: MockConfigEntry, server_name: str, **values: Any
) -> ConfigSubentry:
    """Add a subentry through the flow; return it."""
    before = set(entry.subentries)
    result = await start_flow(hass, entry)
    result = await submit(hass, result["flow_id"], form_input(server_name, **values))
    assert result["type"] is FlowResultType.CREATE_ENTRY, result.get("errors")
    await hass.async_block_till_done()
    (subentry_id,) = set(entry.subentries) - before
    return entry.subentries[subentry_id]


def flush_updates(hass: HomeAssistant) -> None:
    async_fire_time_changed(
        hass, dt_util.utcnow() + timedelta(seconds=UPDATE_THROTTLE + 1)
    )


async def setup_broker(
    hass: HomeAssistant, port: int, subentries: list[dict[str, Any]] | None = None
) -> MockConfigEntry:
    entry = add_broker_entry(hass, port)
    for data in subentries or ():
        hass.config_entries.async_add_subentry(
            entry,
            ConfigSubentry(
                data=data["data"],
                subentry_type=SUBENTRY_STDIO_SERVER,
                title=data["title"],
                unique_id=data["data"]["server_name"],
            ),
        )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    await wait_for(lambda: entry.runtime_data.connected)
    return entry


def runtime_of(entry: MockConfigEntry) -> BrokerRuntime:
    runtime = entry.runtime_data
    assert isinstance(runtime, BrokerRuntime)
    return runtime


def server_of(entry: MockConfigEntry, subentry: ConfigSubentry) -> HostedServer:
    return runtime_of(entry).hosted.servers[subentry.subentry_id]


def hosted_entity_id(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    subentry_id: str,
    platform: str,
    key: str,
) -> str | None:
    return er.async_get(hass).async_get_entity_id(
        platform, DOMAIN, f"{entry.entry_id}_{subentry_id}_{key}"
    )


def hosted_state(
    hass: HomeAssistant,
    entry: MockConfigEntry,
    subentry_id: str,
    platform: str,
    key: str,
) -> str:
    found = hosted_entity_id(hass, entry, subentry_id, platform, key)
    assert found is not None, key
    current = hass.states.get(found)
    assert current is not None, key
    return current.state


async def retained_presence(port: int, server_name: str) -> dict[str, dict[str, Any]]:
    """The retained presence messages of ``server_name``: ``{server-id: payload}``.

    A plain subscriber: the retained messages of its subscription arrive before
    the marker it publishes after the SUBACK, so an empty result is certain.
    """
    found: dict[str, dict[str, Any]] = {}
    marker = f"test/marker/{uid()}"
    done = asyncio.Event()
    async with mqtt_client(port, f"probe-{uid()}") as client:

        def on_presence(message: Any) -> None:
            assert message.retain
            found[message.topic.split("/")[2]] = json.loads(message.payload)

        presence = client.subscribe(
            f"$mcp-server/presence/+/{server_name}",
            on_presence,
            SubscribeOptions(qos=1),
        )
        mark = client.subscribe(marker, lambda _m: done.set(), SubscribeOptions(qos=1))
        async with asyncio.timeout(5):
            await presence.wait_granted()
            await mark.wait_granted()
            await client.publish_wait(marker, b"x", qos=1)
            await done.wait()
    return found


@asynccontextmanager
async def mcp_session(port: int, server_name: str) -> AsyncIterator[ClientSession]:
    """A real MCP client of ``server_name``, on an MQTT connection of its own."""
    client_id = f"cli-{uid()}"
    async with mqtt_client(
        port, client_id, McpMqttClientTransport.client_will(client_id)
    ) as c:
        transport = McpMqttClientTransport(c, server_name, timeout=10)
        async with transport as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


def text_of(result: Any) -> str:
    return " ".join(getattr(item, "text", "") for item in result.content)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- the subentry flow -----------------------------------------------------------------


async def test_subentry_type_only_for_brokers(hass: HomeAssistant) -> None:
    assert config_flow.SUBENTRY_FLOWS
    broker = add_broker_entry(hass, 1883)
    node = add_node_entry(hass, 4403)
    assert broker.supported_subentry_types == {
        SUBENTRY_STDIO_SERVER: {"supports_reconfigure": True}
    }
    assert node.supported_subentry_types == {}
    unknown = MockConfigEntry(domain=DOMAIN, data={"entry_type": "future"})
    unknown.add_to_hass(hass)
    assert unknown.supported_subentry_types == {}
    strings = TRANSLATIONS["config_subentries"][SUBENTRY_STDIO_SERVER]
    assert strings["initiate_flow"]["user"]
    assert strings["initiate_flow"]["reconfigure"]
    assert strings["entry_type"]


@pytest.mark.parametrize(
    ("values", "field", "error", "placeholders"),
    [
        ({"name": "  "}, "name", "name_required", {}),
        ({"command": " "}, "command", "command_required", {}),
        ({"command": "no-such-command-" + "x" * 8}, "command", "command_not_found", {}),
        ({"command": "./not-here"}, "command", "command_not_found", {}),
        ({"args": [ECHO, "bad\0arg"]}, "args", "invalid_args", {}),
        (
            {"env": "GOOD=1\nBAD KEY=2"},
            "env",
            "invalid_env",
            {"line": "2", "key": "BAD KEY"},
        ),
        ({"env": "NO_EQUALS"}, "env", "invalid_env", {"line": "1", "key": "NO_EQUALS"}),
        ({"env": "1ABC=x"}, "env", "invalid_env", {"line": "1", "key": "1ABC"}),
        ({"env": "A=1\n\nA=2"}, "env", "duplicate_env", {"line": "3", "key": "A"}),
        ({"cwd": "relative/dir"}, "cwd", "invalid_cwd", {}),
        ({"cwd": "/no/such/directory"}, "cwd", "invalid_cwd", {}),
        ({"server_name": "a/+/b"}, "server_name", "invalid_server_name", {}),
        ({"server_name": "$sys/x"}, "server_name", "invalid_server_name", {}),
        ({"server_name": "a//b"}, "server_name", "invalid_server_name", {}),
        ({"server_name": ""}, "server_name", "invalid_server_name", {}),
        (
            {"request_topic": "mcp/+/request"},
            "request_topic",
            "invalid_request_topic",
            {"topic_problem": "wildcard"},
        ),
        (
            {"request_topic": "mcp/#"},
            "request_topic",
            "invalid_request_topic",
            {"topic_problem": "wildcard"},
        ),
        (
            {"request_topic": "$share/group/request"},
            "request_topic",
            "invalid_request_topic",
            {"topic_problem": "it starts with $"},
        ),
        (
            {"request_topic": "mcp/\x01/request"},
            "request_topic",
            "invalid_request_topic",
            {"topic_problem": "control character"},
        ),
        (
            {"request_topic": "x" * 65_530},
            "request_topic",
            "invalid_request_topic",
            {"topic_problem": "too long"},
        ),
    ],
)
async def test_flow_validation_errors(
    hass: HomeAssistant,
    values: dict[str, Any],
    field: str,
    error: str,
    placeholders: dict[str, str],
) -> None:
    """Each bad field gets its error (with placeholders) and the form again, filled in."""
    entry = add_broker_entry(hass, 1883)
    result = await start_flow(hass, entry)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "user"
    result = await submit(hass, result["flow_id"], form_input("t/ok", **values))
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {field: error}
    assert placeholders.items() <= (result["description_placeholders"] or {}).items()
    if error == "invalid_server_name":
        assert result["description_placeholders"]["problem"]
    # The submitted values are kept as suggestions.
    suggested = {
        str(key): key.description["suggested_value"]
        for key in result["data_schema"].schema
        if key.description and "suggested_value" in key.description
    }
    assert suggested[field] == form_input("t/ok", **values)[field]
    assert entry.subentries == {}


async def test_flow_creates_subentry(hass: HomeAssistant, tmp_path: Path) -> None:
    """Values are cleaned up and stored; the unique id is the server-name."""
    entry = add_broker_entry(hass, 1883)
    result = await start_flow(hass, entry)
    result = await submit(
        hass,
        result["flow_id"],
        {
            "name": "  Echo ",
            "command": f" {sys.executable} ",
            "args": ["", ECHO, "--flag=a b", ""],
            "env": "# a comment\r\nTOKEN=a=b=c\r\n\r\n  EMPTY=\nSPACED = v \n",
            "cwd": f" {tmp_path} ",
            "server_name": " home/echo ",
            "description": " Echoes ",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Echo"
    (subentry,) = entry.subentries.values()
    assert subentry.title == "Echo"
    assert subentry.unique_id == "home/echo"
    assert subentry.subentry_type == SUBENTRY_STDIO_SERVER
    assert dict(subentry.data) == {
        "command": sys.executable,
        "args": [ECHO, "--flag=a b"],
        "env": {"TOKEN": "a=b=c", "EMPTY": "", "SPACED": " v "},
        "cwd": str(tmp_path),
        "server_name": "home/echo",
        "description": "Echoes",
        "request_topic": None,
    }

    # The same server-name again: refused.
    result = await start_flow(hass, entry)
    result = await submit(hass, result["flow_id"], form_input("home/echo"))
    assert result["errors"] == {"server_name": "server_name_in_use"}

    # A request topic for simple devices is stored trimmed, and only once.
    result = await start_flow(hass, entry)
    result = await submit(
        hass,
        result["flow_id"],
        form_input("home/simple", request_topic=" mcp/echo/request "),
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"]["request_topic"] == "mcp/echo/request"
    result = await start_flow(hass, entry)
    result = await submit(
        hass,
        result["flow_id"],
        form_input("home/other", request_topic="mcp/echo/request"),
    )
    assert result["errors"] == {"request_topic": "request_topic_in_use"}
    # Blank is off.
    result = await submit(
        hass, result["flow_id"], form_input("home/other", request_topic="  ")
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"]["request_topic"] is None

    # Minimal input: only the required fields; a relative command in cwd.
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    result = await start_flow(hass, entry)
    result = await submit(
        hass,
        result["flow_id"],
        {
            "name": "Script",
            "command": "./server.sh",
            "cwd": str(tmp_path),
            "server_name": "home/script",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == {
        "command": "./server.sh",
        "args": [],
        "env": {},
        "cwd": str(tmp_path),
        "server_name": "home/script",
        "description": "",
        "request_topic": None,
    }
    # A command looked up on the PATH the environment sets.
    result = await start_flow(hass, entry)
    result = await submit(
        hass,
        result["flow_id"],
        form_input("home/path", command="server.sh", env=f"PATH={tmp_path}"),
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_flow_reconfigure(hass: HomeAssistant) -> None:
    """The same form, prefilled; saved in place; its own server-name is not "in use"."""
    entry = add_broker_entry(hass, 1883)
    first = await add_server(hass, entry, "t/first", request_topic="t/first/req")
    second = await add_server(hass, entry, "t/second", name="Second")

    result = await start_flow(hass, entry, first.subentry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reconfigure"
    suggested = {
        str(key): key.description["suggested_value"]
        for key in result["data_schema"].schema
        if key.description
    }
    assert suggested == {
        "name": "Echo",
        "command": sys.executable,
        "args": [ECHO],
        "env": "ECHO_TEST=hello",
        "cwd": "",
        "server_name": "t/first",
        "description": "Echo test server",
        "request_topic": "t/first/req",
    }

    result = await submit(hass, result["flow_id"], form_input("t/second"))
    assert result["errors"] == {"server_name": "server_name_in_use"}
    # Its own request topic is not "in use"; another server's is.
    await add_server(hass, entry, "t/third", name="Third", request_topic="t/third/req")
    result = await submit(
        hass,
        result["flow_id"],
        form_input("t/first", request_topic="t/third/req"),
    )
    assert result["errors"] == {"request_topic": "request_topic_in_use"}
    result = await submit(
        hass,
        result["flow_id"],
        form_input("t/first", description="Changed", request_topic="t/first/req"),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.subentries[first.subentry_id].data["description"] == "Changed"
    assert entry.subentries[first.subentry_id].data["request_topic"] == "t/first/req"

    result = await start_flow(hass, entry, first.subentry_id)
    result = await submit(
        hass, result["flow_id"], form_input("t/renamed", name="Renamed", env="")
    )
    assert result["reason"] == "reconfigure_successful"
    changed = entry.subentries[first.subentry_id]
    assert changed.title == "Renamed"
    assert changed.unique_id == "t/renamed"
    assert changed.data["env"] == {}
    assert changed.data["request_topic"] is None  # left out of the form: off
    assert entry.subentries[second.subentry_id] == second


async def test_flow_over_the_http_api(
    hass: HomeAssistant, hass_client: ClientSessionGenerator
) -> None:
    """The form as the frontend gets it: args is a text selector with ``multiple``."""
    assert await async_setup_component(hass, "config", {})
    entry = add_broker_entry(hass, 1883)
    client = await hass_client()
    url = "/api/config/config_entries/subentries/flow"
    response = await client.post(
        url, json={"handler": [entry.entry_id, SUBENTRY_STDIO_SERVER]}
    )
    assert response.status == 200
    form = await response.json()
    fields = {field["name"]: field for field in form["data_schema"]}
    assert list(fields) == [
        "name",
        "command",
        "args",
        "env",
        "cwd",
        "server_name",
        "description",
        "request_topic",
    ]
    assert fields["request_topic"]["optional"] is True
    assert fields["args"]["selector"]["text"]["multiple"] is True
    assert fields["env"]["selector"]["text"]["multiline"] is True
    assert fields["command"]["required"] is True
    assert fields["args"]["optional"] is True

    response = await client.post(
        f"{url}/{form['flow_id']}",
        json=form_input("t/http", args=[ECHO, "x y"]),
    )
    assert response.status == 200
    assert (await response.json())["type"] == "create_entry"
    (subentry,) = entry.subentries.values()
    assert subentry.data["args"] == [ECHO, "x y"]

    response = await client.post(
        url,
        json={
            "handler": [entry.entry_id, SUBENTRY_STDIO_SERVER],
            "subentry_id": subentry.subentry_id,
        },
    )
    form = await response.json()
    assert form["step_id"] == "reconfigure"
    fields = {field["name"]: field for field in form["data_schema"]}
    assert fields["args"]["description"] == {"suggested_value": [ECHO, "x y"]}


def test_parse_env() -> None:
    assert parse_env("") == {}
    assert parse_env("A=1\n# B=2\n  \nC==3\r\n_D=\n") == {"A": "1", "C": "=3", "_D": ""}
    assert env_text({"A": "1", "C": "=3"}) == "A=1\nC==3"
    assert parse_env(env_text({"A": "1", "C": "=3"})) == {"A": "1", "C": "=3"}
    with pytest.raises(EnvError) as caught:
        parse_env("A=1\nB=x\0y")
    assert (caught.value.error, caught.value.line, caught.value.key) == (
        "invalid_env",
        2,
        "B",
    )
    with pytest.raises(EnvError) as caught:
        parse_env("K" * 50 + "-=1")
    assert caught.value.key == "K" * 40 + "…"
    # The value is never part of the error.
    with pytest.raises(EnvError) as caught:
        parse_env("BAD-KEY=secret")
    assert "secret" not in str(caught.value)


# -- hosted servers --------------------------------------------------------------------


async def test_hosted_server_end_to_end(
    hass: HomeAssistant,
    mosquitto: Mosquitto,
    device_registry: dr.DeviceRegistry,
    entity_registry: er.EntityRegistry,
) -> None:
    """Added live: presence, device, entities; a real MCP client calls the child."""
    entry = await setup_broker(hass, mosquitto.port)
    runtime = runtime_of(entry)
    broker_client_id = runtime.client.client_id
    name = f"test/echo-{uid()}"

    subentry = await add_server(hass, entry, name)
    assert entry.runtime_data is runtime  # no reload
    assert not runtime.needs_reload()
    server = server_of(entry, subentry)
    await wait_for(lambda: server.running, timeout=10)

    presence = await retained_presence(mosquitto.port, name)
    assert list(presence) == [server._instance.client.client_id]
    (announced,) = presence.values()
    assert announced["method"] == "notifications/server/online"
    assert announced["params"]["description"] == "Echo test server"
    assert server._instance.client.client_id.startswith("test-bridge-mcp-")
    assert len(server._instance.client.client_id) == len("test-bridge-mcp-") + 8

    # The device of the subentry, via the broker's device.
    device = device_registry.async_get_device(
        identifiers={(DOMAIN, f"{entry.entry_id}_{subentry.subentry_id}")}
    )
    assert device is not None
    assert device.id == server.device_id
    assert device.name == "Echo"
    assert device.model == "stdio MCP server"
    assert device.via_device_id == runtime.device_id
    assert device.config_entries_subentries == {entry.entry_id: {subentry.subentry_id}}

    # Its entities, added live, on that device and subentry.
    strings = await translation.async_get_translations(hass, "en", "entity", [DOMAIN])
    icons = json.loads(
        (Path(hosted_module.__file__).parent / "icons.json").read_text("utf-8")
    )
    for platform, key in HOSTED_KEYS:
        found = hosted_entity_id(hass, entry, subentry.subentry_id, platform, key)
        assert found is not None, key
        registered = entity_registry.async_get(found)
        assert registered is not None
        assert registered.device_id == device.id
        assert registered.config_subentry_id == subentry.subentry_id
        assert registered.translation_key == key
        assert strings[f"component.{DOMAIN}.entity.{platform}.{key}.name"]
        assert icons["entity"][platform][key]
    running_id = hosted_entity_id(
        hass, entry, subentry.subentry_id, "binary_sensor", "running"
    )
    assert running_id == "binary_sensor.echo_running"
    assert (
        entity_registry.async_get(running_id).original_device_class
        == BinarySensorDeviceClass.RUNNING
    )
    requests_state = hass.states.get("sensor.echo_requests")
    assert requests_state is not None
    assert requests_state.attributes["state_class"] == SensorStateClass.TOTAL_INCREASING
    flush_updates(hass)
    await hass.async_block_till_done()
    assert (
        hosted_state(hass, entry, subentry.subentry_id, "binary_sensor", "running")
        == STATE_ON
    )

    # A real MCP client finds the server by name and calls the child's tools.
    async with mcp_session(mosquitto.port, name) as session:
        tools = await session.list_tools()
        assert "echo" in [tool.name for tool in tools.tools]
        result = await session.call_tool("echo", {"text": "over mqtt"})
        assert "over mqtt" in text_of(result)
        result = await session.call_tool("env", {"name": "ECHO_TEST"})
        assert "hello" in text_of(result)
        flush_updates(hass)
        await hass.async_block_till_done()
        assert (
            hosted_state(hass, entry, subentry.subentry_id, "sensor", "active_sessions")
            == "1"
        )
        requests = int(
            hosted_state(hass, entry, subentry.subentry_id, "sensor", "requests")
        )
        assert requests >= 4  # initialize, tools/list, 2 tools/call
        assert (
            hosted_state(hass, entry, subentry.subentry_id, "sensor", "errors") == "0"
        )
        assert (
            hosted_state(hass, entry, subentry.subentry_id, "sensor", "restarts") == "0"
        )

    await wait_for(lambda: server.active_sessions == 0)
    flush_updates(hass)
    await hass.async_block_till_done()
    assert (
        hosted_state(hass, entry, subentry.subentry_id, "sensor", "active_sessions")
        == "0"
    )
    # Nothing changed: no state write.
    written = server._written
    flush_updates(hass)
    await hass.async_block_till_done()
    assert server._written == written

    # The broker's own session and entities were not touched.
    assert entry.runtime_data is runtime
    assert runtime.client.client_id == broker_client_id
    assert runtime.client.stats.connects == 1
    assert (
        hass.states.get("binary_sensor.test_broker_broker_connection").state == STATE_ON
    )
    assert hass.states.get("sensor.test_broker_tool_calls").state == "0"


async def test_reconfigure_and_delete_touch_only_that_server(
    hass: HomeAssistant,
    mosquitto: Mosquitto,
    device_registry: dr.DeviceRegistry,
    entity_registry: er.EntityRegistry,
) -> None:
    name_a, name_b = f"test/a-{uid()}", f"test/b-{uid()}"
    entry = await setup_broker(
        hass,
        mosquitto.port,
        subentries=[
            {"title": "Server A", "data": subentry_data(name_a)},
            {"title": "Server B", "data": subentry_data(name_b)},
        ],
    )
    runtime = runtime_of(entry)
    sub_a, sub_b = (
        next(s for s in entry.subentries.values() if s.unique_id == name)
        for name in (name_a, name_b)
    )
    # Entities of subentries present at set-up are there too.
    assert hosted_entity_id(hass, entry, sub_a.subentry_id, "sensor", "requests")
    assert hosted_entity_id(hass, entry, sub_b.subentry_id, "sensor", "requests")
    server_a, server_b = server_of(entry, sub_a), server_of(entry, sub_b)
    await wait_for(lambda: server_a.running and server_b.running, timeout=10)
    id_a = server_a._instance.client.client_id
    id_b = server_b._instance.client.client_id
    async with mcp_session(mosquitto.port, name_a) as session:
        await session.call_tool("echo", {"text": "x"})
    requests_before = server_a.counters().requests
    assert requests_before >= 2

    # Reconfigure A (description and title): only A restarts, under a new server-id.
    result = await start_flow(hass, entry, sub_a.subentry_id)
    result = await submit(
        hass,
        result["flow_id"],
        form_input(name_a, name="Server A2", description="Changed"),
    )
    assert result["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    assert entry.runtime_data is runtime
    assert runtime_of(entry).hosted.servers[sub_a.subentry_id] is server_a
    await wait_for(
        lambda: server_a.running and server_a._instance.client.client_id != id_a,
        timeout=10,
    )
    presence = await retained_presence(mosquitto.port, name_a)
    assert list(presence) == [server_a._instance.client.client_id]
    assert presence[server_a._instance.client.client_id]["params"]["description"] == (
        "Changed"
    )
    assert server_b._instance.client.client_id == id_b
    assert server_b._instance.client.stats.connects == 1
    assert runtime.client.stats.connects == 1
    # Counts survive the restart; the device has the new name.
    await wait_for(lambda: not server_a._retiring)
    assert server_a.counters().requests == requests_before
    flush_updates(hass)
    await hass.async_block_till_done()
    assert int(hosted_state(hass, entry, sub_a.subentry_id, "sensor", "requests")) == (
        requests_before
    )
    device_a = device_registry.async_get_device(
        identifiers={(DOMAIN, f"{entry.entry_id}_{sub_a.subentry_id}")}
    )
    assert device_a.name == "Server A2"
    async with mcp_session(mosquitto.port, name_a) as session:
        result = await session.call_tool("echo", {"text": "after reconfigure"})
        assert "after reconfigure" in text_of(result)

    # A new title alone renames the device; the server keeps running.
    instance_a = server_a._instance
    result = await start_flow(hass, entry, sub_a.subentry_id)
    result = await submit(
        hass,
        result["flow_id"],
        form_input(name_a, name="Server A3", description="Changed"),
    )
    assert result["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    assert server_a._instance is instance_a
    assert instance_a.host.name == "Server A3"
    assert device_registry.async_get(device_a.id).name == "Server A3"
    # Nothing changed: nothing restarts.
    instance_b = server_b._instance
    runtime.hosted.sync()
    assert server_a._instance is instance_a
    assert server_b._instance is instance_b

    # Delete A: its presence, device and entities are gone; B keeps running.
    device_b = device_registry.async_get_device(
        identifiers={(DOMAIN, f"{entry.entry_id}_{sub_b.subentry_id}")}
    )
    entities_a = [
        hosted_entity_id(hass, entry, sub_a.subentry_id, platform, key)
        for platform, key in HOSTED_KEYS
    ]
    assert all(hass.states.get(entity) for entity in entities_a)
    assert hass.config_entries.async_remove_subentry(entry, sub_a.subentry_id)
    await hass.async_block_till_done()
    assert sub_a.subentry_id not in runtime.hosted.servers
    await wait_for(lambda: not server_a._retiring, timeout=10)
    assert await retained_presence(mosquitto.port, name_a) == {}
    assert device_registry.async_get(device_a.id) is None
    for platform, key in HOSTED_KEYS:
        assert hosted_entity_id(hass, entry, sub_a.subentry_id, platform, key) is None
    assert [hass.states.get(entity) for entity in entities_a] == [None] * 5
    assert device_registry.async_get(device_b.id) is not None
    assert server_b.running
    assert server_b._instance.client.client_id == id_b
    assert list(await retained_presence(mosquitto.port, name_b)) == [id_b]
    assert entry.runtime_data is runtime
    assert runtime.client.stats.connects == 1


async def test_unload_clears_presence_and_stops_children(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    name = f"test/unload-{uid()}"
    entry = await setup_broker(
        hass,
        mosquitto.port,
        subentries=[{"title": "Echo", "data": subentry_data(name)}],
    )
    (subentry,) = entry.subentries.values()
    hosted = runtime_of(entry).hosted
    server = server_of(entry, subentry)
    await wait_for(lambda: server.running, timeout=10)
    instance, task = server._instance, server._task
    assert task is not None
    assert list(await retained_presence(mosquitto.port, name)) == [
        instance.client.client_id
    ]
    async with mcp_session(mosquitto.port, name) as session:
        pid = int(text_of(await session.call_tool("pid", {})))
        assert process_alive(pid)
        assert instance.host.stats.running == 1

        assert await hass.config_entries.async_unload(entry.entry_id)
        # The unload waited for the server: children stopped, presence cleared.
        assert task.done()
        assert instance.host.stats.running == 0
        assert not process_alive(pid)
        assert await retained_presence(mosquitto.port, name) == {}
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert instance.client.state is ClientState.STOPPED
    # A late subentry change after the unload starts nothing.
    hass.config_entries.async_remove_subentry(entry, subentry.subentry_id)
    hosted.sync()
    assert list(hosted.servers) == [subentry.subentry_id]
    assert server._instance is instance


async def test_running_follows_the_broker(
    hass: HomeAssistant, private_mosquitto: Mosquitto
) -> None:
    """The running sensor is written at once when the server's connection goes."""
    name = f"test/restart-{uid()}"
    entry = await setup_broker(
        hass,
        private_mosquitto.port,
        subentries=[{"title": "Echo", "data": subentry_data(name)}],
    )
    (subentry,) = entry.subentries.values()
    server = server_of(entry, subentry)
    await wait_for(lambda: server.running, timeout=10)
    flush_updates(hass)
    await hass.async_block_till_done()
    assert (
        hosted_state(hass, entry, subentry.subentry_id, "binary_sensor", "running")
        == STATE_ON
    )

    private_mosquitto.stop()
    await wait_for(lambda: not server.running)
    await hass.async_block_till_done()
    assert (
        hosted_state(hass, entry, subentry.subentry_id, "binary_sensor", "running")
        == STATE_OFF
    )

    private_mosquitto.start()
    await wait_for(lambda: server.running, timeout=20)
    flush_updates(hass)
    await hass.async_block_till_done()
    assert (
        hosted_state(hass, entry, subentry.subentry_id, "binary_sensor", "running")
        == STATE_ON
    )
    assert list(await retained_presence(private_mosquitto.port, name)) == [
        server._instance.client.client_id
    ]


async def test_stored_invalid_server_name(
    hass: HomeAssistant, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """A subentry the flow would refuse is not hosted, and says why; fixing it starts it."""
    entry = await setup_broker(
        hass,
        mosquitto.port,
        subentries=[{"title": "Broken", "data": subentry_data("bad/+/name")}],
    )
    (subentry,) = entry.subentries.values()
    server = server_of(entry, subentry)
    assert server.problem is not None
    assert "wildcard" in server.problem
    assert "cannot be hosted" in caplog.text
    assert not server.running
    assert server.active_sessions == 0
    diag = runtime_of(entry).hosted.diagnostics()
    assert diag[0]["problem"] == server.problem
    assert "server_id" not in diag[0]
    flush_updates(hass)
    await hass.async_block_till_done()
    assert (
        hosted_state(hass, entry, subentry.subentry_id, "binary_sensor", "running")
        == STATE_OFF
    )

    name = f"test/fixed-{uid()}"
    hass.config_entries.async_update_subentry(
        entry, subentry, data=subentry_data(name), unique_id=name
    )
    await hass.async_block_till_done()
    await wait_for(lambda: server.running, timeout=10)
    assert server.problem is None

    # Broken again, then removed: nothing runs, nothing fails.
    hass.config_entries.async_update_subentry(
        entry, entry.subentries[subentry.subentry_id], data=subentry_data("$x")
    )
    await hass.async_block_till_done()
    assert server.problem is not None
    await wait_for(lambda: not server._retiring, timeout=10)
    assert await retained_presence(mosquitto.port, name) == {}
    hass.config_entries.async_remove_subentry(entry, subentry.subentry_id)
    await hass.async_block_till_done()
    assert runtime_of(entry).hosted.servers == {}


async def test_diagnostics_hosted_servers(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, mosquitto: Mosquitto
) -> None:
    name = f"test/diag-{uid()}"
    entry = await setup_broker(
        hass,
        mosquitto.port,
        subentries=[
            {
                "title": "Echo",
                "data": subentry_data(
                    name, env={"ECHO_TEST": "hello", "API_TOKEN": "s3cr3t-value"}
                ),
            }
        ],
    )
    (subentry,) = entry.subentries.values()
    server = server_of(entry, subentry)
    await wait_for(lambda: server.running, timeout=10)
    async with mcp_session(mosquitto.port, name) as session:
        await session.call_tool("echo", {"text": "x"})
        diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    (hosted,) = diag["hosted_servers"]
    assert hosted["name"] == "Echo"
    assert hosted["subentry_id"] == subentry.subentry_id
    assert hosted["server_name"] == name
    assert hosted["command"] == sys.executable
    assert hosted["args"] == [ECHO]
    assert hosted["env"] == ["API_TOKEN", "ECHO_TEST"]
    assert hosted["cwd"] is None
    assert hosted["problem"] is None
    assert hosted["running"] is True
    assert hosted["server_id"] == server._instance.client.client_id
    assert hosted["client_state"] == "connected"
    stats = hosted["stats"]
    assert stats["active_sessions"] == 1
    assert stats["requests"] >= 2
    assert stats["sessions"] == 1
    assert stats["mcp_server"]["sessions_started"] == 1
    assert stats["stdio_host"]["running"] == 1
    assert stats["mqtt_client"]["connects"] == 1
    (session_info,) = hosted["sessions"]
    assert session_info["client_id"].startswith("cli-")
    assert session_info["requests"] >= 2
    assert hosted["task_failures"] == {}
    dumped = json.dumps(diag)
    assert "s3cr3t-value" not in dumped
    assert "hello" not in dumped
    assert REDACTED not in json.dumps(diag["hosted_servers"])


async def test_shutdown_cancelling_everything_at_once(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """Home Assistant's shutdown cancels every background task at once.

    The server's own task still stops the MCP server (children, presence)
    before its MQTT client.
    """
    name = f"test/shutdown-{uid()}"
    entry = await setup_broker(
        hass,
        mosquitto.port,
        subentries=[{"title": "Echo", "data": subentry_data(name)}],
    )
    (subentry,) = entry.subentries.values()
    server = server_of(entry, subentry)
    await wait_for(lambda: server.running, timeout=10)
    async with mcp_session(mosquitto.port, name) as session:
        pid = int(text_of(await session.call_tool("pid", {})))
        tasks = list(entry._background_tasks)
        for task in tasks:
            task.cancel("Home Assistant is stopping")
        await asyncio.wait(tasks, timeout=15)
        assert all(task.done() for task in tasks)
        assert not process_alive(pid)
        assert await retained_presence(mosquitto.port, name) == {}


# -- simple devices (request topic) ----------------------------------------------------


class PahoDevice:
    """A simple device written with raw paho only: MQTT 5, no MCP lifecycle.

    Requests carry the MQTT 5 Response Topic and Correlation Data properties
    (MQTT 5 §4.10); answers on the response topic are queued with their
    properties. paho's network thread hands messages to the event loop.
    """

    def __init__(self, port: int, response_topic: str) -> None:
        self.port = port
        self.response_topic = response_topic
        self.answers: asyncio.Queue[Any] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._subscribed = asyncio.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"paho-{uid()}",
            protocol=paho.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self._loop.call_soon_threadsafe(
            self._subscribed.set
        )
        self.client.on_message = lambda _c, _u, msg: self._loop.call_soon_threadsafe(
            self.answers.put_nowait, msg
        )

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe(self.response_topic, qos=1)

    async def __aenter__(self) -> PahoDevice:
        self.client.connect_async("127.0.0.1", self.port)
        self.client.loop_start()
        async with asyncio.timeout(10):
            await self._subscribed.wait()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    async def call(
        self, request_topic: str, payload: bytes, correlation: bytes | None
    ) -> Any:
        """Publish one request; return the next answer (a paho ``MQTTMessage``)."""
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        self.client.publish(request_topic, payload, qos=1, properties=props)
        async with asyncio.timeout(10):
            return await self.answers.get()


def tools_call(request_id: Any, tool: str, **arguments: Any) -> bytes:
    return json.dumps(
        {
            "jsonrpc": "2.0",
            "id": request_id,
            "method": "tools/call",
            "params": {"name": tool, "arguments": arguments},
        }
    ).encode()


async def test_simple_devices_on_a_request_topic(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """A raw MQTT 5 device calls a tool without initialize; reconfiguring it away stops it."""
    entry = await setup_broker(hass, mosquitto.port)
    name = f"test/simple-{uid()}"
    request_topic = f"test/{uid()}/mcp/request"
    subentry = await add_server(hass, entry, name, request_topic=request_topic)
    assert subentry.data["request_topic"] == request_topic
    server = server_of(entry, subentry)
    instance, task = server._instance, server._task
    assert instance is not None
    assert task is not None
    assert instance.simple is not None
    assert instance.simple_host is not None
    simple = instance.simple
    await wait_for(lambda: server.running and simple.ready, timeout=20)
    assert instance.simple_host.name == "Echo (simple devices)"

    async with PahoDevice(mosquitto.port, f"devices/{uid()}/answers") as dev:
        answer = await dev.call(
            request_topic, tools_call("call-1", "echo", text="simple"), b"\x00c\xff"
        )
        assert answer.topic == dev.response_topic
        assert answer.properties.CorrelationData == b"\x00c\xff"
        body = json.loads(answer.payload)
        assert body["id"] == "call-1"
        assert body["result"]["content"][0]["text"] == "simple"
        answer = await dev.call(request_topic, tools_call(7, "pid"), b"pid")
        simple_pid = int(json.loads(answer.payload)["result"]["content"][0]["text"])
        assert process_alive(simple_pid)
        # Not JSON: a parse error with id null, the correlation data echoed.
        answer = await dev.call(request_topic, b"{not json", b"bad")
        assert answer.properties.CorrelationData == b"bad"
        assert json.loads(answer.payload)["error"]["code"] == -32700

    # The specification layout runs next to it, on its own child process.
    async with mcp_session(mosquitto.port, name) as session:
        spec_pid = int(text_of(await session.call_tool("pid", {})))
    assert spec_pid != simple_pid

    # Both layouts count in the entities.
    assert simple.stats.requests == 2
    counts = server.counters()
    assert counts.requests >= simple.stats.requests + 3  # + initialize, list, call
    assert counts.errors == 1
    flush_updates(hass)
    await hass.async_block_till_done()
    assert hosted_state(hass, entry, subentry.subentry_id, "sensor", "errors") == "1"
    assert int(
        hosted_state(hass, entry, subentry.subentry_id, "sensor", "requests")
    ) == (counts.requests)
    (diag,) = runtime_of(entry).hosted.diagnostics()
    assert diag["request_topic"] == request_topic
    simple_diag = diag["simple_devices"]
    assert simple_diag["request_topic"] == request_topic
    assert simple_diag["notifications_topic"] == f"{request_topic}/notifications"
    assert simple_diag["ready"] is True
    assert simple_diag["pending_requests"] == 0
    assert simple_diag["upstream_server"]["name"]
    assert simple_diag["stats"]["requests"] == 2
    assert simple_diag["stats"]["parse_errors"] == 1
    assert simple_diag["stdio_host"]["running"] == 1
    json.dumps(diag)

    # A new title renames the simple host's log name too, without a restart.
    result = await start_flow(hass, entry, subentry.subentry_id)
    result = await submit(
        hass,
        result["flow_id"],
        form_input(name, name="Renamed", request_topic=request_topic),
    )
    assert result["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    assert server._instance is instance
    assert instance.simple_host.name == "Renamed (simple devices)"

    # Reconfigured without the request topic: the simple layout stops.
    result = await start_flow(hass, entry, subentry.subentry_id)
    suggested = {
        str(key): key.description["suggested_value"]
        for key in result["data_schema"].schema
        if key.description
    }
    assert suggested["request_topic"] == request_topic
    values = form_input(name, name="Renamed")
    result = await submit(hass, result["flow_id"], values)
    assert result["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    await wait_for(lambda: not server._retiring, timeout=15)
    assert task.done()
    assert not process_alive(simple_pid)
    await wait_for(lambda: server.running, timeout=10)
    new = server._instance
    assert new is not None
    assert new is not instance
    assert new.simple is None
    assert new.client.registry.state_of(request_topic) is None
    (diag,) = runtime_of(entry).hosted.diagnostics()
    assert diag["request_topic"] is None
    assert diag["simple_devices"] is None
    # The counts of the stopped instance are kept.
    assert server.counters().errors == 1
    assert server.counters().requests == counts.requests


async def test_stored_invalid_request_topic(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """A stored request topic the engine refuses: the server is not hosted, and says why."""
    entry = await setup_broker(
        hass,
        mosquitto.port,
        subentries=[
            {
                "title": "Broken",
                "data": subentry_data(f"test/ok-{uid()}", request_topic="a/+/b"),
            }
        ],
    )
    (subentry,) = entry.subentries.values()
    server = server_of(entry, subentry)
    assert server.problem is not None
    assert "wildcard" in server.problem
    assert server._instance is None
    assert not server.running
    assert runtime_of(entry).hosted.diagnostics()[0]["request_topic"] == "a/+/b"
