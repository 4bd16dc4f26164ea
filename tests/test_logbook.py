"""The logbook says who said what on which channel, under the Messages entity.

End to end: a text message from the node simulator becomes the bus event
``mqtt_bridge_text_message``, the recorder stores it, and ``logbook/get_events``
(filtered by the event entity, as its logbook card does) returns the described
entry. The describe callback is also checked on its own for the text variants.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from homeassistant.components import logbook
from homeassistant.components.recorder import Recorder
from homeassistant.core import Event, HomeAssistant
from homeassistant.helpers import device_registry as dr, entity_registry as er
from homeassistant.setup import async_setup_component
from homeassistant.util import dt as dt_util
import pytest
from pytest_homeassistant_custom_component.common import async_capture_events
from pytest_homeassistant_custom_component.components.recorder.common import (
    async_wait_recording_done,
)
from pytest_homeassistant_custom_component.typing import WebSocketGenerator

from custom_components.mqtt_bridge.const import DOMAIN, EVENT_TEXT_MESSAGE
from custom_components.mqtt_bridge.logbook import (
    async_describe_events,
    describe_text_message,
)
from devkit.meshsim import SimulatedNode
from tests.common import NODE_NUM, add_node_entry, wait_for


@pytest.fixture(autouse=True)
def _custom_integrations(
    recorder_db_url: str, enable_custom_integrations: None
) -> None:
    """Override conftest's: the recorder's database must be prepared before hass."""


OTHER_NODE = 0x433E1F70  # "Alpine Hut" in the simulator's default node list
UNKNOWN_NODE = 0x0BADCAFE  # not in the node's database


def _messages_entity_id(hass: HomeAssistant) -> str:
    found = er.async_get(hass).async_get_entity_id(
        "event", DOMAIN, f"{NODE_NUM}_messages"
    )
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {
                "sender_id": "!cafe0001",
                "sender_name": "Alice",
                "channel": 0,
                "channel_name": "LongFast",
                "destination": "^all",
                "text": "hello",
            },
            "Alice (!cafe0001) on LongFast: “hello”",
        ),
        (
            {
                "sender_id": "!cafe0001",
                "sender_name": None,
                "channel": 3,
                "channel_name": None,
                "destination": "^all",
                "text": "hi",
            },
            "!cafe0001 on 3: “hi”",
        ),
        (
            {
                "sender_id": "!cafe0001",
                "sender_name": "Alice",
                "channel": 0,
                "channel_name": "LongFast",
                "destination": "!1a2b3c4d",
                "text": "just you",
            },
            "Alice (!cafe0001) to !1a2b3c4d: “just you”",
        ),
    ],
)
def test_describe_text_message(data: dict[str, Any], expected: str) -> None:
    assert describe_text_message(data) == expected


async def test_text_messages_in_the_logbook(
    recorder_mock: Recorder,
    hass: HomeAssistant,
    hass_ws_client: WebSocketGenerator,
    node: SimulatedNode,
) -> None:
    assert await async_setup_component(hass, "logbook", {})
    entry = add_node_entry(hass, node.port)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    runtime = entry.runtime_data
    await wait_for(lambda: runtime.available and runtime.proxy.broker_connected)
    events = async_capture_events(hass, EVENT_TEXT_MESSAGE)
    start = dt_util.utcnow()

    node.receive_text(OTHER_NODE, "Hello HA", channel_index=0)
    node.receive_text(UNKNOWN_NODE, "Just for you", to=NODE_NUM)
    await wait_for(lambda: len(events) == 2)

    # The bus event: the event entity's attributes plus the entry, device, entity.
    messages_id = _messages_entity_id(hass)
    (device,) = dr.async_entries_for_config_entry(dr.async_get(hass), entry.entry_id)
    first = events[0].data
    assert first["config_entry_id"] == entry.entry_id
    assert first["device_id"] == device.id
    assert first["entity_id"] == messages_id
    attributes = hass.states.get(messages_id).attributes
    for key in (
        "sender_id",
        "sender_name",
        "channel",
        "channel_name",
        "destination",
        "text",
        "snr",
        "rssi",
        "via_mqtt",
        "packet_id",
    ):
        assert key in first, key
    assert events[1].data["text"] == attributes["text"] == "Just for you"

    await async_wait_recording_done(hass)
    client = await hass_ws_client(hass)
    await client.send_json_auto_id(
        {
            "type": "logbook/get_events",
            "start_time": (start - timedelta(seconds=1)).isoformat(),
            "end_time": (dt_util.utcnow() + timedelta(seconds=1)).isoformat(),
            "entity_ids": [messages_id],
        }
    )
    response = await client.receive_json()
    assert response["success"], response
    described = [row for row in response["result"] if row.get("domain") == DOMAIN]
    assert [row["message"] for row in described] == [
        "Alpine Hut (!433e1f70) on LongFast: “Hello HA”",
        "!0badcafe to !1a2b3c4d: “Just for you”",
    ]
    for row in described:
        assert row["name"] == "Sim Node"
        assert row["entity_id"] == messages_id

    # Listed under the node's device too.
    await client.send_json_auto_id(
        {
            "type": "logbook/get_events",
            "start_time": (start - timedelta(seconds=1)).isoformat(),
            "device_ids": [device.id],
        }
    )
    response = await client.receive_json()
    assert response["success"], response
    assert sum(1 for row in response["result"] if row.get("domain") == DOMAIN) == 2
    assert await hass.config_entries.async_unload(entry.entry_id)


async def test_describe_callback_names(hass: HomeAssistant) -> None:
    """The name is the device's (as renamed by the user), else the entry title."""
    described: dict[str, Any] = {}

    def register(domain: str, event_type: str, callback: Any) -> None:
        described[event_type] = (domain, callback)

    async_describe_events(hass, register)
    domain, describe = described[EVENT_TEXT_MESSAGE]
    assert domain == DOMAIN

    entry = add_node_entry(hass, 1)
    registry = dr.async_get(hass)
    device = registry.async_get_or_create(
        config_entry_id=entry.entry_id, identifiers={(DOMAIN, "x")}, name="Node X"
    )
    data = {
        "sender_id": "!cafe0001",
        "sender_name": "Alice",
        "channel": 0,
        "channel_name": "LongFast",
        "destination": "^all",
        "text": "hello",
        "config_entry_id": entry.entry_id,
        "device_id": device.id,
        "entity_id": "event.node_x_messages",
    }
    assert describe(Event(EVENT_TEXT_MESSAGE, data)) == {
        logbook.LOGBOOK_ENTRY_NAME: "Node X",
        logbook.LOGBOOK_ENTRY_MESSAGE: "Alice (!cafe0001) on LongFast: “hello”",
        logbook.LOGBOOK_ENTRY_ENTITY_ID: "event.node_x_messages",
    }
    registry.async_update_device(device.id, name_by_user="Roof node")
    assert describe(Event(EVENT_TEXT_MESSAGE, data))["name"] == "Roof node"
    # Without a known device: the entry title; without both: no name, no entity.
    assert (
        describe(Event(EVENT_TEXT_MESSAGE, {**data, "device_id": "gone"}))["name"]
        == "Sim Node"
    )
    bare = {k: v for k, v in data.items() if k not in ("device_id", "entity_id")}
    bare["config_entry_id"] = "gone"
    assert describe(Event(EVENT_TEXT_MESSAGE, bare)) == {
        logbook.LOGBOOK_ENTRY_MESSAGE: "Alice (!cafe0001) on LongFast: “hello”"
    }
