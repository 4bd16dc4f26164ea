"""Runtime of one config entry: the node link and the proxy, glued to Home Assistant.

Thin glue only: the engines in :mod:`.engine` do the work. This module turns
their callbacks into dispatcher signals (entity updates, rate-limited to one per
``UPDATE_THROTTLE`` seconds; text messages, immediately), keeps the device
registry current, logs unavailability once, and raises or clears repair issues
and the reauth flow when the user must act.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import time
from typing import Any

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import CALLBACK_TYPE, HomeAssistant, callback
from homeassistant.helpers import device_registry as dr, issue_registry as ir
from homeassistant.helpers.dispatcher import async_dispatcher_send
from homeassistant.helpers.event import async_call_later
from meshtastic.protobuf import mesh_pb2, portnums_pb2

from .const import (
    BROKER_MODE_CUSTOM,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_CONNECTION,
    CONF_DEVICE,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_HOST,
    CONF_PORT,
    CONF_UPLINK_QUEUE_SIZE,
    CONNECTION_SERIAL,
    DEFAULT_TCP_PORT,
    DEFAULT_UPLINK_QUEUE_SIZE,
    DOMAIN,
    ISSUE_BROKER_ADDRESS,
    ISSUE_BROKER_AUTH,
    ISSUE_NODE_SETTINGS,
    MANUFACTURER,
    UPDATE_THROTTLE,
)
from .engine.node_link import (
    Connector,
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
    serial_connector,
    tcp_connector,
)
from .engine.proxy import BrokerOverride, MeshtasticProxy, ProxyOptions, ProxyStatus
from .engine.rules import BROADCAST_NUM, MAX_TEXT_BYTES, channel_name, node_id

_LOGGER = logging.getLogger(__name__)

type MqttBridgeConfigEntry = ConfigEntry[MeshtasticRuntime]


def connector_from_data(data: dict[str, Any]) -> Connector:
    """Return the node connector for config entry ``data`` (TCP or serial)."""
    if data.get(CONF_CONNECTION) == CONNECTION_SERIAL:
        return serial_connector(data[CONF_DEVICE])
    return tcp_connector(data[CONF_HOST], int(data.get(CONF_PORT, DEFAULT_TCP_PORT)))


def describe_connection(data: dict[str, Any]) -> str:
    """Return ``host:port`` or the serial device path, for logs and titles."""
    if data.get(CONF_CONNECTION) == CONNECTION_SERIAL:
        return str(data[CONF_DEVICE])
    return f"{data[CONF_HOST]}:{data.get(CONF_PORT, DEFAULT_TCP_PORT)}"


def proxy_options_from_entry(options: dict[str, Any]) -> ProxyOptions:
    """Return the engine's :class:`ProxyOptions` for a config entry's options."""
    override = None
    if options.get(CONF_BROKER_MODE) == BROKER_MODE_CUSTOM and options.get(
        CONF_BROKER_HOST
    ):
        tls = bool(options.get(CONF_BROKER_TLS, False))
        override = BrokerOverride(
            host=options[CONF_BROKER_HOST],
            port=int(options.get(CONF_BROKER_PORT) or (8883 if tls else 1883)),
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

    def as_event_data(self) -> dict[str, Any]:
        """Return the event attributes (JSON-serialisable)."""
        return {
            "sender_id": self.sender_id,
            "sender_name": self.sender_name,
            "channel": self.channel,
            "channel_name": self.channel_name,
            "destination": self.to,
            "text": self.text,
            "rx_time": self.rx_time,
            "snr": self.snr,
            "rssi": self.rssi,
            "via_mqtt": self.via_mqtt,
            "packet_id": self.packet_id,
        }


class MeshtasticRuntime(NodeLinkListener):
    """The entry's runtime data: link, proxy, dispatcher signals, repairs."""

    def __init__(self, hass: HomeAssistant, entry: MqttBridgeConfigEntry) -> None:
        """Build the link and proxy for ``entry`` (nothing runs until :meth:`start`)."""
        self.hass = hass
        self.entry = entry
        self.connection = describe_connection(dict(entry.data))
        self.link = NodeLink(connector_from_data(dict(entry.data)), name=entry.title)
        self.proxy = MeshtasticProxy(
            self.link,
            proxy_options_from_entry(dict(entry.options)),
            on_change=self._on_proxy_change,
        )
        self.link.add_listener(self)
        self.signal_update = f"{DOMAIN}_{entry.entry_id}_update"
        self.signal_text = f"{DOMAIN}_{entry.entry_id}_text"
        self.last_text: TextMessage | None = None
        self._update_pending: CALLBACK_TYPE | None = None
        self._was_available: bool | None = None
        self._last_status: ProxyStatus | None = None
        self._reauth_started = False
        # Set on unload: the engines still report their shutdown (link STOPPED)
        # after the on-unload callbacks ran; no timer may be scheduled then.
        self._unloaded = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start the link and the proxy as background tasks of the entry."""
        entry = self.entry
        entry.async_create_background_task(
            self.hass, self.link.run(), f"{DOMAIN} {entry.title} node link"
        )
        entry.async_create_background_task(
            self.hass, self.proxy.run(), f"{DOMAIN} {entry.title} proxy"
        )
        entry.async_on_unload(self._async_unloaded)

    @callback
    def _async_unloaded(self) -> None:
        self._unloaded = True
        self._cancel_update()

    @callback
    def _cancel_update(self) -> None:
        if self._update_pending is not None:
            self._update_pending()
            self._update_pending = None

    # -- state for entities ------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the node link is live (entities are unavailable otherwise)."""
        return self.link.state is LinkState.READY

    @property
    def snapshot(self) -> NodeSnapshot | None:
        """The node's state from the last handshake."""
        return self.link.snapshot

    @property
    def device_identifier(self) -> tuple[str, str]:
        """The device registry identifier of the node (entry-scoped)."""
        return (DOMAIN, self.entry.unique_id or self.entry.entry_id)

    # -- dispatch ----------------------------------------------------------------

    @callback
    def _on_proxy_change(self) -> None:
        if self._unloaded:
            return
        if self._update_pending is None:
            self._update_pending = async_call_later(
                self.hass, UPDATE_THROTTLE, self._flush_update
            )
        status = self.proxy.status
        if status is not self._last_status:
            self._last_status = status
            self._update_repairs(status)

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
        """Keep the device registry in step with the node."""
        registry = dr.async_get(self.hass)
        device = registry.async_get_or_create(
            config_entry_id=self.entry.entry_id,
            identifiers={self.device_identifier},
            manufacturer=MANUFACTURER,
            name=snapshot.long_name,
            model=snapshot.hw_model,
            sw_version=snapshot.firmware_version,
            serial_number=snapshot.node_id,
        )
        if device.sw_version != snapshot.firmware_version:
            registry.async_update_device(
                device.id, sw_version=snapshot.firmware_version
            )

    def on_telemetry(self, metrics: Any) -> None:
        """Refresh entities (rate-limited) when the node reports device metrics."""
        self._on_proxy_change()

    def on_packet(self, packet: mesh_pb2.MeshPacket) -> None:
        """Turn decoded text packets into text-message events."""
        if not packet.HasField("decoded") or (
            packet.decoded.portnum != portnums_pb2.PortNum.TEXT_MESSAGE_APP
        ):
            return
        snapshot = self.link.snapshot
        sender = int(getattr(packet, "from"))
        channel_index = int(packet.channel)
        channel_label = None
        if snapshot is not None and 0 <= channel_index < len(snapshot.channels):
            channel_label = channel_name(
                snapshot.channels[channel_index], snapshot.lora
            )
        message = TextMessage(
            sender_id=node_id(sender),
            sender_name=snapshot.node_name(sender) if snapshot else None,
            channel=channel_index,
            channel_name=channel_label,
            to="^all" if packet.to == BROADCAST_NUM else node_id(packet.to),
            text=packet.decoded.payload.decode(errors="replace"),
            rx_time=float(packet.rx_time or time.time()),
            snr=float(packet.rx_snr) if packet.rx_snr else None,
            rssi=int(packet.rx_rssi) if packet.rx_rssi else None,
            via_mqtt=bool(packet.via_mqtt),
            packet_id=int(packet.id),
        )
        self.last_text = message
        async_dispatcher_send(self.hass, self.signal_text, message)

    # -- repairs -----------------------------------------------------------------

    def _update_repairs(self, status: ProxyStatus) -> None:
        hass, entry = self.hass, self.entry
        name = entry.title
        for issue, wanted in (
            (ISSUE_NODE_SETTINGS, status is ProxyStatus.NODE_SETTINGS_MISSING),
            (ISSUE_BROKER_ADDRESS, status is ProxyStatus.INVALID_BROKER_ADDRESS),
            (
                ISSUE_BROKER_AUTH,
                status is ProxyStatus.BROKER_AUTH_FAILED
                and entry.options.get(CONF_BROKER_MODE) != BROKER_MODE_CUSTOM,
            ),
        ):
            issue_id = f"{issue}_{entry.entry_id}"
            if not wanted:
                ir.async_delete_issue(hass, DOMAIN, issue_id)
                continue
            placeholders = {"name": name, "error": self.proxy.error or ""}
            if issue == ISSUE_NODE_SETTINGS:
                placeholders["settings"] = ", ".join(
                    str(s) for s in self.proxy.missing_settings
                )
            ir.async_create_issue(
                hass,
                DOMAIN,
                issue_id,
                is_fixable=False,
                severity=ir.IssueSeverity.ERROR,
                translation_key=issue,
                translation_placeholders=placeholders,
            )
        if (
            status is ProxyStatus.BROKER_AUTH_FAILED
            and entry.options.get(CONF_BROKER_MODE) == BROKER_MODE_CUSTOM
            and not self._reauth_started
        ):
            self._reauth_started = True
            entry.async_start_reauth(hass)

    # -- actions -----------------------------------------------------------------

    async def async_send_text(
        self, text: str, *, channel: int = 0, destination: int | None = None
    ) -> mesh_pb2.QueueStatus | None:
        """Send a text message to the mesh through the node.

        ``channel`` is a channel index 0..7; ``destination`` a node number, or
        ``None`` for a broadcast. Returns the node's ``QueueStatus`` or ``None``
        if it did not answer.

        Raises:
            ValueError: text empty or longer than 233 UTF-8 bytes, channel unusable.
            LinkNotReadyError: the node is not connected.

        """
        payload = text.encode()
        if not payload or len(payload) > MAX_TEXT_BYTES:
            raise ValueError(
                f"text must be 1 to {MAX_TEXT_BYTES} bytes, got {len(payload)}"
            )
        snapshot = self.link.snapshot
        if snapshot is not None and (
            channel >= len(snapshot.channels)
            or snapshot.channels[channel].role == 0  # DISABLED
        ):
            raise ValueError(f"channel {channel} is not enabled on the node")
        packet = mesh_pb2.MeshPacket(
            to=BROADCAST_NUM if destination is None else destination,
            channel=channel,
            want_ack=destination is not None,
        )
        packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
        packet.decoded.payload = payload
        return await self.link.send_packet(packet)
