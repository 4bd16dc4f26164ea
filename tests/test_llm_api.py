"""The broker entry's LLM API (Assist agents) against a real Mosquitto.

``llm.async_get_apis`` / ``llm.async_get_api`` as conversation agents use
them: the API named after the entry, the five tools with parameters that
convert to JSON Schema, the prompt with the rules, calls allowed and denied
through ``APIInstance.async_call_tool`` (a peer on the broker sees what gets
through), the ``mqtt_bridge_tool_call`` event with source ``assist``, the
option that adds the Assist API's tools, rule changes without reload, and the
API's removal on unload.
"""

from __future__ import annotations

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import Context, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.setup import async_setup_component
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_capture_events,
)
import voluptuous_openapi

from custom_components.mqtt_bridge.compat import llm_context
from custom_components.mqtt_bridge.const import CONF_INCLUDE_ASSIST, EVENT_TOOL_CALL
from custom_components.mqtt_bridge.engine.tool_specs import TOOL_NAMES
from custom_components.mqtt_bridge.llm_api import MqttTool, api_id
from devkit.mosquitto import Mosquitto
from tests.common import wait_for
from tests.test_broker_runtime import setup_broker
from tests.test_mqtt_client import peer, unique

RULES = [
    {
        "pattern": "sensors/+/temperature",
        "permissions": ["read"],
        "description": "Room temperatures",
    },
    {"pattern": "cmd/#", "permissions": ["write"], "description": "Commands"},
    {"pattern": "state/#", "permissions": ["read", "write"], "description": ""},
]


def context(user_id: str | None = "user-7") -> llm.LLMContext:
    return llm_context(
        "conversation",
        Context(user_id=user_id) if user_id is not None else None,
        assistant="conversation",
    )


async def instance(
    hass: HomeAssistant, entry: MockConfigEntry, user_id: str | None = "user-7"
) -> llm.APIInstance:
    return await llm.async_get_api(hass, api_id(entry.entry_id), context(user_id))


def descriptions(api: llm.APIInstance) -> dict[str, str]:
    return {tool.name: tool.description or "" for tool in api.tools}


