"""The proxy engine end to end: node simulator <-> NodeLink/MeshtasticProxy <-> Mosquitto.

Real TCP sockets, a real Mosquitto, pseudo-terminals for serial; no mocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
import contextlib
from dataclasses import dataclass, field
import os

import aiomqtt
from meshtastic.protobuf import config_pb2, mesh_pb2, mqtt_pb2, portnums_pb2
import pytest

from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.mqtt_client import (
    ClientState as BrokerState,
    MqttClient,
    MqttSettings,
)
from custom_components.mqtt_bridge.engine.node_link import (
    LinkState,
    NodeLink,
    serial_connector,
    tcp_connector,
)
from custom_components.mqtt_bridge.engine.proxy import (
    BrokerOverride,
    MeshtasticProxy,
    ProxyOptions,
    ProxyStatus,
)
from custom_components.mqtt_bridge.engine.publish_queue import DropReason
from custom_components.mqtt_bridge.engine.rules import ProxyRequirement
from custom_components.mqtt_bridge.engine.stream import encode_frame
from devkit.meshsim import ChannelSpec, SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto
from tests.common import wait_for

REMOTE = "!cafe0001"


@dataclass
class Subscriber:
    """A plain MQTT client that records what the broker delivers."""

    client: aiomqtt.Client
    messages: list[aiomqtt.Message] = field(default_factory=list)

    def payloads(self) -> list[bytes]:
        return [bytes(m.payload) for m in self.messages]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def subscriber(
    broker: Mosquitto, topic: str = "msh/#"
) -> AsyncIterator[Subscriber]:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        sub = Subscriber(client)
        await client.subscribe(topic, qos=1)

        async def read() -> None:
            async for message in client.messages:
                sub.messages.append(message)

        reader = asyncio.create_task(read())
        try:
            yield sub
        finally:
            reader.cancel()
            await asyncio.wait({reader})


@dataclass
class Running:
    node: SimulatedNode
    link: NodeLink
    proxy: MeshtasticProxy


@contextlib.asynccontextmanager
async def running_proxy(
    node: SimulatedNode,
    options: ProxyOptions | None = None,
    *,
    connector: object = None,
    wait_broker: bool = True,
) -> AsyncIterator[Running]:
    link = NodeLink(
        connector or tcp_connector("127.0.0.1", node.port),
        name="test",
        backoff=Backoff(base=0.02, cap=0.1),
    )
    proxy = MeshtasticProxy(link, options)
    tasks = {asyncio.create_task(link.run()), asyncio.create_task(proxy.run())}
    try:
        await wait_for(lambda: link.state is LinkState.READY)
        if wait_broker:
            await wait_for(lambda: proxy.broker_connected)
            await wait_for(
                lambda: (
                    bool(proxy.subscriptions)
                    and proxy.active_subscriptions == proxy.subscriptions
                )
            )
        yield Running(node, link, proxy)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


@pytest.fixture
async def make_node() -> AsyncIterator[Callable[..., SimulatedNode]]:
    nodes: list[SimulatedNode] = []

    def factory(**overrides: object) -> SimulatedNode:
        node = SimulatedNode(default_profile(**overrides))
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        await node.stop()


async def tcp_node(make_node, broker: Mosquitto, **overrides) -> SimulatedNode:
    overrides.setdefault("mqtt_address", f"127.0.0.1:{broker.port}")
    node = make_node(**overrides)
    await node.start_tcp()
    return node


def envelope(
    channel: str = "LongFast", gateway: str = REMOTE, *, text: str | None = "hello"
) -> bytes:
    env = mqtt_pb2.ServiceEnvelope(channel_id=channel, gateway_id=gateway)
    packet = env.packet
    setattr(packet, "from", 0xCAFE0001)
    packet.to = 0xFFFFFFFF
    packet.id = 4242
    packet.hop_limit = 3
    packet.hop_start = 3
    if text is not None:
        packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
        packet.decoded.payload = text.encode()
    return env.SerializeToString()


async def test_uplink_reaches_broker(make_node, mosquitto: Mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run, subscriber(mosquitto) as sub:
        node.receive_text(0xCAFE0002, "hi from the mesh")
        await wait_for(lambda: len(sub.messages) == 1)
        message = sub.messages[0]
        assert message.topic.value == node.topic_for(0) == "msh/2/e/LongFast/!1a2b3c4d"
        env = mqtt_pb2.ServiceEnvelope.FromString(bytes(message.payload))
        assert (env.channel_id, env.gateway_id) == ("LongFast", "!1a2b3c4d")
        assert message.qos == 1
        await wait_for(lambda: run.proxy.stats.uplink_messages == 1)
        assert run.proxy.stats.last_uplink is not None


async def test_text_uplink_published_as_utf8(make_node, mosquitto: Mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node), subscriber(mosquitto) as sub:
        node.inject_uplink("msh/2/map/", text='{"long_name":"Zürich"}')
        await wait_for(lambda: len(sub.messages) == 1)
        assert sub.payloads() == ['{"long_name":"Zürich"}'.encode()]


async def test_retained_uplink_flag_kept(make_node, mosquitto: Mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        node.inject_uplink("msh/2/stat/!1a2b3c4d", data=b"online", retained=True)
        await wait_for(lambda: run.proxy.stats.uplink_messages == 1)
        async with subscriber(mosquitto, "msh/2/stat/#") as late:
            await wait_for(lambda: len(late.messages) == 1)
            assert late.messages[0].retain is True
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.publish("msh/2/stat/!1a2b3c4d", b"", retain=True)


async def test_downlink_reaches_node_as_data(make_node, mosquitto: Mosquitto) -> None:
    # Firmware drops decoded (plaintext) downlinks when encryption is on.
    node = await tcp_node(make_node, mosquitto, mqtt_encryption_enabled=False)
    async with running_proxy(node) as run:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
        await wait_for(lambda: len(node.downlinks) == 1)
        message = node.downlinks[0]
        assert message.WhichOneof("payload_variant") == "data"
        assert message.topic == f"msh/2/e/LongFast/{REMOTE}"
        assert message.data == envelope()
        await wait_for(lambda: len(node.mesh_injected) == 1)
        assert run.proxy.stats.downlink_messages == 1


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"modem_preset": "MEDIUM_FAST"},
            {"msh/2/e/MediumFast/+", "msh/2/e/PKI/+"},
        ),
        (
            {"modem_preset": "LONG_MODERATE", "mqtt_root": "msh/EU_868"},
            {"msh/EU_868/2/e/LongMod/+", "msh/EU_868/2/e/PKI/+"},
        ),
        (
            {"use_preset": False, "mqtt_root": ""},
            {"msh/2/e/Custom/+", "msh/2/e/PKI/+"},
        ),
        (
            {
                "channels": [
                    ChannelSpec(name="", downlink=False),
                    ChannelSpec(name="Family", role="SECONDARY"),
                    ChannelSpec(name="Quiet", role="SECONDARY", downlink=False),
                ]
            },
            {"msh/2/e/Family/+", "msh/2/e/PKI/+"},
        ),
    ],
)
async def test_subscriptions_follow_node_channels(
    make_node, mosquitto: Mosquitto, overrides: dict, expected: set[str]
) -> None:
    node = await tcp_node(make_node, mosquitto, **overrides)
    async with running_proxy(node) as run:
        assert run.proxy.subscriptions == expected


async def test_uplink_on_blank_medium_fast_channel(make_node, mosquitto) -> None:
    # LN4CY dropped these ("Channel 'MediumFast' not found").
    node = await tcp_node(make_node, mosquitto, modem_preset="MEDIUM_FAST")
    async with running_proxy(node), subscriber(mosquitto) as sub:
        node.receive_text(0xCAFE0002, "medium fast")
        await wait_for(lambda: len(sub.messages) == 1)
        assert sub.messages[0].topic.value == "msh/2/e/MediumFast/!1a2b3c4d"


async def test_unsubscribed_channel_not_forwarded(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"msh/2/e/Other/{REMOTE}", envelope("Other"), qos=1)
            await client.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
        await wait_for(lambda: len(node.downlinks) == 1)
        assert [m.topic for m in node.downlinks] == [f"msh/2/e/LongFast/{REMOTE}"]
        assert run.proxy.stats.downlink_messages == 1


async def test_resubscribes_after_node_config_change(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        assert run.proxy.subscriptions == {"msh/2/e/LongFast/+", "msh/2/e/PKI/+"}
        node.profile.channels = [
            ChannelSpec(name="Family"),
            ChannelSpec(name="Team", role="SECONDARY"),
        ]
        await node.reboot()
        await wait_for(
            lambda: (
                run.proxy.active_subscriptions
                == {"msh/2/e/Family/+", "msh/2/e/Team/+", "msh/2/e/PKI/+"}
            )
        )
        assert run.link.stats.handshakes == 2
        assert run.proxy.client is not None
        await wait_for(lambda: run.proxy.broker_connected)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"msh/2/e/Team/{REMOTE}", envelope("Team"), qos=1)
            await client.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
        await wait_for(lambda: len(node.downlinks) >= 1)
        await asyncio.sleep(0.1)
        assert [m.topic for m in node.downlinks] == [f"msh/2/e/Team/{REMOTE}"]


async def test_oversize_downlinks_counted_not_sent(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        long_topic = "msh/2/e/LongFast/" + "x" * 43  # 60 bytes
        assert len(long_topic) == 60
        big = mqtt_pb2.ServiceEnvelope(channel_id="LongFast", gateway_id=REMOTE)
        big.packet.encrypted = b"\x00" * 430
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(long_topic, envelope(), qos=1)
            await client.publish(
                f"msh/2/e/LongFast/{REMOTE}", big.SerializeToString(), qos=1
            )
            await client.publish(
                f"msh/2/e/LongFast/{REMOTE}", b"not protobuf \xff", qos=1
            )
            await client.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
        await wait_for(lambda: len(node.downlinks) == 1)
        dropped = run.proxy.stats.dropped
        assert dropped["downlink_topic_too_long"] == 1
        assert dropped["downlink_payload_too_large"] == 1
        assert dropped["downlink_not_service_envelope"] == 1
        assert node.dropped_frames == 0
        assert len(node.downlinks) == 1


async def test_retained_downlinks_skipped_unless_enabled(make_node, mosquitto) -> None:
    topic = f"msh/2/e/LongFast/{REMOTE}"
    async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
        await client.publish(topic, envelope(text="stale"), qos=1, retain=True)
    try:
        node = await tcp_node(make_node, mosquitto)
        async with running_proxy(node) as run:
            await wait_for(lambda: run.proxy.stats.dropped["downlink_retained"] == 1)
            assert node.downlinks == []
        async with running_proxy(node, ProxyOptions(forward_retained=True)) as run:
            await wait_for(lambda: len(node.downlinks) == 1)
            assert node.downlinks[0].retained is True
    finally:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(topic, b"", retain=True)


async def test_own_echoes_dropped_by_default(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        node.receive_text(0xCAFE0002, "echo?")
        await wait_for(lambda: run.proxy.stats.uplink_messages == 1)
        # Another client replays our own envelope (e.g. a bridge): still dropped.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(
                node.topic_for(0), envelope(gateway=node.node_id), qos=1
            )
        await wait_for(lambda: run.proxy.stats.dropped["downlink_own_echo"] == 1)
        assert node.implicit_acks == 0
        assert node.downlinks == []


async def test_own_echoes_forwarded_become_implicit_acks(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node, ProxyOptions(forward_own_echoes=True)) as run:
        # Only packets the node originated come back as implicit ACKs: send one.
        packet = mesh_pb2.MeshPacket(to=0xFFFFFFFF, channel=0)
        packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
        packet.decoded.payload = b"from HA"
        status = await run.link.send_packet(packet)
        assert status is not None
        assert status.res == 0
        await wait_for(lambda: node.implicit_acks == 1)
        assert run.proxy.stats.downlink_messages >= 1
        assert run.proxy.stats.dropped["downlink_own_echo"] == 0


async def test_broker_outage_queues_and_flushes_uplinks(
    make_node, private_mosquitto
) -> None:
    broker = private_mosquitto
    node = await tcp_node(make_node, broker)
    async with running_proxy(node) as run:
        assert run.proxy.client is not None
        run.proxy.client.backoff = Backoff(base=30, cap=30)
        broker.kill()
        await wait_for(lambda: not run.proxy.broker_connected)
        for i in range(5):
            node.receive_text(0xCAFE0002, f"queued {i}")
        await wait_for(lambda: run.proxy.uplink_queue_depth == 5)
        assert run.link.state is LinkState.READY  # the node link does not care
        broker.start()
        async with subscriber(broker) as sub:
            run.proxy.client.reconnect_now()
            await wait_for(lambda: len(sub.messages) == 5)
            texts = [
                mqtt_pb2.ServiceEnvelope.FromString(p).packet for p in sub.payloads()
            ]
        assert len(texts) == 5
        assert run.proxy.uplink_queue_depth == 0
        assert run.proxy.stats.dropped_total == 0


async def test_uplink_queue_is_bounded_drop_oldest(
    make_node, private_mosquitto
) -> None:
    broker = private_mosquitto
    node = await tcp_node(make_node, broker)
    async with running_proxy(node, ProxyOptions(uplink_queue_size=3)) as run:
        assert run.proxy.client is not None
        run.proxy.client.backoff = Backoff(base=30, cap=30)
        broker.kill()
        await wait_for(lambda: not run.proxy.broker_connected)
        for i in range(5):
            node.inject_uplink("msh/2/e/LongFast/!1a2b3c4d", data=b"m%d" % i)
        await wait_for(lambda: run.proxy.stats.dropped["uplink_queue_full"] == 2)
        broker.start()
        async with subscriber(broker) as sub:
            run.proxy.client.reconnect_now()
            await wait_for(lambda: len(sub.messages) == 3)
            assert sub.payloads() == [b"m2", b"m3", b"m4"]


async def test_node_reconnect_keeps_broker_session(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run, subscriber(mosquitto) as sub:
        await node.drop_client()
        await wait_for(lambda: run.link.stats.handshakes == 2)
        node.receive_text(0xCAFE0002, "after reconnect")
        await wait_for(lambda: len(sub.messages) == 1)
        assert run.proxy.client is not None
        assert run.proxy.client.stats.connects == 1


async def test_downlinks_held_while_node_away(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        run.link.backoff = Backoff(base=0.3, cap=0.3)
        await node.drop_client()
        await wait_for(lambda: run.link.state is not LinkState.READY)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
        await wait_for(lambda: run.proxy.downlink_queue_depth == 1)
        await wait_for(lambda: len(node.downlinks) == 1)
        assert run.proxy.stats.dropped_total == 0


async def test_second_client_takes_node_over_then_link_recovers(
    make_node, mosquitto
) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        _reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        try:
            await wait_for(
                lambda: run.link.stats.failures >= 1 or run.link.stats.connects >= 2
            )
            await wait_for(lambda: run.link.stats.handshakes >= 2)
            assert run.link.state is LinkState.READY
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def test_node_reboot_triggers_fresh_handshake(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        await node.reboot()
        await wait_for(lambda: run.link.stats.handshakes == 2)
        assert node.handshakes == 2


async def test_missing_node_settings_reported(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto, proxy_to_client_enabled=False)
    async with running_proxy(node, wait_broker=False) as run:
        await wait_for(lambda: run.proxy.status is ProxyStatus.NODE_SETTINGS_MISSING)
        assert run.proxy.missing_settings == [ProxyRequirement.PROXY_TO_CLIENT]
        assert run.proxy.client is None


async def test_empty_address_uses_public_server_defaults(make_node) -> None:
    node = make_node(mqtt_address="", mqtt_root="")
    await node.start_tcp()
    async with running_proxy(node, wait_broker=False) as run:
        await wait_for(lambda: run.proxy.broker_settings is not None)
        settings = run.proxy.broker_settings
        assert settings is not None
        assert (settings.host, settings.port, settings.tls) == (
            "mqtt.meshtastic.org",
            8883,
            True,
        )
        assert (settings.username, settings.password) == ("meshdev", "large4cats")
        assert run.proxy.subscriptions == {"msh/2/e/LongFast/+", "msh/2/e/PKI/+"}
        # No internet here: the attempt fails, is counted, and nothing crashes.
        assert run.proxy.client is not None
        await wait_for(lambda: run.proxy.client.stats.failures >= 1)
        assert run.link.state is LinkState.READY


async def test_tls_broker_self_signed(make_node) -> None:
    with Mosquitto(tls=True) as broker:
        assert broker.tls_port is not None
        node = make_node(
            mqtt_address=f"127.0.0.1:{broker.tls_port}", mqtt_tls_enabled=True
        )
        await node.start_tcp()
        async with running_proxy(node, wait_broker=False) as run:
            assert run.proxy.client is not None
            await wait_for(lambda: run.proxy.client.stats.failures >= 1)
            assert not run.proxy.broker_connected
            assert "CERTIFICATE_VERIFY_FAILED" in (
                run.proxy.client.stats.last_error or ""
            )
        async with running_proxy(node, ProxyOptions(verify_tls=False)) as run:
            assert run.proxy.broker_settings is not None
            assert run.proxy.broker_settings.tls is True
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.subscribe("msh/#", qos=1)
                node.receive_text(0xCAFE0002, "over tls")
                async with asyncio.timeout(5):
                    message = await anext(aiter(client.messages))
            assert message.topic.value == "msh/2/e/LongFast/!1a2b3c4d"


async def test_rejected_credentials_stop_retrying(make_node) -> None:
    with Mosquitto(users={"hauser": "right"}) as broker:
        node = make_node(
            mqtt_address=f"127.0.0.1:{broker.port}",
            mqtt_username="hauser",
            mqtt_password="wrong",
        )
        await node.start_tcp()
        async with running_proxy(node, wait_broker=False) as run:
            await wait_for(lambda: run.proxy.status is ProxyStatus.BROKER_AUTH_FAILED)
            assert run.proxy.client is not None
            assert run.proxy.client.state is BrokerState.AUTH_FAILED
            failures = run.proxy.client.stats.failures
            await asyncio.sleep(0.3)
            assert run.proxy.client.stats.failures == failures  # no retry loop
            assert run.link.state is LinkState.READY
        override = BrokerOverride(
            "127.0.0.1", broker.port, username="hauser", password="right"
        )
        async with running_proxy(node, ProxyOptions(broker_override=override)) as run:
            assert run.proxy.status is ProxyStatus.RUNNING


async def test_broker_override_replaces_node_broker(make_node, mosquitto) -> None:
    node = make_node(mqtt_address="192.0.2.1:1883")  # unreachable on purpose
    await node.start_tcp()
    override = BrokerOverride("127.0.0.1", mosquitto.port)
    async with running_proxy(node, ProxyOptions(broker_override=override)) as run:
        async with subscriber(mosquitto) as sub:
            node.receive_text(0xCAFE0002, "via override")
            await wait_for(lambda: len(sub.messages) == 1)
        settings = run.proxy.broker_settings
        assert settings is not None
        assert (settings.host, settings.port) == ("127.0.0.1", mosquitto.port)
        # The topic root still comes from the node.
        assert run.proxy.broker is not None
        assert run.proxy.broker.root == "msh"
        assert run.proxy.broker.settings is settings


async def test_serial_link_over_pty(make_node, mosquitto) -> None:
    node = make_node(mqtt_address=f"127.0.0.1:{mosquitto.port}")
    master, slave = os.openpty()
    path = os.ttyname(slave)
    serve = asyncio.create_task(node.serve_serial(master))
    try:
        async with running_proxy(node, connector=serial_connector(path)) as run:
            async with subscriber(mosquitto) as sub:
                node.receive_text(0xCAFE0002, "over serial")
                await wait_for(lambda: len(sub.messages) == 1)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                await client.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
            await wait_for(lambda: len(node.downlinks) == 1)
            assert run.link.stats.garbage_bytes > 0  # the node's log lines
    finally:
        serve.cancel()
        await asyncio.wait({serve})
        await node.stop()
        os.close(slave)
        with contextlib.suppress(OSError):
            os.close(master)


async def test_many_downlinks_paced_in_order(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run:
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            for i in range(200):
                await client.publish(
                    f"msh/2/e/LongFast/{REMOTE}", envelope(text=f"m{i}"), qos=1
                )
        await wait_for(lambda: len(node.downlinks) == 200, timeout=10)
        texts = [
            mqtt_pb2.ServiceEnvelope.FromString(m.data).packet.decoded.payload
            for m in node.downlinks
        ]
        assert texts == [f"m{i}".encode() for i in range(200)]
        assert run.proxy.stats.dropped_total == 0
        assert node.dropped_frames == 0


# -- a scripted node, for framing and liveness cases the simulator never produces --


class ScriptedNode:
    """A TCP peer that answers the handshake, then follows a script."""

    def __init__(self, *, garbage: bytes = b"", answer_heartbeats: int = 10**9) -> None:
        self.garbage = garbage
        self.answer_heartbeats = answer_heartbeats
        self.heartbeats = 0
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.handlers: set[asyncio.Task[object]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
        for task in self.handlers:
            task.cancel()
        if self.handlers:
            await asyncio.wait(self.handlers)
        if self.server is not None:
            await self.server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        from custom_components.mqtt_bridge.engine.stream import FrameDecoder

        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        decoder = FrameDecoder()

        def send(message: mesh_pb2.FromRadio) -> None:
            writer.write(encode_frame(message.SerializeToString()))

        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                for payload in decoder.feed(data):
                    request = mesh_pb2.ToRadio.FromString(payload)
                    kind = request.WhichOneof("payload_variant")
                    if kind == "want_config_id":
                        writer.write(self.garbage)
                        send(
                            mesh_pb2.FromRadio(
                                my_info=mesh_pb2.MyNodeInfo(my_node_num=7)
                            )
                        )
                        # A truncated frame header split across writes.
                        frame = encode_frame(
                            mesh_pb2.FromRadio(
                                config=config_pb2.Config(
                                    lora=config_pb2.Config.LoRaConfig(use_preset=True)
                                )
                            ).SerializeToString()
                        )
                        writer.write(frame[:3])
                        await writer.drain()
                        await asyncio.sleep(0.01)
                        writer.write(frame[3:])
                        writer.write(b"\x94\xc3\x7f\xff")  # oversize header
                        writer.write(encode_frame(b"\xff\xff\xff"))  # undecodable
                        send(
                            mesh_pb2.FromRadio(
                                config_complete_id=request.want_config_id
                            )
                        )
                    elif kind == "heartbeat":
                        self.heartbeats += 1
                        assert request.heartbeat.nonce != 1
                        if self.heartbeats <= self.answer_heartbeats:
                            send(
                                mesh_pb2.FromRadio(
                                    queueStatus=mesh_pb2.QueueStatus(free=16)
                                )
                            )


async def test_garbage_truncated_and_oversize_frames_survive() -> None:
    peer = ScriptedNode(garbage=b"INFO | booting\r\n\x94\x00\x01junk")
    port = await peer.start()
    link = NodeLink(tcp_connector("127.0.0.1", port), name="scripted")
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.state is LinkState.READY)
        assert link.snapshot is not None
        assert link.snapshot.node_num == 7
        assert link.stats.garbage_bytes >= len(b"INFO | booting\r\n")
        assert link.stats.oversize_frames >= 1
        await wait_for(lambda: link.stats.decode_errors == 1)
    finally:
        task.cancel()
        await asyncio.wait({task})
        await peer.stop()


async def test_heartbeats_sent_and_silent_node_declared_dead() -> None:
    peer = ScriptedNode(answer_heartbeats=2)
    port = await peer.start()
    link = NodeLink(
        tcp_connector("127.0.0.1", port),
        name="scripted",
        heartbeat_interval=0.05,
        silence_timeout=0.2,
        backoff=Backoff(base=0.02, cap=0.05),
    )
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.state is LinkState.READY)
        await wait_for(lambda: peer.heartbeats >= 2)
        # After two answers the peer stays connected but silent.
        await wait_for(lambda: peer.connections >= 2, timeout=5)
        assert "silent" in (link.stats.last_error or "") or link.stats.failures >= 1
    finally:
        task.cancel()
        await asyncio.wait({task})
        await peer.stop()


async def test_unreachable_node_backs_off() -> None:
    from devkit.mosquitto import free_port

    link = NodeLink(
        tcp_connector("127.0.0.1", free_port()),
        name="nowhere",
        backoff=Backoff(base=0.01, cap=0.02),
    )
    task = asyncio.create_task(link.run())
    try:
        await wait_for(lambda: link.stats.failures >= 3)
        assert link.state in (LinkState.DISCONNECTED, LinkState.CONNECTING)
        assert "cannot connect" in (link.stats.last_error or "")
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert link.state is LinkState.STOPPED


def test_backoff_grows_with_jitter_and_caps() -> None:
    import random

    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(10)]
    assert 0.5 <= delays[0] <= 1.0
    assert 1.0 <= delays[1] <= 2.0
    assert all(d <= 60.0 for d in delays)
    assert delays[-1] >= 30.0
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def _registered_fds() -> set[int]:
    """File descriptors the running event loop watches (reader or writer)."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    return set(selector.get_map())


