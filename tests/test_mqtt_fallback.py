"""MQTT 5 -> 3.1.1 fallback against a real MQTT-3.1.1-only broker (RabbitMQ 3.10).

RabbitMQ's ``rabbitmq_mqtt`` 3.10 does not answer an MQTT 5 CONNECT: it closes
the connection without a CONNACK. The client must then connect with MQTT 3.1.1
at once, work normally (publish, subscribe, QoS 1), and the node proxy must run
over it (without No Local, its own echoes come back and are dropped by rule).
"""

from __future__ import annotations

import asyncio

from meshtastic.protobuf import mqtt_pb2

from custom_components.mqtt_bridge.engine.mqtt_client import (
    ClientState,
    Message,
    MqttClient,
    MqttSettings,
    ProtocolVersion,
    PublishProperties,
    check_connection,
)
from custom_components.mqtt_bridge.engine.rules import DownlinkDrop
from devkit.meshsim import SimulatedNode, default_profile
from devkit.rabbitmq import RabbitMQ
from tests.common import wait_for
from tests.test_proxy import running_proxy, subscriber


async def test_client_falls_back_to_311_and_works(rabbitmq: RabbitMQ) -> None:
    settings = MqttSettings("127.0.0.1", rabbitmq.port)
    client = MqttClient(settings, client_id="fallback-test")
    received: list[Message] = []
    subscription = client.subscribe("fb/+/x", received.append)
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(10):
            await client.wait_connected()
            await subscription.wait_granted()
        assert client.protocol is ProtocolVersion.V311
        assert client.stats.connects == 1
        # Properties cannot travel on 3.1.1: the publish still goes through.
        await client.publish_wait(
            "fb/1/x",
            b"hello",
            qos=1,
            properties=PublishProperties(user_properties=(("k", "v"),)),
        )
        await wait_for(lambda: len(received) == 1)
        assert received[0].topic == "fb/1/x"
        assert received[0].payload == b"hello"
        assert received[0].properties is None
        assert client.stats.published == 1
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert client.state is ClientState.STOPPED


async def test_check_connection_accepts_311_only_broker(rabbitmq: RabbitMQ) -> None:
    await check_connection(MqttSettings("127.0.0.1", rabbitmq.port), timeout=10)


async def test_proxy_runs_over_311_broker(rabbitmq: RabbitMQ) -> None:
    node = SimulatedNode(default_profile(mqtt_address=f"127.0.0.1:{rabbitmq.port}"))
    await node.start_tcp()
    try:
        async with (
            subscriber(rabbitmq, "msh/#") as sub,
            running_proxy(node) as run,
        ):
            assert run.proxy.client is not None
            assert run.proxy.client.protocol is ProtocolVersion.V311
            node.receive_text(0xCAFE0002, "over 3.1.1")
            await wait_for(lambda: len(sub.messages) == 1, timeout=10)
            envelope = mqtt_pb2.ServiceEnvelope()
            envelope.ParseFromString(sub.payloads()[0])
            assert envelope.gateway_id == run.proxy.gateway_id
            # No No Local on 3.1.1: the broker echoes the uplink back, and the
            # own-echo rule drops it instead of writing it to the node.
            await wait_for(
                lambda: (
                    run.proxy.stats.dropped[f"downlink_{DownlinkDrop.OWN_ECHO}"] == 1
                ),
                timeout=10,
            )
            assert run.proxy.stats.uplink_messages == 1
            assert not node.downlinks
    finally:
        await node.stop()
