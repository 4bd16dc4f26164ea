"""MCP servers on the broker as LLM APIs (remote_llm.py), against a real Mosquitto.

The servers are real: ``McpMqttServer`` + ``StdioHost`` running the stdio child
``tests_engine/stdio_servers/echo.py`` on MQTT connections of their own (an
"external" server), and a ``stdio_server`` subentry hosted by the same entry.
Agents' view: ``llm.async_get_apis`` / ``llm.async_get_api`` and
``APIInstance.async_call_tool``; the ``mcp_servers`` option through the options
flow, applied without a reload; unload.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import sys
from typing import Any

from homeassistant.config_entries import ConfigSubentry
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from mcp import types
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
import voluptuous as vol
import voluptuous_openapi

from custom_components.mqtt_bridge import config_flow  # noqa: F401 - subentry types
from custom_components.mqtt_bridge.compat import llm_context
from custom_components.mqtt_bridge.const import CONF_MCP_SERVERS, DOMAIN
from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.mcp_mqtt import McpMqttServer, ServerPresence
from custom_components.mqtt_bridge.engine.mcp_remote import RemoteMcpError
from custom_components.mqtt_bridge.engine.stdio_host import (
    StdioHost,
    StdioServerConfig,
)
from custom_components.mqtt_bridge.remote_llm import (
    RemoteMcpApi,
    RemoteMcpManager,
    remote_api_id,
    server_patterns,
    tool_result,
)
from devkit.mosquitto import Mosquitto
from tests.common import (
    ECHO,
    check_flow_translations,
    mqtt_client,
    uid,
    wait_for,
)
from tests.test_broker_runtime import setup_broker

pytestmark = pytest.mark.timeout(90)


def context() -> llm.LLMContext:
    return llm_context("conversation", Context(user_id="u1"), assistant="conversation")


@asynccontextmanager
async def announced(
    broker: Mosquitto, name: str, description: str = "Echo server for tests"
) -> AsyncIterator[McpMqttServer]:
    """An MCP server on the broker (its own MQTT connection) until the block ends."""
    sid = f"srv-{uid()}"
    host = StdioHost(
        StdioServerConfig(sys.executable, (ECHO,)),
        name="echo",
        restart_backoff=Backoff(base=0.05, cap=0.1),
    )
    async with mqtt_client(broker.port, sid, McpMqttServer.will(sid, name)) as client:
        server = McpMqttServer(
            client, name, description=description, handler=host.serve_session
        )
        task = asyncio.create_task(server.run())
        try:
            await wait_for(lambda: len(client.registry.granted) == 1)
            yield server
        finally:
            task.cancel()
            await asyncio.wait({task})


def manager_of(entry: MockConfigEntry) -> RemoteMcpManager:
    manager = entry.runtime_data.remote_mcp
    assert isinstance(manager, RemoteMcpManager)
    return manager


def remote_apis(hass: HomeAssistant, tag: str) -> dict[str, llm.API]:
    return {api.id: api for api in llm.async_get_apis(hass) if tag in api.id}


async def set_servers(
    hass: HomeAssistant, entry: MockConfigEntry, text: str | None
) -> Any:
    """Submit the options flow's settings step with ``mcp_servers`` = ``text``."""
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "settings"}
    )
    assert result["step_id"] == "settings"
    user_input: dict[str, Any] = {
        "require_admin": False,
        "include_assist_tools": False,
    }
    if text is not None:
        user_input[CONF_MCP_SERVERS] = text
    return await hass.config_entries.options.async_configure(
        result["flow_id"], user_input
    )


