"""The virtual node end to end: simulator <-> NodeLink <-> VirtualNodeServer <-> clients.

Real TCP sockets on 127.0.0.1; the clients are the real ``meshtastic`` library
(``TCPInterface``, blocking, run in the loop's executor and closed in
``finally``) and the raw stream client of ``tests/common.py``. No mocks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
import contextlib
from dataclasses import dataclass, field
import errno
import random
import socket
import threading
import time
from typing import Any

from meshtastic.protobuf import (
    admin_pb2,
    config_pb2,
    mesh_pb2,
    portnums_pb2,
    telemetry_pb2,
)
import meshtastic.tcp_interface
from pubsub import pub
import pytest

from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.node_db import (
    SPECIAL_NONCE_ONLY_CONFIG,
    SPECIAL_NONCE_ONLY_NODES,
    NodeDb,
)
from custom_components.mqtt_bridge.engine.node_link import (
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
    tcp_connector,
)
from custom_components.mqtt_bridge.engine.stream import (
    encode_frame,
)
from custom_components.mqtt_bridge.engine.virtual_node import (
    LOCAL_NETWORKS,
    InvalidNetworkError,
    VirtualNodeBindError,
    VirtualNodeServer,
    address_allowed,
    parse_networks,
)
from devkit.meshsim import SimulatedNode, default_profile
from tests.common import (
    NODE_NUM,
    RawClient,
    join_new_threads,
    scripted,
    wait_for,
)

NODE_ID = f"!{NODE_NUM:08x}"
ALPINE = 0x433E1F70  # one of the simulator's other nodes
BROADCAST = 0xFFFFFFFF


# --------------------------------------------------------------------- helpers


def kind(message: mesh_pb2.FromRadio) -> str | None:
    return message.WhichOneof("payload_variant")


def text_packet(text: str, packet_id: int | None = None) -> mesh_pb2.ToRadio:
    message = mesh_pb2.ToRadio()
    packet = message.packet
    packet.to = BROADCAST
    packet.id = packet_id if packet_id is not None else random.randint(1, 2**31)
    packet.want_ack = True
    packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
    packet.decoded.payload = text.encode()
    return message


@dataclass
class Rig:
    node: SimulatedNode
    link: NodeLink
    server: VirtualNodeServer
    raws: list[RawClient] = field(default_factory=list)

    async def raw(self, *, handshake: bool = True, read: bool = True) -> RawClient:
        client = await RawClient.connect(self.server.port, read=read)
        self.raws.append(client)
        if handshake:
            await client.handshake(random.randint(1, 2**31))
        return client


@contextlib.asynccontextmanager
async def rig(
    node: SimulatedNode | None = None,
    *,
    start_link: bool = True,
    **options: Any,
) -> AsyncIterator[Rig]:
    """A simulated node, a NodeLink to it and a VirtualNodeServer on 127.0.0.1."""
    sim = node or SimulatedNode(default_profile())
    if not sim.port:
        await sim.start_tcp()
    link = NodeLink(
        tcp_connector("127.0.0.1", sim.port),
        name="vnode-test",
        backoff=Backoff(base=0.02, cap=0.1),
    )
    options.setdefault("refresh_delay", 0.05)
    server = VirtualNodeServer(link, host="127.0.0.1", port=0, **options)
    task: asyncio.Task[None] | None = None
    setup = Rig(sim, link, server)
    try:
        if start_link:
            task = asyncio.create_task(link.run())
            await wait_for(lambda: link.state is LinkState.READY)
        await server.start()
        if task is None:
            task = asyncio.create_task(link.run())
        yield setup
    finally:
        for client in setup.raws:
            await client.close()
        await server.stop()
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        await sim.stop()


@dataclass
class Library:
    """Real ``meshtastic`` TCPInterfaces and what their pubsub delivered to each."""

    loop: asyncio.AbstractEventLoop
    interfaces: list[Any] = field(default_factory=list)
    texts: dict[int, list[str]] = field(default_factory=dict)
    notifications: dict[int, list[str]] = field(default_factory=dict)
    lost: dict[int, int] = field(default_factory=dict)
    established: dict[int, int] = field(default_factory=dict)

    async def open(self, port: int) -> Any:
        iface = await self.loop.run_in_executor(
            None,
            lambda: meshtastic.tcp_interface.TCPInterface(
                hostname="127.0.0.1", portNumber=port
            ),
        )
        self.interfaces.append(iface)
        return iface

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await self.loop.run_in_executor(None, func, *args)

    # pubsub callbacks run on the library's "publishing" thread.
    def on_text(self, packet: dict[str, Any], interface: Any) -> None:
        text = packet["decoded"]["text"]
        self.loop.call_soon_threadsafe(
            self.texts.setdefault(id(interface), []).append, text
        )

    def on_notification(self, notification: Any, interface: Any) -> None:
        self.loop.call_soon_threadsafe(
            self.notifications.setdefault(id(interface), []).append,
            notification.message,
        )

    def on_lost(self, interface: Any) -> None:
        self.loop.call_soon_threadsafe(self._count, self.lost, interface)

    def on_established(self, interface: Any) -> None:
        self.loop.call_soon_threadsafe(self._count, self.established, interface)

    @staticmethod
    def _count(counter: dict[int, int], interface: Any) -> None:
        counter[id(interface)] = counter.get(id(interface), 0) + 1


_TOPICS = {
    "meshtastic.receive.text": "on_text",
    "meshtastic.clientNotification": "on_notification",
    "meshtastic.connection.lost": "on_lost",
    "meshtastic.connection.established": "on_established",
}


@contextlib.asynccontextmanager
async def library() -> AsyncIterator[Library]:
    """Library clients, closed (in the executor) and their threads joined at exit."""
    lib = Library(asyncio.get_running_loop())
    listeners = {topic: getattr(lib, name) for topic, name in _TOPICS.items()}
    for topic, listener in listeners.items():
        pub.subscribe(listener, topic)  # bound methods of lib: strong refs held here
    before = set(threading.enumerate())
    try:
        yield lib
    finally:
        for iface in lib.interfaces:
            await lib.run(iface.close)
        for topic, listener in listeners.items():
            pub.unsubscribe(listener, topic)
        await lib.run(join_new_threads, before)


def name_in_nodes(iface: Any, num: int) -> str | None:
    node = iface.nodesByNum.get(num) if iface.nodesByNum else None
    if not node or "user" not in node:
        return None
    return str(node["user"].get("longName"))


# --------------------------------------------------------------------- handshake


async def test_handshake_for_libraries_and_raw_clients_at_once() -> None:
    async with rig() as setup, library() as lib:
        node, server = setup.node, setup.server
        one, two = await asyncio.gather(lib.open(server.port), lib.open(server.port))
        raw = await setup.raw(handshake=False)
        items = await raw.handshake(31337)

        # The firmware's order, item for item, as the simulator answers directly.
        direct = node._build_handshake(31337)
        assert [kind(m) for m in items] == [kind(m) for m in direct]
        assert items[-1].config_complete_id == 31337
        assert [m.id for m in items] == list(range(1, len(items) + 1))
        assert [m.channel for m in raw.of_kind("channel")] == [
            m.channel for m in direct if kind(m) == "channel"
        ]
        for iface in (one, two):
            assert iface.myInfo.my_node_num == NODE_NUM
            assert iface.getLongName() == "Sim Node"
            assert NODE_ID in iface.nodes
            assert "!433e1f70" in iface.nodes  # the node database
            assert len(iface.nodes) == 4
            assert iface.localNode.channels[0].role == 1  # PRIMARY
            assert iface.localNode.localConfig.lora.modem_preset == (
                config_pb2.Config.LoRaConfig.ModemPreset.LONG_FAST
            )
            assert iface.localNode.moduleConfig.mqtt.proxy_to_client_enabled
        # want_config_id never reached the node: one handshake (the link's).
        assert node.handshakes == 1
        assert node.connections == 1
        await wait_for(lambda: server.stats.heartbeats >= 2)  # libraries' first
        assert server.stats.handshakes == 3
        clients = server.clients
        assert len(clients) == 3
        assert all(c.live and c.address == "127.0.0.1" for c in clients)
        assert node.heartbeats == setup.link.stats.frames_tx - 1  # only the link's

        # Special nonces, as the firmware answers them.
        config_only = await raw.handshake(SPECIAL_NONCE_ONLY_CONFIG)
        assert [kind(m) for m in config_only] == [
            kind(m) for m in node._build_handshake(SPECIAL_NONCE_ONLY_CONFIG)
        ]
        infos = [m.node_info.num for m in config_only if kind(m) == "node_info"]
        assert infos == [NODE_NUM]
        only_nodes = await raw.handshake(SPECIAL_NONCE_ONLY_NODES)
        assert [kind(m) for m in only_nodes] == ["node_info"] * 4 + [
            "config_complete_id"
        ]
        assert only_nodes[0].node_info.num == NODE_NUM
        assert only_nodes[0].node_info.is_favorite
        assert not only_nodes[0].node_info.HasField("hops_away")
        assert only_nodes[-1].config_complete_id == SPECIAL_NONCE_ONLY_NODES


async def test_client_waiting_for_the_node_is_answered_when_it_is_known() -> None:
    async with rig(start_link=False) as setup:
        # The server started before the link ever reached the node.
        raw = await setup.raw(handshake=False)
        items = await raw.handshake(4242)
        assert items[-1].config_complete_id == 4242
        assert setup.server.stats.handshakes_deferred == 1
        assert setup.server.node_db is not None


# --------------------------------------------------------------------- traffic


async def test_texts_from_each_client_reach_the_node_once() -> None:
    async with rig() as setup, library() as lib:
        node, server = setup.node, setup.server
        one, two = await asyncio.gather(lib.open(server.port), lib.open(server.port))
        raw = await setup.raw()
        await lib.run(one.sendText, "from one")
        await lib.run(two.sendText, "from two")
        raw.send(text_packet("from raw", packet_id=777))

        def texts() -> list[str]:
            return [p.decoded.payload.decode() for p in node.sent_packets]

        await node.wait_for(lambda: len(node.sent_packets) == 3)
        assert sorted(texts()) == ["from one", "from raw", "from two"]
        # Each sender got the node's queueStatus for its own packet only (the
        # library notes an answer that arrives after its send as a ``False``
        # entry in its queue: only the own packet's id may show up there).
        ids = {p.decoded.payload.decode(): p.id for p in node.sent_packets}
        await raw.wait(
            lambda: (
                [m.queueStatus.mesh_packet_id for m in raw.of_kind("queueStatus")]
                == [777]
            )
        )
        await wait_for(lambda: set(one.queue) == {ids["from one"]})
        await wait_for(lambda: set(two.queue) == {ids["from two"]})
        await lib.run(one.sendHeartbeat)
        await lib.run(two.sendHeartbeat)
        await wait_for(lambda: server.stats.heartbeats >= 4)
        await asyncio.sleep(0.1)
        assert sorted(texts()) == ["from one", "from raw", "from two"]
        assert server.stats.packets_from_clients == 3
        assert server.stats.forwarded == 3
        assert [c.packets_from_client for c in server.clients] == [1, 1, 1]


async def test_text_from_the_mesh_reaches_every_client_once() -> None:
    async with rig() as setup, library() as lib:
        node, server = setup.node, setup.server
        one, two = await asyncio.gather(lib.open(server.port), lib.open(server.port))
        raw = await setup.raw()
        node.receive_text(ALPINE, "hello mesh")

        def raw_texts() -> list[bytes]:
            return [
                m.packet.decoded.payload
                for m in raw.of_kind("packet")
                if m.packet.decoded.portnum == portnums_pb2.PortNum.TEXT_MESSAGE_APP
            ]

        await raw.wait(lambda: raw_texts() == [b"hello mesh"])
        await wait_for(
            lambda: all(lib.texts.get(id(i)) == ["hello mesh"] for i in (one, two))
        )
        await asyncio.sleep(0.1)
        assert raw_texts() == [b"hello mesh"]
        assert all(lib.texts[id(i)] == ["hello mesh"] for i in (one, two))
        # The node database saw the packet (a client connecting later shows it).
        db = server.node_db
        assert db is not None
        assert db.nodes[ALPINE].last_heard >= int(time.time()) - 5


async def test_client_proxy_messages_are_dropped_and_counted() -> None:
    async with rig() as setup, library() as lib:
        node, server = setup.node, setup.server
        iface = await lib.open(server.port)
        raw = await setup.raw()
        await lib.run(
            iface.sendMqttClientProxyMessage, "msh/2/e/LongFast/!cafe0001", b"dn"
        )
        proxy = mesh_pb2.ToRadio()
        proxy.mqttClientProxyMessage.topic = "msh/2/e/LongFast/!cafe0002"
        proxy.mqttClientProxyMessage.data = b"dn"
        raw.send(proxy)
        await wait_for(lambda: server.stats.proxy_messages_dropped == 2)
        assert sorted(c.proxy_messages_dropped for c in server.clients) == [1, 1]
        # The node's own uplinks reach the link (Home Assistant's proxy) only.
        uplinks: list[mesh_pb2.MqttClientProxyMessage] = []

        class Uplinks(NodeLinkListener):
            def on_proxy_message(
                self, message: mesh_pb2.MqttClientProxyMessage
            ) -> None:
                uplinks.append(message)

        remove = setup.link.add_listener(Uplinks())
        node.inject_uplink(node.topic_for(0), data=b"up")
        await wait_for(lambda: len(uplinks) == 1)
        node.receive_text(ALPINE, "after")  # a marker behind the uplink
        await raw.wait(lambda: bool(raw.of_kind("packet")))
        remove()
        assert not raw.of_kind("mqttClientProxyMessage")
        assert node.downlinks == []
        assert node.ignored_downlinks == 0


# --------------------------------------------------------------------- settings


async def test_set_owner_from_a_client_renames_the_node_for_every_client() -> None:
    node = SimulatedNode(default_profile())
    node.admin_reboot_delay = None  # the refresh, not a reboot, carries the change
    async with rig(node) as setup, library() as lib:
        server, link = setup.server, setup.link
        one, two = await asyncio.gather(lib.open(server.port), lib.open(server.port))
        raw = await setup.raw()
        await lib.run(lambda: one.localNode.setOwner("Renamed", "RNM"))
        await node.wait_for(lambda: node.profile.long_name == "Renamed")
        owner = [m for m in node.admin_messages if m.HasField("set_owner")]
        assert owner[0].set_owner.short_name == "RNM"
        await wait_for(
            lambda: link.snapshot is not None and (link.snapshot.long_name == "Renamed")
        )
        assert server.stats.config_refreshes == 1
        assert link.stats.refreshes == 1
        # Every client is told to re-handshake and then shows the new name.
        await raw.wait(lambda: bool(raw.of_kind("rebooted")))
        again = await raw.handshake(99)
        own = next(m.node_info for m in again if kind(m) == "node_info")
        assert own.user.long_name == "Renamed"
        await wait_for(
            lambda: all(i.getLongName() == "Renamed" for i in (one, two)), 10
        )
        assert server.stats.resyncs == 3
        assert node.connections == 1  # the link kept its connection
        assert len(server.clients) == 3


async def test_admin_getters_pass_through_and_change_nothing() -> None:
    async with rig() as setup:
        node, server = setup.node, setup.server
        raw = await setup.raw()
        request = mesh_pb2.ToRadio()
        packet = request.packet
        packet.to = NODE_NUM
        packet.id = 4711
        packet.decoded.portnum = portnums_pb2.PortNum.ADMIN_APP
        packet.decoded.want_response = True
        packet.decoded.payload = admin_pb2.AdminMessage(
            get_owner_request=True
        ).SerializeToString()
        raw.send(request)

        def response() -> list[mesh_pb2.FromRadio]:
            return [
                m for m in raw.of_kind("packet") if m.packet.decoded.request_id == 4711
            ]

        await raw.wait(lambda: bool(response()))
        admin = admin_pb2.AdminMessage()
        admin.ParseFromString(response()[0].packet.decoded.payload)
        assert admin.get_owner_response.long_name == "Sim Node"
        await asyncio.sleep(0.15)  # longer than refresh_delay
        assert server.stats.config_refreshes == 0
        # Remote administration of another node is not this node's settings.
        remote = mesh_pb2.ToRadio()
        remote.CopyFrom(request)
        remote.packet.to = ALPINE
        remote.packet.id = 4712
        remote.packet.decoded.payload = admin_pb2.AdminMessage(
            set_owner=mesh_pb2.User(long_name="x")
        ).SerializeToString()
        raw.send(remote)
        await node.wait_for(lambda: len(node.sent_packets) == 2)
        await asyncio.sleep(0.15)
        assert server.stats.config_refreshes == 0


async def test_node_reboot_resyncs_every_client() -> None:
    async with rig() as setup, library() as lib:
        node, server, link = setup.node, setup.server, setup.link
        one, two = await asyncio.gather(lib.open(server.port), lib.open(server.port))
        raw = await setup.raw()
        node.profile.long_name = "After Boot"  # persisted settings, read at boot
        await node.reboot()
        await raw.wait(lambda: bool(raw.of_kind("clientNotification")))
        await raw.wait(lambda: bool(raw.of_kind("rebooted")), 10)
        assert link.state is LinkState.READY
        own = next(m for m in await raw.handshake(5) if kind(m) == "node_info")
        assert own.node_info.user.long_name == "After Boot"
        await wait_for(
            lambda: all(i.getLongName() == "After Boot" for i in (one, two)), 10
        )
        # pubsub delivers on the library's "publishing" thread: may lag a little.
        await wait_for(lambda: all(lib.lost.get(id(i), 0) >= 1 for i in (one, two)))
        await wait_for(lambda: all(lib.notifications.get(id(i)) for i in (one, two)))
        await wait_for(
            lambda: all(lib.established.get(id(i), 0) >= 2 for i in (one, two))
        )
        assert server.stats.resyncs == 3
        assert server.stats.node_lost == 1
        assert len(server.clients) == 3  # nobody had to reconnect
        # They work as before: a text from one reaches the node.
        await lib.run(one.sendText, "still here")
        await node.wait_for(
            lambda: any(p.decoded.payload == b"still here" for p in node.sent_packets)
        )


async def test_admin_reboot_after_set_owner_heals_clients() -> None:
    node = SimulatedNode(default_profile())
    node.admin_reboot_delay = 0.05  # AdminModule::saveChanges reboots the node
    async with rig(node) as setup:
        server = setup.server
        raw = await setup.raw()
        request = mesh_pb2.ToRadio()
        request.packet.to = NODE_NUM
        request.packet.id = 1234
        request.packet.decoded.portnum = portnums_pb2.PortNum.ADMIN_APP
        request.packet.decoded.payload = admin_pb2.AdminMessage(
            set_owner=mesh_pb2.User(long_name="Rebooted Name")
        ).SerializeToString()
        raw.send(request)
        await node.wait_for(lambda: node.reboot_count == 1)
        await wait_for(lambda: server.stats.node_lost == 1)
        await raw.wait(lambda: bool(raw.of_kind("rebooted")), 10)
        own = next(m for m in await raw.handshake(6) if kind(m) == "node_info")
        assert own.node_info.user.long_name == "Rebooted Name"


# --------------------------------------------------------------------- slow, idle


@dataclass
class Stalled:
    """A client that never reads: its socket, its request frame, its server info."""

    sock: socket.socket
    request: bytes  # one ``want_config_id`` frame (about 1.2 kB of answer each)
    info: Callable[[], Any]  # its ``ClientInfo`` on the server, None once dropped


@contextlib.asynccontextmanager
async def stalled_client(
    server: VirtualNodeServer, nonce: int
) -> AsyncIterator[Stalled]:
    """Connect a client that never reads (small receive buffer), closed on exit.

    It asks for the handshake over and over until the kernel buffers are
    full and the server has to hold data for it (``buffered_bytes`` > 0).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        port = sock.getsockname()[1]
        request = encode_frame(
            mesh_pb2.ToRadio(want_config_id=nonce).SerializeToString()
        )

        def info() -> Any:
            return next((c for c in server.clients if c.port == port), None)

        await wait_for(lambda: info() is not None)
        for _ in range(500):
            if info().buffered_bytes:
                break
            await loop.sock_sendall(sock, request * 10)
            await asyncio.sleep(0.005)
        assert info().buffered_bytes > 0
        yield Stalled(sock, request, info)
    finally:
        sock.close()


