"""Meshtastic MQTT client proxy rules, as the firmware and the official apps apply them.

Everything here is a pure function of the node's configuration and of one
message; nothing does I/O. The rules and their sources:

* Channel naming: firmware ``Channels::getName`` and
  ``DisplayFormatters::getModemPresetDisplayName`` (2.7 and develop).
* Broker endpoint: firmware ``src/mesh/Default.h`` defaults, the Android
  ``MQTTRepositoryImpl`` and Apple ``MqttClientProxyManager`` endpoint rules.
* Subscriptions: ``{root}/2/e/{channel}/+`` per downlink channel plus
  ``{root}/2/e/PKI/+`` when any channel has downlink (firmware ``MQTT.cpp``).
  Channel names are free text in the apps: a name or root that is not a valid
  literal topic level (``+``, ``#``, control characters; MQTT §4.7) is skipped
  instead of subscribed, so ``+`` never turns into a wildcard.
* Proxy limits: ``MqttClientProxyMessage.topic`` ``char[60]`` (59 bytes) and
  ``data`` ``bytes[435]`` (``mesh.pb.h``); an oversize ToRadio is dropped whole.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from dataclasses import dataclass
import enum
import re
import uuid

from google.protobuf.message import DecodeError
from meshtastic.protobuf import (
    channel_pb2,
    config_pb2,
    mesh_pb2,
    module_config_pb2,
    mqtt_pb2,
)

from .mqtt_client import PORT_PLAIN, PORT_TLS, MqttSettings
from .topics import TopicProblem, topic_name_problem

DEFAULT_SERVER = "mqtt.meshtastic.org"
DEFAULT_USERNAME = "meshdev"
DEFAULT_PASSWORD = "large4cats"
DEFAULT_ROOT = "msh"
PKI_CHANNEL = "PKI"

MAX_PROXY_TOPIC_BYTES = 59
MAX_PROXY_DATA_BYTES = 435
# Firmware Constants: DATA_PAYLOAD_LEN, the largest decoded payload of one packet.
MAX_TEXT_BYTES = 233
BROADCAST_NUM = 0xFFFFFFFF

# ModemPreset number -> firmware display name (DisplayFormatters.cpp). Keyed by
# number so presets newer than the installed protobufs still resolve.
PRESET_DISPLAY_NAMES: dict[int, str] = {
    0: "LongFast",
    1: "LongSlow",
    3: "MediumSlow",
    4: "MediumFast",
    5: "ShortSlow",
    6: "ShortFast",
    7: "LongMod",
    8: "ShortTurbo",
    9: "LongTurbo",
    10: "LiteFast",
    11: "LiteSlow",
    12: "NarrowFast",
    13: "NarrowSlow",
}
_PRESET_BY_ENUM_NAME = {
    "MEDIUM_TURBO": "MediumTurbo",
    "TINY_FAST": "TinyFast",
    "TINY_SLOW": "TinySlow",
}


def node_id(node_num: int) -> str:
    """Return the Meshtastic node id ``!xxxxxxxx`` (gateway id) of a node number."""
    return f"!{node_num & 0xFFFFFFFF:08x}"


def parse_node_id(value: str | int) -> int:
    """Parse ``!1a2b3c4d``, ``0x1a2b3c4d``, ``1a2b3c4d`` or a decimal node number.

    Raises:
        ValueError: the value is not a node number in 0..0xFFFFFFFF.

    """
    if isinstance(value, int):
        num = value
    else:
        text = value.strip().lower()
        if text.startswith("!"):
            num = int(text[1:], 16)
        elif text.startswith("0x"):
            num = int(text[2:], 16)
        elif text.isdecimal():
            num = int(text)
        elif re.fullmatch(r"[0-9a-f]{8}", text):
            num = int(text, 16)
        else:
            raise ValueError(f"not a Meshtastic node id: {value!r}")
    if not 0 <= num <= 0xFFFFFFFF:
        raise ValueError(f"node number out of range: {value!r}")
    return num


def preset_display_name(lora: config_pb2.Config.LoRaConfig) -> str:
    """Return the firmware's display name of the LoRa modem preset.

    ``use_preset`` false gives ``Custom``; unknown presets give ``Invalid``
    (firmware ``getModemPresetDisplayName(preset, false, use_preset)``).
    """
    if not lora.use_preset:
        return "Custom"
    preset = int(lora.modem_preset)
    if preset in PRESET_DISPLAY_NAMES:
        return PRESET_DISPLAY_NAMES[preset]
    enum_type = config_pb2.Config.LoRaConfig.ModemPreset
    try:
        return _PRESET_BY_ENUM_NAME.get(enum_type.Name(lora.modem_preset), "Invalid")
    except ValueError:
        return "Invalid"


def channel_name(
    channel: channel_pb2.Channel, lora: config_pb2.Config.LoRaConfig
) -> str:
    """Return the channel segment of MQTT topics for ``channel``.

    The channel's own name, or for any channel with an empty name the modem
    preset display name (firmware ``Channels::getName``).
    """
    return channel.settings.name or preset_display_name(lora)


def active_channels(
    channels: list[channel_pb2.Channel],
) -> list[channel_pb2.Channel]:
    """Return the PRIMARY and SECONDARY channels, in index order."""
    return [c for c in channels if c.role != channel_pb2.Channel.Role.DISABLED]


@dataclass(frozen=True, slots=True)
class SubscriptionPlan:
    """The proxy's topic filters, and the channels that cannot be subscribed.

    ``filters`` are sorted; ``invalid`` maps a channel name (or ``root:`` plus
    the topic root) to the :class:`~.topics.TopicProblem` that rules it out.
    """

    filters: list[str]
    invalid: dict[str, TopicProblem]


def subscription_filters(
    root: str,
    channels: list[channel_pb2.Channel],
    lora: config_pb2.Config.LoRaConfig,
) -> SubscriptionPlan:
    """Return the topic filters the proxy subscribes to, never ``#``.

    ``{root}/2/e/{name}/+`` for each active channel with ``downlink_enabled``,
    plus ``{root}/2/e/PKI/+`` when there is at least one (firmware accepts PKI
    downlinks only then, firmware #8580). An empty root means ``msh``. A root
    or channel name that is not a valid topic name (wildcards, control
    characters; MQTT §4.7) is left out and reported in ``invalid``.
    """
    root = root or DEFAULT_ROOT
    names = {
        channel_name(c, lora)
        for c in active_channels(channels)
        if c.settings.downlink_enabled
    }
    if not names:
        return SubscriptionPlan([], {})
    if (problem := topic_name_problem(root)) is not None:
        return SubscriptionPlan([], {f"root:{root}": problem})
    names.add(PKI_CHANNEL)
    invalid: dict[str, TopicProblem] = {}
    filters: list[str] = []
    for name in names:
        if (problem := topic_name_problem(name)) is not None:
            invalid[name] = problem
        else:
            filters.append(f"{root}/2/e/{name}/+")
    return SubscriptionPlan(sorted(filters), invalid)


class ProxyRequirement(enum.StrEnum):
    """A node setting the client proxy needs (firmware ``MQTT::isValidConfig``)."""

    MQTT_ENABLED = "mqtt_enabled"
    PROXY_TO_CLIENT = "proxy_to_client_enabled"


def missing_proxy_settings(
    mqtt: module_config_pb2.ModuleConfig.MQTTConfig,
) -> list[ProxyRequirement]:
    """Return the node settings that must be turned on before the proxy can run."""
    missing: list[ProxyRequirement] = []
    if not mqtt.enabled:
        missing.append(ProxyRequirement.MQTT_ENABLED)
    if not mqtt.proxy_to_client_enabled:
        missing.append(ProxyRequirement.PROXY_TO_CLIENT)
    return missing


@dataclass(frozen=True, slots=True)
class NodeBroker:
    """The broker to connect to and the node's topic root (``msh`` if unset)."""

    settings: MqttSettings
    root: str


class InvalidAddressError(ValueError):
    """The broker address is not ``host``, ``host:port`` or ``[v6]:port``."""


_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True, "tls": True}


