"""The MQTT broker entry's runtime against real Mosquitto brokers.

Set-up and unload, the one tool call path (counters, the
``mqtt_bridge_tool_call`` event, its logbook text), entities and their
rate-limited state writes (flushed with ``async_fire_time_changed``, never by
sleeping), rule changes applied live (no reload, no reconnect), data changes
that reload, reauth on rejected credentials, a broker restart, diagnostics.
"""

from __future__ import annotations

from datetime import timedelta
import json
import logging
from pathlib import Path
from typing import Any
from unittest.mock import patch

from homeassistant.components import logbook
from homeassistant.components.binary_sensor import BinarySensorDeviceClass
from homeassistant.components.sensor import SensorStateClass
from homeassistant.config_entries import SOURCE_REAUTH, ConfigEntryState
from homeassistant.const import (
    EVENT_STATE_CHANGED,
    STATE_OFF,
    STATE_ON,
    EntityCategory,
)
from homeassistant.core import Event, HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers import (
    device_registry as dr,
    entity_registry as er,
    translation,
)
from homeassistant.helpers.device_registry import DeviceEntryType
from homeassistant.helpers.redact import REDACTED
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_capture_events,
    async_fire_time_changed,
)
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.mqtt_bridge import broker_runtime as runtime_module
from custom_components.mqtt_bridge.broker_runtime import (
    RESOURCE_ACL_RULES,
    BrokerRuntime,
)
from custom_components.mqtt_bridge.const import (
    CONF_INCLUDE_ASSIST,
    CONF_REQUIRE_ADMIN,
    CONF_RULES,
    DOMAIN,
    EVENT_TOOL_CALL,
    UPDATE_THROTTLE,
)
from custom_components.mqtt_bridge.engine.mqtt_client import ClientState
from custom_components.mqtt_bridge.logbook import (
    async_describe_events,
    describe_tool_call,
)
from devkit.mosquitto import Mosquitto
from tests.common import add_broker_entry, wait_for

READ_WRITE_A = [
    {"pattern": "a/#", "permissions": ["read", "write"], "description": "Test A"}
]

# platform, key, device class, state class, unit, entity category
EXPECTED = [
    (
        "binary_sensor",
        "broker_connected",
        BinarySensorDeviceClass.CONNECTIVITY,
        None,
        None,
        EntityCategory.DIAGNOSTIC,
    ),
    ("sensor", "tool_calls", None, SensorStateClass.TOTAL_INCREASING, "calls", None),
    (
        "sensor",
        "denied_tool_calls",
        None,
        SensorStateClass.TOTAL_INCREASING,
        "calls",
        None,
    ),
    (
        "sensor",
        "messages_published",
        None,
        SensorStateClass.TOTAL_INCREASING,
        "messages",
        None,
    ),
    (
        "sensor",
        "messages_received",
        None,
        SensorStateClass.TOTAL_INCREASING,
        "messages",
        None,
    ),
    ("sensor", "topics_known", None, SensorStateClass.MEASUREMENT, "topics", None),
]


def flush_updates(hass: HomeAssistant) -> None:
    """Fire the runtime's counter timer instead of sleeping through it."""
    async_fire_time_changed(
        hass, dt_util.utcnow() + timedelta(seconds=UPDATE_THROTTLE + 1)
    )


async def setup_broker(
    hass: HomeAssistant,
    port: int,
    *,
    connected: bool = True,
    **kwargs: Any,
) -> MockConfigEntry:
    """Add and set up a broker entry; wait for the broker session if ``connected``."""
    entry = add_broker_entry(hass, port, **kwargs)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    runtime = entry.runtime_data
    assert isinstance(runtime, BrokerRuntime)
    if connected:
        await wait_for(lambda: runtime.connected)
    return entry


def entity_id(
    hass: HomeAssistant, entry: MockConfigEntry, platform: str, key: str
) -> str:
    found = er.async_get(hass).async_get_entity_id(
        platform, DOMAIN, f"{entry.entry_id}_{key}"
    )
    assert found is not None, key
    return found


