"""Sharing the node through Home Assistant: options, the shared port, entities, repairs.

Home Assistant runs the virtual node on the node entry's link; the clients
are the real ``meshtastic`` library (``TCPInterface``, blocking: run in the
executor and closed in ``finally`` by ``library()``, which also joins its
threads) and the raw stream client of ``tests/common.py``, over
real sockets on 127.0.0.1, against the node simulator and a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
import socket
from typing import Any

from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import STATE_UNAVAILABLE
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType, InvalidData
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import (
    device_registry as dr,
    entity_registry as er,
    issue_registry as ir,
)
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
import voluptuous as vol

from custom_components.mqtt_bridge import node_runtime, node_sharing
from custom_components.mqtt_bridge.const import (
    BROKER_MODE_CUSTOM,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_SHARE_HOST,
    CONF_SHARE_NETWORKS,
    CONF_SHARE_NODE,
    CONF_SHARE_PORT,
    DOMAIN,
    EVENT_TEXT_MESSAGE,
    ISSUE_VIRTUAL_NODE_PORT,
    UPDATE_THROTTLE,
)
from custom_components.mqtt_bridge.engine.node_db import SPECIAL_NONCE_ONLY_CONFIG
from custom_components.mqtt_bridge.engine.node_link import LinkState, NodeLinkListener
from custom_components.mqtt_bridge.engine.virtual_node import (
    DEFAULT_PORT,
    LOCAL_NETWORKS,
)
from custom_components.mqtt_bridge.node_sharing import (
    ShareSettings,
    bind_problem,
    format_client,
    normalize_bind_address,
    parse_network_text,
)
from devkit.meshsim import SimulatedNode
from devkit.mosquitto import Mosquitto, free_port
from tests.common import (
    NODE_NUM,
    NODE_PROXY_DEFAULTS,
    add_node_entry,
    check_flow_translations,
    raw_client,
    wait_for,
)
from tests.test_virtual_node import ALPINE, library, text_packet

CLIENTS_KEY = "shared_node_clients"
PACKETS_KEY = "shared_node_packets"


def share_options(port: int, **options: Any) -> dict[str, Any]:
    """Node entry options with sharing on at ``port`` (defaults otherwise)."""
    return {
        **NODE_PROXY_DEFAULTS,
        CONF_SHARE_NODE: True,
        CONF_SHARE_PORT: port,
        CONF_SHARE_HOST: "0.0.0.0",
        CONF_SHARE_NETWORKS: [],
        **options,
    }


def flush_updates(hass: HomeAssistant) -> None:
    """Fire the runtime's rate-limit timer instead of sleeping through it."""
    async_fire_time_changed(
        hass, dt_util.utcnow() + timedelta(seconds=UPDATE_THROTTLE + 1)
    )


def sensor_id(hass: HomeAssistant, key: str) -> str | None:
    """The entity id of the node's sensor ``key``, ``None`` if not registered."""
    return er.async_get(hass).async_get_entity_id("sensor", DOMAIN, f"{NODE_NUM}_{key}")


def issue(hass: HomeAssistant, entry: MockConfigEntry) -> ir.IssueEntry | None:
    return ir.async_get(hass).async_get_issue(
        DOMAIN, f"{ISSUE_VIRTUAL_NODE_PORT}_{entry.entry_id}"
    )


