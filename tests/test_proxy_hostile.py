"""Hostile inputs through the proxy, end to end.

Node simulator <-> NodeLink/MeshtasticProxy <-> Mosquitto: poison uplinks,
channel names and roots that are not topic levels, undecodable topics, and
background tasks that crash.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
import logging

import aiomqtt
from google.protobuf.message import DecodeError
from meshtastic.protobuf import mesh_pb2
import pytest

from custom_components.mqtt_bridge.engine import supervisor
from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.mqtt_client import MqttClient
from custom_components.mqtt_bridge.engine.node_link import LinkState
from custom_components.mqtt_bridge.engine.proxy import MeshtasticProxy, ProxyStatus
from custom_components.mqtt_bridge.engine.topics import TopicProblem
from devkit.meshsim import ChannelSpec, SimulatedNode, default_profile
from devkit.meshsim.stream import encode_frame
from devkit.mosquitto import Mosquitto
from tests.common import wait_for
from tests.test_proxy import REMOTE, envelope, running_proxy, subscriber, tcp_node

OWN_TOPIC = "msh/2/e/LongFast/!1a2b3c4d"


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


def first_seen(payloads: list[bytes]) -> list[bytes]:
    return list(dict.fromkeys(payloads))


# -- poison uplinks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "msh/2/e/LongFast/\x01",  # Mosquitto would drop the connection
        "msh/2/e/LongFast/\x7f",
        "msh/2/e/\u0085/x",
        "msh/2/e/LongFast/\ufffe",
        "msh/2/e/LongFast/a\x00b",
        "msh/2/e/+/!1a2b3c4d",
        "msh/#",
        "",
    ],
)
async def test_poison_topic_uplink_counted_good_ones_flow(
    make_node, mosquitto, topic: str
) -> None:
    node = await tcp_node(make_node, mosquitto)
    async with running_proxy(node) as run, subscriber(mosquitto) as sub:
        node.inject_uplink(topic, data=b"poison")
        for i in range(20):
            node.inject_uplink(OWN_TOPIC, data=b"good%02d" % i)
        await wait_for(lambda: len(sub.messages) == 20)
        await wait_for(lambda: run.proxy.stats.uplink_messages == 20)
        assert sub.payloads() == [b"good%02d" % i for i in range(20)]
        assert {m.topic.value for m in sub.messages} == {OWN_TOPIC}
        assert dict(run.proxy.stats.dropped) == {"uplink_invalid_topic": 1}
        client = run.proxy.client
        assert client is not None
        assert client.stats.connects == 1  # never reconnected
        assert client.stats.failures == 0
        assert run.proxy.status is ProxyStatus.RUNNING
        assert run.proxy.diagnostics()["stats"]["dropped"] == {
            "uplink_invalid_topic": 1
        }


@pytest.mark.parametrize(
    "limit",
    [
        # Mosquitto disconnects the client (DISCONNECT 0x95 "packet too large").
        "max_packet_size 200",
        # Mosquitto 2.0.11 answers PUBACK 0x95 (not a valid PUBACK reason code:
        # paho cannot parse it) and closes the connection.
        "message_size_limit 200",
    ],
)
async def test_poison_that_breaks_the_connection_is_dropped_after_three_losses(
    make_node, limit: str
) -> None:
    with Mosquitto(extra_config=limit + "\n") as broker:
        node = await tcp_node(make_node, broker)
        async with running_proxy(node) as run, subscriber(broker) as sub:
            client = run.proxy.client
            assert client is not None
            client.backoff = Backoff(base=0.01, cap=0.05)
            node.inject_uplink(OWN_TOPIC, data=b"P" * 400)  # valid topic, too big
            for i in range(5):
                node.inject_uplink(OWN_TOPIC, data=b"good%02d" % i)
            await wait_for(
                lambda: (
                    run.proxy.stats.dropped["uplink_lost_connection_repeatedly"] == 1
                ),
                timeout=10,
            )
            for i in range(5, 10):
                node.inject_uplink(OWN_TOPIC, data=b"good%02d" % i)
            await wait_for(lambda: run.proxy.stats.uplink_messages == 10, timeout=10)
            await wait_for(lambda: len(set(sub.payloads())) == 10)
            assert first_seen(sub.payloads()) == [b"good%02d" % i for i in range(10)]
            assert b"P" * 400 not in sub.payloads()
            # At most three connection losses for the poison, then it is gone.
            assert client.stats.connects == 4
            assert client.stats.failures == 3
            assert dict(run.proxy.stats.dropped) == {
                "uplink_lost_connection_repeatedly": 1
            }
            assert run.proxy.broker_connected
            assert run.proxy.status is ProxyStatus.RUNNING
            assert run.link.stats.handshakes == 1  # the node link never noticed
            # Downlinks still work on the new session.
            await wait_for(
                lambda: run.proxy.active_subscriptions == run.proxy.subscriptions
            )
            async with aiomqtt.Client("127.0.0.1", broker.port) as peer:
                await peer.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
            await wait_for(lambda: len(node.downlinks) == 1)


# -- channel names and roots that are not topic levels ----------------------------------

BAD_CHANNELS = {
    "C#": TopicProblem.WILDCARD,
    "x+y": TopicProblem.WILDCARD,
    "+": TopicProblem.WILDCARD,
    "ch\x01": TopicProblem.CONTROL_CHARACTER,
}


async def test_bad_channel_names_skipped_normal_channel_works_both_ways(
    make_node, mosquitto
) -> None:
    channels = [ChannelSpec(name="Normal")] + [
        ChannelSpec(name=name, role="SECONDARY") for name in BAD_CHANNELS
    ]
    node = await tcp_node(
        make_node, mosquitto, channels=channels, mqtt_encryption_enabled=False
    )
    async with running_proxy(node) as run, subscriber(mosquitto) as sub:
        proxy = run.proxy
        assert proxy.subscriptions == {"msh/2/e/Normal/+", "msh/2/e/PKI/+"}
        assert proxy.active_subscriptions == proxy.subscriptions
        assert proxy.client is not None
        assert proxy.client.registry.filters == proxy.subscriptions
        assert "msh/2/e/+/+" not in proxy.client.registry.filters
        assert proxy.invalid_channels == BAD_CHANNELS
        assert proxy.diagnostics()["invalid_channels"] == {
            name: str(problem) for name, problem in BAD_CHANNELS.items()
        }
        assert proxy.status is ProxyStatus.RUNNING
        assert proxy.error is None

        # Uplink on the normal channel; the bad channels' uplinks are counted.
        node.receive_text(0xCAFE0002, "normal up", channel_index=0)
        for index in range(1, len(channels)):
            node.receive_text(0xCAFE0002, f"bad {index}", channel_index=index)
        await wait_for(lambda: len(sub.messages) == 1)
        await wait_for(
            lambda: proxy.stats.dropped["uplink_invalid_topic"] == len(BAD_CHANNELS)
        )
        assert sub.messages[0].topic.value == "msh/2/e/Normal/!1a2b3c4d"

        # Downlink on the normal channel reaches the node; a topic that only a
        # "+" channel turned wildcard would match does not.
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as peer:
            await peer.publish(f"msh/2/e/Other/{REMOTE}", envelope("Other"), qos=1)
            await peer.publish(f"msh/2/e/Normal/{REMOTE}", envelope("Normal"), qos=1)
        await wait_for(lambda: len(node.downlinks) == 1)
        await wait_for(lambda: len(node.mesh_injected) == 1)
        assert [m.topic for m in node.downlinks] == [f"msh/2/e/Normal/{REMOTE}"]
        await asyncio.sleep(0.05)
        assert len(node.downlinks) == 1
        assert proxy.stats.downlink_messages == 1
        assert proxy.client.stats.connects == 1
        assert proxy.status is ProxyStatus.RUNNING


async def test_invalid_root_on_second_proxy_does_not_disturb_first(
    make_node, mosquitto
) -> None:
    normal = [ChannelSpec(name="Normal")]
    first = await tcp_node(
        make_node, mosquitto, channels=normal, mqtt_encryption_enabled=False
    )
    second = await tcp_node(
        make_node,
        mosquitto,
        node_num=0x2B3C4D5E,
        mqtt_root="msh#",
        channels=normal,
        mqtt_encryption_enabled=False,
    )
    async with (
        running_proxy(first) as one,
        running_proxy(second, wait_broker=False) as two,
        subscriber(mosquitto) as sub,
    ):
        await wait_for(lambda: two.proxy.broker_connected)
        assert two.proxy.invalid_channels == {"root:msh#": TopicProblem.WILDCARD}
        assert two.proxy.subscriptions == frozenset()
        assert two.proxy.status is ProxyStatus.RUNNING
        assert one.proxy.invalid_channels == {}

        second.receive_text(0xCAFE0002, "from the bad root")
        await wait_for(lambda: two.proxy.stats.dropped["uplink_invalid_topic"] == 1)
        first.receive_text(0xCAFE0002, "from the good root")
        await wait_for(lambda: len(sub.messages) == 1)
        assert sub.messages[0].topic.value == "msh/2/e/Normal/!1a2b3c4d"

        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as peer:
            await peer.publish(f"msh/2/e/Normal/{REMOTE}", envelope("Normal"), qos=1)
        await wait_for(lambda: len(first.downlinks) == 1)
        await asyncio.sleep(0.05)
        assert second.downlinks == []
        assert dict(one.proxy.stats.dropped) == {}
        assert dict(two.proxy.stats.dropped) == {"uplink_invalid_topic": 1}
        assert one.proxy.client is not None
        assert two.proxy.client is not None
        assert one.proxy.client.stats.connects == 1
        assert two.proxy.client.stats.connects == 1
        assert two.proxy.client.stats.published == 0
        assert one.proxy.status is ProxyStatus.RUNNING


# -- undecodable topics -------------------------------------------------------------


async def test_uplink_with_invalid_utf8_topic_counted(make_node, mosquitto) -> None:
    node = await tcp_node(make_node, mosquitto)
    message = mesh_pb2.FromRadio(
        id=4242,
        mqttClientProxyMessage=mesh_pb2.MqttClientProxyMessage(
            topic="msh/2/e/LongFast/XX", data=b"bad topic"
        ),
    )
    raw = message.SerializeToString().replace(b"XX", b"\xff\xfe")
    with pytest.raises(DecodeError):
        mesh_pb2.FromRadio.FromString(raw)  # protobuf refuses the whole frame
    async with running_proxy(node) as run, subscriber(mosquitto) as sub:
        session = node._tcp_session
        assert session is not None
        session.write(encode_frame(raw))
        session.write(encode_frame(b"\xff\xff\xff"))  # garbage: not an uplink
        node.inject_uplink(OWN_TOPIC, data=b"after")
        await wait_for(lambda: sub.payloads() == [b"after"])
        await wait_for(lambda: run.proxy.stats.dropped["uplink_invalid_topic"] == 1)
        assert run.link.stats.decode_errors == 2
        assert dict(run.proxy.stats.dropped) == {"uplink_invalid_topic": 1}
        assert run.link.stats.handshakes == 1
        assert run.link.state is LinkState.READY
        assert run.proxy.client is not None
        assert run.proxy.client.stats.connects == 1


# -- crashing background tasks ------------------------------------------------------


@pytest.fixture
def quick_restart(monkeypatch) -> None:
    """Supervised tasks restart after 0.15-0.3 s instead of 0.5-1 s."""
    monkeypatch.setattr(
        supervisor, "Backoff", lambda **_kwargs: Backoff(base=0.3, cap=0.3)
    )


async def test_downlink_writer_crash_is_logged_shown_and_restarted(
    make_node, mosquitto, monkeypatch, caplog, quick_restart
) -> None:
    original = MeshtasticProxy._downlink_writer
    crash = asyncio.Event()
    calls = 0

    async def flaky(self: MeshtasticProxy) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await crash.wait()
            raise RuntimeError("writer bug")
        await original(self)

    monkeypatch.setattr(MeshtasticProxy, "_downlink_writer", flaky)
    node = await tcp_node(make_node, mosquitto, mqtt_encryption_enabled=False)
    async with running_proxy(node) as run:
        proxy = run.proxy
        assert proxy.status is ProxyStatus.RUNNING
        with caplog.at_level(logging.ERROR):
            crash.set()
            await wait_for(lambda: proxy.status is ProxyStatus.TASK_FAILED)
        assert proxy.error == "downlink writer: RuntimeError: writer bug"
        failure = proxy.health.failures["downlink writer"]
        assert (failure.count, failure.restarting) == (1, True)
        diagnostics = proxy.diagnostics()
        assert diagnostics["status"] == "task_failed"
        assert diagnostics["task_failures"]["downlink writer"]["count"] == 1
        await wait_for(lambda: proxy.status is ProxyStatus.RUNNING)
        assert calls == 2
        assert failure.restarting is False
        assert proxy.error is None

        # Downlinks held while the node is away need the (restarted) writer.
        run.link.backoff = Backoff(base=0.3, cap=0.3)
        await node.drop_client()
        await wait_for(lambda: run.link.state is not LinkState.READY)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as peer:
            await peer.publish(f"msh/2/e/LongFast/{REMOTE}", envelope(), qos=1)
        await wait_for(lambda: proxy.downlink_queue_depth == 1)
        await wait_for(lambda: len(node.downlinks) == 1)
        await wait_for(lambda: proxy.downlink_queue_depth == 0)
        assert proxy.stats.dropped_total == 0
        assert proxy.client is not None
        assert proxy.client.stats.connects == 1
        assert proxy.health.failures["downlink writer"].count == 1
    (record,) = [r for r in caplog.records if "downlink writer failed" in r.message]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is RuntimeError
    assert "writer bug" in caplog.text


async def test_broker_client_crash_is_restarted(
    make_node, mosquitto, monkeypatch, caplog, quick_restart
) -> None:
    original = MqttClient.run
    calls = 0

    async def flaky(self: MqttClient) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("client bug")
        await original(self)

    monkeypatch.setattr(MqttClient, "run", flaky)
    node = await tcp_node(make_node, mosquitto)
    with caplog.at_level(logging.ERROR):
        async with running_proxy(node, wait_broker=False) as run:
            proxy = run.proxy
            await wait_for(lambda: proxy.status is ProxyStatus.TASK_FAILED)
            assert proxy.error == "broker client: RuntimeError: client bug"
            assert not proxy.broker_connected
            await wait_for(lambda: proxy.broker_connected)
            assert proxy.status is ProxyStatus.RUNNING
            assert proxy.health.failures["broker client"].count == 1
            assert calls == 2
            async with subscriber(mosquitto) as sub:
                node.inject_uplink(OWN_TOPIC, data=b"after restart")
                await wait_for(lambda: sub.payloads() == [b"after restart"])
    assert "broker client failed; restarting it" in caplog.text
    assert "Traceback" in caplog.text
