"""Set-up, unload and the reloads the flows cause, with the real runtime.

The flows only update the entry; its update listener reloads it (the pattern
that stays valid in HA 2026.12). These tests check that the reload really
happens and that the new runtime uses the new data or options, against the node
simulator and real Mosquitto brokers.
"""

from __future__ import annotations

from ipaddress import ip_address
from types import MappingProxyType
from typing import Any

from homeassistant.config_entries import (
    SOURCE_REAUTH,
    SOURCE_ZEROCONF,
    ConfigEntryState,
    ConfigSubentry,
)
from homeassistant.const import CONF_PORT, Platform
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from homeassistant.exceptions import ServiceValidationError
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
from pytest_homeassistant_custom_component.components.diagnostics import (
    get_diagnostics_for_config_entry,
)
from pytest_homeassistant_custom_component.typing import ClientSessionGenerator

import custom_components.mqtt_bridge as integration
from custom_components.mqtt_bridge.const import (
    BROKER_MODE_CUSTOM,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_ENTRY_TYPE,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_UPLINK_QUEUE_SIZE,
    DOMAIN,
    EntryType,
)
from custom_components.mqtt_bridge.models import EntryRuntime
from custom_components.mqtt_bridge.node_runtime import NodeRuntime
from devkit.meshsim import SimulatedNode
from devkit.mosquitto import Mosquitto, free_port
from tests.common import (
    MINOR_VERSION,
    NODE_NUM,
    VERSION,
    add_node_entry,
    node_data,
    wait_for,
)


def _entry(hass: HomeAssistant, port: int, **options: Any) -> MockConfigEntry:
    return add_node_entry(hass, port, options=options)


def _running(entry: MockConfigEntry, old: NodeRuntime | None = None) -> bool:
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


# -- versions and migration -----------------------------------------------------


def _versioned_entry(
    hass: HomeAssistant, version: int, minor_version: int, data: dict[str, Any]
) -> MockConfigEntry:
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Sim Node",
        unique_id=str(NODE_NUM),
        version=version,
        minor_version=minor_version,
        data=data,
    )
    entry.add_to_hass(hass)
    return entry


async def test_migrate_1_1_to_1_2(hass: HomeAssistant, node: SimulatedNode) -> None:
    """A 1.1 entry (no entry type) becomes a 1.2 Meshtastic node entry and runs."""
    old = {"connection": "tcp", "host": "127.0.0.1", "port": node.port}
    entry = _versioned_entry(hass, 1, 1, old)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert (entry.version, entry.minor_version) == (1, 2)
    assert entry.data == {**old, CONF_ENTRY_TYPE: "meshtastic_node"}
    assert isinstance(entry.runtime_data, NodeRuntime)
    await wait_for(lambda: _running(entry))


async def test_entry_without_type_is_a_node(hass: HomeAssistant) -> None:
    """A current entry written without entry_type (e.g. by devkit/demo.py) is a node."""
    data = {"connection": "tcp", "host": "127.0.0.1", "port": free_port()}
    entry = _versioned_entry(hass, VERSION, MINOR_VERSION, data)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert isinstance(entry.runtime_data, NodeRuntime)
    assert entry.data == data