async def refused(port: int) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused (nothing listens)."""
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return False


async def setup_shared(
    hass: HomeAssistant, node: SimulatedNode, port: int, **options: Any
) -> MockConfigEntry:
    """Set up a node entry sharing the node on ``port``; wait for link and broker."""
    entry = add_node_entry(hass, node.port, options=share_options(port, **options))
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    runtime = entry.runtime_data
    # Also wait for the broker session (unloading while aiomqtt connects
    # leaves a task behind, see tests/test_entities.py).
    await wait_for(lambda: runtime.available and runtime.proxy.broker_connected)
    return entry


# -- options flow -------------------------------------------------------------------


async def test_options_share_step_validates_and_saves(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """Sharing is off by default; the share step checks address, networks and port."""
    check_flow_translations(hass)
    entry = add_node_entry(hass, free_port())
    result = await hass.config_entries.options.async_init(entry.entry_id)
    defaults = {key.schema: key.default() for key in result["data_schema"].schema}
    assert defaults[CONF_SHARE_NODE] is False

    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**NODE_PROXY_DEFAULTS, CONF_SHARE_NODE: True}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "share"
    schema = result["data_schema"].schema
    defaults = {
        key.schema: key.default() for key in schema if key.default is not vol.UNDEFINED
    }
    assert defaults == {CONF_SHARE_PORT: DEFAULT_PORT, CONF_SHARE_HOST: "0.0.0.0"}
    suggested = {
        key.schema: (key.description or {}).get("suggested_value") for key in schema
    }
    assert suggested[CONF_SHARE_NETWORKS] is None  # empty: the local networks
    assert "192.168.0.0/16" in result["description_placeholders"]["local_networks"]
    flow_id = result["flow_id"]
    port = free_port()

    async def submit(**fields: Any) -> Any:
        return await hass.config_entries.options.async_configure(
            flow_id,
            {CONF_SHARE_PORT: port, CONF_SHARE_HOST: "0.0.0.0", **fields},
        )

    result = await submit(**{CONF_SHARE_HOST: "homeassistant.local"})
    assert result["errors"] == {CONF_SHARE_HOST: "share_invalid_address"}
    result = await submit(**{CONF_SHARE_NETWORKS: "192.168.1.0/24\n10.0.0.300/8"})
    assert result["errors"] == {CONF_SHARE_NETWORKS: "share_invalid_networks"}
    assert "10.0.0.300/8" in result["description_placeholders"]["problem"]
    # What was typed is shown again.
    suggested = {
        key.schema: (key.description or {}).get("suggested_value")
        for key in result["data_schema"].schema
    }
    assert suggested[CONF_SHARE_NETWORKS] == "192.168.1.0/24\n10.0.0.300/8"
    for bad_port in (0, 65536):
        with pytest.raises(InvalidData):
            await submit(**{CONF_SHARE_PORT: bad_port})

    holder = socket.socket()
    holder.bind(("0.0.0.0", port))
    holder.listen()
    try:
        result = await submit()
        assert result["errors"] == {CONF_SHARE_PORT: "share_port_in_use"}
        assert result["description_placeholders"]["error"]
    finally:
        holder.close()
    result = await submit(**{CONF_SHARE_HOST: "192.0.2.1"})
    assert result["errors"] == {CONF_SHARE_PORT: "share_address_unavailable"}
    result = await submit(**{CONF_SHARE_HOST: "::ffff:127.0.0.1"})
    assert result["errors"] == {CONF_SHARE_PORT: "share_cannot_bind"}

    result = await submit(
        **{
            CONF_SHARE_HOST: " 127.0.0.1 ",
            CONF_SHARE_NETWORKS: "192.168.1.5/24, 10.0.0.7\nfd00::/8 192.168.1.0/24",
        }
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {
        **NODE_PROXY_DEFAULTS,
        CONF_SHARE_NODE: True,
        CONF_SHARE_PORT: port,
        CONF_SHARE_HOST: "127.0.0.1",
        CONF_SHARE_NETWORKS: ["192.168.1.0/24", "10.0.0.7/32", "fd00::/8"],
    }

    # Shown again as saved; turning sharing off keeps the settings for later.
    result = await hass.config_entries.options.async_init(entry.entry_id)
    defaults = {key.schema: key.default() for key in result["data_schema"].schema}
    assert defaults[CONF_SHARE_NODE] is True
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**NODE_PROXY_DEFAULTS, CONF_SHARE_NODE: True}
    )
    suggested = {
        key.schema: (key.description or {}).get("suggested_value")
        for key in result["data_schema"].schema
    }
    assert suggested[CONF_SHARE_NETWORKS] == "192.168.1.0/24\n10.0.0.7/32\nfd00::/8"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_SHARE_PORT: port, CONF_SHARE_HOST: "127.0.0.1"}
    )
    assert entry.options[CONF_SHARE_NETWORKS] == []  # cleared: the local networks
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**NODE_PROXY_DEFAULTS, CONF_SHARE_NODE: False}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_SHARE_NODE] is False
    assert entry.options[CONF_SHARE_PORT] == port


async def test_options_custom_broker_then_share(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """With a custom broker the share step follows the broker step."""
    check_flow_translations(hass)
    entry = add_node_entry(hass, free_port())
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            **NODE_PROXY_DEFAULTS,
            CONF_BROKER_MODE: BROKER_MODE_CUSTOM,
            CONF_SHARE_NODE: True,
        },
    )
    assert result["step_id"] == "broker"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_BROKER_HOST: "127.0.0.1",
            CONF_BROKER_PORT: mosquitto.port,
            CONF_BROKER_TLS: False,
            CONF_BROKER_USERNAME: "",
            CONF_BROKER_PASSWORD: "",
        },
    )
    assert result["step_id"] == "share"
    port = free_port()
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {CONF_SHARE_PORT: port, CONF_SHARE_HOST: "::"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_BROKER_HOST] == "127.0.0.1"
    assert entry.options[CONF_SHARE_HOST] == "::"
    assert entry.options[CONF_SHARE_PORT] == port


# -- sharing end to end ----------------------------------------------------------


async def test_shared_node_serves_clients_through_home_assistant(
    hass: HomeAssistant,
    hass_client: ClientSessionGenerator,
    node: SimulatedNode,
) -> None:
    """Handshake, texts both ways, entities, diagnostics; unload closes everything."""
    port = free_port()
    entry = await setup_shared(hass, node, port)
    runtime = entry.runtime_data
    sharing = runtime.sharing
    await wait_for(lambda: sharing.listening)
    assert issue(hass, entry) is None
    events = async_capture_events(hass, EVENT_TEXT_MESSAGE)

    async with library() as lib:
        iface = await lib.open(port)
        # The real library completed its handshake through Home Assistant.
        assert iface.myInfo.my_node_num == NODE_NUM
        assert iface.getLongName() == "Sim Node"
        assert "!433e1f70" in iface.nodes  # the node database
        assert iface.localNode.moduleConfig.mqtt.proxy_to_client_enabled
        assert node.handshakes == 1  # Home Assistant's own, nothing else
        assert node.connections == 1
        async with raw_client(port) as raw:
            items = await raw.handshake(SPECIAL_NONCE_ONLY_CONFIG)
            assert items[-1].config_complete_id == SPECIAL_NONCE_ONLY_CONFIG

            # The clients sensor counts and lists them.
            await wait_for(lambda: len(sharing.clients) == 2)
            flush_updates(hass)
            await hass.async_block_till_done()
            clients_id = sensor_id(hass, CLIENTS_KEY)
            assert clients_id is not None
            state = hass.states.get(clients_id)
            assert state is not None
            assert state.state == "2"
            expected = [f"127.0.0.1:{c.port}" for c in sharing.clients]
            assert state.attributes["clients"] == expected
            assert len(set(expected)) == 2

            # A text from the mesh: the Home Assistant event fires once, and
            # every client gets it.
            node.receive_text(ALPINE, "hello shared mesh")
            await wait_for(lambda: lib.texts.get(id(iface)) == ["hello shared mesh"])
            await raw.wait(
                lambda: any(
                    m.packet.decoded.payload == b"hello shared mesh"
                    for m in raw.of_kind("packet")
                )
            )
            await hass.async_block_till_done()
            assert [e.data["text"] for e in events] == ["hello shared mesh"]

            # Texts from a client and from Home Assistant reach the node once each.
            await lib.run(iface.sendText, "from the app")
            raw.send(text_packet("from the raw client"))
            await hass.services.async_call(
                DOMAIN,
                "send_text",
                {"config_entry_id": entry.entry_id, "text": "from home assistant"},
                blocking=True,
            )
            await node.wait_for(lambda: len(node.sent_packets) == 3)
            assert sorted(p.decoded.payload for p in node.sent_packets) == [
                b"from home assistant",
                b"from the app",
                b"from the raw client",
            ]
            await wait_for(lambda: sharing.packets_from_clients == 2)
            flush_updates(hass)
            await hass.async_block_till_done()
            packets_id = sensor_id(hass, PACKETS_KEY)
            assert packets_id is not None
            state = hass.states.get(packets_id)
            assert state is not None
            assert state.state == "2"
            reg = er.async_get(hass).async_get(packets_id)
            assert reg is not None
            assert reg.entity_category == "diagnostic"
            assert [e.data["text"] for e in events] == ["hello shared mesh"]

            # Diagnostics list the clients.
            diag = await get_diagnostics_for_config_entry(hass, hass_client, entry)
            shared = diag["sharing"]
            assert shared["enabled"] is True
            assert shared["port"] == port
            assert shared["allowed_networks"] == "local networks"
            assert shared["error"] is None
            server = shared["server"]
            assert server["listening"] is True
            assert server["allowed_networks"] == list(LOCAL_NETWORKS)
            assert sorted(
                (c["address"], c["port"]) for c in server["clients"]
            ) == sorted(("127.0.0.1", c.port) for c in sharing.clients)
            assert server["stats"]["packets_from_clients"] == 2
            assert server["stats"]["accepted"] == 2

            # Unloading closes the port and every client connection.
            assert await hass.config_entries.async_unload(entry.entry_id)
            await hass.async_block_till_done()
            assert entry.state is ConfigEntryState.NOT_LOADED
            await raw.wait(lambda: raw.eof)
            assert await refused(port)
            await wait_for(lambda: not iface.isConnected.is_set(), 10)
    assert hass.states.get(clients_id).state == STATE_UNAVAILABLE


async def test_sensors_stay_while_the_node_is_away_and_go_when_sharing_is_off(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """Clients stay connected while the node is away; off removes the sensors."""
    port = free_port()
    entry = await setup_shared(hass, node, port, **{CONF_SHARE_HOST: "127.0.0.1"})
    sharing = entry.runtime_data.sharing
    await wait_for(lambda: sharing.listening)
    async with raw_client(port) as raw:
        await raw.handshake(1234)
        node_port = node.port
        await node.stop()
        await raw.wait(lambda: bool(raw.of_kind("clientNotification")))
        assert not entry.runtime_data.available
        flush_updates(hass)
        await hass.async_block_till_done()
        clients_id = sensor_id(hass, CLIENTS_KEY)
        uplinks_id = sensor_id(hass, "uplink_messages")
        assert clients_id is not None
        assert uplinks_id is not None
        state = hass.states.get(clients_id)
        assert state is not None
        assert state.state == "1"  # available: the client stays connected
        assert hass.states.get(uplinks_id).state == STATE_UNAVAILABLE
        await node.start_tcp(port=node_port)
        await wait_for(lambda: entry.runtime_data.available, 10)

        hass.config_entries.async_update_entry(
            entry, options={**entry.options, CONF_SHARE_NODE: False}
        )
        await hass.async_block_till_done()
        await raw.wait(lambda: raw.eof)
    assert entry.state is ConfigEntryState.LOADED
    assert not entry.runtime_data.sharing.listening
    assert entry.runtime_data.sharing.diagnostics()["server"] is None
    assert sensor_id(hass, CLIENTS_KEY) is None
    assert sensor_id(hass, PACKETS_KEY) is None
    assert await refused(port)
    await wait_for(lambda: entry.runtime_data.available)


async def test_settings_changed_by_a_client_reach_home_assistant(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """A client's set_owner renames the node; the device follows, no outage."""
    node.admin_reboot_delay = None  # the settings refresh carries the change
    port = free_port()
    entry = await setup_shared(hass, node, port)
    runtime = entry.runtime_data
    await wait_for(lambda: runtime.sharing.listening)
    states: list[bool] = []
    remove = runtime.link.add_listener(_AvailabilityProbe(runtime, states))
    try:
        async with library() as lib:
            iface = await lib.open(port)
            await lib.run(lambda: iface.localNode.setOwner("Renamed", "RNM"))
            await node.wait_for(lambda: node.profile.long_name == "Renamed")
            await wait_for(lambda: runtime.link.stats.refreshes == 1, 10)
            device = dr.async_get(hass).async_get(runtime.device_id)
            assert device is not None
            assert device.name == "Renamed"
            await wait_for(lambda: iface.getLongName() == "Renamed", 10)
    finally:
        remove()
    assert states  # the link went through the refresh handshake ...
    assert all(states)  # ... and the node never looked unavailable
    assert node.connections == 1


