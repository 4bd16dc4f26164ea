"""Config entry diagnostics against the node simulator: content and redaction."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
import json

from google.protobuf.json_format import MessageToDict
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers.redact import REDACTED
from homeassistant.setup import async_setup_component
import pytest
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

from custom_components.mqtt_bridge.const import DOMAIN
from devkit.meshsim import ChannelSpec, SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto, free_port
from tests.common import NODE_NUM, add_node_entry, wait_for

PSK = bytes(range(100, 116))
SECOND_PSK = bytes(range(32))
MQTT_USER = "meshuser"
MQTT_PASSWORD = "s3cretpw"
OPTIONS_PASSWORD = "0pt10n-secret"
OPTIONS_USER = "optuser"
POSITION = (47.3769123, 8.5417456, 408)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
async def node(mosquitto: Mosquitto) -> AsyncIterator[SimulatedNode]:
    """A node with credentials, keys and a position that must not leak."""
    sim = SimulatedNode(
        default_profile(
            mqtt_address=f"127.0.0.1:{mosquitto.port}",
            mqtt_username=MQTT_USER,
            mqtt_password=MQTT_PASSWORD,
            position=POSITION,
            channels=[
                ChannelSpec(psk=PSK),
                ChannelSpec(name="Ops", psk=SECOND_PSK, role="SECONDARY"),
            ],
        )
    )
    await sim.start_tcp()
    yield sim
    await sim.stop()


async def test_diagnostics(
    hass: HomeAssistant, hass_client: ClientSessionGenerator, node: SimulatedNode
) -> None:
    """Diagnostics describe node, link and proxy, with secrets and positions redacted."""
    entry = add_node_entry(
        hass,
        node.port,
        options={
            "broker_mode": "node",
            "broker_host": "broker.example.com",
            "broker_username": OPTIONS_USER,
            "broker_password": OPTIONS_PASSWORD,
        },
    )
    entry.add_to_hass(hass)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    runtime = entry.runtime_data
    await wait_for(lambda: runtime.available and runtime.proxy.broker_connected)
    # The position and the keys really are in what the node reported.
    own = runtime.snapshot.nodes[NODE_NUM]
    assert own.position.latitude_i == round(POSITION[0] * 1e7)
    assert own.user.public_key

    diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    dumped = json.dumps(diag)

    # Nothing secret or locating anywhere, in any encoding.
    for secret in (
        MQTT_USER,
        MQTT_PASSWORD,
        OPTIONS_USER,
        OPTIONS_PASSWORD,
        b64(PSK),
        b64(SECOND_PSK),
        b64(bytes(own.user.public_key)),
        b64(bytes(own.user.macaddr)),
        str(round(POSITION[0] * 1e7)),
        str(round(POSITION[1] * 1e7)),
    ):
        assert secret not in dumped, secret

    assert diag["entry"]["data"]["host"] == "127.0.0.1"
    assert diag["entry"]["entry_type"] == "meshtastic_node"
    assert diag["entry"]["version"] == "1.2"
    assert diag["entry"]["state"] == "loaded"
    assert diag["entry"]["options"]["broker_password"] == REDACTED
    assert diag["entry"]["options"]["broker_username"] == REDACTED
    assert diag["entry"]["options"]["broker_host"] == "broker.example.com"

    node_diag = diag["node"]
    assert node_diag["node_id"] == "!1a2b3c4d"
    assert node_diag["long_name"] == "Sim Node"
    assert node_diag["hw_model"] == "TBEAM"
    assert node_diag["firmware_version"] == "2.7.15.567b8ea"
    assert node_diag["my_info"]["my_node_num"] == NODE_NUM
    assert node_diag["metadata"]["firmware_version"] == "2.7.15.567b8ea"
    assert node_diag["user"]["public_key"] == REDACTED
    assert node_diag["user"]["macaddr"] == REDACTED
    assert node_diag["user"]["long_name"] == "Sim Node"
    assert len(node_diag["channels"]) == 8
    assert node_diag["channels"][0]["settings"]["psk"] == REDACTED
    assert node_diag["channels"][1]["settings"]["name"] == "Ops"
    assert node_diag["channels"][1]["settings"]["psk"] == REDACTED
    assert node_diag["lora"]["modem_preset"] == "LONG_FAST"
    mqtt = node_diag["mqtt"]
    assert mqtt["enabled"] is True
    assert mqtt["proxy_to_client_enabled"] is True
    assert mqtt["address"] == f"127.0.0.1:{runtime.proxy.broker_settings.port}"
    assert mqtt["username"] == REDACTED
    assert mqtt["password"] == REDACTED

    assert diag["metrics"]["battery_level"] == 87
    assert diag["link"]["state"] == "ready"
    assert diag["link"]["stats"]["handshakes"] == 1

    proxy = diag["proxy"]
    assert proxy["status"] == "running"
    assert proxy["broker_connected"] is True
    assert proxy["broker"]["host"] == "127.0.0.1"
    assert proxy["broker"]["username"] == REDACTED
    assert proxy["broker"].get("password") in (None, REDACTED)
    assert proxy["subscriptions"] == [
        "msh/2/e/LongFast/+",
        "msh/2/e/Ops/+",
        "msh/2/e/PKI/+",
    ]
    assert proxy["stats"]["uplink_messages"] == 0
    assert proxy["missing_settings"] == []
    # The test's own premise: unredacted, the key would show up in this encoding.
    raw = MessageToDict(runtime.snapshot.channels[0], preserving_proto_field_name=True)
    assert b64(PSK) in json.dumps(raw)


async def test_diagnostics_of_entry_not_loaded(
    hass: HomeAssistant, hass_client: ClientSessionGenerator
) -> None:
    """An entry that is not set up reports itself only, still redacted."""
    assert await async_setup_component(hass, DOMAIN, {})
    # Added after the integration was set up: not loaded.
    entry = add_node_entry(
        hass,
        free_port(),
        options={"broker_username": OPTIONS_USER, "broker_password": OPTIONS_PASSWORD},
    )
    assert entry.state is ConfigEntryState.NOT_LOADED
    diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert set(diag) == {"entry"}
    assert diag["entry"]["state"] == "not_loaded"
    assert diag["entry"]["options"] == {
        "broker_username": REDACTED,
        "broker_password": REDACTED,
    }


async def test_diagnostics_before_the_node_answers(
    hass: HomeAssistant, hass_client: ClientSessionGenerator
) -> None:
    """A loaded entry whose node was never reached has no node data yet."""
    entry = add_node_entry(hass, free_port())
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert diag["node"] is None
    assert diag["metrics"] is None
    assert diag["link"]["state"] != "ready"
    assert diag["proxy"]["status"] == "waiting_for_node"
    assert diag["proxy"]["broker_connected"] is False
