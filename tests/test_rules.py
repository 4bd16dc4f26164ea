"""Proxy rules and stream framing, checked against firmware and app behaviour."""

from __future__ import annotations

from meshtastic.protobuf import (
    channel_pb2,
    config_pb2,
    mesh_pb2,
    module_config_pb2,
    mqtt_pb2,
)
import pytest

from custom_components.mqtt_bridge.engine import rules
from custom_components.mqtt_bridge.engine.rules import (
    BrokerSettings,
    DownlinkDrop,
    InvalidAddressError,
    ProxyRequirement,
    UplinkDrop,
    broker_from_node,
    check_downlink,
    parse_address,
    subscription_filters,
)
from custom_components.mqtt_bridge.engine.stream import (
    FrameDecoder,
    FrameTooLargeError,
    encode_frame,
)

Preset = config_pb2.Config.LoRaConfig.ModemPreset
Role = channel_pb2.Channel.Role
MQTTConfig = module_config_pb2.ModuleConfig.MQTTConfig


def _channel(
    index: int,
    name: str = "",
    *,
    role: int = Role.SECONDARY,
    uplink: bool = True,
    downlink: bool = True,
) -> channel_pb2.Channel:
    channel = channel_pb2.Channel(index=index, role=role)
    channel.settings.name = name
    channel.settings.uplink_enabled = uplink
    channel.settings.downlink_enabled = downlink
    return channel


def _lora(preset: int = Preset.LONG_FAST, *, use_preset: bool = True):
    return config_pb2.Config.LoRaConfig(modem_preset=preset, use_preset=use_preset)


@pytest.mark.parametrize(
    ("preset", "name"),
    [
        (Preset.LONG_FAST, "LongFast"),
        (Preset.MEDIUM_FAST, "MediumFast"),
        (Preset.LONG_MODERATE, "LongMod"),
        (Preset.SHORT_TURBO, "ShortTurbo"),
        (Preset.MEDIUM_SLOW, "MediumSlow"),
        (Preset.VERY_LONG_SLOW, "Invalid"),
    ],
)
def test_blank_channel_uses_preset_display_name(preset: int, name: str) -> None:
    channel = _channel(0, role=Role.PRIMARY)
    assert rules.channel_name(channel, _lora(preset)) == name


def test_presets_off_is_custom() -> None:
    channel = _channel(0, role=Role.PRIMARY)
    assert rules.channel_name(channel, _lora(use_preset=False)) == "Custom"


def test_named_channel_keeps_its_name() -> None:
    channel = _channel(1, "Family")
    assert rules.channel_name(channel, _lora(Preset.MEDIUM_FAST)) == "Family"


def test_subscriptions_blank_primary_medium_fast() -> None:
    channels = [_channel(0, role=Role.PRIMARY)] + [
        _channel(i, role=Role.DISABLED) for i in range(1, 8)
    ]
    assert subscription_filters("msh/EU_868", channels, _lora(Preset.MEDIUM_FAST)) == [
        "msh/EU_868/2/e/MediumFast/+",
        "msh/EU_868/2/e/PKI/+",
    ]


def test_subscriptions_several_channels_only_downlink_ones() -> None:
    channels = [
        _channel(0, role=Role.PRIMARY, downlink=False),
        _channel(1, "Family"),
        _channel(2, "Uplinkonly", downlink=False),
        _channel(3, "Ghost", role=Role.DISABLED),
        _channel(4, "", downlink=True),
    ]
    assert subscription_filters("", channels, _lora(Preset.LONG_MODERATE)) == [
        "msh/2/e/Family/+",
        "msh/2/e/LongMod/+",
        "msh/2/e/PKI/+",
    ]


def test_subscriptions_presets_off_and_none_without_downlink() -> None:
    channels = [_channel(0, role=Role.PRIMARY)]
    assert subscription_filters("msh", channels, _lora(use_preset=False)) == [
        "msh/2/e/Custom/+",
        "msh/2/e/PKI/+",
    ]
    no_downlink = [_channel(0, role=Role.PRIMARY, downlink=False)]
    assert subscription_filters("msh", no_downlink, _lora()) == []


def test_subscriptions_never_hash() -> None:
    channels = [_channel(i, f"C{i}") for i in range(8)]
    filters = subscription_filters("msh", channels, _lora())
    assert all("#" not in f for f in filters)
    assert len(filters) == 9