def parse_address(address: str, *, tls: bool) -> tuple[str, int, bool]:
    """Split a broker address into ``(host, port, tls)``.

    Accepts ``host``, ``host:port``, ``[ipv6]``, ``[ipv6]:port`` and an optional
    ``mqtt://``/``tcp://``/``mqtts://``/``ssl://`` scheme (which sets TLS, as the
    Android app accepts). Without a port: 8883 with TLS, else 1883. The public
    server always uses TLS, as both apps force it.

    Raises:
        InvalidAddressError: empty host, bad port, or a malformed address.

    """
    text = address.strip()
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() not in _SCHEMES:
            raise InvalidAddressError(f"unsupported scheme in {address!r}")
        tls = _SCHEMES[scheme.lower()]
        text = text.rstrip("/")
    port: int | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise InvalidAddressError(f"malformed address {address!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if port_text:
        if not port_text.isdecimal() or not 0 < int(port_text) < 65536:
            raise InvalidAddressError(f"bad port in {address!r}")
        port = int(port_text)
    host = host.strip()
    if not host or any(ch.isspace() for ch in host):
        raise InvalidAddressError(f"bad host in {address!r}")
    if host.lower() == DEFAULT_SERVER:
        tls = True
        if port == PORT_PLAIN:
            port = PORT_TLS
    return host, port or (PORT_TLS if tls else PORT_PLAIN), tls


def broker_from_node(
    mqtt: module_config_pb2.ModuleConfig.MQTTConfig, *, verify_tls: bool = True
) -> NodeBroker:
    """Return the broker the node's MQTT settings name, as firmware and apps read them.

    An empty address is the public server with its default credentials and TLS
    (firmware ``Default.h``, Android). Credentials are used verbatim otherwise;
    the public server with an empty username gets the default credentials.
    An empty root is ``msh``.

    Raises:
        InvalidAddressError: the node's address cannot be parsed.

    """
    root = mqtt.root or DEFAULT_ROOT
    address = mqtt.address.strip()
    if not address:
        return NodeBroker(
            MqttSettings(
                DEFAULT_SERVER,
                PORT_TLS,
                tls=True,
                username=DEFAULT_USERNAME,
                password=DEFAULT_PASSWORD,
            ),
            root,
        )
    host, port, tls = parse_address(address, tls=mqtt.tls_enabled)
    username: str | None = mqtt.username or None
    password: str | None = mqtt.password or None
    if host.lower() == DEFAULT_SERVER and not username:
        username, password = DEFAULT_USERNAME, DEFAULT_PASSWORD
    return NodeBroker(
        MqttSettings(
            host,
            port,
            tls=tls,
            verify_tls=verify_tls,
            username=username,
            password=password,
        ),
        root,
    )


def make_client_id(gateway_id: str) -> str:
    """Return a unique MQTT client id for one proxy instance.

    Unique per instance (a random suffix), so two proxies of the same node never
    take each other's session over (the Android/Apple fix for ``SESSION_TAKEN_OVER``).
    """
    return f"MqttBridgeHA-{gateway_id}-{uuid.uuid4().hex[:12]}"


class DownlinkDrop(enum.StrEnum):
    """Why a broker message is not written to the node."""

    TOPIC_TOO_LONG = "topic_too_long"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    EMPTY = "empty_payload"
    NOT_ENVELOPE = "not_service_envelope"
    NO_PACKET = "payload_less_envelope"
    RETAINED = "retained"
    OWN_ECHO = "own_echo"
    QUEUE_FULL = "queue_full"
    NODE_GONE = "node_disconnected"


def check_downlink(
    topic: str,
    payload: bytes,
    *,
    retained: bool,
    gateway_id: str,
    forward_retained: bool,
    forward_own_echoes: bool,
) -> DownlinkDrop | None:
    """Return why a broker message must not go to the node, or ``None`` to forward it.

    Rules: topic <= 59 UTF-8 bytes and payload <= 435 bytes (an oversize ToRadio
    is dropped whole by the firmware's nanopb decoder); empty payloads are
    rejected by the firmware; the payload must be a ``ServiceEnvelope`` with a
    packet that is decoded or encrypted (Android PR #6171, Apple #2063), unless
    its channel is ``PKI`` or the gateway is this node; retained messages are
    stale replays and skipped unless ``forward_retained``; envelopes this node
    published itself (``gateway_id``) are forwarded only with
    ``forward_own_echoes`` (the firmware turns them into implicit ACKs).
    """
    if len(topic.encode()) > MAX_PROXY_TOPIC_BYTES:
        return DownlinkDrop.TOPIC_TOO_LONG
    if not payload:
        return DownlinkDrop.EMPTY
    if len(payload) > MAX_PROXY_DATA_BYTES:
        return DownlinkDrop.PAYLOAD_TOO_LARGE
    if retained and not forward_retained:
        return DownlinkDrop.RETAINED
    envelope = mqtt_pb2.ServiceEnvelope()
    try:
        envelope.ParseFromString(payload)
    except (DecodeError, RuntimeWarning):
        return DownlinkDrop.NOT_ENVELOPE
    if not envelope.HasField("packet") or not envelope.channel_id:
        return DownlinkDrop.NOT_ENVELOPE
    own = envelope.gateway_id == gateway_id
    if own and not forward_own_echoes:
        return DownlinkDrop.OWN_ECHO
    variant = envelope.packet.WhichOneof("payload_variant")
    if variant is None and envelope.channel_id != PKI_CHANNEL and not own:
        return DownlinkDrop.NO_PACKET
    return None


class UplinkDrop(enum.StrEnum):
    """Why a node uplink is not published (besides :class:`~.publish_queue.DropReason`)."""

    NO_PAYLOAD = "no_payload"


def uplink_payload(
    message: mesh_pb2.MqttClientProxyMessage,
) -> tuple[bytes, UplinkDrop | None]:
    """Return the bytes to publish for a node uplink, or why it cannot be published.

    ``data`` is published as is, ``text`` as UTF-8 (both apps do this; LN4CY
    published ``text`` uplinks as empty payloads). The topic is checked when
    the message is queued (:class:`~.publish_queue.PublishQueue`).
    """
    variant = message.WhichOneof("payload_variant")
    if variant == "data":
        return message.data, None
    if variant == "text":
        return message.text.encode(), None
    return b"", UplinkDrop.NO_PAYLOAD
