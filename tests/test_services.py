"""The ``mqtt_bridge.send_text`` action against the node simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers.service import async_get_all_descriptions
from homeassistant.setup import async_setup_component
from meshtastic.protobuf import mesh_pb2, portnums_pb2
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge.const import DOMAIN
from devkit.meshsim import ChannelSpec, SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto, free_port
from tests.common import add_node_entry, wait_for

OTHER_NODE = 0x433E1F70
BROADCAST = 0xFFFFFFFF


@pytest.fixture
async def node(mosquitto: Mosquitto) -> AsyncIterator[SimulatedNode]:
    """A node with a primary channel and a secondary "Ops" channel (1)."""
    sim = SimulatedNode(
        default_profile(
            mqtt_address=f"127.0.0.1:{mosquitto.port}",
            channels=[
                ChannelSpec(),
                ChannelSpec(name="Ops", psk=bytes(range(16)), role="SECONDARY"),
            ],
        )
    )
    await sim.start_tcp()
    yield sim
    await sim.stop()


async def setup_entry(hass: HomeAssistant, port: int) -> MockConfigEntry:
    """Set up an entry for a node on ``port`` (it may not be listening)."""
    entry = add_node_entry(hass, port)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    return entry


@pytest.fixture
async def loaded(hass: HomeAssistant, node: SimulatedNode) -> MockConfigEntry:
    """A loaded entry whose node is connected."""
    entry = await setup_entry(hass, node.port)
    runtime = entry.runtime_data
    # Also wait for the broker session: unloading while aiomqtt is still
    # connecting leaves its misc task behind (engine/broker.py).
    await wait_for(lambda: runtime.available and runtime.proxy.broker_connected)
    return entry


async def send(hass: HomeAssistant, entry_id: str, **data: Any) -> None:
    """Call the action and wait for it to finish."""
    await hass.services.async_call(
        DOMAIN,
        "send_text",
        {"config_entry_id": entry_id, **data},
        blocking=True,
    )


def text_packets(node: SimulatedNode) -> list[mesh_pb2.MeshPacket]:
    """The text packets the client wrote to the node."""
    return [
        p
        for p in node.sent_packets
        if p.decoded.portnum == portnums_pb2.PortNum.TEXT_MESSAGE_APP
    ]


async def test_broadcast(
    hass: HomeAssistant, node: SimulatedNode, loaded: MockConfigEntry
) -> None:
    """Without destination the text is broadcast on channel 0, without ACK request."""
    await send(hass, loaded.entry_id, text="Hello mesh 👋")
    await wait_for(lambda: bool(text_packets(node)))
    (packet,) = text_packets(node)
    assert packet.to == BROADCAST
    assert packet.channel == 0
    assert packet.decoded.payload == "Hello mesh 👋".encode()
    assert not packet.want_ack
    assert packet.id != 0


@pytest.mark.parametrize(
    "destination", ["!433e1f70", "0x433E1F70", "433e1f70", str(OTHER_NODE)]
)
async def test_direct_message_on_channel(
    hass: HomeAssistant,
    node: SimulatedNode,
    loaded: MockConfigEntry,
    destination: str,
) -> None:
    """A destination in any node id form gets a direct message on the chosen channel."""
    await send(hass, loaded.entry_id, text="DM", channel=1, destination=destination)
    await wait_for(lambda: bool(text_packets(node)))
    (packet,) = text_packets(node)
    assert packet.to == OTHER_NODE
    assert packet.channel == 1
    assert packet.want_ack
    assert packet.decoded.payload == b"DM"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"text": "é" * 117}, "invalid_text_length"),  # 234 bytes
        ({"text": ""}, "invalid_text_length"),
        ({"text": "hi", "destination": "!zz"}, "invalid_destination"),
        ({"text": "hi", "destination": "99999999999"}, "invalid_destination"),
        ({"text": "hi", "channel": 9}, "invalid_channel"),
        ({"text": "hi", "channel": -1}, "invalid_channel"),
        ({"text": "hi", "channel": 2}, "channel_disabled"),
    ],
)
async def test_invalid_input(
    hass: HomeAssistant,
    node: SimulatedNode,
    loaded: MockConfigEntry,
    data: dict[str, Any],
    key: str,
) -> None:
    """Bad input raises a translated ServiceValidationError and sends nothing."""
    with pytest.raises(ServiceValidationError) as err:
        await send(hass, loaded.entry_id, **data)
    assert err.value.translation_domain == DOMAIN
    assert err.value.translation_key == key
    await asyncio.sleep(0.05)
    assert not text_packets(node)


async def test_longest_text_is_accepted(
    hass: HomeAssistant, node: SimulatedNode, loaded: MockConfigEntry
) -> None:
    """233 UTF-8 bytes is the limit, inclusive."""
    text = "é" * 116 + "x"  # 233 bytes
    await send(hass, loaded.entry_id, text=text)
    await wait_for(lambda: bool(text_packets(node)))
    assert text_packets(node)[0].decoded.payload == text.encode()


async def test_unknown_or_unloaded_entry(hass: HomeAssistant) -> None:
    """The entry must exist, belong to this integration and be loaded."""
    assert await async_setup_component(hass, DOMAIN, {})
    other = MockConfigEntry(domain="other_domain")
    other.add_to_hass(hass)
    idle = MockConfigEntry(domain=DOMAIN, unique_id="1")
    idle.add_to_hass(hass)  # added after setup: not loaded

    for entry_id, key in (
        ("does-not-exist", "entry_not_found"),
        (other.entry_id, "entry_not_found"),
        (idle.entry_id, "entry_not_loaded"),
    ):
        with pytest.raises(ServiceValidationError) as err:
            await send(hass, entry_id, text="hi")
        assert err.value.translation_key == key


async def test_node_not_connected(hass: HomeAssistant) -> None:
    """A loaded entry whose node is unreachable raises a translated error."""
    entry = await setup_entry(hass, free_port())
    assert not entry.runtime_data.available
    with pytest.raises(HomeAssistantError) as err:
        await send(hass, entry.entry_id, text="hi")
    assert not isinstance(err.value, ServiceValidationError)
    assert err.value.translation_key == "node_not_connected"
    assert err.value.translation_placeholders == {"name": "Sim Node"}
    assert str(err.value) == "The Meshtastic node Sim Node is not connected"


async def test_node_gone_after_start(
    hass: HomeAssistant, node: SimulatedNode, loaded: MockConfigEntry
) -> None:
    """After the node disconnects the action fails instead of queueing."""
    await node.stop()
    await wait_for(lambda: not loaded.runtime_data.available)
    with pytest.raises(HomeAssistantError) as err:
        await send(hass, loaded.entry_id, text="hi")
    assert err.value.translation_key == "node_not_connected"


async def test_node_rejects_packet(
    hass: HomeAssistant,
    node: SimulatedNode,
    loaded: MockConfigEntry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A QueueStatus with a non-zero result becomes a translated error."""

    def full_queue(res: int = 0, packet_id: int = 0) -> mesh_pb2.QueueStatus:
        return mesh_pb2.QueueStatus(res=32, free=0, maxlen=16, mesh_packet_id=packet_id)

    # The simulator's Router::getQueueStatus: make its TX queue report "full".
    monkeypatch.setattr(node, "_queue_status", full_queue)
    with pytest.raises(HomeAssistantError) as err:
        await send(hass, loaded.entry_id, text="hi", destination="!433e1f70")
    assert err.value.translation_key == "send_rejected"
    assert err.value.translation_placeholders == {
        "name": "Sim Node",
        "result": "32",
        "destination": "!433e1f70",
    }
    assert len(text_packets(node)) == 1