async def test_migrate_refuses_future_major_version(
    hass: HomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _versioned_entry(hass, 2, 1, node_data(connection="tcp", host="x"))
    assert not await hass.config_entries.async_setup(entry.entry_id)
    assert entry.state is ConfigEntryState.MIGRATION_ERROR
    assert (entry.version, entry.minor_version) == (2, 1)
    assert "written by a newer version" in caplog.text


async def test_future_minor_version_is_kept(hass: HomeAssistant) -> None:
    """A later minor version of major 1 only added keys: it is set up as it is."""
    data = node_data(connection="tcp", host="127.0.0.1", port=free_port(), extra=1)
    entry = _versioned_entry(hass, 1, 3, data)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert (entry.version, entry.minor_version) == (1, 3)
    assert entry.data == data


async def test_unknown_entry_type_fails_setup(
    hass: HomeAssistant,
    caplog: pytest.LogCaptureFixture,
    entity_registry: er.EntityRegistry,
) -> None:
    """An entry of a type this version does not know fails cleanly, translated."""
    entry = _versioned_entry(
        hass, VERSION, MINOR_VERSION, {CONF_ENTRY_TYPE: "future_type", "x": 1}
    )
    assert not await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.SETUP_ERROR
    assert entry.reason == (
        'This entry has the type "future_type", which this version of MQTT '
        "Bridge does not know; update the integration"
    )
    assert "Error setting up entry Sim Node for mqtt_bridge" in caplog.text
    assert er.async_entries_for_config_entry(entity_registry, entry.entry_id) == []
    # Unloading an entry that never loaded is harmless.
    assert await hass.config_entries.async_unload(entry.entry_id)


# -- the update listener -----------------------------------------------------------


async def test_update_listener_reloads_only_for_data_or_options(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """Title or subentry changes keep the runtime; option changes rebuild it."""
    entry = _entry(hass, node.port)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    await wait_for(lambda: _running(entry))
    runtime = entry.runtime_data

    hass.config_entries.async_update_entry(entry, title="Renamed")
    await hass.async_block_till_done()
    assert entry.runtime_data is runtime
    assert hass.config_entries.async_add_subentry(
        entry,
        ConfigSubentry(
            data=MappingProxyType({"topic": "a/b"}),
            subentry_type="tool",
            title="Tool",
            unique_id=None,
        ),
    )
    await hass.async_block_till_done()
    assert entry.runtime_data is runtime
    # The same options again (a new but equal dict) change nothing either.
    hass.config_entries.async_update_entry(entry, options={**entry.options})
    await hass.async_block_till_done()
    assert entry.runtime_data is runtime
    assert runtime.link.state == "ready"

    hass.config_entries.async_update_entry(entry, options={CONF_FORWARD_RETAINED: True})
    await hass.async_block_till_done()
    await wait_for(lambda: _running(entry, runtime))
    assert entry.runtime_data.proxy.options.forward_retained is True
    assert runtime.link.state == "stopped"


# -- dispatch by entry type ---------------------------------------------------------


class _OtherRuntime(EntryRuntime):
    """A runtime for another entry type, with the node's platforms forwarded."""

    platforms = (Platform.BINARY_SENSOR, Platform.EVENT, Platform.SENSOR)
    started = False

    def start(self) -> None:
        self.started = True


async def test_other_entry_type_gets_no_node_entities(
    hass: HomeAssistant,
    monkeypatch: pytest.MonkeyPatch,
    entity_registry: er.EntityRegistry,
    hass_client: ClientSessionGenerator,
) -> None:
    """Set-up, platforms, diagnostics and the action dispatch on the entry type."""
    monkeypatch.setitem(integration.RUNTIMES, EntryType.MQTT_BROKER, _OtherRuntime)
    entry = _versioned_entry(
        hass, VERSION, MINOR_VERSION, {CONF_ENTRY_TYPE: EntryType.MQTT_BROKER.value}
    )
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert isinstance(entry.runtime_data, _OtherRuntime)
    assert entry.runtime_data.started
    # The node platforms were set up for the entry but added nothing.
    assert er.async_entries_for_config_entry(entity_registry, entry.entry_id) == []
    assert hass.states.async_entity_ids() == []

    diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
    assert set(diag) == {"entry"}
    assert diag["entry"]["entry_type"] == "mqtt_broker"

    with pytest.raises(ServiceValidationError) as err:
        await hass.services.async_call(
            DOMAIN,
            "send_text",
            {"config_entry_id": entry.entry_id, "text": "hi"},
            blocking=True,
        )
    assert err.value.translation_key == "not_a_node"

    assert await hass.config_entries.async_unload(entry.entry_id)
    assert entry.state is ConfigEntryState.NOT_LOADED
