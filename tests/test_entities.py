"""Entity platforms against the node simulator and a real Mosquitto.

Rate-limited state writes are flushed with ``async_fire_time_changed`` instead
of sleeping through ``UPDATE_THROTTLE``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
import json
from pathlib import Path

import aiomqtt
from homeassistant.components.binary_sensor import BinarySensorDeviceClass
from homeassistant.components.sensor import SensorDeviceClass
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import (
    EVENT_STATE_CHANGED,
    PERCENTAGE,
    STATE_OFF,
    STATE_ON,
    STATE_UNAVAILABLE,
    STATE_UNKNOWN,
    EntityCategory,
    UnitOfElectricPotential,
)
from homeassistant.core import HomeAssistant
from homeassistant.helpers import (
    device_registry as dr,
    entity_registry as er,
    issue_registry as ir,
    translation,
)
from homeassistant.util import dt as dt_util
from meshtastic.protobuf import mesh_pb2, mqtt_pb2, portnums_pb2
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    async_capture_events,
    async_fire_time_changed,
)

from custom_components.mqtt_bridge import entity as entity_module
from custom_components.mqtt_bridge.const import DOMAIN, UPDATE_THROTTLE
from custom_components.mqtt_bridge.engine.proxy import ProxyStatus
from custom_components.mqtt_bridge.sensor import SENSORS
from devkit.meshsim import SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto, free_port
from tests.common import NODE_NUM, add_node_entry, wait_for

UNIQUE_ID = str(NODE_NUM)
OTHER_NODE = 0x433E1F70  # "Alpine Hut" in the simulator's default node list
UPLINK_TOPIC = "msh/2/e/LongFast/!1a2b3c4d"

DIAG = EntityCategory.DIAGNOSTIC
# platform, key, device class, unit, entity category, enabled by default
EXPECTED = [
    (
        "binary_sensor",
        "node_connected",
        BinarySensorDeviceClass.CONNECTIVITY,
        None,
        DIAG,
        True,
    ),
    (
        "binary_sensor",
        "broker_connected",
        BinarySensorDeviceClass.CONNECTIVITY,
        None,
        DIAG,
        True,
    ),
    ("sensor", "uplink_messages", None, "messages", None, True),
    ("sensor", "downlink_messages", None, "messages", None, True),
    ("sensor", "dropped_messages", None, "messages", None, True),
    ("sensor", "uplink_queue", None, "messages", DIAG, False),
    ("sensor", "last_uplink", SensorDeviceClass.TIMESTAMP, None, None, False),
    ("sensor", "last_downlink", SensorDeviceClass.TIMESTAMP, None, None, False),
    ("sensor", "battery_level", SensorDeviceClass.BATTERY, PERCENTAGE, None, True),
    (
        "sensor",
        "voltage",
        SensorDeviceClass.VOLTAGE,
        UnitOfElectricPotential.VOLT,
        DIAG,
        True,
    ),
    ("sensor", "channel_utilization", None, PERCENTAGE, DIAG, True),
    ("sensor", "air_util_tx", None, PERCENTAGE, DIAG, False),
    ("sensor", "proxy_status", SensorDeviceClass.ENUM, None, DIAG, True),
    ("event", "messages", None, None, None, True),
]


def flush_updates(hass: HomeAssistant) -> None:
    """Fire the runtime's rate-limit timer instead of sleeping through it."""
    async_fire_time_changed(
        hass, dt_util.utcnow() + timedelta(seconds=UPDATE_THROTTLE + 1)
    )


async def setup_entry(
    hass: HomeAssistant,
    node: SimulatedNode,
    *,
    enable: tuple[str, ...] = (),
    title: str = "Sim Node",
) -> MockConfigEntry:
    """Set up an entry for ``node``, enabling the given disabled-by-default sensors."""
    entry = add_node_entry(hass, node.port, title=title)
    registry = er.async_get(hass)
    for key in enable:
        registry.async_get_or_create(
            "sensor",
            DOMAIN,
            f"{UNIQUE_ID}_{key}",
            config_entry=entry,
            suggested_object_id=f"sim_node_{key}",
        )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    runtime = entry.runtime_data
    # Also wait for the broker session: unloading while aiomqtt is still
    # connecting leaves its misc task behind (engine/broker.py, see report).
    await wait_for(lambda: runtime.available and runtime.proxy.broker_connected)
    return entry