async def test_client_that_stops_reading_is_dropped_without_delaying_others() -> None:
    async with rig(send_buffer_limit=32 * 1024) as setup, library() as lib:
        node, server = setup.node, setup.server
        iface = await lib.open(server.port)
        fast = await setup.raw()

        async def mesh_latency(text: str) -> float:
            seen = len(lib.texts.get(id(iface), []))
            start = time.perf_counter()
            node.receive_text(ALPINE, text)
            await fast.wait(
                lambda: any(
                    m.packet.decoded.payload == text.encode()
                    for m in fast.of_kind("packet")
                )
            )
            await wait_for(lambda: len(lib.texts.get(id(iface), [])) > seen)
            return time.perf_counter() - start

        baseline = min([await mesh_latency(f"base {i}") for i in range(3)])
        async with stalled_client(server, 7) as slow:
            stalled = slow.info()
            # While it is stalled (connected, data piling up) the others flow.
            latencies = [await mesh_latency(f"during {i}") for i in range(5)]
            assert slow.info() is not None
            assert slow.info().buffered_bytes > stalled.buffered_bytes
            # Past the limit it is dropped; the others still flow.
            await asyncio.get_running_loop().sock_sendall(slow.sock, slow.request * 60)
            await wait_for(lambda: server.stats.dropped_slow == 1)
            latencies.append(await mesh_latency("after"))
        assert len(server.clients) == 2
        # The others were not held up (measured: a few milliseconds each).
        assert max(latencies) < max(0.5, 20 * baseline), (baseline, latencies)


