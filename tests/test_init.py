"""Set-up, unload and the reloads the flows cause, with the real runtime.

The flows only update the entry; its update listener reloads it (the pattern
that stays valid in HA 2026.12). These tests check that the reload really
happens and that the new runtime uses the new data or options, against the node
simulator and real Mosquitto brokers.
"""

from __future__ import annotations

from ipaddress import ip_address
from typing import Any

from homeassistant.config_entries import (
    SOURCE_REAUTH,
    SOURCE_ZEROCONF,
    ConfigEntryState,
)
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge.const import (
    BROKER_MODE_CUSTOM,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_PORT,
    CONF_UPLINK_QUEUE_SIZE,
    DOMAIN,
)
from custom_components.mqtt_bridge.runtime import MeshtasticRuntime
from devkit.meshsim import SimulatedNode
from devkit.mosquitto import Mosquitto, free_port
from tests.common import add_node_entry, wait_for


def _entry(hass: HomeAssistant, port: int, **options: Any) -> MockConfigEntry:
    return add_node_entry(hass, port, options=options)


def _running(entry: MockConfigEntry, old: MeshtasticRuntime | None = None) -> bool:
    """Whether the entry runs a (new) runtime with node and broker connected."""
    if entry.state is not ConfigEntryState.LOADED:
        return False
    runtime = entry.runtime_data
    return runtime is not old and runtime.available and runtime.proxy.broker_connected


async def test_setup_unload_reload(
    hass: HomeAssistant, node: SimulatedNode, mosquitto: Mosquitto
) -> None:
    entry = _entry(hass, node.port)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    await wait_for(lambda: _running(entry))
    first = entry.runtime_data
    assert first.proxy.broker_settings is not None
    assert first.proxy.broker_settings.port == mosquitto.port

    assert await hass.config_entries.async_reload(entry.entry_id)
    await wait_for(lambda: _running(entry, first))
    assert first.link.state == "stopped"

    assert await hass.config_entries.async_unload(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    await node.wait_for(lambda: not node.client_connected)


async def test_options_flow_switches_to_custom_broker(
    hass: HomeAssistant, node: SimulatedNode, private_mosquitto: Mosquitto
) -> None:
    """Saving the options reloads the entry, which then uses the other broker."""
    entry = _entry(hass, node.port)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    await wait_for(lambda: _running(entry))
    first = entry.runtime_data

    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_BROKER_MODE: BROKER_MODE_CUSTOM,
            CONF_ALLOW_SELF_SIGNED: False,
            CONF_FORWARD_RETAINED: True,
            CONF_FORWARD_OWN_ECHOES: False,
            CONF_UPLINK_QUEUE_SIZE: 50,
        },
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_BROKER_HOST: "127.0.0.1",
            CONF_BROKER_PORT: private_mosquitto.port,
            CONF_BROKER_TLS: False,
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    await hass.async_block_till_done()

    await wait_for(lambda: _running(entry, first))
    runtime = entry.runtime_data
    assert runtime.proxy.broker_settings is not None
    assert runtime.proxy.broker_settings.port == private_mosquitto.port
    assert runtime.proxy.options.forward_retained is True
    assert runtime.proxy.options.uplink_queue_size == 50


async def test_rejected_credentials_start_reauth(
    hass: HomeAssistant, node: SimulatedNode, password_broker: Mosquitto
) -> None:
    """A custom broker rejecting the credentials asks the user for new ones."""
    entry = _entry(
        hass,
        node.port,
        **{
            CONF_BROKER_MODE: BROKER_MODE_CUSTOM,
            CONF_BROKER_HOST: "127.0.0.1",
            CONF_BROKER_PORT: password_broker.port,
            CONF_BROKER_TLS: False,
            CONF_BROKER_USERNAME: "u",
            CONF_BROKER_PASSWORD: "expired",
        },
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()

    def reauth_flows() -> list:
        return [
            flow
            for flow in hass.config_entries.flow.async_progress_by_handler(DOMAIN)
            if flow["context"]["source"] == SOURCE_REAUTH
        ]

    await wait_for(lambda: bool(reauth_flows()))
    first = entry.runtime_data
    assert not first.proxy.broker_connected
    flow = reauth_flows()[0]
    assert flow["step_id"] == "reauth_confirm"

    result = await hass.config_entries.flow.async_configure(
        flow["flow_id"], {CONF_BROKER_USERNAME: "u", CONF_BROKER_PASSWORD: "p"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    await hass.async_block_till_done()
    await wait_for(lambda: _running(entry, first))
    assert entry.runtime_data.proxy.broker_settings is not None
    assert entry.runtime_data.proxy.broker_settings.password == "p"


async def test_zeroconf_moves_entry_to_announced_address(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """A node announcing a new port: the entry follows without a user step."""
    entry = _entry(hass, free_port())
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    first = entry.runtime_data
    assert not first.available

    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=ZeroconfServiceInfo(
            ip_address=ip_address("127.0.0.1"),
            ip_addresses=[ip_address("127.0.0.1")],
            port=node.port,
            hostname="meshtastic.local.",
            type="_meshtastic._tcp.local.",
            name="Meshtastic_3c4d._meshtastic._tcp.local.",
            properties={"id": "!1a2b3c4d", "shortname": "SIM"},
        ),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_PORT] == node.port
    await hass.async_block_till_done()
    await wait_for(lambda: _running(entry, first))
