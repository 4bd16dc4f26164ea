"""The RabbitMQ harness (devkit/rabbitmq.py): a real MQTT-3.1.1-only broker.

RabbitMQ 3.10's MQTT plugin (Debian 12) accepts MQTT 3.1.1 and cannot parse an
MQTT 5 CONNECT: it logs "MQTT cannot parse a frame" and closes the TCP
connection without any CONNACK. These tests pin down what paho-mqtt 2.1 then
reports, which is what the client's MQTT 5 -> 3.1.1 fallback must recognise.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
from pathlib import Path
import secrets
import socket
import threading
import time

from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
import pytest

from devkit.rabbitmq import RabbitMQ, mqtt311_probe, rabbitmq_broker

# The module fixture's first start (about 10-15 s) counts towards the first test.
pytestmark = pytest.mark.timeout(120)

HOST = "127.0.0.1"  # PHCC allows connect() only to this literal address


@pytest.fixture(scope="module")
def rabbitmq(request: pytest.FixtureRequest) -> Iterator[RabbitMQ]:
    """The session's RabbitMQ if conftest has one, else one for this module.

    An own node is checked on teardown: none of its processes remain.
    """
    try:
        shared = request.getfixturevalue("rabbitmq_session")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    gen = rabbitmq_broker()
    broker = next(gen)
    pids = broker.pids()
    assert pids, "the node runs no process"
    yield broker
    with pytest.raises(StopIteration):
        next(gen)  # cleanup(): stop and remove the work directory
    left = [pid for pid in pids if _alive(pid)]
    assert not left, f"processes of the stopped node remain: {left}"
    assert not broker.workdir.exists()


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie awaiting its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _client(protocol: int, client_id: str | None = None) -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"harness-{secrets.token_hex(4)}",
        protocol=protocol,
    )


def test_mqtt311_client_receives_its_own_publish(rabbitmq: RabbitMQ) -> None:
    client = _client(mqtt.MQTTv311)
    connected = threading.Event()
    subscribed = threading.Event()
    received: list[mqtt.MQTTMessage] = []
    got_message = threading.Event()
    connack: list[object] = []
    granted: list[int] = []
    topic = f"msh/harness/{secrets.token_hex(4)}"

    def on_connect(_c, _u, flags, reason, _props) -> None:
        connack.append((flags.session_present, reason.value))
        connected.set()

    def on_subscribe(_c, _u, _mid, reasons, _props) -> None:
        granted.extend(reason.value for reason in reasons)
        subscribed.set()

    def on_message(_c, _u, message: mqtt.MQTTMessage) -> None:
        received.append(message)
        got_message.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    assert (
        client.connect(HOST, rabbitmq.port, keepalive=10)
        == MQTTErrorCode.MQTT_ERR_SUCCESS
    )
    client.loop_start()
    try:
        assert connected.wait(10), "no CONNACK"
        assert connack == [(False, 0)]
        client.subscribe(topic, qos=1)
        assert subscribed.wait(10), "no SUBACK"
        assert granted == [1]
        info = client.publish(topic, b"\x00\x01mesh", qos=1)
        info.wait_for_publish(10)
        assert got_message.wait(10), "own publish not received"
    finally:
        client.disconnect()
        client.loop_stop()
    assert [(m.topic, m.payload, m.qos, m.retain) for m in received] == [
        (topic, b"\x00\x01mesh", 1, False)
    ]


def test_mqtt311_qos2_subscription_is_granted_qos1(rabbitmq: RabbitMQ) -> None:
    """RabbitMQ's MQTT plugin has no QoS 2: SUBACK grants 1 for a QoS 2 request."""
    client = _client(mqtt.MQTTv311)
    granted: list[int] = []
    client.on_subscribe = lambda _c, _u, _mid, reasons, _p: granted.extend(
        r.value for r in reasons
    )
    client.connect(HOST, rabbitmq.port, keepalive=10)
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            client.loop(0.05)
        assert client.is_connected()
        client.subscribe("msh/harness/qos2", qos=2)
        while not granted and time.monotonic() < deadline:
            client.loop(0.05)
    finally:
        client.disconnect()
        client.loop(0.05)
    assert granted == [1]


def test_mqtt5_connect_is_dropped_without_connack(rabbitmq: RabbitMQ) -> None:
    """What paho reports when a 3.1.1-only RabbitMQ gets an MQTT 5 CONNECT.

    The broker closes the TCP connection at once, sending nothing: paho calls
    no ``on_connect``; it calls ``on_disconnect`` with reason code 128
    ("Unspecified error") and ``is_disconnect_packet_from_server=False``, and
    its network loop returns ``MQTT_ERR_CONN_LOST``.
    """
    client = _client(mqtt.MQTTv5)
    events: list[tuple[object, ...]] = []
    client.on_connect = lambda _c, _u, flags, reason, props: events.append(
        ("connect", reason.value)
    )
    client.on_connect_fail = lambda _c, _u: events.append(("connect_fail",))
    client.on_disconnect = lambda _c, _u, flags, reason, props: events.append(
        (
            "disconnect",
            flags.is_disconnect_packet_from_server,
            reason.value,
            reason.getName(),
            reason.packetType,
        )
    )
    assert (
        client.connect(HOST, rabbitmq.port, keepalive=10)
        == MQTTErrorCode.MQTT_ERR_SUCCESS
    )
    results = []
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        results.append(client.loop(0.05))
    assert events == [("disconnect", False, 128, "Unspecified error", 14)]
    assert results[-1] == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert not client.is_connected()

    # The same on the wire: a minimal MQTT 5 CONNECT gets EOF, no bytes.
    sock = socket.create_connection((HOST, rabbitmq.port), timeout=5)
    try:
        cid = b"harness-v5"
        variable = (
            b"\x00\x04MQTT\x05\x02\x00\x0a\x00"  # level 5, clean, ka 10, no props
        )
        payload = len(cid).to_bytes(2, "big") + cid
        sock.sendall(bytes([0x10, len(variable) + len(payload)]) + variable + payload)
        assert sock.recv(16) == b""
    finally:
        sock.close()
    # ... and the broker stays up for 3.1.1 clients.
    assert mqtt311_probe(HOST, rabbitmq.port) == 0


def test_node_listens_on_loopback_only(rabbitmq: RabbitMQ) -> None:
    """MQTT, AMQP and distribution listeners are all on 127.0.0.1."""
    inodes: set[str] = set()
    for pid in rabbitmq.pids():
        fd_dir = Path(f"/proc/{pid}/fd")
        for fd in fd_dir.iterdir() if fd_dir.exists() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    listening: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                listening.add((address, int(port, 16)))
    loopback = "0100007F"  # 127.0.0.1, little-endian hex
    assert listening == {
        (loopback, rabbitmq.port),
        (loopback, rabbitmq.amqp_port),
        (loopback, rabbitmq.dist_port),
    }


def test_stop_leaves_no_process_and_start_reuses_the_port(rabbitmq: RabbitMQ) -> None:
    """Last in the module: a stop ends every process of the node (script,
    beam.smp, its port programs, the private epmd); a start comes back on the
    same MQTT port (faster: the node's database is kept)."""
    assert rabbitmq.epmd is not None
    pids = [*rabbitmq.pids(), rabbitmq.epmd.pid]
    assert len(pids) >= 3
    rabbitmq.stop()
    assert [pid for pid in pids if _alive(pid)] == []
    assert mqtt311_probe(HOST, rabbitmq.port, timeout=1.0) is None
    port = rabbitmq.port
    rabbitmq.start()
    assert rabbitmq.port == port
    assert mqtt311_probe(HOST, rabbitmq.port) == 0