async def test_idle_clients_kept_while_they_heartbeat() -> None:
    async with rig(idle_timeout=0.3) as setup:
        server = setup.server
        talker = await setup.raw()
        silent = await setup.raw()
        heartbeat = mesh_pb2.ToRadio()
        heartbeat.heartbeat.SetInParent()
        for _ in range(8):
            talker.send(heartbeat)
            await asyncio.sleep(0.1)
        await silent.wait(lambda: silent.eof)
        assert not talker.eof
        assert server.stats.dropped_idle == 1
        statuses = talker.of_kind("queueStatus")
        assert len(statuses) == 8
        assert statuses[0].queueStatus.free == 16
        assert statuses[0].queueStatus.maxlen == 16
        assert setup.node.heartbeats == 0  # answered locally


# --------------------------------------------------------------------- node outage


async def test_node_disconnected_and_back() -> None:
    async with rig(packet_max_age=30) as setup:
        node, server, link = setup.node, setup.server, setup.link
        raw = await setup.raw()
        port = node.port
        await node.stop()
        await raw.wait(lambda: bool(raw.of_kind("clientNotification")))
        note = raw.of_kind("clientNotification")[0].clientNotification
        assert "lost the connection" in note.message
        assert note.level == mesh_pb2.LogRecord.Level.WARNING
        assert not server.node_available
        # Still connected: handshakes come from the cache, packets wait.
        items = await raw.handshake(8)
        assert any(kind(m) == "node_info" for m in items)
        raw.send(text_packet("while away", packet_id=9001))
        await wait_for(lambda: server.clients[0].queued == 1)
        await node.start_tcp(port=port)
        await wait_for(lambda: link.state is LinkState.READY, 10)
        await raw.wait(lambda: bool(raw.of_kind("rebooted")))
        await node.wait_for(lambda: any(p.id == 9001 for p in node.sent_packets))
        assert server.node_available
        assert server.stats.resyncs == 1
        assert not raw.eof