def entity_id(hass: HomeAssistant, platform: str, key: str) -> str:
    """Return the entity id of one of the entry's entities."""
    found = er.async_get(hass).async_get_entity_id(
        platform, DOMAIN, f"{UNIQUE_ID}_{key}"
    )
    assert found is not None, key
    return found


def state(hass: HomeAssistant, platform: str, key: str) -> str:
    """Return the state string of one of the entry's entities."""
    current = hass.states.get(entity_id(hass, platform, key))
    assert current is not None, key
    return current.state


async def test_device_and_entity_registry(
    hass: HomeAssistant,
    node: SimulatedNode,
    entity_registry: er.EntityRegistry,
    device_registry: dr.DeviceRegistry,
) -> None:
    """The node becomes a device with every entity, classes and flags as designed."""
    entry = await setup_entry(hass, node)

    device = device_registry.async_get_device(identifiers={(DOMAIN, UNIQUE_ID)})
    assert device is not None
    assert device.name == "Sim Node"
    assert device.manufacturer == "Meshtastic"
    assert device.model == "TBEAM"
    assert device.sw_version == "2.7.15.567b8ea"
    assert device.serial_number == "!1a2b3c4d"

    entries = er.async_entries_for_config_entry(entity_registry, entry.entry_id)
    assert {(e.domain, e.unique_id) for e in entries} == {
        (platform, f"{UNIQUE_ID}_{key}") for platform, key, *_ in EXPECTED
    }
    for platform, key, device_class, unit, category, enabled in EXPECTED:
        reg = entity_registry.async_get(entity_id(hass, platform, key))
        assert reg is not None
        assert reg.device_id == device.id
        assert reg.original_device_class == device_class, key
        assert reg.unit_of_measurement == unit, key
        assert reg.entity_category == category, key
        assert (reg.disabled_by is None) is enabled, key
        assert reg.translation_key == key
        # Names come from translations/en.json (has_entity_name + device name).
        if enabled:
            assert reg.entity_id.startswith(f"{platform}.sim_node_"), reg.entity_id
    assert entity_id(hass, "sensor", "uplink_messages") == (
        "sensor.sim_node_uplink_messages"
    )
    assert entity_id(hass, "binary_sensor", "node_connected") == (
        "binary_sensor.sim_node_node_connection"
    )

    status = hass.states.get(entity_id(hass, "sensor", "proxy_status"))
    assert status is not None
    assert status.attributes["options"] == [status.value for status in ProxyStatus]
    assert {
        "waiting_for_node",
        "node_settings_missing",
        "invalid_broker_address",
        "running",
        "broker_auth_failed",
    } <= set(status.attributes["options"])
    # Every state the engine can report is translated and has an icon.
    strings = await translation.async_get_translations(hass, "en", "entity", [DOMAIN])
    icons = json.loads(
        (Path(entity_module.__file__).parent / "icons.json").read_text(encoding="utf-8")
    )
    for option in status.attributes["options"]:
        key = f"component.{DOMAIN}.entity.sensor.proxy_status.state.{option}"
        assert strings[key], option
        assert icons["entity"]["sensor"]["proxy_status"]["state"][option], option


async def test_reload_keeps_node_device_info(
    hass: HomeAssistant, node: SimulatedNode, device_registry: dr.DeviceRegistry
) -> None:
    """Entities added before a handshake never overwrite what the node reported."""
    entry = await setup_entry(hass, node, title="Gateway")
    device = device_registry.async_get_device(identifiers={(DOMAIN, UNIQUE_ID)})
    assert device is not None
    assert device.name == "Sim Node"
    assert entity_id(hass, "sensor", "uplink_messages") == (
        "sensor.gateway_uplink_messages"
    )

    assert await hass.config_entries.async_unload(entry.entry_id)
    await node.stop()
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert not entry.runtime_data.available
    device = device_registry.async_get_device(identifiers={(DOMAIN, UNIQUE_ID)})
    assert device is not None
    assert device.name == "Sim Node"
    assert device.model == "TBEAM"
    assert device.manufacturer == "Meshtastic"
    assert state(hass, "sensor", "uplink_messages") == STATE_UNAVAILABLE
    assert state(hass, "binary_sensor", "node_connected") == STATE_OFF