async def test_api_registered_per_entry(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    first = await setup_broker(hass, mosquitto.port, rules=RULES, title="Garage")
    second = await setup_broker(
        hass, mosquitto.port, title="Lab", client_id_prefix="lab"
    )
    apis = {api.id: api for api in llm.async_get_apis(hass)}
    assert apis[f"mqtt_bridge-{first.entry_id}"].name == "Garage"
    assert apis[f"mqtt_bridge-{second.entry_id}"].name == "Lab"
    assert llm.LLM_API_ASSIST in apis

    # A renamed entry renames its API (no reload happens for a title).
    runtime = first.runtime_data
    hass.config_entries.async_update_entry(first, title="Shed")
    await hass.async_block_till_done()
    assert first.runtime_data is runtime
    apis = {api.id: api for api in llm.async_get_apis(hass)}
    assert apis[f"mqtt_bridge-{first.entry_id}"].name == "Shed"
    api = await instance(hass, first)
    assert '"Shed"' in api.api_prompt

    # Unloaded: gone from the list and from async_get_api; loaded again: back.
    assert await hass.config_entries.async_unload(first.entry_id)
    await hass.async_block_till_done()
    ids = [api.id for api in llm.async_get_apis(hass)]
    assert f"mqtt_bridge-{first.entry_id}" not in ids
    assert f"mqtt_bridge-{second.entry_id}" in ids
    with pytest.raises(HomeAssistantError):
        await instance(hass, first)
    assert await hass.config_entries.async_setup(first.entry_id)
    await hass.async_block_till_done()
    assert (await instance(hass, first)).api.name == "Shed"


async def test_tools_schema_and_prompt(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    entry = await setup_broker(hass, mosquitto.port, rules=RULES)
    api = await instance(hass, entry)
    assert api.api.id == f"mqtt_bridge-{entry.entry_id}"
    assert api.api.name == "Test Broker"
    assert api.custom_serializer is None
    assert [tool.name for tool in api.tools] == list(TOOL_NAMES)
    assert all(isinstance(tool, MqttTool) for tool in api.tools)

    schemas = {
        tool.name: voluptuous_openapi.convert(tool.parameters) for tool in api.tools
    }
    publish = schemas["mqtt_publish"]
    assert publish["type"] == "object"
    assert sorted(publish["required"]) == ["payload", "topic"]
    assert publish["properties"]["topic"]["type"] == "string"
    assert publish["properties"]["topic"]["description"]
    assert publish["properties"]["qos"]["enum"] == [0, 1, 2]
    assert publish["properties"]["qos"]["default"] == 0
    assert publish["properties"]["retain"]["type"] == "boolean"
    assert publish["properties"]["payload_encoding"]["enum"] == ["text", "base64"]
    assert schemas["mqtt_read"]["required"] == ["topic"]
    assert schemas["mqtt_read"]["properties"]["timeout"]["type"] == "number"
    subscribe = schemas["mqtt_subscribe"]["properties"]["max_messages"]
    assert (subscribe["minimum"], subscribe["maximum"]) == (1, 100)
    assert sorted(schemas["mqtt_query"]["required"]) == ["payload", "request_topic"]
    assert schemas["mqtt_topics"]["required"] == []
    for name, schema in schemas.items():
        for prop in schema["properties"].values():
            assert prop.get("description"), name

    described = descriptions(api)
    assert "cmd/#: Commands" in described["mqtt_publish"]
    assert "sensors/+/temperature" not in described["mqtt_publish"]
    assert "sensors/+/temperature: Room temperatures" in described["mqtt_read"]
    assert "state/#" in described["mqtt_subscribe"]

    prompt = api.api_prompt
    assert '"Test Broker"' in prompt
    assert "Readable:\n- sensors/+/temperature: Room temperatures\n- state/#" in prompt
    assert "Writable:\n- cmd/#: Commands\n- state/#" in prompt
    assert "every MQTT tool call will be denied" not in prompt


async def test_no_rules_prompt(hass: HomeAssistant, mosquitto: Mosquitto) -> None:
    entry = await setup_broker(hass, mosquitto.port)
    api = await instance(hass, entry)
    assert "every MQTT tool call will be denied" in api.api_prompt
    assert "Readable" not in api.api_prompt
    assert "Writable" not in api.api_prompt


async def test_calls_allowed_and_denied(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    entry = await setup_broker(hass, mosquitto.port, rules=RULES)
    events = async_capture_events(hass, EVENT_TOOL_CALL)
    api = await instance(hass, entry)
    room_topic = f"sensors/{unique('hall')}/temperature"
    async with peer(mosquitto, "#") as watcher:
        await watcher.client.publish(room_topic, b"19", qos=1, retain=True)
        allowed = await api.async_call_tool(
            llm.ToolInput(
                tool_name="mqtt_publish",
                tool_args={"topic": "cmd/fan", "payload": "on", "qos": 1},
            )
        )
        denied = await api.async_call_tool(
            llm.ToolInput(
                tool_name="mqtt_publish",
                tool_args={"topic": room_topic, "payload": "99"},
            )
        )
        read = await api.async_call_tool(
            llm.ToolInput(
                tool_name="mqtt_read",
                tool_args={"topic": room_topic, "timeout": 5},
            )
        )
        bad = await api.async_call_tool(
            llm.ToolInput(tool_name="mqtt_read", tool_args={"topic": "a/#/b"})
        )
        anonymous = await (await instance(hass, entry, None)).async_call_tool(
            llm.ToolInput(
                tool_name="mqtt_publish",
                tool_args={"topic": "cmd/end", "payload": "x", "qos": 1},
            )
        )
        await wait_for(lambda: b"x" in watcher.payloads())
        with pytest.raises(HomeAssistantError):
            await api.async_call_tool(llm.ToolInput(tool_name="nope", tool_args={}))
    received = [(str(m.topic), bytes(m.payload)) for m in watcher.messages]  # type: ignore[arg-type]
    # Clean the retained value up for other tests.
    async with peer(mosquitto) as cleaner:
        await cleaner.client.publish(room_topic, b"", qos=1, retain=True)

    assert "error" not in allowed
    assert allowed["published"] is True
    assert allowed["topic"] == "cmd/fan"
    assert ("cmd/fan", b"on") in received

    assert denied["error"].startswith("Permission denied")
    assert "write" in denied["error"]
    assert room_topic in denied["error"]
    assert "cmd/#" in denied["error"]
    assert denied["permission"] == "write"
    assert (room_topic, b"99") not in received

    assert "error" not in read
    assert read["message"]["payload"] == "19"
    assert read["message"]["retain"] is True

    assert bad["error"]
    assert anonymous["published"] is True

    await hass.async_block_till_done()
    data = [e.data for e in events]
    assert [(d["tool"], d["allowed"], d["is_error"]) for d in data] == [
        ("mqtt_publish", True, False),
        ("mqtt_publish", False, True),
        ("mqtt_read", True, False),
        ("mqtt_read", True, True),
        ("mqtt_publish", True, False),
    ]
    assert all(d["source"] == "assist" for d in data)
    assert [d["user_id"] for d in data] == ["user-7"] * 4 + [None]
    assert events[0].context.user_id == "user-7"
    assert data[1]["topic"] == room_topic


async def test_include_assist_tools(hass: HomeAssistant, mosquitto: Mosquitto) -> None:
    assert await async_setup_component(hass, "homeassistant", {})
    assert await async_setup_component(hass, "intent", {})
    entry = await setup_broker(
        hass, mosquitto.port, rules=RULES, options={CONF_INCLUDE_ASSIST: True}
    )
    api = await instance(hass, entry)
    assist = await llm.async_get_api(hass, llm.LLM_API_ASSIST, context())
    names = [tool.name for tool in api.tools]
    assert names[: len(TOOL_NAMES)] == list(TOOL_NAMES)
    assert "HassTurnOn" in names
    assert names[len(TOOL_NAMES) :] == [tool.name for tool in assist.tools]
    assert api.api_prompt.startswith(assist.api_prompt)
    assert "cmd/#: Commands" in api.api_prompt
    assert api.custom_serializer is not None
    assert api.custom_serializer is assist.custom_serializer

    # Off again (applied live): only the MQTT tools.
    runtime = entry.runtime_data
    hass.config_entries.async_update_entry(
        entry, options={**entry.options, CONF_INCLUDE_ASSIST: False}
    )
    await hass.async_block_till_done()
    assert entry.runtime_data is runtime
    api = await instance(hass, entry)
    assert [tool.name for tool in api.tools] == list(TOOL_NAMES)


async def test_rule_change_without_reload(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """A rule added in the options flow shows in the next instance; same runtime."""
    entry = await setup_broker(hass, mosquitto.port)
    runtime = entry.runtime_data
    before = await instance(hass, entry)
    assert "lights/#" not in descriptions(before)["mqtt_publish"]
    denied = await before.async_call_tool(
        llm.ToolInput(
            tool_name="mqtt_publish", tool_args={"topic": "lights/a", "payload": "1"}
        )
    )
    assert "error" in denied

    flow = await hass.config_entries.options.async_init(entry.entry_id)
    flow = await hass.config_entries.options.async_configure(
        flow["flow_id"], {"next_step_id": "add_rule"}
    )
    flow = await hass.config_entries.options.async_configure(
        flow["flow_id"],
        {"pattern": "lights/#", "permissions": ["write"], "description": "Lights"},
    )
    assert flow["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()
    assert entry.runtime_data is runtime
    assert entry.state is ConfigEntryState.LOADED

    after = await instance(hass, entry)
    assert "lights/#: Lights" in descriptions(after)["mqtt_publish"]
    assert "Writable:\n- lights/#: Lights" in after.api_prompt
    allowed = await after.async_call_tool(
        llm.ToolInput(
            tool_name="mqtt_publish", tool_args={"topic": "lights/a", "payload": "1"}
        )
    )
    assert "error" not in allowed
    # An instance built before the change also uses the new rules for its calls.
    again = await before.async_call_tool(
        llm.ToolInput(
            tool_name="mqtt_publish", tool_args={"topic": "lights/b", "payload": "1"}
        )
    )
    assert "error" not in again

    hass.config_entries.async_update_entry(
        entry, options={**entry.options, "rules": []}
    )
    await hass.async_block_till_done()
    emptied = await instance(hass, entry)
    assert "every MQTT tool call will be denied" in emptied.api_prompt
    assert "lights/#" not in descriptions(emptied)["mqtt_publish"]