async def test_action_description(hass: HomeAssistant) -> None:
    """services.yaml and the translations describe the action for the UI."""
    assert await async_setup_component(hass, DOMAIN, {})
    descriptions = await async_get_all_descriptions(hass)
    action = descriptions[DOMAIN]["send_text"]
    assert action["name"] == "Send text"
    fields = action["fields"]
    assert set(fields) == {
        "config_entry_id",
        "device_id",
        "text",
        "channel",
        "destination",
    }
    # Either target, so neither is required by the UI (the handler checks).
    assert fields["config_entry_id"]["required"] is False
    assert fields["config_entry_id"]["selector"] == {
        "config_entry": {"integration": DOMAIN}
    }
    assert fields["device_id"]["required"] is False
    assert fields["device_id"]["selector"] == {"device": {"integration": DOMAIN}}
    assert fields["device_id"]["name"] == "Device"
    assert fields["text"]["selector"] == {"text": {"multiline": True}}
    assert fields["channel"]["selector"]["number"]["max"] == 7
    assert fields["destination"]["name"] == "Destination"


async def call(hass: HomeAssistant, **data: Any) -> None:
    """Call the action with exactly the given data."""
    await hass.services.async_call(DOMAIN, "send_text", data, blocking=True)


def node_device_id(hass: HomeAssistant, entry: MockConfigEntry) -> str:
    """Return the id of the entry's node device."""
    (device,) = dr.async_entries_for_config_entry(dr.async_get(hass), entry.entry_id)
    return device.id


async def test_send_by_device(
    hass: HomeAssistant, node: SimulatedNode, loaded: MockConfigEntry
) -> None:
    """The node's device works as the target instead of the entry."""
    await call(
        hass,
        device_id=node_device_id(hass, loaded),
        text="via device",
        destination="!433e1f70",
    )
    await wait_for(lambda: bool(text_packets(node)))
    (packet,) = text_packets(node)
    assert packet.decoded.payload == b"via device"
    assert packet.to == OTHER_NODE


async def test_target_must_be_exactly_one(
    hass: HomeAssistant, node: SimulatedNode, loaded: MockConfigEntry
) -> None:
    """Both or neither of config_entry_id and device_id: translated errors."""
    device_id = node_device_id(hass, loaded)
    for data, key in (
        ({}, "missing_target"),
        ({"config_entry_id": "", "device_id": ""}, "missing_target"),
        (
            {"config_entry_id": loaded.entry_id, "device_id": device_id},
            "conflicting_target",
        ),
    ):
        with pytest.raises(ServiceValidationError) as err:
            await call(hass, text="hi", **data)
        assert err.value.translation_domain == DOMAIN
        assert err.value.translation_key == key
    await asyncio.sleep(0.05)
    assert not text_packets(node)


async def test_unknown_device(hass: HomeAssistant, loaded: MockConfigEntry) -> None:
    """A device id that is not one of this integration's nodes is refused."""
    other = MockConfigEntry(domain="other_domain")
    other.add_to_hass(hass)
    foreign = dr.async_get(hass).async_get_or_create(
        config_entry_id=other.entry_id, identifiers={("other_domain", "x")}
    )
    for device_id in ("does-not-exist", foreign.id):
        with pytest.raises(ServiceValidationError) as err:
            await call(hass, device_id=device_id, text="hi")
        assert err.value.translation_key == "device_not_found"
        assert err.value.translation_placeholders == {"device_id": device_id}


async def test_device_of_unloaded_entry(
    hass: HomeAssistant, loaded: MockConfigEntry
) -> None:
    device_id = node_device_id(hass, loaded)
    assert await hass.config_entries.async_unload(loaded.entry_id)
    with pytest.raises(ServiceValidationError) as err:
        await call(hass, device_id=device_id, text="hi")
    assert err.value.translation_key == "entry_not_loaded"