async def test_queued_packets_expire_and_overflow_while_node_away() -> None:
    async with rig(packet_max_age=0.1, client_queue_limit=2) as setup:
        node, server, link = setup.node, setup.server, setup.link
        raw = await setup.raw()
        port = node.port
        await node.stop()
        await wait_for(lambda: not server.node_available)
        for number in range(3):
            raw.send(text_packet(f"t{number}", packet_id=100 + number))
        await wait_for(lambda: server.stats.packets_dropped["queue_full"] == 1)
        await asyncio.sleep(0.15)
        await node.start_tcp(port=port)
        await wait_for(lambda: link.state is LinkState.READY, 10)
        await wait_for(lambda: server.stats.packets_dropped["expired"] == 2)
        assert node.sent_packets == []
        assert server.clients[0].packets_dropped == 3


# --------------------------------------------------------------------- lifecycle


async def test_stop_closes_the_port_and_every_client() -> None:
    async with rig() as setup, library() as lib:
        server = setup.server
        iface = await lib.open(server.port)
        raw = await setup.raw()
        port = server.port
        await server.stop()
        assert not server.listening
        await raw.wait(lambda: raw.eof)
        assert server.clients == []
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        # The library notices (its reconnect attempt is refused) and closes cleanly.
        await wait_for(lambda: not iface.isConnected.is_set(), 10)
        await server.stop()  # idempotent
        # It can listen again (Home Assistant reloading the entry's options).
        await server.start()
        again = await setup.raw()
        assert again.of_kind("config_complete_id")
        assert len(server.clients) == 1