class _AvailabilityProbe(NodeLinkListener):
    """Records ``runtime.available`` at each link state change."""

    def __init__(self, runtime: Any, states: list[bool]) -> None:
        self.runtime = runtime
        self.states = states

    def on_state(self, state: LinkState) -> None:
        self.states.append(self.runtime.available)


# -- the port cannot be bound ---------------------------------------------------------


async def test_port_in_use_raises_repair_cleared_when_free(
    hass: HomeAssistant, node: SimulatedNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A taken port raises the repair issue; it clears once the port is bound."""
    monkeypatch.setattr(node_sharing, "BIND_RETRY_BASE", 0.05)
    monkeypatch.setattr(node_sharing, "BIND_RETRY_CAP", 0.1)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        entry = await setup_shared(hass, node, port, **{CONF_SHARE_HOST: "127.0.0.1"})
        sharing = entry.runtime_data.sharing
        await wait_for(lambda: issue(hass, entry) is not None)
        found = issue(hass, entry)
        assert found is not None
        assert found.translation_key == ISSUE_VIRTUAL_NODE_PORT
        assert found.severity is ir.IssueSeverity.ERROR
        assert found.translation_placeholders["port"] == str(port)
        assert found.translation_placeholders["name"] == "Sim Node"
        assert "in use" in found.translation_placeholders["error"]
        await wait_for(lambda: sharing.bind_failures >= 2)  # it keeps trying
        assert not sharing.listening
        assert "in use" in (sharing.error or "")
        # The node itself works meanwhile.
        assert entry.runtime_data.available
    finally:
        holder.close()
    await wait_for(lambda: sharing.listening)
    assert issue(hass, entry) is None
    assert sharing.error is None
    async with raw_client(port) as raw:
        await raw.handshake(99)


async def test_port_in_use_cleared_by_choosing_another_port(
    hass: HomeAssistant, node: SimulatedNode
) -> None:
    """Changing the port in the options reloads the entry and clears the issue."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        taken = holder.getsockname()[1]
        entry = await setup_shared(hass, node, taken, **{CONF_SHARE_HOST: "127.0.0.1"})
        await wait_for(lambda: issue(hass, entry) is not None)
        port = free_port()
        result = await hass.config_entries.options.async_init(entry.entry_id)
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {**NODE_PROXY_DEFAULTS, CONF_SHARE_NODE: True}
        )
        # The taken port is reported in the form, before anything is saved.
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {CONF_SHARE_PORT: taken, CONF_SHARE_HOST: "127.0.0.1"}
        )
        assert result["errors"] == {CONF_SHARE_PORT: "share_port_in_use"}
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {CONF_SHARE_PORT: port, CONF_SHARE_HOST: "127.0.0.1"}
        )
        assert result["type"] is FlowResultType.CREATE_ENTRY
        await hass.async_block_till_done()
        runtime = entry.runtime_data
        await wait_for(lambda: runtime.sharing.listening)
        assert runtime.sharing.server is not None
        assert runtime.sharing.server.port == port
        assert issue(hass, entry) is None
        # The port this entry already listens on is not reported as taken.
        result = await hass.config_entries.options.async_init(entry.entry_id)
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {**NODE_PROXY_DEFAULTS, CONF_SHARE_NODE: True}
        )
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {CONF_SHARE_PORT: port, CONF_SHARE_HOST: "127.0.0.1"}
        )
        assert result["type"] is FlowResultType.CREATE_ENTRY
        await hass.async_block_till_done()
        await wait_for(lambda: entry.runtime_data.sharing.listening)
        await wait_for(lambda: entry.runtime_data.available)
    finally:
        holder.close()


