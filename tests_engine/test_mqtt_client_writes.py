"""MqttClient write path against the real Mosquitto fixture: writes the socket does not take at once.

``MqttClient.publish`` writes at once and registers the socket writer only
for what the socket did not take; QoS 0 publishes without ``on_done`` leave
paho's ``on_publish`` unset (paho builds a ReasonCode and a Properties per
QoS 0 write when it is set) and are counted as published when written.
"""

from __future__ import annotations

import os
import signal

from mqtt_bridge_engine.mqtt_client import PublishProperties
import pytest

from devkit.mosquitto import Mosquitto

from .common import mqtt_client, wait_for

pytestmark = pytest.mark.timeout(30)

# Larger than a loopback socket's send buffer (tcp_wmem max is 4 MiB by default).
BIG = 24 * 1024 * 1024


async def test_qos0_larger_than_the_socket_buffer(mosquitto: Mosquitto) -> None:
    """A QoS 0 publish the socket cannot take at once is written later and counted then."""
    async with mqtt_client(mosquitto) as client:
        props = PublishProperties(user_properties=(("k", "v"),))
        assert mosquitto.proc is not None
        # The broker stops reading (SIGSTOP), so the socket fills up for sure.
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            client.publish("t/writes/big", b"x" * BIG, qos=0, properties=props)
            assert client.stats.published == 0  # not written yet: waits for the socket
            # Queued behind it: written with the rest, counted by publish() or paho.
            client.publish("t/writes/small", b"y", qos=0, properties=props)
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        await wait_for(lambda: client.stats.published == 2, 20.0)
        # Nothing is waiting any more: small publishes are written at once.
        client.publish("t/writes/small", b"z", qos=0)
        assert client.stats.published == 3


async def test_qos0_and_qos1_interleaved(mosquitto: Mosquitto) -> None:
    """QoS 1 acknowledgements and untracked QoS 0 publishes share paho's on_publish."""
    async with mqtt_client(mosquitto) as client:
        done: list[object] = []
        client.publish("t/writes/a", b"1", qos=1, on_done=done.append)
        client.publish("t/writes/b", b"0", qos=0)  # while the QoS 1 is in flight
        client.publish("t/writes/c", b"0", qos=0, on_done=done.append)
        await wait_for(lambda: len(done) == 2, 20.0)
        assert done == [None, None]
        await client.publish_wait("t/writes/d", b"1", qos=1)
        client.publish("t/writes/e", b"0", qos=0)
        assert client.stats.published == 5
