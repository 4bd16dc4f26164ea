"""Config, options, reconfigure, reauth and zeroconf flows against real peers.

The node is the ``devkit.meshsim`` simulator (TCP, or a pseudo-terminal for the
serial path); brokers are real Mosquitto processes. Only what has no real peer
here is patched: the USB port listing, an unexpected exception, and the probe
timeout (shortened, the silent peer is real).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
import contextlib
from ipaddress import ip_address
import os
from unittest.mock import AsyncMock, patch

from homeassistant.config_entries import (
    SOURCE_USER,
    SOURCE_ZEROCONF,
    ConfigEntryState,
)
from homeassistant.const import CONF_DEVICE, CONF_HOST, CONF_PORT
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType, UnknownHandler
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry
import serialx
import voluptuous as vol

from custom_components.mqtt_bridge import config_flow, flow_common, flow_node
from custom_components.mqtt_bridge.const import (
    BROKER_MODE_CUSTOM,
    BROKER_MODE_NODE,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_CONNECTION,
    CONF_ENTRY_TYPE,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_SHARE_NODE,
    CONF_UPLINK_QUEUE_SIZE,
    CONNECTION_SERIAL,
    CONNECTION_TCP,
    DOMAIN,
    EntryType,
)
from custom_components.mqtt_bridge.engine.mqtt_client import MqttSettings
from devkit.meshsim import SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto, free_port
from tests.common import (
    MINOR_VERSION,
    NODE_NUM,
    NODE_PROXY_DEFAULTS,
    TRANSLATIONS,
    VERSION,
    check_flow_translations,
    node_data,
)

NODE_ID = "!1a2b3c4d"
OTHER_NUM = 0x0BADCAFE


# -- fixtures -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _translations_checked(hass: HomeAssistant) -> None:
    """Check every flow result of the test against translations/en.json."""
    check_flow_translations(hass)


@pytest.fixture
def mock_unload_entry() -> Iterator[AsyncMock]:
    """Unload entries set up by ``mock_setup_entry`` (nothing to stop)."""
    with patch(
        "custom_components.mqtt_bridge.async_unload_entry", return_value=True
    ) as unload:
        yield unload


@pytest.fixture
def mock_setup_entry(mock_unload_entry: AsyncMock) -> Iterator[AsyncMock]:
    """Do not start the link and proxy when a flow creates or reloads an entry."""
    with patch(
        "custom_components.mqtt_bridge.async_setup_entry", return_value=True
    ) as setup:
        yield setup


async def _start_node(**overrides: object) -> tuple[SimulatedNode, int]:
    node = SimulatedNode(default_profile(**overrides))
    port = await node.start_tcp()
    return node, port


@pytest.fixture
async def node() -> AsyncIterator[tuple[SimulatedNode, int]]:
    """A simulated node with default settings, served on TCP."""
    sim, port = await _start_node()
    yield sim, port
    await sim.stop()


@pytest.fixture
async def serial_node() -> AsyncIterator[tuple[SimulatedNode, str]]:
    """A simulated node behind a pseudo-terminal; yields the device path."""
    master_fd, slave_fd = os.openpty()
    sim = SimulatedNode(default_profile())
    await sim.serve_serial(master_fd)
    yield sim, os.ttyname(slave_fd)
    await sim.stop()
    for fd in (slave_fd, master_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


class _Peer:
    """A TCP peer on 127.0.0.1 that runs ``handler`` for each connection."""

    def __init__(self, handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.connections = 0
        self.port = 0

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        self._writers.append(writer)
        await self._handler(reader, writer)

    async def __aenter__(self) -> _Peer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept and never answer (a node busy with another client, a wrong service)."""
    await reader.read()