def test_missing_proxy_settings() -> None:
    assert rules.missing_proxy_settings(MQTTConfig()) == [
        ProxyRequirement.MQTT_ENABLED,
        ProxyRequirement.PROXY_TO_CLIENT,
    ]
    assert rules.missing_proxy_settings(MQTTConfig(enabled=True)) == [
        ProxyRequirement.PROXY_TO_CLIENT
    ]
    assert (
        rules.missing_proxy_settings(
            MQTTConfig(enabled=True, proxy_to_client_enabled=True)
        )
        == []
    )


def test_empty_address_is_public_server_with_defaults_and_tls() -> None:
    settings = broker_from_node(MQTTConfig(enabled=True))
    assert settings == BrokerSettings(
        "mqtt.meshtastic.org", 8883, True, "meshdev", "large4cats", "msh", True
    )


def test_host_port_and_root() -> None:
    settings = broker_from_node(
        MQTTConfig(
            address="broker.example.com:1884",
            username="u",
            password="p",
            root="msh/US",
        )
    )
    assert (settings.host, settings.port, settings.tls) == (
        "broker.example.com",
        1884,
        False,
    )
    assert (settings.username, settings.password, settings.root) == ("u", "p", "msh/US")


def test_tls_flag_selects_8883() -> None:
    # LN4CY read a misspelt field and connected to 1883 without TLS (#70).
    settings = broker_from_node(
        MQTTConfig(address="broker.example.com", tls_enabled=True)
    )
    assert (settings.port, settings.tls, settings.verify_tls) == (8883, True, True)
    insecure = broker_from_node(
        MQTTConfig(address="broker.example.com", tls_enabled=True), verify_tls=False
    )
    assert insecure.verify_tls is False


def test_public_server_forces_tls_and_default_credentials() -> None:
    settings = broker_from_node(MQTTConfig(address="mqtt.meshtastic.org:1883"))
    assert (settings.port, settings.tls, settings.username) == (8883, True, "meshdev")


@pytest.mark.parametrize(
    ("address", "tls", "expected"),
    [
        ("10.0.0.2", False, ("10.0.0.2", 1883, False)),
        ("10.0.0.2:2000", True, ("10.0.0.2", 2000, True)),
        ("[fd00::1]:1999", False, ("fd00::1", 1999, False)),
        ("[fd00::1]", True, ("fd00::1", 8883, True)),
        ("mqtts://broker.lan", False, ("broker.lan", 8883, True)),
        ("mqtt://broker.lan:1000/", True, ("broker.lan", 1000, False)),
    ],
)
def test_parse_address(address: str, tls: bool, expected: tuple) -> None:
    assert parse_address(address, tls=tls) == expected


@pytest.mark.parametrize(
    "address",
    [":1883", "host:0", "host:99999", "host:abc", "[fd00::1", "ws://x", "a b"],
)
def test_parse_address_rejects(address: str) -> None:
    with pytest.raises(InvalidAddressError):
        parse_address(address, tls=False)


def test_client_ids_are_unique_per_instance() -> None:
    first = rules.make_client_id("!1a2b3c4d")
    assert first.startswith("MqttBridgeHA-!1a2b3c4d-")
    assert first != rules.make_client_id("!1a2b3c4d")


@pytest.mark.parametrize(
    ("value", "num"),
    [
        ("!1a2b3c4d", 0x1A2B3C4D),
        ("0x10", 16),
        ("1a2b3c4d", 0x1A2B3C4D),
        ("42", 42),
        (7, 7),
    ],
)
def test_parse_node_id(value: str | int, num: int) -> None:
    assert rules.parse_node_id(value) == num


@pytest.mark.parametrize("value", ["!xyz", "", "0x1ffffffff", -1, "hello"])
def test_parse_node_id_rejects(value: str | int) -> None:
    with pytest.raises(ValueError):
        rules.parse_node_id(value)


def _envelope(
    gateway: str = "!cafe0001", channel: str = "LongFast", *, packet: bool = True
) -> bytes:
    envelope = mqtt_pb2.ServiceEnvelope(channel_id=channel, gateway_id=gateway)
    if packet:
        envelope.packet.encrypted = b"\x01\x02\x03"
        setattr(envelope.packet, "from", 0xCAFE0001)
        envelope.packet.id = 7
    else:
        envelope.packet.id = 7  # present but neither decoded nor encrypted
    return envelope.SerializeToString()


def _check(
    topic: str = "msh/2/e/LongFast/!cafe0001", payload: bytes | None = None, **kw
):
    args = {
        "retained": False,
        "gateway_id": "!1a2b3c4d",
        "forward_retained": False,
        "forward_own_echoes": False,
    } | kw
    return check_downlink(topic, _envelope() if payload is None else payload, **args)


