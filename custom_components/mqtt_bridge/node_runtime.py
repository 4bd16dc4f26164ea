"""Runtime of a Meshtastic node entry: the node link and the proxy, glued to Home Assistant.

Thin glue only: the engines in :mod:`.engine` do the work. :class:`NodeRuntime`
turns their callbacks into typed dispatcher signals (entity updates,
rate-limited to one per ``UPDATE_THROTTLE`` seconds; text messages, at once)
and ``mqtt_bridge_text_message`` bus events (described by :mod:`.logbook`),
keeps the node's device in the registry current, logs unavailability once,
hands the proxy status to :class:`~.issues.NodeIssues`, sends text
messages for the ``send_text`` action (the one place that validates them) and,
with "Share this node" on, serves the node to other clients on the same link
(:class:`~.node_sharing.NodeSharing`).
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import time
from typing import Any, Final, Self

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import (
    ATTR_DEVICE_ID,
    ATTR_ENTITY_ID,
    CONF_DEVICE,
    CONF_HOST,
    CONF_PORT,
    Platform,
)
from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import device_registry as dr, entity_registry as er
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.dispatcher import async_dispatcher_send
from homeassistant.helpers.event import async_call_later
from homeassistant.util.signal_type import SignalTypeFormat
from meshtastic.protobuf import mesh_pb2, portnums_pb2

from .const import (
    ATTR_CHANNEL,
    ATTR_CHANNEL_NAME,
    ATTR_CONFIG_ENTRY_ID,
    ATTR_DESTINATION,
    ATTR_PACKET_ID,
    ATTR_RSSI,
    ATTR_RX_TIME,
    ATTR_SENDER_ID,
    ATTR_SENDER_NAME,
    ATTR_SNR,
    ATTR_TEXT,
    ATTR_VIA_MQTT,
    BROKER_MODE_CUSTOM,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_CONNECTION,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_UPLINK_QUEUE_SIZE,
    CONNECTION_SERIAL,
    DEFAULT_UPLINK_QUEUE_SIZE,
    DESTINATION_BROADCAST,
    DOMAIN,
    EVENT_TEXT_MESSAGE,
    KEY_MESSAGES,
    MANUFACTURER,
    UPDATE_THROTTLE,
)
from .engine.mqtt_client import PORT_PLAIN, PORT_TLS
from .engine.node_link import (
    DEFAULT_TCP_PORT,
    Connector,
    LinkNotReadyError,
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
    serial_connector,
    tcp_connector,
)
from .engine.proxy import BrokerOverride, MeshtasticProxy, ProxyOptions
from .engine.rules import (
    BROADCAST_NUM,
    MAX_TEXT_BYTES,
    channel_name,
    node_id,
    parse_node_id,
)
from .engine.supervisor import supervise
from .issues import NodeIssues
from .models import EntryRuntime, validation_error
from .node_sharing import NodeSharing

_LOGGER = logging.getLogger(__name__)

# Highest channel index: a node has 8 channel slots (channel.options max_count).
MAX_CHANNEL_INDEX: Final = 7
# Channel.Role DISABLED: the slot is unused.
_CHANNEL_DISABLED: Final = 0
# Seconds send_text waits for a link that is connecting or (re-)reading the
# node's settings, e.g. after a shared client changed one, before it fails.
SEND_READY_TIMEOUT: Final = 5.0

type NodeConfigEntry = ConfigEntry[NodeRuntime]

# Sent (formatted with the entry id, no arguments) when entities should write
# their state: at most once per UPDATE_THROTTLE seconds, at once when the node
# comes or goes.
SIGNAL_NODE_UPDATE: Final[SignalTypeFormat[()]] = SignalTypeFormat(
    f"{DOMAIN}_{{}}_update"
)
# Sent (formatted with the entry id) with each text message the node receives.
SIGNAL_NODE_TEXT: Final[SignalTypeFormat[TextMessage]] = SignalTypeFormat(
    f"{DOMAIN}_{{}}_text"
)


def connector_from_data(data: dict[str, Any]) -> Connector:
    """Return the node connector for node entry ``data`` (TCP or serial)."""
    if data.get(CONF_CONNECTION) == CONNECTION_SERIAL:
        return serial_connector(data[CONF_DEVICE])
    return tcp_connector(data[CONF_HOST], int(data.get(CONF_PORT, DEFAULT_TCP_PORT)))


def describe_connection(data: dict[str, Any]) -> str:
    """Return ``host:port`` or the serial device path of node entry ``data``."""
    if data.get(CONF_CONNECTION) == CONNECTION_SERIAL:
        return str(data[CONF_DEVICE])
    return f"{data[CONF_HOST]}:{data.get(CONF_PORT, DEFAULT_TCP_PORT)}"


def proxy_options_from_entry(options: dict[str, Any]) -> ProxyOptions:
    """Return the engine's :class:`ProxyOptions` for a node entry's options.

    A custom broker without a port uses 8883 with TLS, else 1883.
    """
    override = None
    if options.get(CONF_BROKER_MODE) == BROKER_MODE_CUSTOM and options.get(
        CONF_BROKER_HOST
    ):
        tls = bool(options.get(CONF_BROKER_TLS, False))
        override = BrokerOverride(
            host=options[CONF_BROKER_HOST],
            port=int(
                options.get(CONF_BROKER_PORT) or (PORT_TLS if tls else PORT_PLAIN)
            ),
            tls=tls,
            username=options.get(CONF_BROKER_USERNAME) or None,
            password=options.get(CONF_BROKER_PASSWORD) or None,
        )
    return ProxyOptions(
        broker_override=override,
        verify_tls=not options.get(CONF_ALLOW_SELF_SIGNED, False),
        forward_retained=bool(options.get(CONF_FORWARD_RETAINED, False)),
        forward_own_echoes=bool(options.get(CONF_FORWARD_OWN_ECHOES, False)),
        uplink_queue_size=int(
            options.get(CONF_UPLINK_QUEUE_SIZE, DEFAULT_UPLINK_QUEUE_SIZE)
        ),
    )


def node_device_info(
    identifier: tuple[str, str], *, title: str, snapshot: NodeSnapshot | None
) -> DeviceInfo:
    """Return the device registry info of a node (the one definition).

    With the handshake ``snapshot``: the node's long name, hardware model,
    firmware and node id. Without (the node was never reached): the entry
    ``title`` as name.
    """
    if snapshot is None:
        return DeviceInfo(
            identifiers={identifier}, manufacturer=MANUFACTURER, name=title
        )
    return DeviceInfo(
        identifiers={identifier},
        manufacturer=MANUFACTURER,
        name=snapshot.long_name,
        model=snapshot.hw_model,
        sw_version=snapshot.firmware_version,
        serial_number=snapshot.node_id,
    )


@dataclass(slots=True)
class TextMessage:
    """A decoded text message the node received (what the event entity fires).

    ``rx_time`` is a POSIX timestamp in seconds; ``snr`` in dB; ``rssi`` in dBm.
    ``channel`` is the channel index; ``to`` the destination node id or
    ``^all`` for broadcast.
    """

    sender_id: str
    sender_name: str | None
    channel: int
    channel_name: str | None
    to: str
    text: str
    rx_time: float
    snr: float | None
    rssi: int | None
    via_mqtt: bool
    packet_id: int

    @classmethod
    def from_packet(
        cls, packet: mesh_pb2.MeshPacket, snapshot: NodeSnapshot | None
    ) -> Self:
        """Decode a ``TEXT_MESSAGE_APP`` packet; names come from ``snapshot``.

        Undecodable UTF-8 is replaced; a missing ``rx_time`` is now; SNR and
        RSSI of 0 (not reported) are ``None``.
        """
        sender = int(getattr(packet, "from"))
        index = int(packet.channel)
        label = None
        if snapshot is not None and 0 <= index < len(snapshot.channels):
            label = channel_name(snapshot.channels[index], snapshot.lora)
        return cls(
            sender_id=node_id(sender),
            sender_name=snapshot.node_name(sender) if snapshot else None,
            channel=index,
            channel_name=label,
            to=DESTINATION_BROADCAST
            if packet.to == BROADCAST_NUM
            else node_id(packet.to),
            text=packet.decoded.payload.decode(errors="replace"),
            rx_time=float(packet.rx_time or time.time()),
            snr=float(packet.rx_snr) if packet.rx_snr else None,
            rssi=int(packet.rx_rssi) if packet.rx_rssi else None,
            via_mqtt=bool(packet.via_mqtt),
            packet_id=int(packet.id),
        )

    def as_event_data(self) -> dict[str, Any]:
        """Return the event entity's attributes (JSON-serialisable)."""
        return {
            ATTR_SENDER_ID: self.sender_id,
            ATTR_SENDER_NAME: self.sender_name,
            ATTR_CHANNEL: self.channel,
            ATTR_CHANNEL_NAME: self.channel_name,
            ATTR_DESTINATION: self.to,
            ATTR_TEXT: self.text,
            ATTR_RX_TIME: self.rx_time,
            ATTR_SNR: self.snr,
            ATTR_RSSI: self.rssi,
            ATTR_VIA_MQTT: self.via_mqtt,
            ATTR_PACKET_ID: self.packet_id,
        }