async def _hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept and close at once."""
    writer.close()


async def _server_unavailable(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """An MQTT broker answering CONNECT with return code 3 (server unavailable)."""
    await reader.read(1024)
    writer.write(bytes([0x20, 0x02, 0x00, 0x03]))
    await writer.drain()
    await reader.read()


def _port_info(device: str, **fields: object) -> serialx.SerialPortInfo:
    values: dict[str, object] = {
        "device": device,
        "resolved_device": device,
        "vid": None,
        "pid": None,
        "serial_number": None,
        "manufacturer": None,
        "product": None,
        "bcd_device": None,
        "interface_description": None,
        "interface_num": None,
    }
    values.update(fields)
    return serialx.SerialPortInfo(**values)


def _list_ports(*ports: serialx.SerialPortInfo):
    return patch.object(
        serialx, "async_list_serial_ports", AsyncMock(return_value=list(ports))
    )


def _tcp_entry(hass: HomeAssistant, **data: object) -> MockConfigEntry:
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Sim Node",
        unique_id=str(NODE_NUM),
        version=VERSION,
        minor_version=MINOR_VERSION,
        data=node_data(
            **{
                CONF_CONNECTION: CONNECTION_TCP,
                CONF_HOST: "192.0.2.7",
                CONF_PORT: 4403,
                **data,
            }
        ),
    )
    entry.add_to_hass(hass)
    return entry


async def _loaded_entry(hass: HomeAssistant, entry: MockConfigEntry) -> None:
    assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED


async def _start_tcp_flow(hass: HomeAssistant) -> str:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "meshtastic"}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "tcp"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "tcp"
    return result["flow_id"]


def _zeroconf_info(port: int | None, properties: dict[str, str]) -> ZeroconfServiceInfo:
    return ZeroconfServiceInfo(
        ip_address=ip_address("127.0.0.1"),
        ip_addresses=[ip_address("127.0.0.1")],
        port=port,
        hostname="meshtastic.local.",
        type="_meshtastic._tcp.local.",
        name="Meshtastic_4d._meshtastic._tcp.local.",
        properties=properties,
    )


# -- user flow: menus and TCP ---------------------------------------------------


async def test_user_menus(hass: HomeAssistant) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_USER}
    )
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "user"
    assert list(result["menu_options"]) == ["meshtastic", "mqtt_broker"]

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "meshtastic"}
    )
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "meshtastic"
    assert list(result["menu_options"]) == ["tcp", "serial"]


async def test_tcp_creates_entry(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    sim, port = node
    flow_id = await _start_tcp_flow(hass)

    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST: " 127.0.0.1 ", CONF_PORT: port}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "confirm"
    placeholders = result["description_placeholders"]
    assert placeholders["name"] == "Sim Node"
    assert placeholders["node_id"] == NODE_ID
    assert placeholders["firmware"] == "2.7.15.567b8ea"
    assert placeholders["hardware"] == "TBEAM"
    assert placeholders["connection"] == f"127.0.0.1:{port}"
    # MQTT and "Proxy to client" are on: no warning.
    assert result["errors"] is None
    assert sim.handshakes >= 1

    result = await hass.config_entries.flow.async_configure(flow_id, {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Sim Node"
    assert result["data"] == {
        CONF_ENTRY_TYPE: "meshtastic_node",
        CONF_CONNECTION: CONNECTION_TCP,
        CONF_HOST: "127.0.0.1",
        CONF_PORT: port,
    }
    entry = result["result"]
    assert entry.unique_id == str(NODE_NUM)
    assert (entry.version, entry.minor_version) == (1, 2)
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert len(mock_setup_entry.mock_calls) == 1


@pytest.mark.parametrize(
    ("flags", "warning", "mentions"),
    [
        (
            (False, False),
            "node_settings_missing",
            {"MQTT enabled": True, "Proxy to client enabled": True},
        ),
        (
            (True, False),
            "proxy_to_client_disabled",
            {"MQTT enabled": False, "Proxy to client enabled": True},
        ),
        (
            (False, True),
            "mqtt_disabled",
            {"MQTT enabled": True, "Proxy to client enabled": False},
        ),
    ],
)
async def test_tcp_warns_about_node_settings(
    hass: HomeAssistant,
    mock_setup_entry: AsyncMock,
    flags: tuple[bool, bool],
    warning: str,
    mentions: dict[str, bool],
) -> None:
    """A translated warning names the node settings that are off; adding still works."""
    sim, port = await _start_node(
        mqtt_enabled=flags[0], proxy_to_client_enabled=flags[1]
    )
    try:
        flow_id = await _start_tcp_flow(hass)
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: port}
        )
        assert result["type"] is FlowResultType.FORM
        assert result["step_id"] == "confirm"
        assert result["errors"] == {"base": warning}
        text = TRANSLATIONS["config"]["error"][warning]
        for setting, mentioned in mentions.items():
            assert (setting in text) is mentioned, setting
        # No English built in code: the placeholders are the node's own data.
        assert set(result["description_placeholders"]) == {
            "name",
            "node_id",
            "firmware",
            "hardware",
            "connection",
        }
        # Adding the node is still allowed.
        result = await hass.config_entries.flow.async_configure(flow_id, {})
        assert result["type"] is FlowResultType.CREATE_ENTRY
    finally:
        await sim.stop()


async def test_tcp_invalid_host(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    _, port = node
    flow_id = await _start_tcp_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST: "   ", CONF_PORT: port}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {CONF_HOST: "invalid_host"}

    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert result["step_id"] == "confirm"


async def test_tcp_cannot_connect_then_recovers(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    _, port = node
    flow_id = await _start_tcp_flow(hass)
    closed = free_port()
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: closed}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "tcp"
    assert result["errors"] == {"base": "cannot_connect"}

    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert result["step_id"] == "confirm"
    result = await hass.config_entries.flow.async_configure(flow_id, {})
    assert result["type"] is FlowResultType.CREATE_ENTRY


async def test_tcp_peer_hangs_up(hass: HomeAssistant) -> None:
    async with _Peer(_hang_up) as peer:
        flow_id = await _start_tcp_flow(hass)
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: peer.port}
        )
    assert result["errors"] == {"base": "cannot_connect"}
    assert peer.connections == 1


async def test_tcp_handshake_timeout(hass: HomeAssistant) -> None:
    async with _Peer(_silent) as peer:
        flow_id = await _start_tcp_flow(hass)
        with patch.object(flow_node, "PROBE_TIMEOUT", 0.3):
            result = await hass.config_entries.flow.async_configure(
                flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: peer.port}
            )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "timeout"}
    assert peer.connections == 1


async def test_tcp_unexpected_error(
    hass: HomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    flow_id = await _start_tcp_flow(hass)
    with patch.object(flow_node, "probe_node", side_effect=RuntimeError("boom")):
        result = await hass.config_entries.flow.async_configure(
            flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: 4403}
        )
    assert result["errors"] == {"base": "unknown"}
    assert "Unexpected error while connecting to 127.0.0.1:4403" in caplog.text


async def test_tcp_already_configured_updates_address(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    _, port = node
    entry = _tcp_entry(hass)
    await _loaded_entry(hass, entry)
    flow_id = await _start_tcp_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        flow_id, {CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == node_data(
        **{CONF_CONNECTION: CONNECTION_TCP, CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    await hass.async_block_till_done()
    # No reload from the flow (the entry's own update listener does that, and
    # both together are an error from HA 2026.12).
    assert len(mock_setup_entry.mock_calls) == 1


# -- user flow: serial ----------------------------------------------------------


async def test_serial_creates_entry(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, serial_node
) -> None:
    sim, device = serial_node
    usb = _port_info(
        "/dev/serial/by-id/usb-RAK_WisBlock-if00",
        resolved_device="/dev/ttyACM0",
        product="WisBlock RAK4631",
        manufacturer="RAKwireless",
        serial_number="C0FFEE",
    )
    plain = _port_info("/dev/ttyS0")
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "meshtastic"}
    )
    with _list_ports(usb, plain):
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"next_step_id": "serial"}
        )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "serial"
    assert result["description_placeholders"] == {"count": "2"}
    selector = result["data_schema"].schema[CONF_DEVICE].config
    assert selector["custom_value"] is True
    assert selector["options"] == [
        {
            "value": "/dev/serial/by-id/usb-RAK_WisBlock-if00",
            "label": "/dev/serial/by-id/usb-RAK_WisBlock-if00 - WisBlock RAK4631, "
            "RAKwireless, C0FFEE",
        },
        {"value": "/dev/ttyS0", "label": "/dev/ttyS0"},
    ]
    # The first listed port is preselected.
    marker = next(iter(result["data_schema"].schema))
    assert marker.default() == "/dev/serial/by-id/usb-RAK_WisBlock-if00"

    # A pseudo-terminal is not listed; its path is typed in (custom value).
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_DEVICE: device}
    )
    assert result["step_id"] == "confirm"
    assert result["description_placeholders"]["connection"] == device
    assert sim.handshakes >= 1
    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"] == node_data(
        **{CONF_CONNECTION: CONNECTION_SERIAL, CONF_DEVICE: device}
    )
    assert result["result"].unique_id == str(NODE_NUM)


async def test_serial_no_ports_and_cannot_connect(
    hass: HomeAssistant, tmp_path
) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_USER}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "meshtastic"}
    )
    with _list_ports():
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"next_step_id": "serial"}
        )
        # Still a form: the path can be typed in.
        assert result["type"] is FlowResultType.FORM
        assert result["description_placeholders"] == {"count": "0"}
        marker = next(iter(result["data_schema"].schema))
        assert marker.default is vol.UNDEFINED
        assert result["data_schema"].schema[CONF_DEVICE].config["options"] == []

        missing = str(tmp_path / "ttyUSB9")
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_DEVICE: missing}
        )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}
    # The typed path is kept as the default.
    assert next(iter(result["data_schema"].schema)).default() == missing


# -- zeroconf -------------------------------------------------------------------


async def test_zeroconf_creates_entry(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    sim, port = node
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_zeroconf_info(port, {"id": NODE_ID, "shortname": "SIM"}),
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "zeroconf_confirm"
    assert result["description_placeholders"]["name"] == "Sim Node"
    assert result["description_placeholders"]["firmware"] == "2.7.15.567b8ea"
    flows = hass.config_entries.flow.async_progress()
    assert flows[0]["context"]["title_placeholders"] == {"name": "Sim Node"}
    assert flows[0]["context"]["unique_id"] == str(NODE_NUM)

    result = await hass.config_entries.flow.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == "Sim Node"
    assert result["data"] == node_data(
        **{CONF_CONNECTION: CONNECTION_TCP, CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert sim.handshakes >= 1


async def test_zeroconf_known_node_is_not_contacted(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    """The TXT id identifies a configured node: no probe takes its connection."""
    sim, _ = node
    entry = _tcp_entry(hass)
    await _loaded_entry(hass, entry)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_zeroconf_info(None, {"id": NODE_ID}),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data[CONF_HOST] == "127.0.0.1"
    assert entry.data[CONF_PORT] == 4403  # no port announced: the default
    assert sim.connections == 0
    await hass.async_block_till_done()
    assert len(mock_setup_entry.mock_calls) == 1


async def test_zeroconf_without_id_probes_then_updates(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    sim, port = node
    entry = _tcp_entry(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_zeroconf_info(port, {"shortname": "SIM"}),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == node_data(
        **{CONF_CONNECTION: CONNECTION_TCP, CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert sim.handshakes >= 1


async def test_zeroconf_keeps_serial_entry(
    hass: HomeAssistant, mock_setup_entry: AsyncMock
) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=str(NODE_NUM),
        data={CONF_CONNECTION: CONNECTION_SERIAL, CONF_DEVICE: "/dev/ttyACM0"},
    )
    entry.add_to_hass(hass)
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_zeroconf_info(4403, {"id": NODE_ID}),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "already_configured"
    assert entry.data == {
        CONF_CONNECTION: CONNECTION_SERIAL,
        CONF_DEVICE: "/dev/ttyACM0",
    }


async def test_zeroconf_unreachable_with_bad_id(hass: HomeAssistant) -> None:
    result = await hass.config_entries.flow.async_init(
        DOMAIN,
        context={"source": SOURCE_ZEROCONF},
        data=_zeroconf_info(free_port(), {"id": "not-a-node"}),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "cannot_connect"


# -- reconfigure ----------------------------------------------------------------


async def test_reconfigure_tcp(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, mock_unload_entry: AsyncMock, node
) -> None:
    sim, port = node
    entry = _tcp_entry(hass, **{CONF_PORT: 4404})
    await _loaded_entry(hass, entry)

    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "reconfigure"
    assert list(result["menu_options"]) == ["tcp", "serial"]
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "tcp"}
    )
    assert result["step_id"] == "tcp"
    defaults = {key.schema: key.default() for key in result["data_schema"].schema}
    assert defaults == {CONF_HOST: "192.0.2.7", CONF_PORT: 4404}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.data == node_data(
        **{CONF_CONNECTION: CONNECTION_TCP, CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    await hass.async_block_till_done()
    # Unloaded for the probe, then set up again with the new data.
    assert entry.state is ConfigEntryState.LOADED
    assert len(mock_unload_entry.mock_calls) == 1
    assert len(mock_setup_entry.mock_calls) == 2
    assert sim.handshakes >= 1


async def test_reconfigure_wrong_node(
    hass: HomeAssistant, mock_setup_entry: AsyncMock
) -> None:
    entry = _tcp_entry(hass)
    await _loaded_entry(hass, entry)
    other, port = await _start_node(node_num=OTHER_NUM, long_name="Other Node")
    try:
        result = await entry.start_reconfigure_flow(hass)
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"next_step_id": "tcp"}
        )
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: port}
        )
    finally:
        await other.stop()
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "wrong_node"
    assert result["description_placeholders"] == {
        "name": "Other Node",
        "node_id": "!0badcafe",
    }
    assert entry.data[CONF_HOST] == "192.0.2.7"
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED


async def test_reconfigure_error_keeps_entry_running(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, node
) -> None:
    _, port = node
    entry = _tcp_entry(hass)
    await _loaded_entry(hass, entry)
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "tcp"}
    )
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: free_port()}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "cannot_connect"}
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED
    assert entry.data[CONF_HOST] == "192.0.2.7"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_HOST: "127.0.0.1", CONF_PORT: port}
    )
    assert result["reason"] == "reconfigure_successful"
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.LOADED


async def test_reconfigure_tcp_to_serial(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, serial_node
) -> None:
    _, device = serial_node
    entry = _tcp_entry(hass)
    # Not loaded: nothing to unload or set up again.
    result = await entry.start_reconfigure_flow(hass)
    with _list_ports():
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"next_step_id": "serial"}
        )
    assert result["step_id"] == "serial"
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_DEVICE: device}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.data == node_data(
        **{CONF_CONNECTION: CONNECTION_SERIAL, CONF_DEVICE: device}
    )
    await hass.async_block_till_done()
    assert entry.state is ConfigEntryState.NOT_LOADED
    assert mock_setup_entry.mock_calls == []


async def test_reconfigure_serial_shows_current_device(
    hass: HomeAssistant, mock_setup_entry: AsyncMock
) -> None:
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=str(NODE_NUM),
        data={CONF_CONNECTION: CONNECTION_SERIAL, CONF_DEVICE: "/dev/ttyACM0"},
    )
    entry.add_to_hass(hass)
    result = await entry.start_reconfigure_flow(hass)
    with _list_ports(_port_info("/dev/ttyUSB0")):
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {"next_step_id": "serial"}
        )
    assert next(iter(result["data_schema"].schema)).default() == "/dev/ttyACM0"
    # The TCP form of a serial entry starts empty.
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "tcp"}
    )
    defaults = {key.schema: key.default() for key in result["data_schema"].schema}
    assert defaults == {CONF_HOST: "", CONF_PORT: 4403}


async def _wait_running(entry: MockConfigEntry) -> None:
    async with asyncio.timeout(5):
        while not (
            entry.runtime_data.available and entry.runtime_data.proxy.broker_connected
        ):
            await asyncio.sleep(0.02)


async def test_reconfigure_running_serial_entry(
    hass: HomeAssistant, mosquitto: Mosquitto
) -> None:
    """A running entry holds its serial port exclusively; reconfigure frees it."""
    master_fd, slave_fd = os.openpty()
    sim = SimulatedNode(default_profile(mqtt_address=f"127.0.0.1:{mosquitto.port}"))
    await sim.serve_serial(master_fd)
    device = os.ttyname(slave_fd)
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Sim Node",
        unique_id=str(NODE_NUM),
        data={CONF_CONNECTION: CONNECTION_SERIAL, CONF_DEVICE: device},
    )
    entry.add_to_hass(hass)
    try:
        await _loaded_entry(hass, entry)
        # Also wait for the broker session: unloading while aiomqtt is still
        # connecting leaves its task behind.
        await _wait_running(entry)
        handshakes = sim.handshakes

        result = await entry.start_reconfigure_flow(hass)
        with _list_ports():
            result = await hass.config_entries.flow.async_configure(
                result["flow_id"], {"next_step_id": "serial"}
            )
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_DEVICE: device}
        )
        assert result["type"] is FlowResultType.ABORT
        assert result["reason"] == "reconfigure_successful"
        await hass.async_block_till_done()
        assert entry.state is ConfigEntryState.LOADED
        # The probe's handshake, then the set-up-again entry's own.
        await sim.wait_for(lambda: sim.handshakes >= handshakes + 2)
        await _wait_running(entry)
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await sim.stop()
        os.close(slave_fd)
        os.close(master_fd)


# -- reauth ---------------------------------------------------------------------


def _custom_broker_entry(
    hass: HomeAssistant, broker_port: int, **options: object
) -> MockConfigEntry:
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Sim Node",
        unique_id=str(NODE_NUM),
        version=VERSION,
        minor_version=MINOR_VERSION,
        data=node_data(
            **{CONF_CONNECTION: CONNECTION_TCP, CONF_HOST: "192.0.2.7", CONF_PORT: 4403}
        ),
        options={
            CONF_BROKER_MODE: BROKER_MODE_CUSTOM,
            CONF_BROKER_HOST: "127.0.0.1",
            CONF_BROKER_PORT: broker_port,
            CONF_BROKER_TLS: False,
            CONF_BROKER_USERNAME: "u",
            CONF_BROKER_PASSWORD: "old",
            CONF_FORWARD_RETAINED: True,
            **options,
        },
    )
    entry.add_to_hass(hass)
    return entry


async def test_reauth(hass: HomeAssistant, password_broker: Mosquitto) -> None:
    entry = _custom_broker_entry(hass, password_broker.port)
    result = await entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "reauth_confirm"
    assert result["description_placeholders"] == {
        "name": "Sim Node",
        "broker": f"127.0.0.1:{password_broker.port}",
    }

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        {CONF_BROKER_USERNAME: "u", CONF_BROKER_PASSWORD: "wrong"},
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}
    assert entry.options[CONF_BROKER_PASSWORD] == "old"

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_BROKER_USERNAME: " u ", CONF_BROKER_PASSWORD: "p"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert entry.options[CONF_BROKER_USERNAME] == "u"
    assert entry.options[CONF_BROKER_PASSWORD] == "p"
    assert entry.options[CONF_FORWARD_RETAINED] is True
    assert entry.data[CONF_HOST] == "192.0.2.7"


async def test_reauth_cannot_connect_and_unknown(
    hass: HomeAssistant, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _custom_broker_entry(hass, free_port())
    result = await entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_BROKER_USERNAME: "u", CONF_BROKER_PASSWORD: "p"}
    )
    assert result["errors"] == {"base": "cannot_connect"}

    with patch.object(
        flow_common, "check_connection", side_effect=RuntimeError("boom")
    ):
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], {CONF_BROKER_USERNAME: "u", CONF_BROKER_PASSWORD: "p"}
        )
    assert result["errors"] == {"base": "unknown"}
    assert "Unexpected error while checking the broker" in caplog.text
    assert entry.options[CONF_BROKER_PASSWORD] == "old"


async def test_reauth_without_custom_broker(hass: HomeAssistant) -> None:
    entry = _tcp_entry(hass)
    result = await entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "no_custom_broker"


# -- options --------------------------------------------------------------------


async def test_options_node_broker(hass: HomeAssistant) -> None:
    entry = _tcp_entry(hass)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "init"
    defaults = {key.schema: key.default() for key in result["data_schema"].schema}
    assert defaults == {**NODE_PROXY_DEFAULTS, CONF_SHARE_NODE: False}

    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_BROKER_MODE: BROKER_MODE_NODE,
            CONF_ALLOW_SELF_SIGNED: True,
            CONF_FORWARD_RETAINED: False,
            CONF_FORWARD_OWN_ECHOES: True,
            CONF_UPLINK_QUEUE_SIZE: 250.0,
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {
        CONF_BROKER_MODE: BROKER_MODE_NODE,
        CONF_ALLOW_SELF_SIGNED: True,
        CONF_FORWARD_RETAINED: False,
        CONF_FORWARD_OWN_ECHOES: True,
        CONF_UPLINK_QUEUE_SIZE: 250,
        CONF_SHARE_NODE: False,
    }
    assert isinstance(entry.options[CONF_UPLINK_QUEUE_SIZE], int)


def _init_input(mode: str = BROKER_MODE_CUSTOM) -> dict[str, object]:
    return {**NODE_PROXY_DEFAULTS, CONF_BROKER_MODE: mode, CONF_SHARE_NODE: False}


async def test_options_custom_broker(
    hass: HomeAssistant, password_broker: Mosquitto
) -> None:
    entry = _tcp_entry(hass)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], _init_input()
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "broker"
    defaults = {
        key.schema: key.default()
        for key in result["data_schema"].schema
        if key.default is not vol.UNDEFINED
    }
    assert defaults == {
        CONF_BROKER_HOST: "",
        CONF_BROKER_PORT: 1883,
        CONF_BROKER_TLS: False,
    }

    broker = {
        CONF_BROKER_HOST: "127.0.0.1",
        CONF_BROKER_PORT: float(password_broker.port),
        CONF_BROKER_TLS: False,
        CONF_BROKER_USERNAME: "u",
        CONF_BROKER_PASSWORD: "nope",
    }
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], broker
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}

    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**broker, CONF_BROKER_PASSWORD: "p"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options == {
        **_init_input(),
        CONF_BROKER_HOST: "127.0.0.1",
        CONF_BROKER_PORT: password_broker.port,
        CONF_BROKER_TLS: False,
        CONF_BROKER_USERNAME: "u",
        CONF_BROKER_PASSWORD: "p",
    }

    # Again, leaving the password empty: the saved one is kept (and accepted).
    result = await hass.config_entries.options.async_init(entry.entry_id)
    defaults = {key.schema: key.default() for key in result["data_schema"].schema}
    assert defaults[CONF_BROKER_MODE] == BROKER_MODE_CUSTOM
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**_init_input(), CONF_FORWARD_RETAINED: True}
    )
    suggested = {
        key.schema: (key.description or {}).get("suggested_value")
        for key in result["data_schema"].schema
    }
    assert suggested[CONF_BROKER_USERNAME] == "u"
    assert suggested[CONF_BROKER_PASSWORD] is None  # never sent to the browser
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_BROKER_HOST: "127.0.0.1",
            CONF_BROKER_PORT: password_broker.port,
            CONF_BROKER_TLS: False,
            CONF_BROKER_USERNAME: "u",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_BROKER_PASSWORD] == "p"
    assert entry.options[CONF_FORWARD_RETAINED] is True


async def test_options_broker_errors(
    hass: HomeAssistant, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    entry = _tcp_entry(hass)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**_init_input(), CONF_ALLOW_SELF_SIGNED: True}
    )
    base = {CONF_BROKER_HOST: "127.0.0.1", CONF_BROKER_TLS: False}
    flow_id = result["flow_id"]

    result = await hass.config_entries.options.async_configure(
        flow_id, {**base, CONF_BROKER_HOST: "  ", CONF_BROKER_PORT: mosquitto.port}
    )
    assert result["errors"] == {CONF_BROKER_HOST: "invalid_host"}

    result = await hass.config_entries.options.async_configure(
        flow_id, {**base, CONF_BROKER_PORT: free_port()}
    )
    assert result["errors"] == {"base": "cannot_connect"}

    # TLS to a plain listener fails the handshake.
    result = await hass.config_entries.options.async_configure(
        flow_id, {**base, CONF_BROKER_PORT: mosquitto.port, CONF_BROKER_TLS: True}
    )
    assert result["errors"] == {"base": "cannot_connect"}
    # The form keeps what was typed.
    defaults = {
        key.schema: key.default()
        for key in result["data_schema"].schema
        if key.default is not vol.UNDEFINED
    }
    assert defaults[CONF_BROKER_TLS] is True

    with patch.object(
        flow_common, "check_connection", side_effect=RuntimeError("boom")
    ):
        result = await hass.config_entries.options.async_configure(
            flow_id, {**base, CONF_BROKER_PORT: mosquitto.port}
        )
    assert result["errors"] == {"base": "unknown"}

    # Anonymous access to the session broker.
    result = await hass.config_entries.options.async_configure(
        flow_id, {**base, CONF_BROKER_PORT: mosquitto.port}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_BROKER_USERNAME] == ""
    assert entry.options[CONF_BROKER_PASSWORD] == ""
    assert entry.options[CONF_ALLOW_SELF_SIGNED] is True


async def test_options_self_signed_broker(
    hass: HomeAssistant, tls_broker: Mosquitto
) -> None:
    entry = _tcp_entry(hass)
    broker = {
        CONF_BROKER_HOST: "127.0.0.1",
        CONF_BROKER_PORT: tls_broker.tls_port,
        CONF_BROKER_TLS: True,
    }
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], _init_input()
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], broker
    )
    # The certificate is checked unless self-signed ones are allowed.
    assert result["errors"] == {"base": "tls_failed"}

    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {**_init_input(), CONF_ALLOW_SELF_SIGNED: True}
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], broker
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_BROKER_TLS] is True
    assert entry.options[CONF_ALLOW_SELF_SIGNED] is True


# -- the broker check (the engine's check_connection, mapped to error keys) --------


async def _check(settings: MqttSettings) -> dict[str, str]:
    errors: dict[str, str] = {}
    passed = await flow_common.async_check_broker(settings, errors)
    assert passed is (not errors)
    return errors


async def test_broker_check_credentials(
    hass: HomeAssistant, password_broker: Mosquitto
) -> None:
    port = password_broker.port
    assert (
        await _check(MqttSettings("127.0.0.1", port, username="u", password="p")) == {}
    )
    assert await _check(
        MqttSettings("127.0.0.1", port, username="u", password="bad")
    ) == {"base": "invalid_auth"}
    assert await _check(MqttSettings("127.0.0.1", port)) == {"base": "invalid_auth"}


async def test_broker_check_unreachable_and_tls(
    hass: HomeAssistant, mosquitto: Mosquitto, tls_broker: Mosquitto
) -> None:
    assert await _check(MqttSettings("127.0.0.1", free_port())) == {
        "base": "cannot_connect"
    }
    # A self-signed certificate fails verification unless it is accepted.
    assert await _check(MqttSettings("127.0.0.1", tls_broker.tls_port, tls=True)) == {
        "base": "tls_failed"
    }
    assert (
        await _check(
            MqttSettings("127.0.0.1", tls_broker.tls_port, tls=True, verify_tls=False)
        )
        == {}
    )


async def test_broker_check_refused_for_other_reason(hass: HomeAssistant) -> None:
    """CONNACK "server unavailable" is not a credentials problem."""
    async with _Peer(_server_unavailable) as peer:
        assert await _check(MqttSettings("127.0.0.1", peer.port)) == {
            "base": "cannot_connect"
        }
    assert peer.connections >= 1


async def test_broker_check_timeout(hass: HomeAssistant) -> None:
    """A peer that accepts and never answers CONNACK is a timeout."""
    async with _Peer(_silent) as peer:
        with patch.object(flow_common, "BROKER_TIMEOUT", 0.3):
            assert await _check(MqttSettings("127.0.0.1", peer.port)) == {
                "base": "timeout"
            }
    assert peer.connections == 1


async def test_options_broker_timeout(hass: HomeAssistant) -> None:
    """The options flow shows the broker check's timeout (translated)."""
    entry = _tcp_entry(hass)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], _init_input()
    )
    async with _Peer(_silent) as peer:
        with patch.object(flow_common, "BROKER_TIMEOUT", 0.3):
            result = await hass.config_entries.options.async_configure(
                result["flow_id"],
                {
                    CONF_BROKER_HOST: "127.0.0.1",
                    CONF_BROKER_PORT: peer.port,
                    CONF_BROKER_TLS: False,
                },
            )
    assert result["errors"] == {"base": "timeout"}
    assert CONF_BROKER_HOST not in entry.options