def test_downlink_accepts_envelope() -> None:
    assert _check() is None


def test_downlink_topic_limit_is_59_bytes() -> None:
    assert _check("t" * 59) is None
    assert _check("t" * 60) is DownlinkDrop.TOPIC_TOO_LONG
    # Bytes, not characters: 30 two-byte characters are 60 bytes.
    assert _check("é" * 30) is DownlinkDrop.TOPIC_TOO_LONG


def _envelope_of_size(size: int) -> mqtt_pb2.ServiceEnvelope:
    # Varint lengths jump, so vary the ciphertext and the channel name together.
    for pad in range(4):
        for n in range(size - 40, size):
            envelope = mqtt_pb2.ServiceEnvelope(
                channel_id="LongFast" + "x" * pad, gateway_id="!cafe0001"
            )
            envelope.packet.encrypted = b"x" * n
            if envelope.ByteSize() == size:
                return envelope
    raise AssertionError(size)


def test_downlink_payload_limit_is_435_bytes() -> None:
    exact = _envelope_of_size(435).SerializeToString()
    assert len(exact) == 435
    assert _check(payload=exact) is None
    over = _envelope_of_size(436).SerializeToString()
    assert _check(payload=over) is DownlinkDrop.PAYLOAD_TOO_LARGE


def test_downlink_rejections() -> None:
    assert _check(payload=b"") is DownlinkDrop.EMPTY
    assert _check(payload=b"\xff\xff\xff") is DownlinkDrop.NOT_ENVELOPE
    assert _check(payload=_envelope(packet=False)) is DownlinkDrop.NO_PACKET
    assert _check(payload=_envelope(channel="PKI", packet=False)) is None
    assert _check(retained=True) is DownlinkDrop.RETAINED
    assert _check(retained=True, forward_retained=True) is None
    own = _envelope(gateway="!1a2b3c4d")
    assert _check(payload=own) is DownlinkDrop.OWN_ECHO
    assert _check(payload=own, forward_own_echoes=True) is None


def test_uplink_payloads() -> None:
    data = mesh_pb2.MqttClientProxyMessage(
        topic="msh/2/e/LongFast/!1", data=b"\x00\x01"
    )
    assert rules.uplink_payload(data) == (b"\x00\x01", None)
    text = mesh_pb2.MqttClientProxyMessage(topic="msh/2/map/", text='{"json":1}')
    assert rules.uplink_payload(text) == (b'{"json":1}', None)
    bad = mesh_pb2.MqttClientProxyMessage(topic="msh/+/x", data=b"1")
    assert rules.uplink_payload(bad)[1] is UplinkDrop.INVALID_TOPIC
    empty = mesh_pb2.MqttClientProxyMessage(topic="msh/x")
    assert rules.uplink_payload(empty)[1] is UplinkDrop.NO_PAYLOAD


def test_frames_roundtrip_with_garbage_and_split_reads() -> None:
    garbage: list[bytes] = []
    decoder = FrameDecoder(on_garbage=garbage.append)
    stream = (
        b"DEBUG | boot\r\n"
        + encode_frame(b"abc")
        + b"\x94\x00noise"
        + encode_frame(b"")
        + encode_frame(b"x" * 512)
    )
    frames: list[bytes] = []
    for i in range(0, len(stream), 7):
        frames += decoder.feed(stream[i : i + 7])
    assert frames == [b"abc", b"", b"x" * 512]
    assert b"".join(garbage) == b"DEBUG | boot\r\n\x94\x00noise"
    assert decoder.buffered == 0


def test_oversize_header_resyncs_on_next_frame() -> None:
    decoder = FrameDecoder()
    bogus = b"\x94\xc3\x02\x01"  # announces 513 bytes
    assert decoder.feed(bogus + encode_frame(b"ok")) == [b"ok"]
    assert decoder.stats.oversize_frames == 1


def test_truncated_frame_waits_for_rest() -> None:
    decoder = FrameDecoder()
    frame = encode_frame(b"hello")
    assert decoder.feed(frame[:5]) == []
    assert decoder.buffered == 5
    assert decoder.feed(frame[5:]) == [b"hello"]


def test_encode_frame_limit() -> None:
    assert len(encode_frame(b"x" * 512)) == 516
    with pytest.raises(FrameTooLargeError):
        encode_frame(b"x" * 513)