def state(hass: HomeAssistant, entry: MockConfigEntry, platform: str, key: str) -> str:
    current = hass.states.get(entity_id(hass, entry, platform, key))
    assert current is not None, key
    return current.state


async def call(
    runtime: BrokerRuntime,
    name: str,
    source: str = "mcp",
    user_id: str | None = None,
    **arguments: Any,
) -> Any:
    return await runtime.async_call_tool(
        name, arguments, source=source, user_id=user_id
    )


# -- set-up, entities, device ----------------------------------------------------


async def test_entities_and_device(
    hass: HomeAssistant,
    mosquitto: Mosquitto,
    entity_registry: er.EntityRegistry,
    device_registry: dr.DeviceRegistry,
) -> None:
    entry = await setup_broker(hass, mosquitto.port, rules=READ_WRITE_A)
    runtime: BrokerRuntime = entry.runtime_data
    assert runtime.client.client_id.startswith("test-bridge-")
    assert len(runtime.client.client_id) == len("test-bridge-") + 8

    device = device_registry.async_get_device(identifiers={(DOMAIN, entry.entry_id)})
    assert device is not None
    assert device.id == runtime.device_id
    assert device.name == "Test Broker"
    assert device.model == "MQTT broker"
    assert device.entry_type is DeviceEntryType.SERVICE

    registered = er.async_entries_for_config_entry(entity_registry, entry.entry_id)
    assert len(registered) == len(EXPECTED)
    strings = await translation.async_get_translations(hass, "en", "entity", [DOMAIN])
    icons = json.loads(
        (Path(runtime_module.__file__).parent / "icons.json").read_text("utf-8")
    )
    for platform, key, device_class, state_class, unit, category in EXPECTED:
        registry_entry = entity_registry.async_get(
            entity_id(hass, entry, platform, key)
        )
        assert registry_entry is not None
        assert registry_entry.device_id == device.id
        assert registry_entry.translation_key == key
        assert registry_entry.entity_category == category
        assert registry_entry.original_device_class == device_class
        assert registry_entry.unit_of_measurement == unit
        assert strings[f"component.{DOMAIN}.entity.{platform}.{key}.name"]
        assert icons["entity"][platform][key]
        current = hass.states.get(registry_entry.entity_id)
        assert current is not None
        assert current.attributes.get("state_class") == state_class
    assert (
        entity_id(hass, entry, "sensor", "tool_calls")
        == "sensor.test_broker_tool_calls"
    )
    assert entity_id(hass, entry, "binary_sensor", "broker_connected") == (
        "binary_sensor.test_broker_broker_connection"
    )

    # The connection is written at once when it comes up, the counters are 0.
    await hass.async_block_till_done()
    assert state(hass, entry, "binary_sensor", "broker_connected") == STATE_ON
    for key in ("tool_calls", "denied_tool_calls", "messages_published"):
        assert state(hass, entry, "sensor", key) == "0"