async def test_cancel_during_broker_connect_leaves_nothing() -> None:
    """Unload while CONNECT waits for CONNACK: no task, timer or socket remains."""
    accepted = asyncio.Event()
    closed_by_client = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writers.append(writer)
        accepted.set()
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):  # the CONNECT packet; never answered
                pass
            closed_by_client.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fds_before = _registered_fds()
    tasks_before = asyncio.all_tasks()
    client = MqttClient(MqttSettings("127.0.0.1", port), client_id="cancel-test")
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(5):
            await accepted.wait()
        await asyncio.sleep(0.05)
        assert client.state is BrokerState.CONNECTING
        assert len(_registered_fds()) > len(fds_before)  # the socket is watched
        task.cancel()
        await asyncio.wait({task})
        # The client closed its socket: the server sees EOF.
        async with asyncio.timeout(5):
            await closed_by_client.wait()
    finally:
        task.cancel()
        await asyncio.wait({task})
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
    assert client.state is BrokerState.STOPPED
    assert client.connected is False
    assert _registered_fds() <= fds_before
    leftovers = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
    assert {t for t in leftovers if not t.done()} == set()


async def test_broker_killed_mid_stream_delivers_held_uplinks_in_order(
    make_node, private_mosquitto
) -> None:
    broker = private_mosquitto
    node = await tcp_node(make_node, broker)
    async with running_proxy(node) as run:
        assert run.proxy.client is not None
        run.proxy.client.backoff = Backoff(base=30, cap=30)
        sent: list[bytes] = []
        after_outage: list[bytes] = []

        async def stream() -> None:
            for i in range(300):
                payload = b"u%03d" % i
                sent.append(payload)
                if not run.proxy.broker_connected:
                    after_outage.append(payload)
                node.inject_uplink("msh/2/e/LongFast/!1a2b3c4d", data=payload)
                await asyncio.sleep(0.001)

        async with subscriber(broker) as before:
            streaming = asyncio.create_task(stream())
            await wait_for(lambda: len(before.messages) >= 50)
            broker.kill()
            await streaming
        assert after_outage, "the outage began while messages were flowing"
        broker.start()
        async with subscriber(broker) as after:
            run.proxy.client.reconnect_now()
            await wait_for(lambda: run.proxy.uplink_queue_depth == 0)
            await wait_for(lambda: set(after_outage) <= set(after.payloads()))
            delivered = after.payloads()
        # Held messages come out in the order the node produced them.
        held = [p for p in delivered if p in set(after_outage)]
        assert held == sorted(set(held))
        assert run.proxy.stats.dropped_total == 0
        # At-least-once: anything the broker had not acknowledged is sent again.
        everything = set(before.payloads()) | set(delivered)
        missing = [p for p in sent if p not in everything]
        assert len(missing) <= run.proxy.client.inflight


def test_requeue_overflow_is_counted_and_keeps_order() -> None:
    """Unacknowledged messages put back into a full queue drop (and count) the oldest."""
    from tests.test_publish_queue import Counts, FakeClient, make_queue

    client = FakeClient()
    counts = Counts()
    queue = make_queue(client, counts, size=3, window=3)
    for n in (1, 2, 3):
        queue.put("t", b"%d" % n)  # written at once: in flight
    assert queue.in_flight == 3
    client._connected = False  # the session is going away
    for n in (4, 5):
        queue.put("t", b"%d" % n)  # no session: both wait in the queue
    assert queue.depth == 2
    # The session ends; the broker acknowledged none of 1-3, reported 3, 1, 2.
    client.in_flight = [client.in_flight[i] for i in (2, 0, 1)]
    client.lose()
    assert [m.payload for m in queue._queue] == [b"3", b"4", b"5"]
    assert counts.dropped == {DropReason.QUEUE_FULL: 2}
    assert sum(counts.dropped.values()) == 2
    # In sequence order again once the broker is back.
    client.connect()
    assert client.payloads() == [b"3"]  # a suspect goes alone
    client.ack()
    assert client.payloads() == [b"4", b"5"]
