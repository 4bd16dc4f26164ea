"""PublishQueue: order, in-flight window, drop-oldest, requeue, poison messages.

Most tests run against a real Mosquitto; the strike bookkeeping is also checked
step by step with a scripted client (``FakeClient``), where the order of
acknowledgements and connection losses can be chosen exactly.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
import contextlib
from dataclasses import dataclass
import signal
import uuid

import pytest

from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.mqtt_client import (
    ClientState,
    ConnectionLostError,
    MqttClient,
    MqttError,
    MqttSettings,
    NotConnectedError,
    PublishRefusedError,
)
from custom_components.mqtt_bridge.engine.publish_queue import DropReason, PublishQueue
from devkit.mosquitto import Mosquitto
from tests.common import wait_for
from tests.test_proxy import subscriber


class Counts:
    """What a queue reported: published messages and drops by reason."""

    def __init__(self) -> None:
        self.published = 0
        self.dropped: Counter[DropReason] = Counter()

    def on_published(self, count: int) -> None:
        self.published += count

    def on_dropped(self, reason: DropReason, count: int) -> None:
        self.dropped[reason] += count


def make_queue(client: object, counts: Counts, **kwargs: int) -> PublishQueue:
    return PublishQueue(
        client,  # type: ignore[arg-type]
        on_published=counts.on_published,
        on_dropped=counts.on_dropped,
        **kwargs,
    )


@contextlib.asynccontextmanager
async def running_client(
    broker: Mosquitto, *, backoff: Backoff | None = None
) -> AsyncIterator[MqttClient]:
    client = MqttClient(
        MqttSettings("127.0.0.1", broker.port),
        client_id=f"pq-{uuid.uuid4().hex[:8]}",
        backoff=backoff,
    )
    task = asyncio.create_task(client.run())
    try:
        await wait_for(lambda: client.connected)
        yield client
    finally:
        task.cancel()
        await asyncio.wait({task})


def numbered(payloads: list[bytes]) -> list[int]:
    return [int(p.split(b":")[1]) for p in payloads]


# -- against Mosquitto ---------------------------------------------------------


async def test_messages_published_in_order_within_window(mosquitto) -> None:
    counts = Counts()
    async with (
        subscriber(mosquitto, "pq/order/#") as sub,
        running_client(mosquitto) as client,
    ):
        queue = make_queue(client, counts, window=5)
        peak = 0

        def sample(_count: int) -> None:
            nonlocal peak
            peak = max(peak, queue.in_flight)

        queue._on_published = lambda n: (sample(n), counts.on_published(n))
        for i in range(300):
            queue.put("pq/order/x", b"m:%d" % i)
            peak = max(peak, queue.in_flight)
        # Written at once up to the window; the rest waits in order.
        assert queue.in_flight == 5
        assert queue.depth == 295
        await wait_for(lambda: len(sub.messages) == 300, timeout=10)
        assert numbered(sub.payloads()) == list(range(300))
        assert all(m.qos == 1 for m in sub.messages)
        await wait_for(lambda: counts.published == 300)
        assert peak == 5
        assert (queue.depth, queue.in_flight) == (0, 0)
        assert counts.dropped == {}
        assert client.stats.connects == 1
        queue.close()


async def test_retain_flag_kept(mosquitto) -> None:
    counts = Counts()
    async with running_client(mosquitto) as client:
        queue = make_queue(client, counts)
        queue.put("pq/retained/x", b"kept", retain=True)
        await wait_for(lambda: counts.published == 1)
        async with subscriber(mosquitto, "pq/retained/#") as late:
            await wait_for(lambda: len(late.messages) == 1)
            assert late.messages[0].retain is True
            assert late.payloads() == [b"kept"]
        queue.put("pq/retained/x", b"", retain=True)  # clear it
        await wait_for(lambda: counts.published == 2)


async def test_queue_full_drops_oldest_while_disconnected(mosquitto) -> None:
    counts = Counts()
    client = MqttClient(
        MqttSettings("127.0.0.1", mosquitto.port),
        client_id=f"pq-{uuid.uuid4().hex[:8]}",
    )
    queue = make_queue(client, counts, size=3)
    for i in range(5):
        queue.put("pq/full/x", b"m:%d" % i)
    assert queue.depth == 3
    assert counts.dropped == {DropReason.QUEUE_FULL: 2}
    async with subscriber(mosquitto, "pq/full/#") as sub:
        task = asyncio.create_task(client.run())
        try:
            await wait_for(lambda: len(sub.messages) == 3)
            assert numbered(sub.payloads()) == [2, 3, 4]
            await wait_for(lambda: counts.published == 3)
        finally:
            task.cancel()
            await asyncio.wait({task})
    assert counts.dropped == {DropReason.QUEUE_FULL: 2}


async def test_unacknowledged_requeued_after_broker_kill(private_mosquitto) -> None:
    broker = private_mosquitto
    counts = Counts()
    total = 100
    async with running_client(broker, backoff=Backoff(base=30, cap=30)) as client:
        queue = make_queue(client, counts, window=20)
        # A frozen broker reads nothing and acknowledges nothing, then dies.
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        for i in range(total):
            queue.put("pq/kill/x", b"m:%d" % i)
        assert (queue.in_flight, queue.depth) == (20, 80)
        broker.kill()
        await wait_for(lambda: not client.connected)
        # The 20 in flight went back to the front of the queue, in order.
        assert counts.published == 0
        assert (queue.in_flight, queue.depth) == (0, total)
        assert client.stats.lost_publishes == 20
        assert counts.dropped == {}
        broker.start()
        async with subscriber(broker, "pq/kill/#") as after:
            client.reconnect_now()
            await wait_for(lambda: counts.published == total, timeout=10)
            await wait_for(lambda: len(after.messages) >= total)
            delivered = numbered(after.payloads())
    assert delivered == list(range(total))
    assert counts.dropped == {}
    assert (queue.depth, queue.in_flight) == (0, 0)


@pytest.mark.parametrize(
    "topic", ["pq/+", "pq/#", "", "pq/\x01", "pq/\x00", "pq/\ud800", "p" * 65_536]
)
async def test_invalid_topic_dropped_before_queueing(mosquitto, topic: str) -> None:
    counts = Counts()
    async with (
        subscriber(mosquitto, "pq/valid/#") as sub,
        running_client(mosquitto) as client,
    ):
        queue = make_queue(client, counts)
        queue.put(topic, b"bad")
        assert counts.dropped == {DropReason.INVALID_TOPIC: 1}
        assert (queue.depth, queue.in_flight) == (0, 0)
        queue.put("pq/valid/x", b"good")
        await wait_for(lambda: sub.payloads() == [b"good"])
        assert counts.published == 1
        assert client.stats.connects == 1


async def test_broker_refusal_counted_not_retried(mosquitto) -> None:
    # Mosquitto 2.0.11 answers a publish to $SYS with PUBACK 0x87 "Not
    # authorized" (MQTT 5) and then closes the connection; the refused message
    # is counted once and not sent again, the next one is delivered once.
    counts = Counts()
    async with (
        subscriber(mosquitto, "pq/after/#") as sub,
        running_client(mosquitto, backoff=Backoff(base=0.01, cap=0.05)) as client,
    ):
        queue = make_queue(client, counts)
        queue.put("$SYS/mqtt-bridge-test", b"nope")
        queue.put("pq/after/x", b"ok")
        await wait_for(lambda: counts.dropped[DropReason.BROKER_REFUSED] == 1)
        await wait_for(lambda: sub.payloads() == [b"ok"])
        assert counts.published == 1
        assert counts.dropped == {DropReason.BROKER_REFUSED: 1}
        assert client.stats.refused_publishes == 1
        assert client.stats.connects <= 2  # 2 on Mosquitto 2.0.11 (see above)
        await wait_for(lambda: client.connected)
        queue.put("pq/after/x", b"again")
        await wait_for(lambda: sub.payloads() == [b"ok", b"again"])


@pytest.mark.parametrize(
    "limit",
    [
        # The broker sends DISCONNECT 0x95 (packet too large).
        "max_packet_size 200",
        # Mosquitto 2.0.11 answers PUBACK reason 0x95 (invalid for PUBACK, paho
        # cannot parse it) and closes the connection.
        "message_size_limit 200",
    ],
)
async def test_poison_message_dropped_after_max_strikes(limit: str) -> None:
    counts = Counts()
    with Mosquitto(extra_config=limit + "\n") as broker:
        async with (
            subscriber(broker, "pq/poison/#") as sub,
            running_client(broker, backoff=Backoff(base=0.01, cap=0.05)) as client,
        ):
            queue = make_queue(client, counts, max_strikes=3)
            queue.put("pq/poison/x", b"P" * 300)
            for i in range(10):
                queue.put("pq/poison/x", b"m:%d" % i)
            await wait_for(
                lambda: counts.dropped[DropReason.CONNECTION_LOSSES] == 1, timeout=10
            )
            await wait_for(lambda: counts.published == 10, timeout=10)
            for i in range(10, 15):  # later messages flow normally
                queue.put("pq/poison/x", b"m:%d" % i)
            await wait_for(lambda: counts.published == 15)
            await wait_for(lambda: len(set(sub.payloads())) == 15)
            assert client.stats.connects == 4  # the first session + one per strike
            assert client.stats.failures == 3
            assert client.connected
        first_seen = list(dict.fromkeys(numbered(sub.payloads())))
        assert first_seen == list(range(15))
        assert counts.dropped == {DropReason.CONNECTION_LOSSES: 1}


# -- scripted client: the strike bookkeeping step by step ----------------------


@dataclass
class Sent:
    topic: str
    payload: bytes
    on_done: Callable[[MqttError | None], None]


class FakeClient:
    """Just what PublishQueue uses of MqttClient, driven by the test."""

    def __init__(self, *, connected: bool = True) -> None:
        self._connected = connected
        self.in_flight: list[Sent] = []
        self.listeners: list[Callable[[ClientState], None]] = []
        self.not_connected_once = False

    @property
    def connected(self) -> bool:
        return self._connected

    def add_state_listener(
        self, listener: Callable[[ClientState], None]
    ) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int,
        retain: bool,
        on_done: Callable[[MqttError | None], None],
    ) -> None:
        assert qos == 1
        if self.not_connected_once:
            self.not_connected_once = False
            raise NotConnectedError("session just ended")
        self.in_flight.append(Sent(topic, payload, on_done))

    def connect(self) -> None:
        self._connected = True
        for listener in list(self.listeners):
            listener(ClientState.CONNECTED)

    def lose(self) -> None:
        """The session ends: state first, then every in-flight publish fails."""
        self._connected = False
        for listener in list(self.listeners):
            listener(ClientState.DISCONNECTED)
        lost, self.in_flight = self.in_flight, []
        for sent in lost:
            sent.on_done(ConnectionLostError("lost"))

    def ack(self, error: MqttError | None = None) -> bytes:
        sent = self.in_flight.pop(0)
        sent.on_done(error)
        return sent.payload

    def payloads(self) -> list[bytes]:
        return [s.payload for s in self.in_flight]


def test_suspects_go_alone_until_acknowledged() -> None:
    client = FakeClient()
    counts = Counts()
    queue = make_queue(client, counts, window=3)
    for i in range(5):
        queue.put("t", b"%d" % i)
    assert client.payloads() == [b"0", b"1", b"2"]
    client.lose()  # 0, 1, 2 were in flight: suspects now
    assert queue.depth == 5
    queue.put("t", b"5")  # while disconnected: waits behind them
    client.connect()
    assert client.payloads() == [b"0"]  # a suspect goes alone
    assert client.ack() == b"0"
    assert client.payloads() == [b"1"]
    assert client.ack() == b"1"
    assert client.payloads() == [b"2"]
    assert client.ack() == b"2"
    # No suspect left: the window is used again, in order.
    assert client.payloads() == [b"3", b"4", b"5"]
    for _ in range(3):
        client.ack()
    assert counts.published == 6
    assert counts.dropped == {}
    assert (queue.depth, queue.in_flight) == (0, 0)


def test_poison_dropped_after_three_losses_others_survive() -> None:
    client = FakeClient()
    counts = Counts()
    queue = make_queue(client, counts, window=20, max_strikes=3)
    queue.put("t", b"poison")
    queue.put("t", b"good")
    client.lose()  # strike 1 for both
    client.connect()
    assert client.payloads() == [b"poison"]
    client.lose()  # strike 2
    client.connect()
    assert client.payloads() == [b"poison"]
    client.lose()  # strike 3: dropped
    assert counts.dropped == {DropReason.CONNECTION_LOSSES: 1}
    assert queue.depth == 1
    client.connect()
    assert client.payloads() == [b"good"]  # one strike only: still sent
    client.ack()
    queue.put("t", b"later")
    assert client.payloads() == [b"later"]
    client.ack()
    assert counts.published == 2
    assert counts.dropped == {DropReason.CONNECTION_LOSSES: 1}


def test_strikes_follow_the_message_across_sessions() -> None:
    client = FakeClient()
    counts = Counts()
    queue = make_queue(client, counts, max_strikes=2)
    queue.put("t", b"a")
    client.lose()
    client.connect()
    assert client.payloads() == [b"a"]
    client.ack()  # acknowledged after one strike: published, not dropped
    queue.put("t", b"b")
    client.lose()
    client.connect()
    client.lose()  # b's second strike
    assert counts.dropped == {DropReason.CONNECTION_LOSSES: 1}
    assert counts.published == 1


def test_refused_publish_is_counted_not_retried() -> None:
    client = FakeClient()
    counts = Counts()
    queue = make_queue(client, counts, window=1)
    queue.put("t", b"refused")
    queue.put("t", b"next")
    assert client.payloads() == [b"refused"]
    client.ack(PublishRefusedError(135, "Not authorized"))
    assert counts.dropped == {DropReason.BROKER_REFUSED: 1}
    assert client.payloads() == [b"next"]
    client.ack()
    assert counts.published == 1


def test_not_connected_on_publish_keeps_message_queued() -> None:
    client = FakeClient()
    counts = Counts()
    queue = make_queue(client, counts)
    client.not_connected_once = True
    queue.put("t", b"first")
    assert (queue.depth, queue.in_flight) == (1, 0)
    assert client.payloads() == []
    queue.put("t", b"second")  # waits behind the first, never overtakes it
    assert client.payloads() == []
    client.connect()
    assert client.payloads() == [b"first", b"second"]


def test_close_stops_following_the_client() -> None:
    client = FakeClient(connected=False)
    counts = Counts()
    queue = make_queue(client, counts)
    queue.put("t", b"x")
    queue.close()
    assert client.listeners == []
    client.connect()
    assert client.payloads() == []
    assert queue.depth == 1


def test_size_and_window_at_least_one() -> None:
    client = FakeClient(connected=False)
    counts = Counts()
    queue = make_queue(client, counts, size=0, window=0, max_strikes=0)
    assert (queue.size, queue.window, queue.max_strikes) == (1, 1, 1)
    queue.put("t", b"a")
    queue.put("t", b"b")
    assert queue.depth == 1
    assert counts.dropped == {DropReason.QUEUE_FULL: 1}
    client.connect()
    assert client.payloads() == [b"b"]