async def test_invalid_stored_settings_keep_the_node_running(
    hass: HomeAssistant, node: SimulatedNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Settings the flow would refuse (hand-edited) only stop the sharing."""
    entry = await setup_shared(
        hass, node, free_port(), **{CONF_SHARE_NETWORKS: ["not a network"]}
    )
    sharing = entry.runtime_data.sharing
    assert sharing.server is None
    assert not sharing.listening
    assert "not a network" in (sharing.error or "")
    assert "the node is not shared" in caplog.text
    assert sharing.clients == []
    assert sharing.packets_from_clients == 0
    assert sharing.diagnostics()["error"] == sharing.error
    assert entry.runtime_data.available


# -- sending while the link re-reads the node's settings ---------------------------


async def test_send_text_waits_for_a_settings_refresh(
    hass: HomeAssistant, node: SimulatedNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a client's settings change the link re-reads the node: sends wait."""
    entry = await setup_shared(hass, node, free_port())
    runtime = entry.runtime_data
    link = runtime.link
    assert link.request_config()
    assert link.state is LinkState.HANDSHAKING
    assert runtime.available  # the node stays connected meanwhile
    await hass.services.async_call(
        DOMAIN,
        "send_text",
        {"config_entry_id": entry.entry_id, "text": "during a refresh"},
        blocking=True,
    )
    assert link.state is LinkState.READY
    await node.wait_for(lambda: len(node.sent_packets) == 1)
    assert node.sent_packets[0].decoded.payload == b"during a refresh"

    # It waits a bounded time only.
    monkeypatch.setattr(node_runtime, "SEND_READY_TIMEOUT", 0.0)
    assert link.request_config()
    with pytest.raises(HomeAssistantError) as err:
        await runtime.async_send_text("too early")
    assert err.value.translation_key == "node_not_connected"
    await wait_for(lambda: link.state is LinkState.READY)


# -- helpers -----------------------------------------------------------------------


def test_helpers() -> None:
    """Settings from options, network text, bind addresses, client labels."""
    assert ShareSettings.from_options({}) == ShareSettings(
        enabled=False, port=DEFAULT_PORT, host="0.0.0.0", networks=()
    )
    settings = ShareSettings.from_options(
        {
            CONF_SHARE_NODE: True,
            CONF_SHARE_PORT: 5000,
            CONF_SHARE_NETWORKS: ["10.0.0.0/8"],
        }
    )
    assert settings.allowed_networks == ["10.0.0.0/8"]
    assert ShareSettings().allowed_networks is None
    assert parse_network_text("") == []
    assert parse_network_text(" 10.1.2.3 ,\n\n10.1.2.3/32") == ["10.1.2.3/32"]
    assert normalize_bind_address(" ::0 ") == "::"
    with pytest.raises(ValueError):
        normalize_bind_address("")
    assert bind_problem("127.0.0.1", free_port()) is None

    class Info:
        def __init__(self, address: str, port: int) -> None:
            self.address = address
            self.port = port

    assert format_client(Info("::1", 5)) == "[::1]:5"  # type: ignore[arg-type]
    assert format_client(Info("10.0.0.1", 5)) == "10.0.0.1:5"  # type: ignore[arg-type]