async def test_tool_calls_count_and_fire_events(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """Allowed and denied calls: counters, entities, events with their context."""
    entry = await setup_broker(hass, mosquitto.port, rules=READ_WRITE_A)
    runtime: BrokerRuntime = entry.runtime_data
    events = async_capture_events(hass, EVENT_TOOL_CALL)

    result = await call(
        runtime,
        "mqtt_publish",
        "mcp",
        "user-1",
        topic="a/r",
        payload="21.5",
        qos=1,
        retain=True,
    )
    assert not result.is_error, result.text
    result = await call(runtime, "mqtt_publish", "assist", topic="b/x", payload="1")
    assert result.is_error
    assert not result.allowed
    result = await call(runtime, "mqtt_read", topic="a/r", timeout=5)
    assert not result.is_error, result.text
    assert result.structured["message"]["payload"] == "21.5"
    await hass.async_block_till_done()

    assert [e.data["allowed"] for e in events] == [True, False, True]
    first, denied, read = (e.data for e in events)
    assert set(first) == {
        "entry_id",
        "device_id",
        "tool",
        "topic",
        "allowed",
        "source",
        "user_id",
        "duration_ms",
        "is_error",
    }
    assert first["entry_id"] == entry.entry_id
    assert first["device_id"] == runtime.device_id
    assert first["tool"] == "mqtt_publish"
    assert first["topic"] == "a/r"
    assert first["source"] == "mcp"
    assert first["user_id"] == "user-1"
    assert first["is_error"] is False
    assert isinstance(first["duration_ms"], float)
    assert first["duration_ms"] >= 0
    assert events[0].context.user_id == "user-1"
    assert denied["source"] == "assist"
    assert denied["user_id"] is None
    assert denied["topic"] == "b/x"
    assert denied["is_error"] is True
    assert read["tool"] == "mqtt_read"

    assert runtime.stats.calls == 3
    assert runtime.stats.denied == 1
    assert runtime.stats.errors == 1
    assert runtime.stats.by_tool == {"mqtt_publish": 2, "mqtt_read": 1}
    assert runtime.stats.last_call is not None

    # The topic store (subscribed to the readable a/#) has seen a/r.
    await wait_for(lambda: runtime.tools.topics_known >= 1)
    flush_updates(hass)
    await hass.async_block_till_done()
    assert state(hass, entry, "sensor", "tool_calls") == "3"
    assert state(hass, entry, "sensor", "denied_tool_calls") == "1"
    assert state(hass, entry, "sensor", "messages_published") == "1"
    assert state(hass, entry, "sensor", "messages_received") == "1"
    assert state(hass, entry, "sensor", "topics_known") == "1"


async def test_state_writes_are_throttled(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """Many calls: no state write until the timer, then one; none without change."""
    entry = await setup_broker(hass, mosquitto.port)
    runtime: BrokerRuntime = entry.runtime_data
    await hass.async_block_till_done()
    tool_calls = entity_id(hass, entry, "sensor", "tool_calls")
    changes = async_capture_events(hass, EVENT_STATE_CHANGED)

    for _ in range(5):
        await call(runtime, "mqtt_publish", topic="a/b", payload="x")
    await hass.async_block_till_done()
    assert [e for e in changes if e.data["entity_id"] == tool_calls] == []
    assert state(hass, entry, "sensor", "tool_calls") == "0"

    flush_updates(hass)
    await hass.async_block_till_done()
    written = [e for e in changes if e.data["entity_id"] == tool_calls]
    assert len(written) == 1
    assert written[0].data["new_state"].state == "5"
    assert state(hass, entry, "sensor", "denied_tool_calls") == "5"

    changes.clear()
    flush_updates(hass)
    await hass.async_block_till_done()
    assert changes == []


async def test_unexpected_failure_unknown_tool_and_clipping(
    hass: HomeAssistant, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Audit data stay bounded; an exception in the tools becomes an error result."""
    entry = await setup_broker(hass, mosquitto.port, rules=READ_WRITE_A)
    runtime: BrokerRuntime = entry.runtime_data
    events = async_capture_events(hass, EVENT_TOOL_CALL)

    result = await call(runtime, "x" * 100)
    assert result.is_error
    result = await call(runtime, "mqtt_publish", topic="b/" + "t" * 400, payload="")
    assert not result.allowed
    with patch.object(runtime.tools, "call", side_effect=RuntimeError("boom")):
        result = await call(runtime, "mqtt_read", topic="a/b")
    assert result.is_error
    assert result.allowed
    assert "internal error" in result.structured["error"]
    assert "MQTT tool mqtt_read failed" in caplog.text
    await hass.async_block_till_done()

    unknown, long_topic, failed = (e.data for e in events)
    assert len(unknown["tool"]) == 64
    assert unknown["tool"].endswith("…")
    assert unknown["topic"] is None
    assert len(long_topic["topic"]) == 256
    assert long_topic["topic"].endswith("…")
    assert failed["is_error"] is True
    assert failed["allowed"] is True
    assert runtime.stats.by_tool == {"unknown": 1, "mqtt_publish": 1, "mqtt_read": 1}


# -- options live, data reload -----------------------------------------------------


async def test_rule_changes_apply_live(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """A rule added in the options flow allows the next call: no reload, no reconnect."""
    entry = await setup_broker(hass, mosquitto.port)
    runtime: BrokerRuntime = entry.runtime_data
    connects = runtime.client.stats.connects
    assert connects == 1

    result = await call(runtime, "mqtt_publish", topic="a/b", payload="x")
    assert not result.allowed
    assert "a/#" not in runtime.tools.specs()[0].description

    with patch.object(
        hass.config_entries,
        "async_schedule_reload",
        wraps=hass.config_entries.async_schedule_reload,
    ) as reload:
        flow = await hass.config_entries.options.async_init(entry.entry_id)
        flow = await hass.config_entries.options.async_configure(
            flow["flow_id"], {"next_step_id": "add_rule"}
        )
        flow = await hass.config_entries.options.async_configure(
            flow["flow_id"],
            {"pattern": "a/#", "permissions": ["read", "write"], "description": "A"},
        )
        assert flow["type"] is FlowResultType.CREATE_ENTRY
        await hass.async_block_till_done()

        assert entry.runtime_data is runtime
        assert entry.state is ConfigEntryState.LOADED
        result = await call(runtime, "mqtt_publish", topic="a/b", payload="x")
        assert result.allowed
        assert not result.is_error, result.text
        assert "- a/#: A" in runtime.tools.specs()[0].description
        assert json.loads(runtime.resources()[RESOURCE_ACL_RULES]) == [
            {"pattern": "a/#", "permissions": ["read", "write"], "description": "A"}
        ]
        # The topic store now follows the readable pattern.
        await wait_for(lambda: "a/#" in runtime.client.registry.granted)

        # Settings too are live, and removing the rule denies again.
        hass.config_entries.async_update_entry(
            entry,
            options={
                CONF_RULES: [],
                CONF_REQUIRE_ADMIN: True,
                CONF_INCLUDE_ASSIST: True,
            },
        )
        # Even before the update listener ran, the next call uses the new rules.
        result = await call(runtime, "mqtt_publish", topic="a/b", payload="x")
        assert not result.allowed
        await hass.async_block_till_done()
        assert runtime.require_admin
        assert runtime.include_assist_tools
        assert "a/#" not in runtime.client.registry.filters
        reload.assert_not_called()

    assert entry.runtime_data is runtime
    assert runtime.client.stats.connects == connects
    assert runtime.client.connected


async def test_data_change_reloads(hass: HomeAssistant, mosquitto: Mosquitto) -> None:
    entry = await setup_broker(hass, mosquitto.port)
    first: BrokerRuntime = entry.runtime_data
    hass.config_entries.async_update_entry(
        entry, data={**entry.data, "client_id_prefix": "renamed"}
    )
    await hass.async_block_till_done()
    await wait_for(
        lambda: (
            entry.state is ConfigEntryState.LOADED
            and entry.runtime_data is not first
            and entry.runtime_data.connected
        )
    )
    assert entry.runtime_data.client.client_id.startswith("renamed-")
    assert first.client.state is ClientState.STOPPED


async def test_unreadable_rules_deny_everything(
    hass: HomeAssistant, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    entry = await setup_broker(
        hass, mosquitto.port, options={CONF_RULES: [{"pattern": 1}]}
    )
    runtime: BrokerRuntime = entry.runtime_data
    assert runtime.acl.rules == ()
    assert "The stored topic rules cannot be read" in caplog.text
    result = await call(runtime, "mqtt_publish", topic="a", payload="x")
    assert not result.allowed


# -- connection ----------------------------------------------------------------------


async def test_rejected_credentials_start_reauth(
    hass: HomeAssistant, password_broker: Mosquitto
) -> None:
    entry = await setup_broker(
        hass, password_broker.port, connected=False, username="u", password="expired"
    )
    runtime: BrokerRuntime = entry.runtime_data

    def reauth_flows() -> list:
        return [
            flow
            for flow in hass.config_entries.flow.async_progress_by_handler(DOMAIN)
            if flow["context"]["source"] == SOURCE_REAUTH
        ]

    await wait_for(lambda: bool(reauth_flows()))
    assert runtime.client.state is ClientState.AUTH_FAILED
    assert state(hass, entry, "binary_sensor", "broker_connected") == STATE_OFF
    flow = reauth_flows()[0]
    assert flow["step_id"] == "broker_reauth"

    result = await hass.config_entries.flow.async_configure(
        flow["flow_id"], {"username": "u", "password": "p"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    await hass.async_block_till_done()
    await wait_for(
        lambda: (
            entry.state is ConfigEntryState.LOADED
            and entry.runtime_data is not runtime
            and entry.runtime_data.connected
        )
    )
    assert runtime.client.state is ClientState.STOPPED
    assert entry.runtime_data.settings.password == "p"


async def test_broker_restart(
    hass: HomeAssistant,
    private_mosquitto: Mosquitto,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection sensor follows the broker at once; the session comes back."""
    caplog.set_level(logging.INFO)
    entry = await setup_broker(hass, private_mosquitto.port, rules=READ_WRITE_A)
    runtime: BrokerRuntime = entry.runtime_data
    await hass.async_block_till_done()
    assert state(hass, entry, "binary_sensor", "broker_connected") == STATE_ON

    private_mosquitto.stop()
    await wait_for(lambda: not runtime.connected)
    await hass.async_block_till_done()
    assert state(hass, entry, "binary_sensor", "broker_connected") == STATE_OFF
    assert "is unavailable" in caplog.text
    result = await call(runtime, "mqtt_publish", topic="a/b", payload="x")
    assert result.is_error
    assert result.allowed

    private_mosquitto.start()
    await wait_for(lambda: runtime.connected, timeout=20)
    await hass.async_block_till_done()
    assert state(hass, entry, "binary_sensor", "broker_connected") == STATE_ON
    assert "is back" in caplog.text
    result = await call(runtime, "mqtt_publish", topic="a/b", payload="x")
    assert not result.is_error, result.text
    assert runtime.client.stats.connects == 2


async def test_unload_leaves_nothing_running(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    entry = await setup_broker(hass, mosquitto.port, rules=READ_WRITE_A)
    runtime: BrokerRuntime = entry.runtime_data
    await wait_for(lambda: "a/#" in runtime.client.registry.granted)
    await call(runtime, "mqtt_publish", topic="a/b", payload="x")

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert runtime.client.state is ClientState.STOPPED
    assert runtime.client.registry.filters == frozenset()
    # A late state report after the unload starts nothing.
    runtime._on_client_state(ClientState.AUTH_FAILED)
    await hass.async_block_till_done()
    assert hass.config_entries.flow.async_progress_by_handler(DOMAIN) == []
    assert hass.states.get("sensor.test_broker_tool_calls").state == "unavailable"


# -- diagnostics -------------------------------------------------------------------------


async def test_diagnostics_redacted(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    password_broker: Mosquitto,
) -> None:
    entry = await setup_broker(
        hass,
        password_broker.port,
        username="u",
        password="p",
        rules=[
            *READ_WRITE_A,
            {"pattern": "x/#/y", "permissions": ["read"], "description": "broken"},
        ],
    )
    runtime: BrokerRuntime = entry.runtime_data
    await call(runtime, "mqtt_publish", topic="a/b", payload="x")
    await call(runtime, "mqtt_publish", topic="z", payload="x")

    diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert diag["entry"]["entry_type"] == "mqtt_broker"
    assert diag["entry"]["data"]["username"] == REDACTED
    assert diag["entry"]["data"]["password"] == REDACTED
    broker = diag["broker"]
    assert "username" not in broker
    assert "password" not in broker
    assert broker["host"] == "127.0.0.1"
    assert broker["port"] == password_broker.port
    assert broker["state"] == "connected"
    assert broker["client_id"].startswith("test-bridge-")
    assert broker["stats"]["connects"] == 1
    # a/#: the tools' topic store; the other: MCP servers announced on the broker.
    assert broker["subscriptions"] == ["$mcp-server/presence/+/#", "a/#"]
    assert broker["task_failures"] == {}
    assert diag["acl"]["rules"] == [
        {"pattern": "a/#", "permissions": ["read", "write"], "description": "Test A"}
    ]
    assert diag["acl"]["invalid_rules"] == [
        {"pattern": "x/#/y", "problem": "invalid_wildcard"}
    ]
    tools = diag["tools"]
    assert tools["calls"] == 2
    assert tools["denied"] == 1
    assert tools["by_tool"] == {"mqtt_publish": 2}
    assert tools["engine_stats"]["published"] == 1
    assert diag["require_admin"] is False
    # The password is nowhere in the dump.
    assert '"p"' not in json.dumps(diag)


# -- logbook -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"tool": "mqtt_publish", "topic": "a/b", "allowed": True, "source": "mcp"},
            "Agent (mcp) called mqtt_publish on 'a/b': allowed",
        ),
        (
            {
                "tool": "mqtt_read",
                "topic": "$SYS/x",
                "allowed": False,
                "is_error": True,
                "source": "assist",
            },
            "Agent (assist) called mqtt_read on '$SYS/x': denied",
        ),
        (
            {
                "tool": "mqtt_query",
                "topic": "q",
                "allowed": True,
                "is_error": True,
                "source": "mcp",
            },
            "Agent (mcp) called mqtt_query on 'q': failed",
        ),
        (
            {"tool": "nope", "topic": None, "allowed": True, "source": "mcp"},
            "Agent (mcp) called nope: allowed",
        ),
    ],
)
def test_describe_tool_call(data: dict[str, Any], expected: str) -> None:
    assert describe_tool_call(data) == expected


async def test_logbook_names_the_broker(
    hass: HomeAssistant, device_registry: dr.DeviceRegistry
) -> None:
    described: dict[str, Any] = {}

    def register(domain: str, event_type: str, callback: Any) -> None:
        described[event_type] = (domain, callback)

    async_describe_events(hass, register)
    domain, describe = described[EVENT_TOOL_CALL]
    assert domain == DOMAIN

    entry = add_broker_entry(hass, 1883, title="Garage broker")
    device = device_registry.async_get_or_create(
        config_entry_id=entry.entry_id,
        identifiers={(DOMAIN, entry.entry_id)},
        name="Garage broker",
    )
    data = {
        "entry_id": entry.entry_id,
        "device_id": device.id,
        "tool": "mqtt_publish",
        "topic": "a/b",
        "allowed": False,
        "source": "mcp",
        "user_id": None,
        "duration_ms": 1.0,
        "is_error": True,
    }
    assert describe(Event(EVENT_TOOL_CALL, data)) == {
        logbook.LOGBOOK_ENTRY_NAME: "Garage broker",
        logbook.LOGBOOK_ENTRY_MESSAGE: "Agent (mcp) called mqtt_publish on 'a/b': denied",
    }
    device_registry.async_update_device(device.id, name_by_user="Shed")
    assert describe(Event(EVENT_TOOL_CALL, data))["name"] == "Shed"
    assert (
        describe(Event(EVENT_TOOL_CALL, {**data, "device_id": "gone"}))["name"]
        == "Garage broker"
    )
    assert "name" not in describe(
        Event(EVENT_TOOL_CALL, {**data, "device_id": None, "entry_id": "gone"})
    )