async def test_port_in_use_raises_bind_error() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        link = NodeLink(tcp_connector("127.0.0.1", 1), name="unused")
        server = VirtualNodeServer(link, host="127.0.0.1", port=port)
        with pytest.raises(VirtualNodeBindError) as caught:
            await server.start()
        assert caught.value.errno == errno.EADDRINUSE
        assert f"127.0.0.1:{port}" in str(caught.value)
        assert isinstance(caught.value, OSError)
        assert not server.listening
    finally:
        holder.close()


async def test_clients_from_other_networks_and_beyond_the_limit_are_refused() -> None:
    async with rig(allowed_networks=["10.0.0.0/8"]) as setup:
        outsider = await setup.raw(handshake=False)
        await outsider.wait(lambda: outsider.eof)
        assert setup.server.stats.refused_network == 1
        assert setup.server.clients == []
    async with rig(max_clients=1) as setup:
        first = await setup.raw()
        second = await setup.raw(handshake=False)
        await second.wait(lambda: second.eof)
        assert setup.server.stats.refused_full == 1
        assert not first.eof
        assert len(setup.server.clients) == 1


async def test_disconnect_malformed_frames_and_forwarded_kinds() -> None:
    changes: list[int] = []
    async with rig(on_change=lambda: changes.append(1)) as setup:
        node, server = setup.node, setup.server
        raw = await setup.raw()
        other = await setup.raw()
        raw.writer.write(encode_frame(b""))  # keepalive
        raw.writer.write(encode_frame(b"\xff\xff\xff"))  # not a ToRadio
        raw.writer.write(b"\x94\xc3\x02\x01")  # header over 512 bytes: resync
        ping = mesh_pb2.ToRadio()
        ping.heartbeat.nonce = 1  # asks the node for a NodeInfo broadcast
        raw.send(ping)
        xmodem = mesh_pb2.ToRadio()
        xmodem.xmodemPacket.seq = 1
        raw.send(xmodem)
        raw.send(mesh_pb2.ToRadio())  # empty: a nop
        await node.wait_for(lambda: node.heartbeats == 1)
        await wait_for(lambda: server.stats.forwarded == 2)
        assert server.stats.decode_errors == 1
        assert server.stats.oversize_frames == 1
        raw.send(mesh_pb2.ToRadio(disconnect=True))
        await raw.wait(lambda: raw.eof)
        assert server.stats.disconnect_requests == 1
        assert not other.eof
        assert len(server.clients) == 1
        diagnostics = server.diagnostics()
        assert diagnostics["listening"] is True
        assert diagnostics["nodes_known"] == 4
        assert diagnostics["clients"][0]["address"] == "127.0.0.1"
        assert diagnostics["stats"]["disconnect_requests"] == 1
        assert changes
        # A heartbeat before any want_config_id is not answered (firmware).
        quiet = await setup.raw(handshake=False)
        heartbeat = mesh_pb2.ToRadio()
        heartbeat.heartbeat.SetInParent()
        quiet.send(heartbeat)
        await wait_for(lambda: server.stats.heartbeats == 2)
        await asyncio.sleep(0.05)
        assert quiet.received == []


# --------------------------------------------------------------------- pure parts


def test_parse_networks_and_address_checks() -> None:
    local = parse_networks(None)
    assert [str(n) for n in local] == list(LOCAL_NETWORKS)
    assert address_allowed("192.168.7.9", local)
    assert address_allowed("::ffff:10.1.2.3", local)  # IPv4-mapped
    assert address_allowed("fd12::1", local)
    assert not address_allowed("8.8.8.8", local)
    assert not address_allowed("2001:db8::1", local)
    assert not address_allowed("not-an-ip", local)
    assert [str(n) for n in parse_networks([" 192.168.1.5/24 ", "10.0.0.7"])] == [
        "192.168.1.0/24",
        "10.0.0.7/32",
    ]
    assert parse_networks([]) == ()
    with pytest.raises(InvalidNetworkError, match="'lan'"):
        parse_networks(["lan"])
    with pytest.raises(InvalidNetworkError, match="empty"):
        parse_networks([""])