async def test_states_after_handshake(hass: HomeAssistant, node: SimulatedNode) -> None:
    """Connectivity, proxy status and handshake metrics are shown once flushed."""
    await setup_entry(hass, node)
    flush_updates(hass)
    await hass.async_block_till_done()

    assert state(hass, "binary_sensor", "node_connected") == STATE_ON
    assert state(hass, "binary_sensor", "broker_connected") == STATE_ON
    assert state(hass, "sensor", "proxy_status") == "running"
    assert state(hass, "sensor", "uplink_messages") == "0"
    assert state(hass, "sensor", "dropped_messages") == "0"
    battery = hass.states.get(entity_id(hass, "sensor", "battery_level"))
    assert battery is not None
    assert battery.state == "87"
    assert battery.attributes["external_power"] is False
    assert float(state(hass, "sensor", "voltage")) == pytest.approx(4.01)
    assert float(state(hass, "sensor", "channel_utilization")) == pytest.approx(12.5)
    event = hass.states.get(entity_id(hass, "event", "messages"))
    assert event is not None
    assert event.state == STATE_UNKNOWN
    assert event.attributes["event_types"] == ["text_message"]


async def test_counters_are_rate_limited(
    hass: HomeAssistant, node: SimulatedNode, mosquitto: Mosquitto
) -> None:
    """50 uplinks move the counter, with at most one state write per window."""
    entry = await setup_entry(
        hass, node, enable=("last_uplink", "last_downlink", "uplink_queue")
    )
    runtime = entry.runtime_data
    flush_updates(hass)
    await hass.async_block_till_done()
    uplinks_id = entity_id(hass, "sensor", "uplink_messages")
    assert state(hass, "sensor", "uplink_messages") == "0"
    assert state(hass, "sensor", "last_uplink") == STATE_UNKNOWN
    assert state(hass, "sensor", "uplink_queue") == "0"

    events = async_capture_events(hass, EVENT_STATE_CHANGED)

    def writes() -> int:
        return sum(1 for e in events if e.data["entity_id"] == uplinks_id)

    for index in range(50):
        node.inject_uplink(UPLINK_TOPIC, data=f"uplink {index}".encode())
    await wait_for(lambda: runtime.proxy.stats.uplink_messages == 50)
    await hass.async_block_till_done()
    # Nothing (or one flush if the 2 s window elapsed) while 50 messages flowed.
    assert writes() <= 1

    flush_updates(hass)
    await hass.async_block_till_done()
    assert state(hass, "sensor", "uplink_messages") == "50"
    assert 1 <= writes() <= 2
    last = dt_util.parse_datetime(state(hass, "sensor", "last_uplink"))
    assert isinstance(last, datetime)
    assert abs((dt_util.utcnow() - last).total_seconds()) < 30

    # A drop is counted with its reason as an attribute.
    node.inject_uplink("msh/2/e/+/bad", data=b"x")
    await wait_for(lambda: runtime.proxy.stats.dropped_total == 1)
    flush_updates(hass)
    await hass.async_block_till_done()
    dropped = hass.states.get(entity_id(hass, "sensor", "dropped_messages"))
    assert dropped is not None
    assert dropped.state == "1"
    assert dropped.attributes["uplink_invalid_topic"] == 1

    # A downlink from another gateway reaches the node and is counted.
    packet = mesh_pb2.MeshPacket(to=0xFFFFFFFF, id=1234, channel=8)
    setattr(packet, "from", OTHER_NODE)
    packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
    packet.decoded.payload = b"from the broker"
    envelope = mqtt_pb2.ServiceEnvelope(
        packet=packet, channel_id="LongFast", gateway_id="!433e1f70"
    ).SerializeToString()
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        for _ in range(25):  # the proxy's SUBSCRIBE may still be in flight
            await client.publish("msh/2/e/LongFast/!433e1f70", envelope, qos=1)
            try:
                await wait_for(lambda: bool(node.downlinks), timeout=0.2)
                break
            except TimeoutError:
                continue
    assert node.downlinks
    await wait_for(lambda: runtime.proxy.stats.downlink_messages >= 1)
    flush_updates(hass)
    await hass.async_block_till_done()
    assert int(state(hass, "sensor", "downlink_messages")) >= 1
    assert state(hass, "sensor", "last_downlink") not in (
        STATE_UNKNOWN,
        STATE_UNAVAILABLE,
    )