class NodeRuntime(EntryRuntime, NodeLinkListener):
    """Runtime data of a Meshtastic node entry: link, proxy, signals, repairs."""

    platforms = (Platform.BINARY_SENSOR, Platform.EVENT, Platform.SENSOR)

    def __init__(self, hass: HomeAssistant, entry: NodeConfigEntry) -> None:
        """Build the link and proxy and register the node's device.

        Nothing connects until :meth:`start`. The device is registered here, before
        the platforms add their entities, so that entities only link to it and a
        reload never replaces the names the node reported with the entry title.
        """
        super().__init__(hass, entry)
        self.connection = describe_connection(dict(entry.data))
        self.link = NodeLink(connector_from_data(dict(entry.data)), name=entry.title)
        self.proxy = MeshtasticProxy(
            self.link,
            proxy_options_from_entry(dict(entry.options)),
            on_change=self._on_proxy_change,
        )
        self.link.add_listener(self)
        self.issues = NodeIssues(hass, entry)
        self.sharing = NodeSharing(
            hass, entry, self.link, self.issues, self._schedule_update
        )
        self.signal_update = SIGNAL_NODE_UPDATE.format(entry.entry_id)
        self.signal_text = SIGNAL_NODE_TEXT.format(entry.entry_id)
        self.device_id = self._async_register_device()
        self._update_pending: CALLBACK_TYPE | None = None
        self._was_available: bool | None = None
        # Set on unload: the engines still report their shutdown (link STOPPED)
        # after the on-unload callbacks ran; no timer may be scheduled then.
        self._unloaded = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the link, the proxy and the shared node as background tasks.

        The link and the proxy are supervised: one that ends unexpectedly is
        logged with its traceback, shown as proxy status ``task_failed`` and in
        diagnostics, and started again. The shared node (when on) retries a
        port it cannot bind (:class:`~.node_sharing.NodeSharing`).
        """
        entry = self.entry
        health = self.proxy.health
        entry.async_create_background_task(
            self.hass,
            supervise("node link", self.link.run, health),
            f"{DOMAIN} {entry.title} node link",
        )
        entry.async_create_background_task(
            self.hass,
            supervise("proxy", self.proxy.run, health),
            f"{DOMAIN} {entry.title} proxy",
        )
        self.sharing.start()
        entry.async_on_unload(self._async_unloaded)

    @callback
    def _async_unloaded(self) -> None:
        self._unloaded = True
        self._cancel_update()
        self.issues.async_clear()

    @callback
    def _cancel_update(self) -> None:
        if self._update_pending is not None:
            self._update_pending()
            self._update_pending = None

    # -- state for entities ------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the node link is live (entities are unavailable otherwise).

        Also while the link re-reads the node's settings on the live connection
        (:meth:`.engine.node_link.NodeLink.request_config`, after a shared
        client changed one): the node stays connected meanwhile.
        """
        return self.link.state is LinkState.READY or self.link.refreshing

    @property
    def snapshot(self) -> NodeSnapshot | None:
        """The node's state from the last handshake."""
        return self.link.snapshot

    @property
    def device_identifier(self) -> tuple[str, str]:
        """The device registry identifier of the node (entry-scoped)."""
        return (DOMAIN, self.entry.unique_id or self.entry.entry_id)

    def unique_id(self, key: str) -> str:
        """Return the unique id of the node's entity with description ``key``."""
        return f"{self.entry.unique_id or self.entry.entry_id}_{key}"

    @callback
    def _async_register_device(self) -> str:
        """Create the node's device unless it exists; return its device id."""
        registry = dr.async_get(self.hass)
        for device in dr.async_entries_for_config_entry(registry, self.entry.entry_id):
            if self.device_identifier in device.identifiers:
                return device.id
        return registry.async_get_or_create(
            config_entry_id=self.entry.entry_id,
            **node_device_info(
                self.device_identifier, title=self.entry.title, snapshot=self.snapshot
            ),
        ).id

    # -- dispatch ----------------------------------------------------------------

    @callback
    def _on_proxy_change(self) -> None:
        if self._unloaded:
            return
        self._schedule_update()
        self.issues.async_update(self.proxy)

    @callback
    def _schedule_update(self) -> None:
        """Send the update signal within ``UPDATE_THROTTLE`` seconds (once)."""
        if self._unloaded:
            return
        if self._update_pending is None:
            self._update_pending = async_call_later(
                self.hass, UPDATE_THROTTLE, self._flush_update
            )

    @callback
    def _flush_update(self, _now: Any = None) -> None:
        self._update_pending = None
        async_dispatcher_send(self.hass, self.signal_update)

    @callback
    def _dispatch_now(self) -> None:
        self._cancel_update()
        async_dispatcher_send(self.hass, self.signal_update)

    # -- NodeLinkListener --------------------------------------------------------

    def on_state(self, state: LinkState) -> None:
        """Log availability changes once and refresh entities at once."""
        available = state is LinkState.READY
        if available != self._was_available and state in (
            LinkState.READY,
            LinkState.DISCONNECTED,
        ):
            if available:
                if self._was_available is False:
                    _LOGGER.info("Meshtastic node %s is back", self.connection)
            elif self._was_available:
                _LOGGER.info(
                    "Meshtastic node %s is unavailable: %s",
                    self.connection,
                    self.link.stats.last_error or "connection lost",
                )
            self._was_available = available
            self._dispatch_now()

    def on_ready(self, snapshot: NodeSnapshot) -> None:
        """Keep the device registry in step with what the node reported."""
        dr.async_get(self.hass).async_get_or_create(
            config_entry_id=self.entry.entry_id,
            **node_device_info(
                self.device_identifier, title=self.entry.title, snapshot=snapshot
            ),
        )

    def on_telemetry(self, metrics: Any) -> None:
        """Refresh entities (rate-limited) when the node reports device metrics."""
        self._on_proxy_change()

    def on_packet(self, packet: mesh_pb2.MeshPacket) -> None:
        """Turn decoded text packets into the event entity's signal and a bus event.

        The bus event ``mqtt_bridge_text_message`` carries the event entity's
        attributes plus ``config_entry_id``, ``device_id`` and ``entity_id`` (the
        "Messages" event entity, ``None`` if it is not registered), so the logbook
        lists it under that entity and device.
        """
        if not packet.HasField("decoded") or (
            packet.decoded.portnum != portnums_pb2.PortNum.TEXT_MESSAGE_APP
        ):
            return
        message = TextMessage.from_packet(packet, self.link.snapshot)
        async_dispatcher_send(self.hass, self.signal_text, message)
        entity_id = er.async_get(self.hass).async_get_entity_id(
            Platform.EVENT, DOMAIN, self.unique_id(KEY_MESSAGES)
        )
        self.hass.bus.async_fire(
            EVENT_TEXT_MESSAGE,
            {
                **message.as_event_data(),
                ATTR_CONFIG_ENTRY_ID: self.entry.entry_id,
                ATTR_DEVICE_ID: self.device_id,
                ATTR_ENTITY_ID: entity_id,
            },
        )

    # -- actions -----------------------------------------------------------------

    async def async_send_text(
        self, text: str, *, channel: int = 0, destination: str | int | None = None
    ) -> None:
        """Send a text message to the mesh through the node (the one send path).

        ``text`` must be 1 to 233 bytes of UTF-8 (firmware
        ``DATA_PAYLOAD_LEN`` minus headers, :data:`.engine.rules.MAX_TEXT_BYTES`);
        ``channel`` a channel index 0..7 that is enabled on the node (checked once
        the node's channels are known); ``destination`` a node id (``!1a2b3c4d``,
        hex or decimal, see :func:`.engine.rules.parse_node_id`) for a direct
        message with ACK request, or ``None``/blank for a broadcast. A node that
        does not answer with a ``QueueStatus`` (firmware < 2.7) counts as sent.
        While the link is connecting or (re-)reading the node's settings, the
        message waits up to :data:`SEND_READY_TIMEOUT` seconds for it.

        Raises:
            ServiceValidationError: translation keys ``invalid_text_length``,
                ``invalid_channel``, ``channel_disabled``, ``invalid_destination``.
            HomeAssistantError: ``node_not_connected``; ``send_rejected`` when the
                node's ``QueueStatus.res`` is not 0 (e.g. its TX queue is full).

        """
        name = self.entry.title
        payload = text.encode()
        if not 0 < len(payload) <= MAX_TEXT_BYTES:
            raise validation_error(
                "invalid_text_length", length=str(len(payload)), max=str(MAX_TEXT_BYTES)
            )
        if not 0 <= channel <= MAX_CHANNEL_INDEX:
            raise validation_error("invalid_channel", channel=str(channel))
        snapshot = self.snapshot
        if snapshot is not None and (
            channel >= len(snapshot.channels)
            or snapshot.channels[channel].role == _CHANNEL_DISABLED
        ):
            raise validation_error("channel_disabled", channel=str(channel), name=name)
        to = BROADCAST_NUM
        if destination is not None and str(destination).strip():
            try:
                to = parse_node_id(destination)
            except ValueError:
                raise validation_error(
                    "invalid_destination", destination=str(destination)
                ) from None

        packet = mesh_pb2.MeshPacket(
            to=to, channel=channel, want_ack=to != BROADCAST_NUM
        )
        packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
        packet.decoded.payload = payload
        await self.link.wait_settled(SEND_READY_TIMEOUT)
        try:
            status = await self.link.send_packet(packet)
        except LinkNotReadyError as err:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="node_not_connected",
                translation_placeholders={"name": name},
            ) from err
        if status is not None and status.res != 0:
            raise HomeAssistantError(
                translation_domain=DOMAIN,
                translation_key="send_rejected",
                translation_placeholders={
                    "name": name,
                    "result": str(status.res),
                    "destination": DESTINATION_BROADCAST
                    if to == BROADCAST_NUM
                    else node_id(to),
                },
            )
