"""MqttClient against a real Mosquitto 2.0, with aiomqtt as the independent peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
import contextlib
from dataclasses import dataclass, field
import random
import signal
import socket
import uuid

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
import psutil
import pytest

from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.mqtt_client import (
    RECONNECT_CAP,
    ClientState,
    ConnectionLostError,
    Message,
    MqttAuthError,
    MqttClient,
    MqttConnectError,
    MqttSettings,
    MqttTimeoutError,
    MqttTlsError,
    ProtocolVersion,
    PublishProperties,
    Will,
    check_connection,
)
from custom_components.mqtt_bridge.engine.subscriptions import (
    FilterState,
    RetainHandling,
    SubscribeOptions,
)
from devkit.mosquitto import Mosquitto, free_port
from tests.common import wait_for

V5 = aiomqtt.ProtocolVersion.V5


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def settings_for(broker: Mosquitto, **kwargs: object) -> MqttSettings:
    return MqttSettings("127.0.0.1", broker.port, **kwargs)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(
    settings: MqttSettings, *, wait: bool = True, **kwargs: object
) -> AsyncIterator[MqttClient]:
    kwargs.setdefault("client_id", unique("mc"))
    client = MqttClient(settings, **kwargs)  # type: ignore[arg-type]
    task = asyncio.create_task(client.run(), name="test mqtt client")
    try:
        if wait:
            await wait_for(lambda: client.connected)
        yield client
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert client.state is ClientState.STOPPED


@dataclass
class Peer:
    """An aiomqtt client (MQTT 5) that records what it receives."""

    client: aiomqtt.Client
    messages: list[aiomqtt.Message] = field(default_factory=list)

    def payloads(self) -> list[bytes]:
        return [bytes(m.payload) for m in self.messages]  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def peer(
    broker: Mosquitto, *topics: str, **kwargs: object
) -> AsyncIterator[Peer]:
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        protocol=V5,
        **kwargs,  # type: ignore[arg-type]
    ) as client:
        result = Peer(client)
        for topic in topics:
            await client.subscribe(topic, qos=1)

        async def read() -> None:
            async for message in client.messages:
                result.messages.append(message)

        reader = asyncio.create_task(read())
        try:
            yield result
        finally:
            reader.cancel()
            await asyncio.wait({reader})


def registered_fds() -> set[int]:
    """File descriptors the running event loop watches (reader or writer)."""
    selector = asyncio.get_running_loop()._selector  # type: ignore[attr-defined]
    return set(selector.get_map())


def tick_timers() -> list[asyncio.TimerHandle]:
    loop = asyncio.get_running_loop()
    return [
        h
        for h in loop._scheduled  # type: ignore[attr-defined]
        if not h.cancelled() and "_tick" in repr(h)
    ]


# -- subscriptions and fan-out ------------------------------------------------------


async def _overlapping(broker: Mosquitto, protocol: ProtocolVersion) -> tuple:
    base = unique("ov")
    wide: list[Message] = []
    narrow: list[Message] = []
    async with running(settings_for(broker), protocol=protocol) as client:
        first = client.subscribe(f"{base}/#", wide.append)
        second = client.subscribe(f"{base}/+/c", narrow.append)
        await first.wait_granted()
        await second.wait_granted()
        async with peer(broker) as p:
            await p.client.publish(f"{base}/b/c", b"both", qos=1)
            await p.client.publish(f"{base}/only", b"wide", qos=1)
            await p.client.publish(f"{base}/end", b"end", qos=1)
        await wait_for(lambda: [m.payload for m in wide][-1:] == [b"end"])
        received = client.stats.received
    return wide, narrow, received


@pytest.mark.parametrize("protocol", [ProtocolVersion.V5, ProtocolVersion.V311])
async def test_overlapping_filters_each_consumer_gets_the_message(
    mosquitto, protocol: ProtocolVersion
) -> None:
    wide, narrow, received = await _overlapping(mosquitto, protocol)
    both_wide = [m for m in wide if m.payload == b"both"]
    both_narrow = [m for m in narrow if m.payload == b"both"]
    assert both_wide
    assert both_narrow
    assert all(m.topic.endswith("/b/c") for m in both_wide + both_narrow)
    assert [m.payload for m in narrow if m.payload != b"both"] == []
    assert [m.payload for m in wide if m.payload != b"both"] == [b"wide", b"end"]
    # Mosquitto 2.0.11 sends one copy per matching subscription to an MQTT 5
    # session, one copy in all to an MQTT 3.1.1 session.
    copies = received - 2
    assert copies == (2 if protocol is ProtocolVersion.V5 else 1)
    # Each consumer gets the message once either way: on MQTT 5 each copy
    # carries the Subscription Identifier of its own filter.
    assert len(both_wide) == len(both_narrow) == 1


async def test_subscriptions_restored_after_broker_restart(private_mosquitto) -> None:
    broker = private_mosquitto
    got: list[Message] = []
    async with running(
        settings_for(broker), backoff=Backoff(base=0.05, cap=0.1)
    ) as client:
        subs = [client.subscribe(f, got.append) for f in ("r/#", "s/+/x")]
        for sub in subs:
            await sub.wait_granted()
        assert client.registry.granted == {"r/#", "s/+/x"}
        broker.kill()
        await wait_for(lambda: not client.connected)
        assert client.registry.granted == frozenset()  # nothing on a dead session
        broker.start()
        await wait_for(lambda: client.registry.granted == {"r/#", "s/+/x"})
        assert client.stats.connects == 2
        for sub in subs:
            await sub.wait_granted()
        async with peer(broker) as p:
            await p.client.publish("r/1", b"r", qos=1)
            await p.client.publish("s/y/x", b"s", qos=1)
        await wait_for(lambda: len(got) == 2)
        assert sorted(m.payload for m in got) == [b"r", b"s"]


# -- MQTT 5 properties, No Local, will, retain handling ----------------------------


async def test_properties_from_client_reach_peer(mosquitto) -> None:
    topic = unique("props") + "/req"
    sent = PublishProperties(
        user_properties=(("k1", "v1"), ("k2", "ü")),
        response_topic="reply/here",
        correlation_data=b"\x00\x01corr-\xff",
        message_expiry_interval=120,
        content_type="application/json",
        payload_format_indicator=1,
    )
    async with peer(mosquitto, topic) as p, running(settings_for(mosquitto)) as client:
        await client.publish_wait(topic, b'{"a": 1}', qos=1, properties=sent)
        await wait_for(lambda: len(p.messages) == 1)
    props = p.messages[0].properties
    assert props is not None
    assert props.UserProperty == [("k1", "v1"), ("k2", "ü")]
    assert props.ResponseTopic == "reply/here"
    assert props.CorrelationData == b"\x00\x01corr-\xff"
    assert 118 <= props.MessageExpiryInterval <= 120
    assert props.ContentType == "application/json"
    assert props.PayloadFormatIndicator == 1


async def test_properties_from_peer_reach_consumer(mosquitto) -> None:
    topic = unique("props") + "/resp"
    got: list[Message] = []
    async with running(settings_for(mosquitto)) as client:
        await client.subscribe(topic, got.append).wait_granted()
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("a", "1"), ("a", "2")]
        props.ResponseTopic = "back/to/peer"
        props.CorrelationData = b"\xffid"
        props.MessageExpiryInterval = 30
        props.ContentType = "text/plain"
        async with peer(mosquitto) as p:
            await p.client.publish(topic, b"hi", qos=1, properties=props)
        await wait_for(lambda: len(got) == 1)
        plain = unique("plain")
        await client.subscribe(plain, got.append).wait_granted()
        async with peer(mosquitto) as p:
            await p.client.publish(plain, b"bare", qos=1)
        await wait_for(lambda: len(got) == 2)
    received = got[0].properties
    assert received is not None
    assert received.user_properties == (("a", "1"), ("a", "2"))
    assert received.response_topic == "back/to/peer"
    assert received.correlation_data == b"\xffid"
    assert received.message_expiry_interval is not None
    assert 28 <= received.message_expiry_interval <= 30
    assert received.content_type == "text/plain"
    assert got[1].properties is None  # nothing set: no properties object


async def test_properties_ignored_on_mqtt311(mosquitto) -> None:
    topic = unique("props311")
    async with (
        peer(mosquitto, topic) as p,
        running(settings_for(mosquitto), protocol=ProtocolVersion.V311) as client,
    ):
        assert client.protocol is ProtocolVersion.V311
        await client.publish_wait(
            topic, b"x", properties=PublishProperties(response_topic="r")
        )
        await wait_for(lambda: len(p.messages) == 1)
    props = p.messages[0].properties
    assert props is None or not hasattr(props, "ResponseTopic")


@pytest.mark.parametrize("no_local", [True, False])
async def test_no_local(mosquitto, no_local: bool) -> None:
    base = unique("nl")
    got: list[Message] = []
    async with running(settings_for(mosquitto)) as client:
        sub = client.subscribe(
            f"{base}/#", got.append, SubscribeOptions(qos=1, no_local=no_local)
        )
        await sub.wait_granted()
        await client.publish_wait(f"{base}/own", b"own", qos=1)
        async with peer(mosquitto) as p:
            # Our own publish was acknowledged first, so an echo would come first.
            await p.client.publish(f"{base}/other", b"other", qos=1)
        await wait_for(lambda: b"other" in [m.payload for m in got])
    expected = [b"other"] if no_local else [b"own", b"other"]
    assert [m.payload for m in got] == expected


@pytest.mark.parametrize("how", ["client_id_taken_over", "socket_shut_down"])
async def test_will_published_when_connection_dies(mosquitto, how: str) -> None:
    topic = unique("will")
    client_id = unique("willing")
    will = Will(
        topic,
        b"gone",
        qos=1,
        properties=PublishProperties(user_properties=(("why", "test"),)),
    )
    async with (
        peer(mosquitto, topic) as watcher,
        running(
            settings_for(mosquitto),
            client_id=client_id,
            will=will,
            backoff=Backoff(base=30, cap=30),
        ) as client,
    ):
        if how == "client_id_taken_over":
            async with aiomqtt.Client(
                "127.0.0.1", mosquitto.port, identifier=client_id, protocol=V5
            ):
                await wait_for(lambda: not client.connected)
                await wait_for(lambda: len(watcher.messages) == 1)
        else:
            connection = client._connection
            assert connection is not None
            connection._sock.shutdown(socket.SHUT_RDWR)
            await wait_for(lambda: not client.connected)
            await wait_for(lambda: len(watcher.messages) == 1)
        assert client.stats.failures == 1
    message = watcher.messages[0]
    assert bytes(message.payload) == b"gone"  # type: ignore[arg-type]
    assert message.properties is not None
    assert message.properties.UserProperty == [("why", "test")]


async def test_no_will_on_clean_stop(mosquitto) -> None:
    topic = unique("will")
    async with peer(mosquitto, topic) as watcher:
        async with running(settings_for(mosquitto), will=Will(topic, b"gone")):
            pass  # cancelled: DISCONNECT with reason 0 discards the will
        marker = unique("marker")
        await watcher.client.subscribe(marker, qos=1)
        await watcher.client.publish(marker, b"m", qos=1)
        await wait_for(lambda: len(watcher.messages) >= 1)
    assert watcher.payloads() == [b"m"]


async def test_retain_handling_per_subscription(mosquitto) -> None:
    base = unique("rh")
    async with peer(mosquitto) as p:
        await p.client.publish(f"{base}/kept", b"retained", qos=1, retain=True)
    try:
        quiet: list[Message] = []
        late: list[Message] = []
        fresh: list[Message] = []
        async with running(settings_for(mosquitto)) as client:
            dont_send = client.subscribe(
                f"{base}/#",
                quiet.append,
                SubscribeOptions(retain_handling=RetainHandling.DONT_SEND),
            )
            await dont_send.wait_granted()
            async with peer(mosquitto) as p:
                await p.client.publish(f"{base}/marker", b"marker", qos=1)
            await wait_for(lambda: len(quiet) == 1)
            # DONT_SEND: the retained message did not come before the marker.
            assert [m.payload for m in quiet] == [b"marker"]

            # A second consumer of the granted filter asks for retained messages.
            send = client.subscribe(f"{base}/#", late.append, SubscribeOptions())
            await send.wait_granted()
            await wait_for(lambda: len(late) == 1)
            assert [(m.payload, m.retain) for m in late] == [(b"retained", True)]
            # The broker answers the filter, so the first consumer sees it too.
            assert [(m.payload, m.retain) for m in quiet] == [
                (b"marker", False),
                (b"retained", True),
            ]

            # SEND_ON_SUBSCRIBE on a new filter gets it as well.
            other = client.subscribe(f"{base}/+", fresh.append)
            await other.wait_granted()
            await wait_for(lambda: len(fresh) == 1)
            assert fresh[0].retain is True

            # SEND_IF_NEW: sent for a new subscription, not for an existing one.
            if_new: list[Message] = []
            options = SubscribeOptions(retain_handling=RetainHandling.SEND_IF_NEW)
            first = client.subscribe(f"{base}/kept", if_new.append, options)
            await first.wait_granted()
            await wait_for(lambda: len(if_new) == 1)
            again: list[Message] = []
            client.subscribe(f"{base}/kept", again.append, options)
            # Same merged options, no retained request: no SUBSCRIBE is sent.
            assert client.registry.state_of(f"{base}/kept") is FilterState.GRANTED
            async with peer(mosquitto) as p:
                await p.client.publish(f"{base}/kept", b"live", qos=1)
            # (MQTT 5: one copy per matching subscription, see the overlap test.)
            await wait_for(lambda: len(again) >= 1)
            assert {(m.payload, m.retain) for m in again} == {(b"live", False)}
    finally:
        async with peer(mosquitto) as p:
            await p.client.publish(f"{base}/kept", b"", qos=1, retain=True)


# -- authentication, TLS, check_connection --------------------------------------------


async def test_auth_failure_stops_retrying_and_update_settings_recovers(
    password_broker,
) -> None:
    broker = password_broker
    states: list[ClientState] = []
    wrong = settings_for(broker, username="u", password="wrong")
    async with running(
        wrong, wait=False, backoff=Backoff(base=0.001, cap=0.002)
    ) as client:
        client.add_state_listener(states.append)
        await wait_for(lambda: client.state is ClientState.AUTH_FAILED)
        assert client.stats.failures == 1
        assert "bad user name or password" in (client.stats.last_error or "") or (
            "not authorized" in (client.stats.last_error or "")
        )
        await asyncio.sleep(0.2)  # with a 1 ms backoff a retry loop would show
        assert client.stats.failures == 1
        assert client.state is ClientState.AUTH_FAILED
        assert client.stats.connects == 0
        # Asking again with the same credentials fails again, once.
        client.reconnect_now()
        await wait_for(lambda: client.stats.failures == 2)
        await wait_for(lambda: client.state is ClientState.AUTH_FAILED)
        await asyncio.sleep(0.1)
        assert client.stats.failures == 2
        # New settings leave AUTH_FAILED at once.
        client.update_settings(settings_for(broker, username="u", password="p"))
        await wait_for(lambda: client.connected)
        assert client.stats.connects == 1
        got: list[Message] = []
        await client.subscribe("auth/ok", got.append).wait_granted()
        await client.publish_wait("auth/ok", b"in", qos=1)
        await wait_for(lambda: len(got) == 1)
    assert states[:3] == [
        ClientState.CONNECTING,
        ClientState.AUTH_FAILED,
        ClientState.CONNECTING,
    ]
    assert ClientState.CONNECTED in states


async def test_check_connection_success_plain(mosquitto) -> None:
    tasks = asyncio.all_tasks()
    fds = registered_fds()
    await check_connection(settings_for(mosquitto))
    await check_connection(settings_for(mosquitto), timeout=5)
    assert registered_fds() <= fds
    assert {t for t in asyncio.all_tasks() - tasks if not t.done()} <= {
        asyncio.current_task()
    }


async def test_check_connection_auth(password_broker) -> None:
    with pytest.raises(MqttAuthError):
        await check_connection(
            settings_for(password_broker, username="u", password="wrong")
        )
    with pytest.raises(MqttAuthError):
        await check_connection(settings_for(password_broker))  # anonymous
    await check_connection(settings_for(password_broker, username="u", password="p"))


async def test_check_connection_closed_port() -> None:
    with pytest.raises(MqttConnectError) as err:
        await check_connection(MqttSettings("127.0.0.1", free_port()))
    assert not isinstance(err.value, (MqttAuthError, MqttTlsError))
    assert err.value.reason_code is None


async def test_check_connection_tls(tls_broker) -> None:
    assert tls_broker.tls_port is not None
    settings = MqttSettings("127.0.0.1", tls_broker.tls_port, tls=True)
    with pytest.raises(MqttTlsError, match="CERTIFICATE_VERIFY_FAILED"):
        await check_connection(settings)
    # Self-signed accepted when verification is off ...
    await check_connection(
        MqttSettings("127.0.0.1", tls_broker.tls_port, tls=True, verify_tls=False)
    )
    # ... or when the certificate is trusted explicitly (SAN 127.0.0.1).
    await check_connection(
        MqttSettings(
            "127.0.0.1",
            tls_broker.tls_port,
            tls=True,
            ca_file=str(tls_broker.cert_path),
        )
    )
    # A missing CA file is a TLS set-up error, not a crash.
    with pytest.raises(MqttTlsError):
        await check_connection(
            MqttSettings(
                "127.0.0.1", tls_broker.tls_port, tls=True, ca_file="/nonexistent.pem"
            )
        )


async def test_check_connection_timeout_on_silent_server() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(MqttTimeoutError):
            await check_connection(MqttSettings("127.0.0.1", port), timeout=0.3)
    finally:
        server.close()
        await server.wait_closed()


class FakeBroker:
    """Answers CONNECT by protocol level: refuse MQTT 5, accept MQTT 3.1.1."""

    def __init__(self, *, refuse_v5_by_closing: bool = False) -> None:
        self.levels: list[int] = []
        self.refuse_v5_by_closing = refuse_v5_by_closing
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            data = await reader.read(4096)
            index = data.find(b"MQTT")
            level = data[index + 4]
            self.levels.append(level)
            if level == 5:
                if not self.refuse_v5_by_closing:
                    # CONNACK: flags 0, reason 0x84 unsupported protocol version.
                    writer.write(b"\x20\x03\x00\x84\x00")
                    await writer.drain()
                writer.close()
                return
            writer.write(b"\x20\x02\x00\x00")  # 3.1.1 CONNACK accepted
            await writer.drain()
            while await reader.read(4096):
                pass


@pytest.mark.parametrize("by_closing", [False, True])
async def test_falls_back_to_mqtt311(by_closing: bool) -> None:
    fake = FakeBroker(refuse_v5_by_closing=by_closing)
    port = await fake.start()
    try:
        async with running(MqttSettings("127.0.0.1", port)) as client:
            assert client.protocol is ProtocolVersion.V311
            assert client.stats.connects == 1
            assert client.stats.failures == 0
        assert fake.levels == [5, 4]
        await check_connection(MqttSettings("127.0.0.1", port))
        assert fake.levels == [5, 4, 5, 4]
    finally:
        await fake.stop()


# -- reconnect delays -----------------------------------------------------------------


def test_backoff_capped_at_twelve_seconds_seeded() -> None:
    for seed in range(20):
        backoff = Backoff(cap=RECONNECT_CAP, rng=random.Random(seed))
        delays = [backoff.next_delay() for _ in range(200)]
        assert 0.5 <= delays[0] <= 1.0
        assert max(delays) <= 12.0
        assert min(delays[10:]) >= 6.0  # capped delay with jitter: [6, 12]
        assert delays[1] <= 2.0
    assert RECONNECT_CAP == 12.0


def test_client_backoff_never_exceeds_cap() -> None:
    client = MqttClient(MqttSettings("127.0.0.1", 1), client_id="backoff-test")
    assert client.backoff.cap == 12.0
    assert client.backoff.base == 1.0
    client.backoff.rng = random.Random(7)
    delays = [client._failed("test") for _ in range(100)]
    assert max(delays) <= 12.0
    assert max(delays) > 6.0
    assert delays[0] <= 1.0
    assert client.stats.failures == 100
    client.reconnect_now()  # resets the backoff
    assert client.backoff.attempt == 0


async def test_reconnect_loop_uses_backoff_and_resets_on_success(
    private_mosquitto,
) -> None:
    class Recording(Backoff):
        def __init__(self) -> None:
            super().__init__(base=0.01, cap=0.04, rng=random.Random(1))
            self.delays: list[float] = []

        def next_delay(self) -> float:
            delay = Backoff.next_delay(self)
            self.delays.append(delay)
            return delay

    broker = private_mosquitto
    broker.stop()
    backoff = Recording()
    states: list[ClientState] = []
    async with running(settings_for(broker), wait=False, backoff=backoff) as client:
        client.add_state_listener(states.append)
        await wait_for(lambda: client.stats.failures >= 5)
        assert len(backoff.delays) >= 5
        assert max(backoff.delays) <= 0.04
        assert backoff.delays[0] <= 0.01
        assert "cannot connect" in (client.stats.last_error or "")
        broker.start()
        await wait_for(lambda: client.connected)
        assert backoff.attempt == 0
    assert ClientState.DISCONNECTED in states


# -- load and clean-up ---------------------------------------------------------------


async def test_flood_creates_no_task_per_message_and_stays_bounded(
    mosquitto,
) -> None:
    topic = unique("flood")
    total = 20_000
    seen = 0
    task_counts: set[int] = set()

    def consume(_message: Message) -> None:
        nonlocal seen
        seen += 1
        if seen % 500 == 0:
            task_counts.add(len(asyncio.all_tasks()))

    process = psutil.Process()
    async with (
        running(settings_for(mosquitto)) as receiver,
        running(settings_for(mosquitto)) as sender,
    ):
        await receiver.subscribe(topic, consume, SubscribeOptions(qos=0)).wait_granted()
        baseline = len(asyncio.all_tasks())
        rss_before = process.memory_info().rss
        payload = b"x" * 100
        for i in range(total):
            sender.publish(topic, payload, qos=0)
            if i % 1000 == 999:
                await asyncio.sleep(0)
                task_counts.add(len(asyncio.all_tasks()))
        await wait_for(lambda: seen == total, timeout=30)
        rss_growth = process.memory_info().rss - rss_before
        assert receiver.stats.received == total
        assert receiver.registry.stats.delivered == total
    assert task_counts == {baseline}
    assert rss_growth < 8 * 1024 * 1024, rss_growth


async def test_nothing_left_running_after_cancel(private_mosquitto) -> None:
    broker = private_mosquitto
    tasks_before = asyncio.all_tasks()
    fds_before = registered_fds()
    client = MqttClient(settings_for(broker), client_id=unique("cleanup"))
    task = asyncio.create_task(client.run())
    try:
        await wait_for(lambda: client.connected)
        await client.subscribe("c/#", lambda _m: None).wait_granted()
        assert len(tick_timers()) == 1  # keep-alive timer of the session
        assert len(registered_fds()) > len(fds_before)
        # A publish the (frozen) broker never acknowledges.
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        pending = asyncio.ensure_future(client.publish_wait("c/x", b"1", qos=1))
        await asyncio.sleep(0.05)
        assert not pending.done()
        task.cancel()
        await asyncio.wait({task})
        with pytest.raises(ConnectionLostError):
            await pending
    finally:
        task.cancel()
        await asyncio.wait({task})
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)
    assert client.state is ClientState.STOPPED
    assert client.stats.lost_publishes == 1
    assert registered_fds() <= fds_before
    assert tick_timers() == []
    leftovers = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
    assert {t for t in leftovers if not t.done()} == set()
