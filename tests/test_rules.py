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
from custom_components.mqtt_bridge.engine.mqtt_client import MqttSettings
from custom_components.mqtt_bridge.engine.rules import (
    DownlinkDrop,
    InvalidAddressError,
    NodeBroker,
    ProxyRequirement,
    SubscriptionPlan,
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
from custom_components.mqtt_bridge.engine.topics import (
    TopicProblem,
    topic_name_problem,
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
    plan = subscription_filters("msh/EU_868", channels, _lora(Preset.MEDIUM_FAST))
    assert plan == SubscriptionPlan(
        ["msh/EU_868/2/e/MediumFast/+", "msh/EU_868/2/e/PKI/+"], {}
    )


def test_subscriptions_several_channels_only_downlink_ones() -> None:
    channels = [
        _channel(0, role=Role.PRIMARY, downlink=False),
        _channel(1, "Family"),
        _channel(2, "Uplinkonly", downlink=False),
        _channel(3, "Ghost", role=Role.DISABLED),
        _channel(4, "", downlink=True),
    ]
    plan = subscription_filters("", channels, _lora(Preset.LONG_MODERATE))
    assert plan.filters == [
        "msh/2/e/Family/+",
        "msh/2/e/LongMod/+",
        "msh/2/e/PKI/+",
    ]
    assert plan.invalid == {}


def test_subscriptions_presets_off_and_none_without_downlink() -> None:
    channels = [_channel(0, role=Role.PRIMARY)]
    assert subscription_filters("msh", channels, _lora(use_preset=False)).filters == [
        "msh/2/e/Custom/+",
        "msh/2/e/PKI/+",
    ]
    no_downlink = [_channel(0, role=Role.PRIMARY, downlink=False)]
    assert subscription_filters("msh", no_downlink, _lora()) == SubscriptionPlan([], {})


def test_subscriptions_never_hash() -> None:
    channels = [_channel(i, f"C{i}") for i in range(8)]
    filters = subscription_filters("msh", channels, _lora()).filters
    assert all("#" not in f for f in filters)
    assert len(filters) == 9


def test_subscriptions_skip_channel_names_that_are_not_topic_levels() -> None:
    # Channel names are free text in the apps; "+" must never become a wildcard.
    channels = [
        _channel(0, "Normal", role=Role.PRIMARY),
        _channel(1, "C#"),
        _channel(2, "x+y"),
        _channel(3, "+"),
        _channel(4, "ch\x01"),
        _channel(5, "#"),
        _channel(6, "nul\x00"),
    ]
    plan = subscription_filters("msh", channels, _lora())
    assert plan.filters == ["msh/2/e/Normal/+", "msh/2/e/PKI/+"]
    assert plan.invalid == {
        "C#": TopicProblem.WILDCARD,
        "x+y": TopicProblem.WILDCARD,
        "+": TopicProblem.WILDCARD,
        "ch\x01": TopicProblem.CONTROL_CHARACTER,
        "#": TopicProblem.WILDCARD,
        "nul\x00": TopicProblem.NULL_CHARACTER,
    }
    assert "msh/2/e/+/+" not in plan.filters


def test_subscriptions_only_bad_channels_still_subscribe_pki() -> None:
    plan = subscription_filters("msh", [_channel(0, "+", role=Role.PRIMARY)], _lora())
    assert plan.filters == ["msh/2/e/PKI/+"]
    assert plan.invalid == {"+": TopicProblem.WILDCARD}


@pytest.mark.parametrize(
    ("root", "problem"),
    [
        ("msh#", TopicProblem.WILDCARD),
        ("msh/+", TopicProblem.WILDCARD),
        ("msh\x7f", TopicProblem.CONTROL_CHARACTER),
    ],
)
def test_subscriptions_invalid_root_subscribes_nothing(
    root: str, problem: TopicProblem
) -> None:
    channels = [_channel(0, "Normal", role=Role.PRIMARY)]
    plan = subscription_filters(root, channels, _lora())
    assert plan == SubscriptionPlan([], {f"root:{root}": problem})


def test_subscriptions_invalid_root_without_downlink_is_not_reported() -> None:
    channels = [_channel(0, "Normal", role=Role.PRIMARY, downlink=False)]
    assert subscription_filters("msh#", channels, _lora()) == SubscriptionPlan([], {})


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
    broker = broker_from_node(MQTTConfig(enabled=True))
    assert broker == NodeBroker(
        MqttSettings(
            "mqtt.meshtastic.org",
            8883,
            tls=True,
            verify_tls=True,
            username="meshdev",
            password="large4cats",
        ),
        "msh",
    )
    assert "large4cats" not in repr(broker)


def test_node_broker_root_defaults_to_msh_for_any_address() -> None:
    assert broker_from_node(MQTTConfig(address="10.0.0.2")).root == "msh"
    assert broker_from_node(MQTTConfig(address="10.0.0.2", root="x/y")).root == "x/y"


def test_host_port_and_root() -> None:
    broker = broker_from_node(
        MQTTConfig(
            address="broker.example.com:1884",
            username="u",
            password="p",
            root="msh/US",
        )
    )
    settings = broker.settings
    assert (settings.host, settings.port, settings.tls) == (
        "broker.example.com",
        1884,
        False,
    )
    assert (settings.username, settings.password, broker.root) == ("u", "p", "msh/US")


def test_tls_flag_selects_8883() -> None:
    # LN4CY read a misspelt field and connected to 1883 without TLS (#70).
    settings = broker_from_node(
        MQTTConfig(address="broker.example.com", tls_enabled=True)
    ).settings
    assert (settings.port, settings.tls, settings.verify_tls) == (8883, True, True)
    insecure = broker_from_node(
        MQTTConfig(address="broker.example.com", tls_enabled=True), verify_tls=False
    )
    assert insecure.settings.verify_tls is False


def test_public_server_forces_tls_and_default_credentials() -> None:
    settings = broker_from_node(MQTTConfig(address="mqtt.meshtastic.org:1883")).settings
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
    # The topic is no longer checked here but when the uplink is queued
    # (PublishQueue counts it as invalid_topic; see test_publish_queue.py).
    bad = mesh_pb2.MqttClientProxyMessage(topic="msh/+/x", data=b"1")
    assert rules.uplink_payload(bad) == (b"1", None)
    assert topic_name_problem(bad.topic) is TopicProblem.WILDCARD
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