def test_server_rejects_bad_limits() -> None:
    link = NodeLink(tcp_connector("127.0.0.1", 1), name="unused")
    with pytest.raises(ValueError, match="max_clients"):
        VirtualNodeServer(link, max_clients=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        VirtualNodeServer(link, idle_timeout=0)
    with pytest.raises(ValueError, match="refresh_delay"):
        VirtualNodeServer(link, refresh_delay=-1)
    with pytest.raises(ValueError, match="port"):
        VirtualNodeServer(link, port=70000)
    with pytest.raises(InvalidNetworkError):
        VirtualNodeServer(link, allowed_networks=["300.1.1.1/8"])


def _handshake(node: SimulatedNode, nonce: int = 1) -> list[mesh_pb2.FromRadio]:
    return [m for m in node._build_handshake(nonce) if kind(m) != "config_complete_id"]


def _rf(sender: int, port: int, payload: bytes, **fields: Any) -> mesh_pb2.MeshPacket:
    packet = mesh_pb2.MeshPacket(**fields)
    setattr(packet, "from", sender)
    packet.decoded.portnum = port
    packet.decoded.payload = payload
    return packet


def test_node_db_follows_live_packets() -> None:
    node = SimulatedNode(default_profile())
    db = NodeDb(_handshake(node))
    port = portnums_pb2.PortNum
    assert db.node_num == NODE_NUM
    assert len(db.channels) == 8
    user = mesh_pb2.User(id="!cafe0001", long_name="Newcomer", short_name="NEW")
    assert db.apply(
        mesh_pb2.FromRadio(
            packet=_rf(
                0xCAFE0001,
                port.NODEINFO_APP,
                user.SerializeToString(),
                rx_time=1000,
                rx_snr=4.5,
                hop_start=3,
                hop_limit=1,
                via_mqtt=True,
            )
        )
    )
    info = db.nodes[0xCAFE0001]
    assert (info.user.long_name, info.last_heard, info.snr) == ("Newcomer", 1000, 4.5)
    assert (info.hops_away, info.via_mqtt) == (2, True)
    position = mesh_pb2.Position(latitude_i=470000000, longitude_i=80000000)
    db.apply_packet(_rf(0xCAFE0001, port.POSITION_APP, position.SerializeToString()))
    assert db.nodes[0xCAFE0001].position.latitude_i == 470000000
    db.apply_packet(_rf(0xCAFE0001, port.POSITION_APP, b""))  # no coordinates
    assert db.nodes[0xCAFE0001].position.latitude_i == 470000000
    telemetry = telemetry_pb2.Telemetry(
        device_metrics=telemetry_pb2.DeviceMetrics(battery_level=42)
    )
    db.apply_packet(_rf(NODE_NUM, port.TELEMETRY_APP, telemetry.SerializeToString()))
    assert db.nodes[NODE_NUM].device_metrics.battery_level == 42
    # A NodeInfo without a key keeps the known one; garbage is ignored.
    keyed = db.nodes[ALPINE].user.public_key
    db.apply_packet(
        _rf(
            ALPINE,
            port.NODEINFO_APP,
            mesh_pb2.User(long_name="Alpine 2").SerializeToString(),
        )
    )
    assert db.nodes[ALPINE].user.public_key == keyed
    assert db.nodes[ALPINE].user.long_name == "Alpine 2"
    assert db.apply_packet(_rf(ALPINE, port.TELEMETRY_APP, b"\xff\xff"))
    assert not db.apply_packet(_rf(0, port.TEXT_MESSAGE_APP, b"x"))
    encrypted = mesh_pb2.MeshPacket(encrypted=b"\x01\x02", channel=8)
    setattr(encrypted, "from", 0xCAFE0002)
    assert db.apply_packet(encrypted, now=2000)
    assert db.nodes[0xCAFE0002].last_heard == 2000
    # Live handshake kinds replace what they describe.
    channel = db.channels[1]
    channel.role = 2
    channel.settings.name = "Side"
    digest = db.config_digest()
    assert db.apply(mesh_pb2.FromRadio(channel=channel))
    assert db.channels[1].settings.name == "Side"
    assert db.config_digest() != digest
    lora = config_pb2.Config()
    lora.lora.hop_limit = 5
    db.apply(mesh_pb2.FromRadio(config=lora))
    sections = [
        m.config.WhichOneof("payload_variant")
        for m in db.handshake(3)
        if kind(m) == "config"
    ]
    assert sections.count("lora") == 1
    assert not db.apply(mesh_pb2.FromRadio(queueStatus=mesh_pb2.QueueStatus()))
    assert db.updates == 3
    with pytest.raises(ValueError, match="my_info"):
        NodeDb([])
    with pytest.raises(ValueError, match="max_nodes"):
        NodeDb(_handshake(node), max_nodes=0)


def test_node_db_evicts_the_node_heard_longest_ago() -> None:
    node = SimulatedNode(default_profile())
    db = NodeDb(_handshake(node), max_nodes=4)
    assert len(db.nodes) == 4
    oldest = min(
        (i for n, i in db.nodes.items() if n != NODE_NUM), key=lambda i: i.last_heard
    )
    db.apply_packet(_rf(0xCAFE0003, portnums_pb2.PortNum.TEXT_MESSAGE_APP, b"x"))
    assert len(db.nodes) == 4
    assert oldest.num not in db.nodes
    assert 0xCAFE0003 in db.nodes
    assert NODE_NUM in db.nodes
    # Favourites stay while others can go; the own node always stays.
    for info in db.nodes.values():
        info.is_favorite = True
    db.apply_packet(_rf(0xCAFE0004, portnums_pb2.PortNum.TEXT_MESSAGE_APP, b"x"))
    assert NODE_NUM in db.nodes
    assert 0xCAFE0004 in db.nodes
    assert len(db.nodes) == 4


def test_message_ids_fit_the_frame_limit() -> None:
    from custom_components.mqtt_bridge.engine.virtual_node import _varint, _with_id

    assert _varint(1) == b"\x01"
    assert _varint(300) == b"\xac\x02"
    assert _with_id(b"x" * 510, 5) == b"\x08\x05" + b"x" * 510
    assert _with_id(b"x" * 511, 5) == b"x" * 511
    assert _with_id(b"x", 300) == b"\x08\xac\x02x"


def test_live_frames_reuse_the_nodes_bytes() -> None:
    from custom_components.mqtt_bridge.engine.virtual_node import (
        _frame_with_id,
        _node_body,
        _serialize,
        _with_id,
    )

    for size in (0, 1, 100, 508, 509, 510, 511, 512):
        body = b"x" * size
        for message_id in (1, 127, 128, 16383, 16384, 2**21, 2**32 - 1):
            assert _frame_with_id(body, message_id) == encode_frame(
                _with_id(body, message_id)
            ), (size, message_id)
    message = mesh_pb2.FromRadio(id=300)
    message.packet.id = 77
    message.packet.decoded.payload = b"hi"
    payload = message.SerializeToString()
    expected = _serialize(message)
    assert payload.startswith(b"\x08\xac\x02")  # the id leads, as from nanopb
    body = _node_body(message, payload)
    assert body == expected
    assert body == payload[3:]  # a slice of the node's bytes, not a new encoding
    # Without an id the node's bytes go out as they are.
    plain = mesh_pb2.FromRadio(queueStatus=mesh_pb2.QueueStatus(free=3))
    plain_bytes = plain.SerializeToString()
    assert _node_body(plain, plain_bytes) is plain_bytes
    # The id elsewhere, twice or cut short: serialized again, without the id.
    late = expected + b"\x08\xac\x02"
    assert _node_body(message, late) == expected
    twice = b"\x08\x05" + expected + b"\x08\xac\x02"
    assert _node_body(message, twice) == expected
    truncated = mesh_pb2.FromRadio(id=300)
    assert _node_body(truncated, b"\x08\xac") == b""
    assert _node_body(truncated, b"\x08" + b"\xff" * 12) == b""


async def test_live_frames_carry_each_clients_ids_and_drop_slow_readers() -> None:
    async with rig() as setup:
        node, server = setup.node, setup.server
        one, two = await setup.raw(), await setup.raw()
        before = {id(c): c.received[-1].id for c in (one, two)}
        node.receive_text(ALPINE, "numbered")
        for client in (one, two):
            await client.wait(lambda c=client: bool(c.of_kind("packet")))
            packet = client.of_kind("packet")[0]
            assert packet.packet.decoded.payload == b"numbered"
            assert packet.id == before[id(client)] + 1  # its own sequence
        db = server.node_db
        assert db is not None
        assert db.nodes[ALPINE].last_heard >= int(time.time()) - 5  # after the write
        # A client whose buffer is over the limit after a live write is dropped.
        async with stalled_client(server, 9) as slow:
            server.send_buffer_limit = 1  # the next live message goes over it
            node.receive_text(ALPINE, "over the limit")
            await wait_for(lambda: server.stats.dropped_slow == 1)
            assert slow.info() is None
            await one.wait(lambda: len(one.of_kind("packet")) == 2)
            await two.wait(lambda: len(two.of_kind("packet")) == 2)


# --------------------------------------------------------------------- edges


def admin_packet(payload: bytes, packet_id: int) -> mesh_pb2.ToRadio:
    message = mesh_pb2.ToRadio()
    message.packet.to = NODE_NUM
    message.packet.id = packet_id
    message.packet.decoded.portnum = portnums_pb2.PortNum.ADMIN_APP
    message.packet.decoded.payload = payload
    return message


async def test_listeners_lifecycle_and_refresh_timer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []
    async with rig(refresh_delay=30) as setup:
        server = setup.server
        remove = server.add_listener(lambda: calls.append("a"))

        def broken() -> None:
            raise RuntimeError("listener bug")

        server.add_listener(broken)
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
        raw = await setup.raw()
        assert "listener bug" in caplog.text
        remove()
        remove()  # twice is harmless
        count = len(calls)
        rename = admin_pb2.AdminMessage(set_owner=mesh_pb2.User(long_name="Later"))
        raw.send(admin_packet(rename.SerializeToString(), 61))
        raw.send(admin_packet(rename.SerializeToString(), 62))  # timer re-armed
        raw.send(admin_packet(b"\xff\xff", 63))  # not an AdminMessage
        await wait_for(lambda: server.stats.forwarded == 3)
        assert len(calls) == count
        assert server._refresh_handle is not None
    # stop() cancelled the pending refresh (a lingering timer would fail the test)
    assert server._refresh_handle is None
    assert server.stats.config_refreshes == 0


async def test_packet_edges_ids_sizes_and_routing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from custom_components.mqtt_bridge.engine import virtual_node

    async with rig(idle_timeout=None) as setup:
        node, server = setup.node, setup.server
        raw = await setup.raw()
        other = await setup.raw()
        # Without an id the server numbers the packet (and routes the answer).
        raw.send(text_packet("numbered", packet_id=0))
        await node.wait_for(lambda: len(node.sent_packets) == 1)
        assert node.sent_packets[0].id != 0
        await raw.wait(lambda: len(raw.of_kind("queueStatus")) == 1)
        # A packet that the added id would push over 512 bytes is dropped.
        big = text_packet("", packet_id=0)
        size = 400
        while True:  # length prefixes grow with the payload: search the size
            big.packet.decoded.payload = b"x" * size
            if len(big.SerializeToString()) >= 510:
                break
            size += 1
        assert len(big.SerializeToString()) == 510
        raw.send(big)
        await wait_for(lambda: server.stats.packets_dropped["too_large"] == 1)
        for number in range(3):
            raw.send(text_packet(f"n{number}", packet_id=300 + number))
        await node.wait_for(lambda: len(node.sent_packets) == 4)
        # A client notification answering a client's packet goes to it only.
        note = mesh_pb2.FromRadio()
        note.clientNotification.reply_id = 302
        note.clientNotification.message = "for raw"
        server.on_from_radio(note)
        await raw.wait(lambda: bool(raw.of_kind("clientNotification")))
        await asyncio.sleep(0.05)
        assert not other.of_kind("clientNotification")
        assert server.clients[0].packets_dropped == 1
        assert all(c.buffered_bytes == 0 for c in server.clients)
        # Once its sender is forgotten, an answer goes to every client.
        monkeypatch.setattr(virtual_node, "_ORIGINS_MAX", 0)
        raw.send(text_packet("forgotten", packet_id=400))
        await other.wait(
            lambda: any(
                m.queueStatus.mesh_packet_id == 400
                for m in other.of_kind("queueStatus")
            )
        )


async def test_link_lost_while_a_packet_waits_for_its_queue_status() -> None:
    async with rig(queue_status_timeout=30) as setup:
        node, server, link = setup.node, setup.server, setup.link
        raw = await setup.raw()
        raw.send(text_packet("once", packet_id=42))
        raw.send(text_packet("once", packet_id=42))  # a duplicate: never answered
        await node.wait_for(lambda: len(node.sent_packets) == 1)
        await wait_for(lambda: server.stats.forwarded == 1)
        await node.drop_client()  # the link goes down under the waiting packet
        await wait_for(lambda: server.stats.forwarded == 2)
        await wait_for(lambda: link.state is LinkState.READY, 10)
        assert len(node.sent_packets) == 1


async def test_unusable_handshake_keeps_the_cache() -> None:
    async with rig() as setup:
        server, link = setup.server, setup.link
        db = server.node_db
        link.handshake_messages = ()
        server.on_ready(NodeSnapshot())
        assert server.node_db is db


# --------------------------------------------------------------------- NodeLink refresh


def _script_full(name: str) -> Callable[[int], list[mesh_pb2.FromRadio]]:
    def script(nonce: int) -> list[mesh_pb2.FromRadio]:
        info = mesh_pb2.NodeInfo(num=NODE_NUM)
        info.user.long_name = name
        return [
            mesh_pb2.FromRadio(my_info=mesh_pb2.MyNodeInfo(my_node_num=NODE_NUM)),
            mesh_pb2.FromRadio(node_info=info),
            mesh_pb2.FromRadio(config_complete_id=nonce),
        ]

    return script


async def test_node_link_refresh_handshake_edges(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def refresh_ok(nonce: int) -> list[mesh_pb2.FromRadio]:
        status = mesh_pb2.FromRadio()
        status.queueStatus.free = 9
        return [
            mesh_pb2.FromRadio(config_complete_id=nonce ^ 1),  # stale: ignored
            status,  # live traffic during the refresh still goes live
            *_script_full("Second")(nonce),
        ]

    def refresh_broken(nonce: int) -> list[mesh_pb2.FromRadio]:
        return [mesh_pb2.FromRadio(config_complete_id=nonce)]  # no my_info

    async with scripted(
        _script_full("First"), refresh_ok, refresh_broken, _script_full("Third")
    ) as (_node, port):
        link = NodeLink(
            tcp_connector("127.0.0.1", port),
            name="scripted",
            backoff=Backoff(base=0.02, cap=0.05),
        )
        seen: list[str | None] = []
        states: list[LinkState] = []

        class Recorder(NodeLinkListener):
            def on_from_radio(self, message: mesh_pb2.FromRadio) -> None:
                seen.append(kind(message))

            def on_state(self, state: LinkState) -> None:
                states.append(state)

        class Broken(NodeLinkListener):
            def on_from_radio(self, message: mesh_pb2.FromRadio) -> None:
                raise RuntimeError("hook bug")

        class DuckTyped:  # not a NodeLinkListener: lacks the new hook
            def on_state(self, state: LinkState) -> None:
                pass

        link.add_listener(Recorder())
        link.add_listener(Broken())
        link.add_listener(DuckTyped())  # type: ignore[arg-type]
        assert not link.request_config()  # not connected
        task = asyncio.create_task(link.run())
        try:
            await wait_for(lambda: link.state is LinkState.READY)
            assert link.snapshot is not None
            assert link.snapshot.long_name == "First"
            assert [kind(m) for m in link.handshake_messages] == [
                "my_info",
                "node_info",
            ]
            assert link.request_config()
            assert link.refreshing
            assert not link.request_config()  # one at a time
            await wait_for(lambda: link.stats.refreshes == 1)
            assert link.snapshot.long_name == "Second"
            assert link.state is LinkState.READY
            assert not link.refreshing
            assert seen == ["queueStatus"]
            assert "hook bug" in caplog.text
            assert LinkState.HANDSHAKING in states
            # A refresh that completes without my_info ends the connection.
            states.clear()
            assert link.request_config()
            await wait_for(lambda: LinkState.DISCONNECTED in states)
            assert link.stats.last_error == "refresh completed without my_info"
            await wait_for(lambda: link.state is LinkState.READY)
            assert link.snapshot.long_name == "Third"
        finally:
            task.cancel()
            await asyncio.wait({task})


async def test_simulator_admin_getters_and_reboot_request() -> None:
    async with rig() as setup:
        node = setup.node
        raw = await setup.raw()
        requests = {
            501: admin_pb2.AdminMessage(
                get_config_request=admin_pb2.AdminMessage.ConfigType.LORA_CONFIG
            ),
            502: admin_pb2.AdminMessage(
                get_config_request=admin_pb2.AdminMessage.ConfigType.SESSIONKEY_CONFIG
            ),
            503: admin_pb2.AdminMessage(get_channel_request=1),
            504: admin_pb2.AdminMessage(begin_edit_settings=True),  # ACK only
        }
        for packet_id, admin in requests.items():
            message = admin_packet(admin.SerializeToString(), packet_id)
            message.packet.decoded.want_response = True
            raw.send(message)

        def answers() -> dict[int, mesh_pb2.MeshPacket]:
            return {
                m.packet.decoded.request_id: m.packet
                for m in raw.of_kind("packet")
                if m.packet.decoded.request_id
            }

        await raw.wait(lambda: len(answers()) == 4)
        replies = {}
        for packet_id in (501, 502, 503):
            reply = admin_pb2.AdminMessage()
            reply.ParseFromString(answers()[packet_id].decoded.payload)
            assert len(reply.session_passkey) == 8
            replies[packet_id] = reply
        assert replies[501].get_config_response.lora.region == (
            config_pb2.Config.LoRaConfig.RegionCode.EU_868
        )
        assert replies[502].get_config_response.HasField("sessionkey")
        assert replies[503].get_channel_response.role == 1  # PRIMARY
        assert answers()[504].decoded.portnum == portnums_pb2.PortNum.ROUTING_APP
        assert len(node.admin_messages) == 4
        raw.send(admin_packet(b"\xff\xff", 505))  # undecodable: ignored
        reboot = admin_pb2.AdminMessage(reboot_seconds=0)
        raw.send(admin_packet(reboot.SerializeToString(), 506))
        await node.wait_for(lambda: node.reboot_count == 1)
        assert len(node.admin_messages) == 5
        # set_owner with the current names changes nothing (no reboot scheduled).
        same = admin_pb2.AdminMessage(set_owner=mesh_pb2.User(long_name="Sim Node"))
        await wait_for(lambda: setup.server.stats.node_lost == 1)
        await wait_for(lambda: setup.server.node_available, 10)
        raw.send(admin_packet(same.SerializeToString(), 507))
        await node.wait_for(lambda: len(node.admin_messages) == 6)
        assert node._reboot_handle is None