# -- entry types ----------------------------------------------------------------


def _future_entry(hass: HomeAssistant) -> MockConfigEntry:
    """An entry of a type this version does not know (written by a newer one)."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        title="Future",
        unique_id="future",
        version=VERSION,
        minor_version=MINOR_VERSION,
        data={CONF_ENTRY_TYPE: "future_type"},
    )
    entry.add_to_hass(hass)
    return entry


async def test_user_menu_offers_node_then_broker(hass: HomeAssistant) -> None:
    """The Meshtastic node comes first, the MQTT broker second."""
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_USER}
    )
    assert result["menu_options"] == ["meshtastic", EntryType.MQTT_BROKER.value]


async def test_options_flow_by_entry_type(hass: HomeAssistant) -> None:
    node = _tcp_entry(hass)
    future = _future_entry(hass)
    flow = config_flow.MqttBridgeConfigFlow
    assert flow.async_supports_options_flow(node) is True
    assert flow.async_supports_options_flow(future) is False
    assert isinstance(flow.async_get_options_flow(node), flow_node.NodeOptionsFlow)
    with pytest.raises(UnknownHandler):
        await hass.config_entries.options.async_init(future.entry_id)


async def test_flows_of_unmigrated_entry(hass: HomeAssistant) -> None:
    """A 1.1 entry (no entry_type, e.g. disabled during the upgrade) is a node."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=str(NODE_NUM),
        data={CONF_CONNECTION: CONNECTION_TCP, CONF_HOST: "192.0.2.7", CONF_PORT: 4403},
    )
    entry.add_to_hass(hass)
    assert (entry.version, entry.minor_version) == (1, 1)
    assert config_flow.MqttBridgeConfigFlow.async_supports_options_flow(entry)
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["step_id"] == "init"
    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "reconfigure"


async def test_reconfigure_and_reauth_of_unknown_type(hass: HomeAssistant) -> None:
    entry = _future_entry(hass)
    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_supported"
    result = await entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "not_supported"