async def test_metrics_after_telemetry(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """Device telemetry updates battery, voltage and air time; 101 % is external power."""
    entry = await setup_entry(hass, node, enable=("air_util_tx",))
    runtime = entry.runtime_data
    node.profile.battery_level = 101
    node.profile.voltage = 4.2
    node.profile.channel_utilization = 20.25
    node.profile.air_util_tx = 5.5
    node.send_telemetry(uplink=False)
    await wait_for(
        lambda: (
            runtime.link.metrics is not None
            and runtime.link.metrics.battery_level == 101
        )
    )
    await hass.async_block_till_done()
    # Not written before the throttle window ends.
    assert state(hass, "sensor", "battery_level") != "100"

    flush_updates(hass)
    await hass.async_block_till_done()
    battery = hass.states.get(entity_id(hass, "sensor", "battery_level"))
    assert battery is not None
    assert battery.state == "100"
    assert battery.attributes["external_power"] is True
    assert float(state(hass, "sensor", "voltage")) == pytest.approx(4.2)
    assert float(state(hass, "sensor", "channel_utilization")) == pytest.approx(20.25)
    assert float(state(hass, "sensor", "air_util_tx")) == pytest.approx(5.5)


async def test_unavailable_and_back(hass: HomeAssistant, node: SimulatedNode) -> None:
    """Entities go unavailable when the node goes away and return when it is back."""
    entry = await setup_entry(hass, node)
    runtime = entry.runtime_data
    runtime.link.backoff.base = 0.02
    runtime.link.backoff.cap = 0.05
    flush_updates(hass)
    await hass.async_block_till_done()
    assert state(hass, "sensor", "battery_level") == "87"

    port = node.port
    await node.stop()
    await wait_for(lambda: not runtime.available)
    await hass.async_block_till_done()
    # Written at once, not after the throttle window.
    assert state(hass, "sensor", "battery_level") == STATE_UNAVAILABLE
    assert state(hass, "sensor", "uplink_messages") == STATE_UNAVAILABLE
    assert state(hass, "binary_sensor", "broker_connected") == STATE_UNAVAILABLE
    assert state(hass, "event", "messages") == STATE_UNAVAILABLE
    # The availability indicator itself stays available.
    assert state(hass, "binary_sensor", "node_connected") == STATE_OFF
    assert state(hass, "sensor", "proxy_status") == "waiting_for_node"

    await node.start_tcp(port=port)
    await wait_for(lambda: runtime.available)
    await hass.async_block_till_done()
    assert state(hass, "binary_sensor", "node_connected") == STATE_ON
    assert state(hass, "sensor", "battery_level") == "87"
    assert state(hass, "sensor", "uplink_messages") == "0"
    assert state(hass, "event", "messages") == STATE_UNKNOWN


async def test_event_entity_fires_on_text(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """A received text fires ``text_message`` at once, with sender and radio data."""
    await setup_entry(hass, node)
    event_id = entity_id(hass, "event", "messages")
    events = async_capture_events(hass, EVENT_STATE_CHANGED)

    node.receive_text(OTHER_NODE, "Hello HA", channel_index=0, snr=6.25, rssi=-80)
    # Immediate: well inside the 2 s throttle window of the other entities.
    await wait_for(lambda: hass.states.get(event_id).state != STATE_UNKNOWN, 1.0)
    event = hass.states.get(event_id)
    assert event is not None
    assert dt_util.parse_datetime(event.state) is not None
    attrs = event.attributes
    assert attrs["event_type"] == "text_message"
    assert attrs["sender_id"] == "!433e1f70"
    assert attrs["sender_name"] == "Alpine Hut"
    assert attrs["channel"] == 0
    assert attrs["channel_name"] == "LongFast"
    assert attrs["destination"] == "^all"
    assert attrs["text"] == "Hello HA"
    assert attrs["snr"] == pytest.approx(6.25)
    assert attrs["rssi"] == -80
    assert attrs["via_mqtt"] is False

    node.receive_text(OTHER_NODE, "Just for you", to=NODE_NUM)
    await wait_for(
        lambda: hass.states.get(event_id).attributes.get("text") == "Just for you",
        1.0,
    )
    assert hass.states.get(event_id).attributes["destination"] == "!1a2b3c4d"
    assert sum(1 for e in events if e.data["entity_id"] == event_id) == 2


async def test_unload_stops_everything(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """Unloading the entry closes the node link and the broker session."""
    entry = await setup_entry(hass, node)
    runtime = entry.runtime_data

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert runtime.link.state == "stopped"
    assert runtime.proxy.broker is None or runtime.proxy.broker.state == "stopped"
    await node.wait_for(lambda: not node.client_connected)
    assert state(hass, "sensor", "uplink_messages") == STATE_UNAVAILABLE


async def test_node_settings_missing(
    hass: HomeAssistant, mosquitto: Mosquitto, issue_registry: ir.IssueRegistry
) -> None:
    """Proxy status shows missing node settings; the repair text renders."""
    sim = SimulatedNode(
        default_profile(
            mqtt_address=f"127.0.0.1:{mosquitto.port}", proxy_to_client_enabled=False
        )
    )
    await sim.start_tcp()
    try:
        entry = add_node_entry(hass, sim.port)
        assert await hass.config_entries.async_setup(entry.entry_id)
        runtime = entry.runtime_data
        await wait_for(
            lambda: (
                runtime.available and runtime.proxy.status == "node_settings_missing"
            )
        )
        flush_updates(hass)
        await hass.async_block_till_done()
        assert state(hass, "sensor", "proxy_status") == "node_settings_missing"
        assert state(hass, "binary_sensor", "broker_connected") == STATE_OFF

        # One issue per setting that is off: only "Proxy to client" here.
        assert (
            issue_registry.async_get_issue(
                DOMAIN, f"node_mqtt_disabled_{entry.entry_id}"
            )
            is None
        )
        issue = issue_registry.async_get_issue(
            DOMAIN, f"node_proxy_to_client_disabled_{entry.entry_id}"
        )
        assert issue is not None
        assert issue.translation_placeholders == {"name": "Sim Node"}
        strings = await translation.async_get_translations(
            hass, "en", "issues", [DOMAIN]
        )
        prefix = f"component.{DOMAIN}.issues.node_proxy_to_client_disabled"
        description = strings[f"{prefix}.description"].format(
            **issue.translation_placeholders
        )
        assert "Proxy to client enabled" in description
        assert "proxy_to_client_enabled" not in description
        title = strings[f"{prefix}.title"].format(**issue.translation_placeholders)
        assert title.startswith("Sim Node: ")
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await sim.stop()


async def test_metrics_not_reported(hass: HomeAssistant) -> None:
    """Before the node reports device metrics the metric sensors have no value."""
    entry = add_node_entry(hass, free_port())
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    runtime = entry.runtime_data
    assert runtime.link.metrics is None
    by_key = {description.key: description for description in SENSORS}
    for key in ("battery_level", "voltage", "channel_utilization", "air_util_tx"):
        assert by_key[key].value_fn(runtime) is None, key
    assert by_key["battery_level"].attributes_fn(runtime) is None
    assert by_key["uplink_messages"].attributes_fn(runtime) is None
