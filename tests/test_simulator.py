"""Tests for the Meshtastic node simulator (devkit.meshsim), over real sockets/ptys.

The stream client below is written independently of the simulator (its own
frame hunter and its own AES-CTR), so the simulator is checked against the
firmware behaviour in shared/reference/meshtastic-proxy.md, not against itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import contextlib
import os
import threading

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from meshtastic.protobuf import (
    config_pb2,
    mesh_pb2,
    mqtt_pb2,
    portnums_pb2,
    telemetry_pb2,
)
import meshtastic.tcp_interface
from pubsub import pub
import pytest
import serialx

from devkit.meshsim import ChannelSpec, SimulatedNode, default_profile
from tests.common import join_new_threads

NODE_NUM = 0x1A2B3C4D
NODE_ID = "!1a2b3c4d"
OTHER = 0x433E1F70  # one of the default other nodes
STRANGER = 0x0BADC0DE
BROADCAST = 0xFFFFFFFF
AQ_KEY = bytes.fromhex("d4f1bb3a20290759f0bcffabcf4e6901")  # PSK "AQ=="
TEXT = portnums_pb2.PortNum.TEXT_MESSAGE_APP


# --------------------------------------------------------------------- helpers


def frame(payload: mesh_pb2.ToRadio | bytes) -> bytes:
    data = payload if isinstance(payload, bytes) else payload.SerializeToString()
    return b"\x94\xc3" + len(data).to_bytes(2, "big") + data


def aes_ctr(key: bytes, packet_id: int, sender: int, data: bytes) -> bytes:
    nonce = packet_id.to_bytes(8, "little") + sender.to_bytes(8, "little")
    enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return enc.update(data) + enc.finalize()


def kind(msg: mesh_pb2.FromRadio) -> str | None:
    return msg.WhichOneof("payload_variant")


class StreamClient:
    """Phone side of the stream API: frame hunter + log-line collector."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.text = bytearray()
        self.eof = False

    @classmethod
    async def open(cls, port: int) -> StreamClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    @property
    def log_lines(self) -> list[str]:
        return [
            line.strip("\r")
            for line in self.text.decode(errors="replace").split("\n")
            if line.strip("\r")
        ]

    def send(self, *items: mesh_pb2.ToRadio | bytes) -> None:
        self.writer.write(
            b"".join(item if isinstance(item, bytes) else frame(item) for item in items)
        )

    def _pop(self) -> mesh_pb2.FromRadio | None:
        while True:
            start = self.buf.find(b"\x94\xc3")
            if start < 0:
                keep = 1 if self.buf.endswith(b"\x94") else 0
                self.text += self.buf[: len(self.buf) - keep]
                del self.buf[: len(self.buf) - keep]
                return None
            self.text += self.buf[:start]
            del self.buf[:start]
            if len(self.buf) < 4:
                return None
            length = int.from_bytes(self.buf[2:4], "big")
            if length > 512:
                del self.buf[:2]
                continue
            if len(self.buf) < 4 + length:
                return None
            payload = bytes(self.buf[4 : 4 + length])
            del self.buf[: 4 + length]
            return mesh_pb2.FromRadio.FromString(payload)

    async def recv(self, timeout: float = 2.0) -> mesh_pb2.FromRadio:
        async with asyncio.timeout(timeout):
            while True:
                msg = self._pop()
                if msg is not None:
                    return msg
                data = await self.reader.read(4096)
                if not data:
                    self.eof = True
                    raise EOFError
                self.buf += data

    async def recv_kind(self, wanted: str, timeout: float = 2.0) -> mesh_pb2.FromRadio:
        """Next FromRadio of kind ``wanted`` (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.recv(timeout)
                if kind(msg) == wanted:
                    return msg

    async def quiet(self, within: float = 0.2) -> None:
        """Assert that no frame arrives within ``within`` seconds."""
        try:
            msg = await self.recv(within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected frame: {msg}")

    async def handshake(self, nonce: int = 4242) -> list[mesh_pb2.FromRadio]:
        self.send(b"\xc3" * 32, mesh_pb2.ToRadio(want_config_id=nonce))
        out = []
        while True:
            msg = await self.recv()
            out.append(msg)
            if kind(msg) == "config_complete_id":
                assert msg.config_complete_id == nonce
                return out

    async def closed_by_peer(self, timeout: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(4096):
                    pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def proxy(
    topic: str = "msh/2/e/LongFast/!deadbeef", data: bytes = b"\x01"
) -> mesh_pb2.ToRadio:
    return mesh_pb2.ToRadio(
        mqttClientProxyMessage=mesh_pb2.MqttClientProxyMessage(topic=topic, data=data)
    )


def text_envelope(
    sender: int,
    text: str,
    *,
    channel_id: str = "LongFast",
    gateway: str = "!cafe0001",
    to: int = BROADCAST,
    packet_id: int = 0x1000,
    encrypted: bool = True,
    hop_limit: int = 3,
    key: bytes = AQ_KEY,
    channel_hash: int = 8,
) -> bytes:
    data = mesh_pb2.Data(portnum=TEXT, payload=text.encode())
    packet = mesh_pb2.MeshPacket(
        to=to, id=packet_id, hop_limit=hop_limit, hop_start=hop_limit
    )
    setattr(packet, "from", sender)
    if encrypted:
        packet.encrypted = aes_ctr(key, packet_id, sender, data.SerializeToString())
        packet.channel = channel_hash
    else:
        packet.decoded.CopyFrom(data)
    return mqtt_pb2.ServiceEnvelope(
        packet=packet, channel_id=channel_id, gateway_id=gateway
    ).SerializeToString()


@pytest.fixture
async def node() -> SimulatedNode:
    sim = SimulatedNode(default_profile())
    await sim.start_tcp()
    yield sim
    await sim.stop()


@pytest.fixture
async def live(node: SimulatedNode) -> StreamClient:
    client = await StreamClient.open(node.port)
    await client.handshake()
    await node.wait_for(lambda: node.config_complete)
    yield client
    await client.close()


# --------------------------------------------------------------------- handshake


async def test_handshake_order_and_nonce_echo(node: SimulatedNode) -> None:
    client = await StreamClient.open(node.port)
    frames = await client.handshake(nonce=987654)
    kinds = [kind(f) for f in frames]
    # ids strictly increasing
    assert [f.id for f in frames] == list(range(1, len(frames) + 1))
    assert kinds[:4] == ["my_info", "deviceuiConfig", "node_info", "metadata"]
    assert frames[0].my_info.my_node_num == NODE_NUM
    own = frames[2].node_info
    assert own.num == NODE_NUM
    assert own.user.id == NODE_ID
    assert own.user.long_name == "Sim Node"
    assert own.user.hw_model == mesh_pb2.HardwareModel.TBEAM
    assert own.device_metrics.battery_level == 87
    assert frames[3].metadata.firmware_version == "2.7.15.567b8ea"
    channels = [f.channel for f in frames if kind(f) == "channel"]
    assert [c.index for c in channels] == list(range(8))
    assert channels[0].role == channels[0].Role.PRIMARY
    assert channels[0].settings.uplink_enabled
    assert channels[0].settings.downlink_enabled
    assert all(c.role == c.Role.DISABLED for c in channels[1:])
    # order of the blocks
    first = {k: kinds.index(k) for k in set(kinds)}
    last = {k: len(kinds) - 1 - kinds[::-1].index(k) for k in set(kinds)}
    assert last["channel"] < first["config"] < last["config"] < first["moduleConfig"]
    sections = [
        f.config.WhichOneof("payload_variant") for f in frames if kind(f) == "config"
    ]
    assert sections[:8] == [
        "device",
        "position",
        "power",
        "network",
        "display",
        "lora",
        "bluetooth",
        "security",
    ]
    lora = next(f.config.lora for f in frames if f.config.HasField("lora"))
    assert lora.use_preset
    assert lora.modem_preset == config_pb2.Config.LoRaConfig.ModemPreset.LONG_FAST
    assert lora.region == config_pb2.Config.LoRaConfig.RegionCode.EU_868
    modules = [f.moduleConfig for f in frames if kind(f) == "moduleConfig"]
    assert len(modules) == 16
    assert modules[0].WhichOneof("payload_variant") == "mqtt"
    assert [m.WhichOneof("payload_variant") for m in modules[1:4]] == [
        "serial",
        "external_notification",
        "store_forward",
    ]
    assert modules[0].mqtt.enabled
    assert modules[0].mqtt.proxy_to_client_enabled
    assert modules[0].mqtt.root == "msh"
    others = [
        f.node_info.num
        for f in frames[first["moduleConfig"] :]
        if kind(f) == "node_info"
    ]
    assert len(others) == 3
    assert NODE_NUM not in others
    assert last["moduleConfig"] < first["fileInfo"]
    assert kinds[-1] == "config_complete_id"
    await node.wait_for(lambda: node.config_complete)
    assert node.handshakes == 1
    assert node.client_connected
    await client.close()


async def test_handshake_reports_real_mqtt_password_and_skips_nodes_on_69420() -> None:
    node = SimulatedNode(
        default_profile(
            mqtt_address="broker.lan:1884",
            mqtt_username="meshdev",
            mqtt_password="s3cret",
            mqtt_tls_enabled=True,
        )
    )
    port = await node.start_tcp()
    try:
        client = await StreamClient.open(port)
        frames = await client.handshake(nonce=69420)
        mqtt = next(
            f.moduleConfig.mqtt for f in frames if f.moduleConfig.HasField("mqtt")
        )
        assert mqtt.address == "broker.lan:1884"
        assert mqtt.username == "meshdev"
        assert mqtt.password == "s3cret"
        assert mqtt.tls_enabled
        node_infos = [f for f in frames if kind(f) == "node_info"]
        assert [n.node_info.num for n in node_infos] == [NODE_NUM]  # own only
        await client.close()
    finally:
        await node.stop()


async def test_wake_bytes_garbage_and_parser_quirk(node: SimulatedNode) -> None:
    client = await StreamClient.open(node.port)
    heartbeat = mesh_pb2.ToRadio(heartbeat=mesh_pb2.Heartbeat())
    # Garbage, a bogus 0x94 0x00, an oversize header (len 513), wake bytes.
    client.send(b"hello\x94\x00junk", b"\x94\xc3\x02\x01", b"\xc3" * 32)
    await client.quiet(0.15)
    assert node.dropped_frames == 1  # the oversize header
    # Quirk: garbage ending in 0x94 right before a frame loses that frame.
    client.send(b"\x94", frame(heartbeat))
    await client.quiet(0.15)
    assert node.heartbeats == 0
    # A zero-length frame is a keepalive: accepted, no reply.
    client.send(b"\x94\xc3\x00\x00")
    await client.quiet(0.15)
    # Undecodable protobuf: dropped whole.
    client.send(frame(b"\xff\xff\xff"))
    await node.wait_for(lambda: node.dropped_frames == 2)
    # The parser has resynchronised: a normal handshake works.
    frames = await client.handshake(nonce=17)
    assert kind(frames[0]) == "my_info"
    await client.close()


async def test_single_client_takeover(node: SimulatedNode) -> None:
    first = await StreamClient.open(node.port)
    await first.handshake(1)
    second = await StreamClient.open(node.port)
    assert await first.closed_by_peer()
    await node.wait_for(lambda: node.connections == 2)
    await second.handshake(2)
    assert node.handshakes == 2
    assert node.client_connected
    await second.close()
    await node.wait_for(lambda: not node.client_connected)
    await first.close()


async def test_heartbeat_and_packet_answered_with_queue_status(
    node: SimulatedNode, live: StreamClient
) -> None:
    live.send(mesh_pb2.ToRadio(heartbeat=mesh_pb2.Heartbeat()))
    status = await live.recv()
    assert kind(status) == "queueStatus"
    assert status.queueStatus.maxlen == 16
    assert status.queueStatus.free == 16
    assert status.queueStatus.mesh_packet_id == 0
    # Back-to-back heartbeats in one read share one queueStatus (one flag).
    heartbeat = mesh_pb2.ToRadio(heartbeat=mesh_pb2.Heartbeat())
    live.send(heartbeat, heartbeat)
    assert kind(await live.recv()) == "queueStatus"
    await live.quiet(0.15)
    assert node.heartbeats == 3
    # A text packet from the client: queueStatus with its id, and an uplink.
    packet = mesh_pb2.MeshPacket(
        to=BROADCAST,
        id=0x5EED,
        hop_limit=3,
        decoded=mesh_pb2.Data(portnum=TEXT, payload=b"hi mesh"),
    )
    live.send(mesh_pb2.ToRadio(packet=packet))
    status = await live.recv()
    assert kind(status) == "queueStatus"
    assert status.queueStatus.mesh_packet_id == 0x5EED
    assert status.queueStatus.res == 0
    uplink = await live.recv_kind("mqttClientProxyMessage")
    assert uplink.mqttClientProxyMessage.topic == f"msh/2/e/LongFast/{NODE_ID}"
    envelope = mqtt_pb2.ServiceEnvelope.FromString(uplink.mqttClientProxyMessage.data)
    assert getattr(envelope.packet, "from") == NODE_NUM
    assert node.sent_packets[0].decoded.payload == b"hi mesh"


async def test_downlink_ignored_before_config_complete_then_accepted(
    node: SimulatedNode,
) -> None:
    client = await StreamClient.open(node.port)
    # Before any handshake, and in the same read as want_config: ignored.
    client.send(proxy())
    await node.wait_for(lambda: node.ignored_downlinks == 1)
    client.send(mesh_pb2.ToRadio(want_config_id=5), proxy())
    await client.recv_kind("config_complete_id")
    assert node.ignored_downlinks == 2
    assert node.downlinks == []
    client.send(proxy(data=b"after"))
    await node.wait_for(lambda: len(node.downlinks) == 1)
    assert node.downlinks[0].data == b"after"
    assert node.ignored_downlinks == 2
    await client.close()


async def test_downlink_ignored_when_proxy_disabled() -> None:
    node = SimulatedNode(default_profile(proxy_to_client_enabled=False))
    port = await node.start_tcp()
    try:
        client = await StreamClient.open(port)
        await client.handshake()
        client.send(proxy())
        await node.wait_for(lambda: node.ignored_downlinks == 1)
        assert node.downlinks == []
        await client.close()
    finally:
        await node.stop()


async def test_oversize_proxy_frames_dropped_whole(
    node: SimulatedNode, live: StreamClient
) -> None:
    base = "msh/2/e/LongFast/"
    topic59 = base + "x" * (59 - len(base))
    topic60 = base + "x" * (60 - len(base))
    live.send(proxy(topic=topic60))
    live.send(proxy(data=b"d" * 436))
    await node.wait_for(lambda: node.dropped_frames == 2)
    assert node.downlinks == []
    live.send(proxy(topic=topic59, data=b"d" * 435))
    await node.wait_for(lambda: len(node.downlinks) == 1)
    assert node.downlinks[0].topic == topic59
    assert len(node.downlinks[0].data) == 435
    assert node.dropped_frames == 2


async def test_uplink_queue_is_8_deep_drop_oldest_and_waits_for_live(
    node: SimulatedNode,
) -> None:
    for i in range(10):
        node.inject_uplink(f"msh/2/e/LongFast/!0000000{i}", data=bytes([i]))
    assert node.uplinks_dropped == 2
    client = await StreamClient.open(node.port)
    await client.quiet(0.15)  # connected but not live: nothing delivered
    await client.handshake()
    got = [await client.recv() for _ in range(8)]
    assert all(kind(m) == "mqttClientProxyMessage" for m in got)
    assert [m.mqttClientProxyMessage.data for m in got] == [
        bytes([i]) for i in range(2, 10)
    ]
    await client.quiet(0.1)
    # text variant and retained flag pass through unchanged
    node.inject_uplink("msh/2/json/LongFast/!x", text='{"a":1}', retained=True)
    msg = (await client.recv()).mqttClientProxyMessage
    assert msg.WhichOneof("payload_variant") == "text"
    assert msg.text == '{"a":1}'
    assert msg.retained
    await client.close()


# --------------------------------------------------------------------- naming


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, "LongFast"),
        ({"modem_preset": "MEDIUM_FAST"}, "MediumFast"),
        ({"modem_preset": "LONG_MODERATE"}, "LongMod"),
        ({"modem_preset": "SHORT_TURBO"}, "ShortTurbo"),
        ({"modem_preset": "VERY_LONG_SLOW"}, "Invalid"),
        ({"use_preset": False, "modem_preset": "MEDIUM_FAST"}, "Custom"),
        ({"channels": [ChannelSpec(name="Home")]}, "Home"),
        ({"mqtt_root": ""}, "LongFast"),
    ],
)
def test_firmware_topic_naming(overrides: dict, expected: str) -> None:
    node = SimulatedNode(default_profile(**overrides))
    assert node.channel_name(0) == expected
    assert node.topic_for(0) == f"msh/2/e/{expected}/{NODE_ID}"


def test_secondary_blank_channel_uses_preset_name_and_custom_root() -> None:
    node = SimulatedNode(
        default_profile(
            mqtt_root="msh/EU_868",
            channels=[
                ChannelSpec(name="Home", psk=bytes(16)),
                ChannelSpec(role="SECONDARY"),
            ],
        )
    )
    assert node.topic_for(0) == f"msh/EU_868/2/e/Home/{NODE_ID}"
    assert node.topic_for(1) == f"msh/EU_868/2/e/LongFast/{NODE_ID}"


# --------------------------------------------------------------------- uplinks


async def test_receive_text_reaches_client_and_is_uplinked(
    node: SimulatedNode, live: StreamClient
) -> None:
    sent = node.receive_text(OTHER, "Hello from the hut", snr=7.5, rssi=-91)
    msgs = [await live.recv(), await live.recv()]
    packet = next(m.packet for m in msgs if kind(m) == "packet")
    uplink = next(
        m.mqttClientProxyMessage for m in msgs if kind(m) == "mqttClientProxyMessage"
    )
    assert getattr(packet, "from") == OTHER
    assert packet.to == BROADCAST
    assert packet.decoded.portnum == TEXT
    assert packet.decoded.payload == b"Hello from the hut"
    assert packet.rx_snr == 7.5
    assert packet.rx_rssi == -91
    assert packet.rx_time > 0
    assert packet.channel == 0
    assert packet.id == sent.id
    assert uplink.topic == f"msh/2/e/LongFast/{NODE_ID}"
    assert not uplink.retained
    envelope = mqtt_pb2.ServiceEnvelope.FromString(uplink.data)
    assert envelope.channel_id == "LongFast"
    assert envelope.gateway_id == NODE_ID
    assert envelope.packet.WhichOneof("payload_variant") == "encrypted"
    assert envelope.packet.channel == 8  # hash of LongFast + default key
    plain = aes_ctr(AQ_KEY, envelope.packet.id, OTHER, envelope.packet.encrypted)
    data = mesh_pb2.Data.FromString(plain)
    assert data.portnum == TEXT
    assert data.payload == b"Hello from the hut"


async def test_uplink_decoded_when_encryption_disabled_and_named_channel() -> None:
    node = SimulatedNode(
        default_profile(
            mqtt_encryption_enabled=False,
            channels=[
                ChannelSpec(),
                ChannelSpec(name="Home", role="SECONDARY", psk=bytes(range(16))),
            ],
        )
    )
    port = await node.start_tcp()
    try:
        client = await StreamClient.open(port)
        await client.handshake()
        node.receive_text(OTHER, "on home", channel_index=1)
        uplink = (
            await client.recv_kind("mqttClientProxyMessage")
        ).mqttClientProxyMessage
        assert uplink.topic == f"msh/2/e/Home/{NODE_ID}"
        envelope = mqtt_pb2.ServiceEnvelope.FromString(uplink.data)
        assert envelope.channel_id == "Home"
        assert envelope.packet.decoded.payload == b"on home"
        assert envelope.packet.channel == 1
        await client.close()
    finally:
        await node.stop()


async def test_ok_to_mqtt_bitfield_gate() -> None:
    """Others' packets without OK_TO_MQTT are not uplinked on a default key
    unless the broker address is a bare private IP (MQTT::onSend)."""
    for address, expect in (("", 0), ("127.0.0.1:1883", 0), ("127.0.0.1", 1)):
        node = SimulatedNode(default_profile(mqtt_address=address))
        packet = mesh_pb2.MeshPacket(
            to=BROADCAST, id=0x77, decoded=mesh_pb2.Data(portnum=TEXT, payload=b"x")
        )
        setattr(packet, "from", OTHER)
        node.receive_packet(packet)
        assert node.pending_uplinks == expect, address


async def test_send_telemetry(node: SimulatedNode, live: StreamClient) -> None:
    node.profile.battery_level = 55
    node.send_telemetry()
    packet = (await live.recv_kind("packet")).packet
    assert getattr(packet, "from") == NODE_NUM
    assert packet.decoded.portnum == portnums_pb2.PortNum.TELEMETRY_APP
    metrics = telemetry_pb2.Telemetry.FromString(packet.decoded.payload).device_metrics
    assert metrics.battery_level == 55
    assert metrics.voltage == pytest.approx(4.01)
    assert metrics.channel_utilization == pytest.approx(12.5)
    assert metrics.air_util_tx == pytest.approx(3.2)


# --------------------------------------------------------------------- downlinks


async def test_downlink_rules(node: SimulatedNode, live: StreamClient) -> None:
    def send(envelope: bytes) -> None:
        live.send(proxy(data=envelope))

    count = 0

    async def accepted(expect_injected: int) -> None:
        nonlocal count
        count += 1
        await node.wait_for(lambda: len(node.downlinks) == count)
        assert len(node.mesh_injected) == expect_injected

    # Another node's encrypted text via another gateway: injected + delivered.
    send(text_envelope(STRANGER, "from mqtt", packet_id=0x101))
    await accepted(1)
    delivered = (await live.recv_kind("packet")).packet
    assert delivered.via_mqtt
    assert delivered.decoded.payload == b"from mqtt"
    assert node.mesh_injected[0].via_mqtt
    # Same (sender, id) again: duplicate, dropped by the packet history.
    send(text_envelope(STRANGER, "from mqtt", packet_id=0x101))
    await accepted(1)
    # channel_id must match exactly (case-sensitive).
    send(text_envelope(STRANGER, "x", packet_id=0x102, channel_id="longfast"))
    await accepted(1)
    # hop_limit > 7 dropped.
    send(text_envelope(STRANGER, "x", packet_id=0x103, hop_limit=8))
    await accepted(1)
    # Decoded envelope while encryption_enabled: dropped.
    send(text_envelope(STRANGER, "x", packet_id=0x104, encrypted=False))
    await accepted(1)
    # Own packet via another gateway: ignored.
    send(text_envelope(NODE_NUM, "x", packet_id=0x105))
    await accepted(1)
    # Wrong key (undecodable): silent drop.
    send(text_envelope(STRANGER, "x", packet_id=0x106, key=bytes(16)))
    await accepted(1)
    # Own packet echoed through our own gateway: implicit ACK to the client.
    send(text_envelope(NODE_NUM, "mine", packet_id=0x107, gateway=NODE_ID))
    await accepted(1)
    assert node.implicit_acks == 1
    ack = (await live.recv_kind("packet")).packet
    assert ack.decoded.portnum == portnums_pb2.PortNum.ROUTING_APP
    assert ack.decoded.request_id == 0x107
    routing = mesh_pb2.Routing.FromString(ack.decoded.payload)
    assert routing.error_reason == mesh_pb2.Routing.Error.NONE
    # A text variant is misparsed by 2.7 firmware: accepted as a proxy
    # message, never injected.
    live.send(
        mesh_pb2.ToRadio(
            mqttClientProxyMessage=mesh_pb2.MqttClientProxyMessage(
                topic="msh/2/json/LongFast/!x", text="{}"
            )
        )
    )
    await accepted(1)
    # Direct message to this node, decoded envelope with encryption off is
    # covered below; PKI to us is accepted even though it cannot be decrypted.
    send(text_envelope(STRANGER, "pki", packet_id=0x108, channel_id="PKI", to=NODE_NUM))
    await accepted(2)


async def test_downlink_exact_match_on_preset_name_and_decoded_when_unencrypted() -> (
    None
):
    node = SimulatedNode(
        default_profile(modem_preset="MEDIUM_FAST", mqtt_encryption_enabled=False)
    )
    port = await node.start_tcp()
    try:
        client = await StreamClient.open(port)
        await client.handshake()
        mediumfast_hash = 0
        for byte in b"MediumFast" + AQ_KEY:
            mediumfast_hash ^= byte
        client.send(
            proxy(
                data=text_envelope(
                    STRANGER,
                    "lower",
                    packet_id=1,
                    channel_id="mediumfast",
                    encrypted=False,
                )
            ),
            proxy(
                data=text_envelope(
                    STRANGER,
                    "dm",
                    packet_id=2,
                    channel_id="MediumFast",
                    encrypted=False,
                    to=NODE_NUM,
                )
            ),
            proxy(
                data=text_envelope(
                    STRANGER,
                    "enc",
                    packet_id=3,
                    channel_id="MediumFast",
                    channel_hash=mediumfast_hash,
                )
            ),
        )
        await node.wait_for(lambda: len(node.downlinks) == 3)
        assert [p.id for p in node.mesh_injected] == [2, 3]
        first = (await client.recv_kind("packet")).packet
        second = (await client.recv_kind("packet")).packet
        assert (first.decoded.payload, second.decoded.payload) == (b"dm", b"enc")
        assert first.to == NODE_NUM
        assert first.via_mqtt
        await client.close()
    finally:
        await node.stop()


# --------------------------------------------------------------------- lifecycle


async def test_idle_timeout_and_zero_length_keepalive() -> None:
    node = SimulatedNode(idle_timeout=0.2)
    port = await node.start_tcp()
    try:
        client = await StreamClient.open(port)
        await client.handshake()
        for _ in range(4):  # 0.4 s of keepalives: stays open
            client.send(b"\x94\xc3\x00\x00")
            await asyncio.sleep(0.1)
        assert node.client_connected
        await client.quiet(0.01)
        assert await client.closed_by_peer(timeout=1.0)
        await node.wait_for(lambda: not node.client_connected, timeout=1.0)
        await client.close()
    finally:
        await node.stop()


async def test_reboot_rereads_profile(node: SimulatedNode, live: StreamClient) -> None:
    node.profile.modem_preset = "MEDIUM_FAST"
    assert node.topic_for(0).startswith("msh/2/e/LongFast/")  # not before reboot
    await node.reboot()
    assert (await live.recv()).rebooted
    assert await live.closed_by_peer()
    assert node.topic_for(0) == f"msh/2/e/MediumFast/{NODE_ID}"
    client = await StreamClient.open(node.port)
    frames = await client.handshake()
    lora = next(f.config.lora for f in frames if f.config.HasField("lora"))
    assert lora.modem_preset == config_pb2.Config.LoRaConfig.ModemPreset.MEDIUM_FAST
    assert frames[0].my_info.reboot_count == 1
    await client.close()


async def test_drop_client_and_disconnect(node: SimulatedNode) -> None:
    client = await StreamClient.open(node.port)
    await client.handshake()
    await node.drop_client()
    assert await client.closed_by_peer()
    assert not node.client_connected
    await client.close()
    client = await StreamClient.open(node.port)
    await client.handshake()
    client.send(mesh_pb2.ToRadio(disconnect=True))
    assert await client.closed_by_peer()
    await node.wait_for(lambda: not node.client_connected)
    await client.close()


async def test_serial_pty_with_interleaved_log_lines() -> None:
    master, slave = os.openpty()
    node = SimulatedNode()
    writer = None
    try:
        await node.serve_serial(master)
        reader, writer = await serialx.open_serial_connection(
            os.ttyname(slave), baudrate=115200
        )
        client = StreamClient(reader, writer)
        frames = await client.handshake(nonce=31337)
        assert kind(frames[0]) == "my_info"
        assert len([f for f in frames if kind(f) == "moduleConfig"]) == 16
        assert node.config_complete
        assert node.client_connected
        node.receive_text(OTHER, "over serial")
        msgs = [await client.recv(), await client.recv()]
        assert {kind(m) for m in msgs} == {"packet", "mqttClientProxyMessage"}
        client.send(proxy(data=b"down"))
        await node.wait_for(lambda: len(node.downlinks) == 1)
        lines = client.log_lines
        assert any("Client wants config, nonce=31337" in line for line in lines)
        assert any("Send config: lora" in line for line in lines)
        assert any(line.startswith("DEBUG | ") for line in lines)
    finally:
        if writer is not None:
            writer.close()
        await node.stop()
        os.close(slave)
        os.close(master)


# --------------------------------------------------------------------- real library


async def test_real_meshtastic_tcp_interface(node: SimulatedNode) -> None:
    loop = asyncio.get_running_loop()
    uplinks: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    def on_proxy(
        proxymessage: mesh_pb2.MqttClientProxyMessage, interface: object
    ) -> None:
        # Runs on the library's "publishing" thread.
        loop.call_soon_threadsafe(
            uplinks.put_nowait, (proxymessage.topic, bytes(proxymessage.data))
        )

    listener: Callable[..., None] = on_proxy  # strong reference for the weak-ref pubsub
    pub.subscribe(listener, "meshtastic.mqttclientproxymessage")
    before = set(threading.enumerate())
    iface = None
    try:
        iface = await loop.run_in_executor(
            None,
            lambda: meshtastic.tcp_interface.TCPInterface(
                hostname="127.0.0.1", portNumber=node.port
            ),
        )
        assert iface.myInfo.my_node_num == NODE_NUM
        assert iface.localNode.moduleConfig.mqtt.proxy_to_client_enabled
        assert iface.localNode.localConfig.lora.modem_preset == (
            config_pb2.Config.LoRaConfig.ModemPreset.LONG_FAST
        )
        assert NODE_ID in iface.nodes
        await node.wait_for(lambda: node.config_complete and node.heartbeats >= 1)
        node.inject_uplink(node.topic_for(0), data=b"\x0a\x0b")
        assert await asyncio.wait_for(uplinks.get(), 5) == (
            node.topic_for(0),
            b"\x0a\x0b",
        )
        await loop.run_in_executor(
            None, iface.sendMqttClientProxyMessage, "msh/2/e/LongFast/!cafe0001", b"dn"
        )
        await node.wait_for(lambda: len(node.downlinks) == 1)
        assert node.downlinks[0].topic == "msh/2/e/LongFast/!cafe0001"
        assert node.downlinks[0].data == b"dn"
    finally:
        if iface is not None:
            await loop.run_in_executor(None, iface.close)
        pub.unsubscribe(listener, "meshtastic.mqttclientproxymessage")
        await loop.run_in_executor(None, join_new_threads, before, 3.0)


# --------------------------------------------------------------------- framing details


def test_channel_hash_and_key_expansion_match_firmware() -> None:
    from devkit.meshsim.crypto import channel_hash, crypt, expand_psk

    assert expand_psk(b"\x01") == AQ_KEY
    assert expand_psk(b"\x02")[-1] == AQ_KEY[-1] + 1
    assert expand_psk(b"\x00") == b""
    assert channel_hash("LongFast", expand_psk(b"\x01")) == 8
    blob = crypt(AQ_KEY, 0x1234, OTHER, b"payload")
    assert aes_ctr(AQ_KEY, 0x1234, OTHER, blob) == b"payload"