async def test_announced_server_is_an_api(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    tag = uid()
    name = f"test-{tag}/echo"
    entry = await setup_broker(
        hass, mosquitto.port, options={CONF_MCP_SERVERS: [f"test-{tag}/*"]}
    )
    runtime = entry.runtime_data
    async with announced(mosquitto, name) as server:
        api_id = remote_api_id(entry.entry_id, name)
        await wait_for(lambda: api_id in remote_apis(hass, tag))
        api = remote_apis(hass, tag)[api_id]
        assert isinstance(api, RemoteMcpApi)
        assert api.name == f"{name} (MQTT)"
        assert "/" not in api.id
        assert api.id.startswith(f"{DOMAIN}-{entry.entry_id}-remote-")
        assert manager_of(entry).api_ids() == [api_id]

        instance = await llm.async_get_api(hass, api_id, context())
        assert name in instance.api_prompt
        assert "Echo server for tests" in instance.api_prompt
        tools = {tool.name: tool for tool in instance.tools}
        assert {"echo", "sleep", "changed"} <= set(tools)
        schema = voluptuous_openapi.convert(tools["echo"].parameters)
        assert schema["properties"]["text"]["type"] == "string"
        assert schema["required"] == ["text"]

        result = await instance.async_call_tool(
            llm.ToolInput(tool_name="echo", tool_args={"text": "over mqtt"})
        )
        assert result == {"result": "over mqtt"}
        assert api.server.connected
        assert api.server.stats.sessions == 1

        # A wrong argument: the server says isError, the model gets "error".
        result = await instance.async_call_tool(
            llm.ToolInput(tool_name="echo", tool_args={})
        )
        assert "text" in str(result["error"])

        # A call the server answers with a JSON-RPC error: translated, names it.
        with pytest.raises(HomeAssistantError) as err:
            await instance.async_call_tool(llm.ToolInput(tool_name="die", tool_args={}))
        assert str(err.value).startswith(
            "The MCP server on the broker could not be used: MCP server "
            f"{name} ({server.server_id}): tool 'die' failed"
        )

        # the same presence again (the server re-announces): nothing changes
        server._publish_presence()
        await asyncio.sleep(0.1)
        assert remote_apis(hass, tag) == {api_id: api}

        diag = runtime.diagnostics()["remote_mcp_servers"]
        assert diag["patterns"] == [f"test-{tag}/*"]
        assert diag["discovery"]["malformed"] == 0
        (listed,) = diag["servers"]
        assert listed["api_id"] == api_id
        assert listed["connected"] is True
        assert listed["stats"]["calls"] == 3
        remote = api.server

    # The server stopped: its presence was cleared, the API and session are gone.
    await wait_for(lambda: remote_apis(hass, tag) == {})
    await hass.async_block_till_done()
    assert not remote.connected
    with pytest.raises(HomeAssistantError):
        await llm.async_get_api(hass, api_id, context())


class Taken(llm.API):
    """Another integration's API."""

    async def async_get_api_instance(
        self, llm_context: llm.LLMContext
    ) -> llm.APIInstance:
        raise NotImplementedError


async def test_changed_description_and_unreachable_server(
    hass: HomeAssistant, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uid()
    name = f"test-{tag}/quiet"
    entry = await setup_broker(
        hass, mosquitto.port, options={CONF_MCP_SERVERS: [f"test-{tag}/*"]}
    )
    runtime = entry.runtime_data
    online = b'{"jsonrpc":"2.0","method":"notifications/server/online",'
    topic = f"$mcp-server/presence/ghost-{tag}/{name}"
    # A presence nobody serves: the API exists, listing its tools fails.
    await runtime.client.publish_wait(topic, online + b'"params":{"description":"a"}}')
    await wait_for(lambda: len(remote_apis(hass, tag)) == 1)
    (api,) = remote_apis(hass, tag).values()
    assert isinstance(api, RemoteMcpApi)
    api.server.connect_timeout = 0.3
    with pytest.raises(HomeAssistantError) as err:
        await llm.async_get_api(hass, api.id, context())
    assert str(err.value).startswith(
        "The MCP server on the broker did not answer in time: MCP server "
        f"{name} (ghost-{tag}) is not announced on the broker"
    )
    # A new description: the same API, told the new text.
    await runtime.client.publish_wait(topic, online + b'"params":{"description":"b"}}')
    await wait_for(lambda: api.server.presence.description == "b")
    assert remote_apis(hass, tag) == {api.id: api}
    # A tool call that times out: translated too.
    tool = api._convert(types.Tool(name="slow", inputSchema={"type": "object"}), set())
    assert tool is not None
    with pytest.raises(HomeAssistantError, match="did not answer in time"):
        await tool.async_call(hass, llm.ToolInput("slow", {}), context())
    await runtime.client.publish_wait(topic, b"")
    await wait_for(lambda: remote_apis(hass, tag) == {})

    # An id another API has already: not offered, logged and counted.
    taken = ServerPresence(f"taken-{tag}", name)
    unregister = llm.async_register_api(
        hass,
        Taken(hass=hass, id=remote_api_id(entry.entry_id, taken.server_name), name="x"),
    )
    manager = manager_of(entry)
    topic = f"$mcp-server/presence/taken-{tag}/{name}"
    await runtime.client.publish_wait(topic, online + b'"params":{}}')
    await wait_for(lambda: manager.register_errors == 1)
    assert "not offered to Assist" in caplog.text
    await runtime.client.publish_wait(topic, b"")
    await wait_for(lambda: manager.directory.servers() == [])  # type: ignore[union-attr]
    unregister()


async def test_option_filters_live(hass: HomeAssistant, mosquitto: Mosquitto) -> None:
    check_flow_translations(hass)
    tag = uid()
    entry = await setup_broker(hass, mosquitto.port)  # no option: all servers
    manager = manager_of(entry)
    assert manager.patterns == ["*"]
    async with (
        announced(mosquitto, f"lab-{tag}/a") as lab,
        announced(mosquitto, f"home-{tag}/b") as home,
    ):
        lab_id = remote_api_id(entry.entry_id, lab.server_name)
        home_id = remote_api_id(entry.entry_id, home.server_name)
        await wait_for(lambda: set(remote_apis(hass, tag)) == {lab_id, home_id})

        # The form shows the stored patterns; an MQTT wildcard is refused.
        result = await set_servers(hass, entry, "home-*/#")
        assert result["type"] is FlowResultType.FORM
        assert result["errors"] == {CONF_MCP_SERVERS: "invalid_mcp_servers"}
        assert "MQTT wildcard" in result["description_placeholders"]["problem"]

        runtime = entry.runtime_data
        result = await set_servers(hass, entry, f" home-{tag}/*,\nother/x ")
        assert result["type"] is FlowResultType.CREATE_ENTRY
        assert entry.options[CONF_MCP_SERVERS] == [f"home-{tag}/*", "other/x"]
        await hass.async_block_till_done()
        assert entry.runtime_data is runtime  # applied live, no reload
        assert set(remote_apis(hass, tag)) == {home_id}

        # Empty: none; the discovery stops.
        await set_servers(hass, entry, None)
        await hass.async_block_till_done()
        assert entry.options[CONF_MCP_SERVERS] == []
        assert remote_apis(hass, tag) == {}
        assert manager.directory is None
        assert manager.diagnostics()["discovery"] is None

        # All again: the retained presence brings both back.
        result = await set_servers(hass, entry, "*")
        await hass.async_block_till_done()
        await wait_for(lambda: set(remote_apis(hass, tag)) == {lab_id, home_id})

        # The form shows the stored list, one pattern per line.
        result = await hass.config_entries.options.async_init(entry.entry_id)
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {"next_step_id": "settings"}
        )
        (key,) = [k for k in result["data_schema"].schema if str(k) == CONF_MCP_SERVERS]
        assert key.description == {"suggested_value": "*"}
        await hass.config_entries.options.async_configure(
            result["flow_id"],
            {"require_admin": True, "include_assist_tools": False, "mcp_servers": "*"},
        )
        await hass.async_block_till_done()
        assert set(remote_apis(hass, tag)) == {lab_id, home_id}  # unchanged

        # Unload: every API gone, every session closed.
        lab_api = remote_apis(hass, tag)[lab_id]
        assert isinstance(lab_api, RemoteMcpApi)
        await llm.async_get_api(hass, lab_id, context())  # opens a session
        assert lab_api.server.connected
        assert await hass.config_entries.async_unload(entry.entry_id)
        await hass.async_block_till_done()
        assert remote_apis(hass, tag) == {}
        assert not lab_api.server.connected
        with pytest.raises(RemoteMcpError, match="closed"):
            await lab_api.server.list_tools()


async def test_hosted_server_is_reachable_too(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    tag = uid()
    name = f"hosted-{tag}/echo"
    entry = await setup_broker(hass, mosquitto.port)
    hass.config_entries.async_add_subentry(
        entry,
        ConfigSubentry(
            data={
                "command": sys.executable,
                "args": [ECHO],
                "env": {},
                "cwd": None,
                "server_name": name,
                "description": "Hosted echo",
            },
            subentry_type="stdio_server",
            title="Echo",
            unique_id=name,
        ),
    )
    await hass.async_block_till_done()
    await wait_for(lambda: len(remote_apis(hass, tag)) == 1, timeout=15)
    (api,) = remote_apis(hass, tag).values()
    instance = await llm.async_get_api(hass, api.id, context())
    result = await instance.async_call_tool(
        llm.ToolInput(tool_name="echo", tool_args={"text": "home"})
    )
    assert result == {"result": "home"}


def test_patterns_and_results() -> None:
    assert server_patterns({}) == ["*"]
    assert server_patterns({CONF_MCP_SERVERS: []}) == []
    assert server_patterns({CONF_MCP_SERVERS: ["a/*", "b"]}) == ["a/*", "b"]
    assert server_patterns({CONF_MCP_SERVERS: "a/*"}) == []  # not a list
    assert server_patterns({CONF_MCP_SERVERS: ["a/#"]}) == []  # invalid
    assert remote_api_id("E", "a_b") == "mqtt_bridge-E-remote-a_b"
    assert remote_api_id("E", "a/b") != remote_api_id("E", "a_b")

    def result(**fields: Any) -> types.CallToolResult:
        return types.CallToolResult.model_validate(fields)

    text = {"type": "text", "text": "hello"}
    assert tool_result(result(content=[text])) == {"result": "hello"}
    assert tool_result(
        result(content=[text], structuredContent={"result": "hello"})
    ) == {"result": "hello"}
    assert tool_result(result(content=[text], isError=True)) == {"error": "hello"}
    assert tool_result(result(content=[], isError=True)) == {
        "error": "The tool reported an error without a message."
    }
    blocks = [
        text,
        {"type": "image", "data": "AAAA", "mimeType": "image/png"},
        {"type": "resource", "resource": {"uri": "x://a", "text": "inline"}},
        {"type": "resource", "resource": {"uri": "x://b", "blob": "AAAA"}},
        {"type": "resource_link", "uri": "x://c", "name": "c"},
    ]
    assert tool_result(result(content=blocks)) == {
        "result": "hello\n[image content (image/png)]\ninline\n[resource x://b]\n"
        "[resource link x://c]"
    }


async def test_tool_names_and_schemas(hass: HomeAssistant) -> None:
    server: Any = type("S", (), {"label": "srv (id)"})()
    api = RemoteMcpApi(hass=hass, id="x", name="x", server=server)
    used: set[str] = set()

    def convert(name: str, schema: Any = None) -> str | None:
        tool = types.Tool(name=name, inputSchema=schema or {"type": "object"})
        converted = api._convert(tool, used)
        return None if converted is None else converted.name

    assert convert("echo") == "echo"
    assert convert("echo") == "echo_2"
    assert convert("a.b/c") == "a_b_c"
    assert convert("x" * 80) == "x" * 64
    assert convert("x" * 80) == "x" * 62 + "_2"
    bad = {"type": "object", "properties": {"a": "not an object"}}
    assert convert("broken", bad) is None
    assert api.skipped_tools == 1
    assert isinstance(
        api._convert(
            types.Tool(name="n", inputSchema={"type": "object"}), set()
        ).parameters,  # type: ignore[union-attr]
        vol.Schema,
    )


async def test_one_api_per_server_name_across_instances(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """Two instances of one server-name (spec §1.2): one API, moved when one goes."""
    tag = uid()
    name = f"twin-{tag}/echo"
    entry = await setup_broker(hass, mosquitto.port)
    api_id = remote_api_id(entry.entry_id, name)
    async with announced(mosquitto, name) as first:
        await wait_for(lambda: set(remote_apis(hass, tag)) == {api_id})
        api = remote_apis(hass, tag)[api_id]
        assert isinstance(api, RemoteMcpApi)
        assert api.server.presence.server_id == first.server_id
        async with announced(mosquitto, name) as second:
            await wait_for(
                lambda: len(manager_of(entry).directory.servers()) == 2  # type: ignore[union-attr]
            )
            assert remote_apis(hass, tag) == {api_id: api}
            assert api.server.presence.server_id == first.server_id
    # (second stopped first, then first: nothing left)
    await wait_for(lambda: remote_apis(hass, tag) == {})

    async with announced(mosquitto, name) as first:
        await wait_for(lambda: set(remote_apis(hass, tag)) == {api_id})
        api = remote_apis(hass, tag)[api_id]
        assert isinstance(api, RemoteMcpApi)
        second_cm = announced(mosquitto, name)
        second = await second_cm.__aenter__()
        try:
            await wait_for(
                lambda: len(manager_of(entry).directory.servers()) == 2  # type: ignore[union-attr]
            )
            # The instance in use goes: the same API (same id) moves to the other.
            await first.client.publish_wait(
                f"$mcp-server/presence/{first.server_id}/{name}", b"", retain=True
            )
            await wait_for(lambda: api.server.presence.server_id == second.server_id)
            assert remote_apis(hass, tag) == {api_id: api}
            instance = await llm.async_get_api(hass, api_id, context())
            result = await instance.async_call_tool(
                llm.ToolInput(tool_name="echo", tool_args={"text": "moved"})
            )
            assert result == {"result": "moved"}
        finally:
            await second_cm.__aexit__(None, None, None)
    await wait_for(lambda: remote_apis(hass, tag) == {})
    await hass.async_block_till_done()
