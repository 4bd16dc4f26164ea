"""Virtual node: a stream API server that shares one node link with many clients.

The firmware's TCP API serves one client at a time (a new connection
force-closes the old one, ``src/mesh/api/ServerAPI.cpp``), so an integration
that holds the node's connection locks every phone app, the CLI and MeshMonitor
out. :class:`VirtualNodeServer` listens on its own port (default 4404, as
MeshMonitor's Virtual Node) and behaves towards each client like the firmware's
``PhoneAPI`` (``shared/reference/meshtastic-proxy.md`` §2 and the addendum)
while the :class:`~.node_link.NodeLink` stays the node's only client:

- **Framing**: the stream API (:mod:`.stream`): wake bytes and text outside
  frames are skipped, headers over 512 bytes resynchronise, a zero-length
  frame is a keepalive; every ``FromRadio`` gets a per-client increasing ``id``.
- **Handshake** answered locally from a :class:`~.node_db.NodeDb` built from
  the link's last handshake, in the firmware's order, ``config_complete_id``
  = the client's nonce; 69420 (config only) and 69421 (nodes only) as the
  firmware. ``want_config_id`` never reaches the node. A client that asks
  before the link ever completed a handshake is answered when it does.
- **Live traffic**: every ``FromRadio`` the node sends after its handshake goes
  to every client that completed one, except ``mqttClientProxyMessage``
  (Home Assistant is the MQTT proxy), ``rebooted`` and ``config_complete_id``.
  A ``queueStatus`` for a packet a client sent (``mesh_packet_id``) and a
  ``clientNotification`` replying to one (``reply_id``) go to that client only,
  as the firmware answers the phone that sent it (the ``meshtastic`` library
  takes its free TX slots from these answers).
- **From clients**: ``packet``, ``xmodemPacket`` and ``heartbeat`` with nonce 1
  (a NodeInfo broadcast) are forwarded to the node in arrival order per
  client, one per client in turn (fair sharing), from a bounded per-client
  queue (drop-oldest, counted ``queue_full``). A packet goes out only after
  the node answered the previous one with its ``queueStatus`` (or after
  ``queue_status_timeout`` seconds): the firmware keeps just two such answers
  for its client (``MAX_RX_QUEUESTATUS_TOPHONE``), so a burst from several
  clients would lose some, and this paces clients to the node's TX queue.
  Items older than
  ``packet_max_age`` when the node can take them are dropped (``expired``).
  ``heartbeat`` is answered locally with a ``queueStatus`` (the node's last
  reported ``free``/``maxlen``, 16/16 before any; firmware >= 2.7.4 does the
  same); ``disconnect`` closes that client only; ``mqttClientProxyMessage`` is
  dropped and counted, so a phone with "proxy to client" still on cannot
  publish a second time what Home Assistant already proxies.
- **Settings**: admin messages to the local node pass through (the apps'
  settings screens work); after one that changes something (``set_owner``,
  ``set_config``, ``set_channel``, ...) the link re-reads the node's state
  (:meth:`NodeLink.request_config`) after ``refresh_delay`` seconds. When that
  changes what clients configure from (:meth:`NodeDb.config_digest`), every
  client is sent ``FromRadio.rebooted``, which makes the apps and the library
  re-handshake against the refreshed cache. Most settings make the firmware
  reboot a few seconds later anyway (``AdminModule::saveChanges``).
- **Node restarts**: when the link loses the node, clients stay connected and
  get a ``clientNotification`` (level WARNING) saying so; their handshakes
  are answered from the last cache and their packets wait (bounded, aged).
  When the link is ready again the cache is rebuilt from the fresh handshake
  and every client is sent ``rebooted`` (re-sync), as after a firmware reboot.
  This is what MeshMonitor issue #1443 (clients stuck after a radio restart)
  lacks.
- **Slow and idle clients**: writes never wait: a client whose unsent data
  exceeds ``send_buffer_limit`` bytes is dropped (``dropped_slow``) without
  delaying the node or anyone else. A client that sends nothing for
  ``idle_timeout`` seconds (firmware ``TCP_IDLE_TIMEOUT_MS``, 15 min) is
  closed (``dropped_idle``); the library's 300 s heartbeat keeps it.
- **Access**: the stream API has no authentication, so connections are
  accepted only from ``allowed_networks`` (CIDRs; default the local networks:
  loopback, RFC 1918, link-local, IPv6 ULA) and up to ``max_clients`` at once.

Other clients do not see the packets a client sends (the firmware does not
echo a phone's packets either). No thread is started; this module imports
nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
import contextlib
from dataclasses import asdict, dataclass, field
import ipaddress
import itertools
import logging
import random
import socket
import time
from typing import Any

from google.protobuf.message import DecodeError
from meshtastic.protobuf import admin_pb2, mesh_pb2, portnums_pb2

from .node_db import DEFAULT_MAX_NODES, NodeDb
from .node_link import (
    LinkNotReadyError,
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
)
from .stream import (
    MAX_FRAME_PAYLOAD,
    START1,
    START2,
    FrameDecoder,
    FrameTooLargeError,
    encode_frame,
)

_LOGGER = logging.getLogger(__name__)

#: MeshMonitor's Virtual Node port; the firmware's own API port is 4403.
DEFAULT_PORT = 4404
#: Networks a client may connect from by default: loopback, RFC 1918, IPv4
#: link-local, IPv6 loopback, link-local and unique local addresses.
LOCAL_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::1/128",
    "fe80::/10",
    "fc00::/7",
)
DEFAULT_MAX_CLIENTS = 16
DEFAULT_CLIENT_QUEUE_LIMIT = 64
DEFAULT_SEND_BUFFER_LIMIT = 256 * 1024
#: ``TCP_IDLE_TIMEOUT_MS`` of the firmware (``src/mesh/api/ServerAPI.h``), seconds.
DEFAULT_IDLE_TIMEOUT = 900.0
DEFAULT_PACKET_MAX_AGE = 60.0
DEFAULT_REFRESH_DELAY = 2.0
#: ``MAX_TX_QUEUE``: reported in heartbeat answers until the node reported its own.
_DEFAULT_TX_QUEUE = 16
#: Packet ids remembered to route the node's ``queueStatus`` to the sender.
_ORIGINS_MAX = 512
#: Kernel send buffer of each client socket (Linux doubles it), so that the
#: per-client ``send_buffer_limit`` bounds what a stalled client holds; Linux
#: would otherwise let the kernel queue megabytes for it.
_SOCKET_SEND_BUFFER = 64 * 1024
#: How long a packet may wait for the node's ``queueStatus`` before the next goes.
DEFAULT_QUEUE_STATUS_TIMEOUT = 2.0
_ADMIN = portnums_pb2.PortNum.ADMIN_APP
#: Admin messages after which the node's settings are read again.
_CONFIG_CHANGES = frozenset(
    name
    for name in (
        "set_owner",
        "set_channel",
        "set_config",
        "set_module_config",
        "set_ham_mode",
        "set_fixed_position",
        "remove_fixed_position",
        "set_favorite_node",
        "remove_favorite_node",
        "set_ignored_node",
        "remove_ignored_node",
        "remove_by_nodenum",
        "add_contact",
        "store_ui_config",
        "commit_edit_settings",
        "factory_reset_config",
        "factory_reset_device",
        "nodedb_reset",
    )
    if name in admin_pb2.AdminMessage.DESCRIPTOR.fields_by_name
)
#: ``FromRadio`` kinds never passed to clients.
_WITHHELD = frozenset({"mqttClientProxyMessage", "rebooted", "config_complete_id"})
#: ``ToRadio`` kinds forwarded to the node (and a heartbeat with nonce 1).
_FORWARDED = frozenset({"packet", "xmodemPacket"})

type Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class VirtualNodeBindError(OSError):
    """The server's port cannot be bound (in use, no permission, bad address).

    ``errno`` is the operating system's error number; the message names the
    address and port.
    """


class InvalidNetworkError(ValueError):
    """An allowed-network entry is not an IP network in CIDR notation."""


def parse_networks(networks: Iterable[str] | None) -> tuple[Network, ...]:
    """Parse CIDR strings (``192.168.1.0/24``, ``fd00::/8``, ``10.0.0.7``).

    ``None`` gives :data:`LOCAL_NETWORKS`. Host bits are allowed
    (``192.168.1.5/24`` = ``192.168.1.0/24``); a bare address is a single host.
    An empty list allows nobody.

    Raises:
        InvalidNetworkError: an entry is empty or not an IP network (the
            message names it).

    """
    result: list[Network] = []
    for entry in LOCAL_NETWORKS if networks is None else networks:
        text = str(entry).strip()
        if not text:
            raise InvalidNetworkError("an allowed network is empty")
        try:
            result.append(ipaddress.ip_network(text, strict=False))
        except ValueError as err:
            raise InvalidNetworkError(
                f"{text!r} is not an IP network such as 192.168.1.0/24 ({err})"
            ) from None
    return tuple(result)


def address_allowed(address: str, networks: Sequence[Network]) -> bool:
    """Return whether ``address`` (IPv4, IPv6 or IPv4-mapped IPv6) is in ``networks``."""
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(
            address
        )
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """One connected client as the integration shows it.

    Times are ``time.time()`` seconds. ``live``: the client completed a
    handshake and gets the node's traffic; ``waiting``: it asked for one before
    the node's state was known. Counters are since the client connected:
    ``packets_from_client`` are ``ToRadio`` packets received,
    ``packets_dropped`` those never forwarded, ``messages_to_client``
    ``FromRadio`` frames written; ``queued`` items wait for the node and
    ``buffered_bytes`` for the client to read them.
    """

    address: str
    port: int
    connected_since: float
    last_seen: float
    live: bool
    waiting: bool
    handshakes: int
    packets_from_client: int
    packets_dropped: int
    proxy_messages_dropped: int
    heartbeats: int
    messages_to_client: int
    queued: int
    buffered_bytes: int


@dataclass(slots=True)
class VirtualNodeStats:
    """Counters of a :class:`VirtualNodeServer` since it was created.

    Connections: ``accepted``, ``refused_network`` (address not allowed),
    ``refused_full`` (``max_clients`` reached), ``disconnected`` (every client
    that left, for any reason), ``disconnect_requests`` (``ToRadio.disconnect``),
    ``dropped_slow`` (send buffer over the limit), ``dropped_idle``.
    Traffic: ``handshakes`` answered, ``handshakes_deferred`` (asked before the
    node was known), ``heartbeats``, ``packets_from_clients`` (``ToRadio.packet``),
    ``forwarded`` (``ToRadio`` written to the node), ``packets_dropped`` by
    reason (``queue_full``, ``expired``, ``too_large``),
    ``proxy_messages_dropped`` (clients' ``mqttClientProxyMessage``),
    ``decode_errors`` / ``oversize_frames`` (malformed ``ToRadio``),
    ``messages_to_clients`` (``FromRadio`` frames written, all clients).
    Node: ``node_lost`` (times clients were told the node is gone),
    ``resyncs`` (``rebooted`` sent to a client), ``config_refreshes``.
    """

    accepted: int = 0
    refused_network: int = 0
    refused_full: int = 0
    disconnected: int = 0
    disconnect_requests: int = 0
    dropped_slow: int = 0
    dropped_idle: int = 0
    handshakes: int = 0
    handshakes_deferred: int = 0
    heartbeats: int = 0
    packets_from_clients: int = 0
    forwarded: int = 0
    packets_dropped: Counter[str] = field(default_factory=Counter)
    proxy_messages_dropped: int = 0
    decode_errors: int = 0
    oversize_frames: int = 0
    messages_to_clients: int = 0
    node_lost: int = 0
    resyncs: int = 0
    config_refreshes: int = 0


@dataclass(slots=True)
class _Queued:
    message: mesh_pb2.ToRadio
    received: float  # loop time


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if not value:
            out.append(bits)
            return bytes(out)
        out.append(bits | 0x80)


def _with_id(payload: bytes, message_id: int) -> bytes:
    """Prefix a serialized ``FromRadio`` (without ``id``) with field 1 = ``message_id``."""
    id_field = b"\x08" + _varint(message_id)
    if len(payload) + len(id_field) > MAX_FRAME_PAYLOAD:
        return payload  # a frame at the size limit goes out without an id
    return id_field + payload


def _frame_with_id(body: bytes, message_id: int) -> bytes:
    """Return one stream API frame: header, ``FromRadio.id`` = ``message_id``, ``body``.

    ``body`` is a serialized ``FromRadio`` without ``id`` (field 1);
    ``message_id`` is 1 to 2**32-1. Same bytes as
    ``encode_frame(_with_id(body, message_id))``, with fewer copies: a frame
    at the size limit goes out without an id.
    """
    if message_id < 0x80:
        id_field = bytes((0x08, message_id))
    elif message_id < 0x4000:
        id_field = bytes((0x08, (message_id & 0x7F) | 0x80, message_id >> 7))
    else:
        id_field = b"\x08" + _varint(message_id)
    size = len(body) + len(id_field)
    if size > MAX_FRAME_PAYLOAD:
        return encode_frame(body)
    return bytes((START1, START2, size >> 8, size & 0xFF)) + id_field + body


def _node_body(message: mesh_pb2.FromRadio, payload: bytes) -> bytes:
    """Return the node's serialized ``message`` (``payload``) without its ``id``.

    The firmware (nanopb) and protobuf serializers write fields in field
    number order, so the node's ``id`` (field 1) leads the payload: it is cut
    off when its value is ``message.id`` (the value the parser kept). Else
    (another encoder's order, or no ``id`` but other fields first) the
    message is serialized again without ``id``, which is always right.
    """
    if not payload or payload[0] != 0x08:
        return payload if not message.id else _serialize(message)
    value = shift = 0
    for index in range(1, min(len(payload), 11)):
        byte = payload[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if value == message.id:
                return payload[index + 1 :]
            break
        shift += 7
    return _serialize(message)


def _serialize(message: mesh_pb2.FromRadio) -> bytes:
    """Serialize ``message`` without its ``id`` (each client numbers its own)."""
    if not message.id:
        return message.SerializeToString()
    copy = mesh_pb2.FromRadio()
    copy.CopyFrom(message)
    copy.ClearField("id")
    return copy.SerializeToString()


class _Client:
    """Per-connection state (one ``PhoneAPI`` of the virtual node)."""

    def __init__(
        self, number: int, transport: asyncio.Transport, address: str, port: int
    ) -> None:
        self.number = number
        self.transport = transport
        self.address = address
        self.port = port
        self.connected_since = self.last_seen = time.time()
        self.last_rx = asyncio.get_running_loop().time()
        self.decoder = FrameDecoder()
        self.queue: deque[_Queued] = deque()
        self.nonce: int | None = None
        self.live = False
        self.waiting = False
        self.closed = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.from_radio_id = 0
        self.idle_handle: asyncio.TimerHandle | None = None
        self.handshakes = 0
        self.packets = 0
        self.packets_dropped = 0
        self.proxy_dropped = 0
        self.heartbeats = 0
        self.messages = 0

    def info(self) -> ClientInfo:
        try:
            buffered = int(self.transport.get_write_buffer_size())
        except (AttributeError, RuntimeError):  # pragma: no cover - closed transport
            buffered = 0
        return ClientInfo(
            address=self.address,
            port=self.port,
            connected_since=self.connected_since,
            last_seen=self.last_seen,
            live=self.live,
            waiting=self.waiting,
            handshakes=self.handshakes,
            packets_from_client=self.packets,
            packets_dropped=self.packets_dropped,
            proxy_messages_dropped=self.proxy_dropped,
            heartbeats=self.heartbeats,
            messages_to_client=self.messages,
            queued=len(self.queue),
            buffered_bytes=buffered,
        )


class _ClientProtocol(asyncio.Protocol):
    """Feeds one accepted connection to its :class:`VirtualNodeServer`."""

    def __init__(self, server: VirtualNodeServer) -> None:
        self._server = server
        self._client: _Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._client = self._server._accept(transport)

    def data_received(self, data: bytes) -> None:
        if self._client is not None:
            self._server._received(self._client, data)

    def eof_received(self) -> bool:
        return False  # the library half-closes on close(): close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        client = self._client
        if client is not None:
            if not client.gone.done():
                client.gone.set_result(None)
            self._server._close(client)


class VirtualNodeServer(NodeLinkListener):
    """Serves the stream API to many clients over one :class:`NodeLink`.

    Create it for a link (which keeps running on its own), ``await start()``
    to listen, ``await stop()`` to close the port and every client. The link
    may be ready or not when the server starts. ``host`` ``"0.0.0.0"`` listens
    on every IPv4 interface (``"::"`` IPv6 too). ``client_queue_limit`` is in
    ``ToRadio`` messages per client, ``send_buffer_limit`` in bytes per client,
    ``idle_timeout`` (``None``: never), ``packet_max_age``, ``refresh_delay``
    and ``queue_status_timeout`` in seconds; ``max_nodes`` bounds the node
    database. ``port`` 0 picks a free port; :attr:`port` holds the bound one
    while listening.

    ``on_change`` (and callbacks added with :meth:`add_listener`) run in the
    event loop after a client connects, completes a handshake or leaves, after
    packets from clients are forwarded or dropped and when the node is lost or
    back; not for each message sent to clients. Rate-limit reactions.

    Raises:
        InvalidNetworkError: an ``allowed_networks`` entry is not a network.
        ValueError: a limit is not positive.

    """

    def __init__(
        self,
        link: NodeLink,
        *,
        host: str = "0.0.0.0",
        port: int = DEFAULT_PORT,
        allowed_networks: Sequence[str] | None = None,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        client_queue_limit: int = DEFAULT_CLIENT_QUEUE_LIMIT,
        send_buffer_limit: int = DEFAULT_SEND_BUFFER_LIMIT,
        idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
        packet_max_age: float = DEFAULT_PACKET_MAX_AGE,
        refresh_delay: float = DEFAULT_REFRESH_DELAY,
        queue_status_timeout: float = DEFAULT_QUEUE_STATUS_TIMEOUT,
        max_nodes: int = DEFAULT_MAX_NODES,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Prepare a server for ``link``; nothing listens until :meth:`start`."""
        for name, value in (
            ("max_clients", max_clients),
            ("client_queue_limit", client_queue_limit),
            ("send_buffer_limit", send_buffer_limit),
            ("packet_max_age", packet_max_age),
            ("queue_status_timeout", queue_status_timeout),
            ("max_nodes", max_nodes),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if refresh_delay < 0:
            raise ValueError(f"refresh_delay must not be negative, got {refresh_delay}")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be positive, got {idle_timeout}")
        if not 0 < port < 65536 and port != 0:
            raise ValueError(f"port must be 1-65535 (0: any free port), got {port}")
        self.link = link
        self.host = host
        self.requested_port = port
        self.port = port
        self.allowed_networks = parse_networks(allowed_networks)
        self.max_clients = max_clients
        self.client_queue_limit = client_queue_limit
        self.send_buffer_limit = send_buffer_limit
        self.idle_timeout = idle_timeout
        self.packet_max_age = packet_max_age
        self.refresh_delay = refresh_delay
        self.queue_status_timeout = queue_status_timeout
        self.max_nodes = max_nodes
        self.stats = VirtualNodeStats()
        self._listeners: list[Callable[[], None]] = [on_change] if on_change else []
        self._server: asyncio.Server | None = None
        self._clients: dict[int, _Client] = {}
        self._live: list[_Client] | None = None  # cache of _live_clients()
        self._numbers = itertools.count(1)
        self._db: NodeDb | None = None
        self._node_up = False
        self._node_free = _DEFAULT_TX_QUEUE
        self._node_maxlen = _DEFAULT_TX_QUEUE
        self._turns: deque[_Client] = deque()
        self._work = asyncio.Event()
        self._forwarder: asyncio.Task[None] | None = None
        self._origins: OrderedDict[int, _Client] = OrderedDict()
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._remove_listener: Callable[[], None] | None = None

    # -- public ------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """Whether the port is open."""
        return self._server is not None

    @property
    def clients(self) -> list[ClientInfo]:
        """The connected clients, oldest first."""
        return [client.info() for client in self._clients.values()]

    @property
    def node_db(self) -> NodeDb | None:
        """The handshake cache and node database, ``None`` before the node was seen."""
        return self._db

    @property
    def node_available(self) -> bool:
        """Whether the node link is live (clients' packets reach the node)."""
        return self._node_up

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` on changes (see the class docstring); return a remover."""
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    def diagnostics(self) -> dict[str, Any]:
        """Settings, counters, clients and node database size, JSON-serialisable."""
        stats = asdict(self.stats)
        stats["packets_dropped"] = dict(self.stats.packets_dropped)
        db = self._db
        return {
            "listening": self.listening,
            "host": self.host,
            "port": self.port,
            "allowed_networks": [str(network) for network in self.allowed_networks],
            "max_clients": self.max_clients,
            "node_available": self._node_up,
            "nodes_known": len(db.nodes) if db is not None else None,
            "stats": stats,
            "clients": [asdict(client) for client in self.clients],
        }

    async def start(self) -> None:
        """Listen on ``host``:``port``; :attr:`port` then holds the bound port.

        Raises:
            VirtualNodeBindError: the port cannot be bound (``errno`` set).
            RuntimeError: already started.

        """
        if self._server is not None:
            raise RuntimeError("virtual node server already started")
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: _ClientProtocol(self), self.host, self.requested_port
            )
        except OSError as err:
            raise VirtualNodeBindError(
                err.errno,
                f"cannot listen on {self.host}:{self.requested_port}: "
                f"{err.strerror or err}",
            ) from err
        self._server = server
        self.port = int(server.sockets[0].getsockname()[1])
        self._work = asyncio.Event()
        self._remove_listener = self.link.add_listener(self)
        if self.link.ready:  # else a cache kept from an earlier start serves
            self._load(self.link.handshake_messages)
        self._node_up = self.link.ready
        self._forwarder = asyncio.create_task(
            self._forward_loop(), name=f"{self.link.name} virtual node forwarder"
        )
        _LOGGER.info(
            "%s: virtual node listening on %s:%d", self.link.name, self.host, self.port
        )
        self._changed()

    async def stop(self) -> None:
        """Close the port and every client; stop forwarding. Idempotent."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
            self._refresh_handle = None
        clients = list(self._clients.values())
        for client in clients:
            self._close(client)
        forwarder, self._forwarder = self._forwarder, None
        if forwarder is not None:
            forwarder.cancel()
            await asyncio.wait({forwarder})
        if clients:
            await asyncio.wait([client.gone for client in clients], timeout=1.0)
        for client in clients:
            if not client.gone.done():  # pragma: no cover - peer never acknowledged
                client.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()
        self._turns.clear()
        self._origins.clear()
        _LOGGER.info("%s: virtual node stopped", self.link.name)
        self._changed()

    # -- NodeLinkListener --------------------------------------------------------

    def on_state(self, state: LinkState) -> None:
        """Resume forwarding when the link is ready; tell clients when the node is lost."""
        if state is LinkState.READY:
            self._work.set()
            return
        if (state is LinkState.HANDSHAKING and self.link.refreshing) or not (
            self._node_up
        ):
            return
        self._node_up = False
        self.stats.node_lost += 1
        _LOGGER.info(
            "%s: node lost; %d virtual node client(s) stay connected",
            self.link.name,
            len(self._clients),
        )
        notification = mesh_pb2.FromRadio()
        note = notification.clientNotification
        note.level = mesh_pb2.LogRecord.Level.WARNING
        note.time = int(time.time())
        note.message = (
            "Home Assistant lost the connection to the node and is reconnecting; "
            f"messages sent meanwhile are held for up to {self.packet_max_age:.0f} s"
        )
        self._send(self._live_clients(), notification)
        self._changed()

    def on_ready(self, snapshot: NodeSnapshot) -> None:
        """Rebuild the cache from the fresh handshake; answer and re-sync clients."""
        old = self._db
        if not self._load(self.link.handshake_messages):
            return
        db = self._db
        assert db is not None
        resync = (
            not self._node_up
            or old is None
            or old.config_digest() != db.config_digest()
        )
        self._node_up = True
        answered: set[int] = set()
        for client in list(self._clients.values()):
            if client.waiting and client.nonce is not None:
                answered.add(client.number)
                self._start_config(client, client.nonce)
        if resync:
            rebooted = mesh_pb2.FromRadio(rebooted=True)
            targets = [c for c in self._live_clients() if c.number not in answered]
            self.stats.resyncs += len(targets)
            self._send(targets, rebooted)
        self._work.set()
        self._changed()

    def on_from_radio(self, message: mesh_pb2.FromRadio) -> None:
        """Pass the node's live message to clients (serialized here), then cache it.

        The link calls :meth:`on_from_radio_frame` instead, with the node's bytes.
        """
        self.on_from_radio_frame(message, None)

    def on_from_radio_frame(
        self, message: mesh_pb2.FromRadio, payload: bytes | None
    ) -> None:
        """Write the node's live message to clients first, then fold it into the cache.

        ``payload`` is the node's serialized ``message`` as received
        (:meth:`NodeLink._emit_from_radio`); clients get those bytes with
        their own ``id`` in front, without serializing ``message`` again
        (``None``: serialize it). The node database, the TX-queue figures and
        other bookkeeping follow the writes, so they add nothing to the
        latency node → client.
        """
        kind = message.WhichOneof("payload_variant")
        if kind in _WITHHELD:
            return
        targets = self._live if self._live is not None else self._live_clients()
        if kind == "queueStatus":
            packet_id = int(message.queueStatus.mesh_packet_id)
            origin = self._origins.pop(packet_id, None) if packet_id else None
            if origin is not None:
                targets = [origin] if origin.live else []
        elif kind == "clientNotification" and message.clientNotification.reply_id:
            origin = self._origins.get(int(message.clientNotification.reply_id))
            if origin is not None:
                targets = [origin] if origin.live else []
        if targets:
            body = (
                _serialize(message) if payload is None else _node_body(message, payload)
            )
            self._write_all(targets, body)
        # Bookkeeping, after every client has its copy.
        if kind == "queueStatus":
            status = message.queueStatus
            self._node_free = int(status.free)
            self._node_maxlen = int(status.maxlen) or self._node_maxlen
        db = self._db
        if db is not None:
            db.apply(message)

    # -- connections -------------------------------------------------------------

    def _accept(self, transport: asyncio.Transport) -> _Client | None:
        peer = transport.get_extra_info("peername")
        address, port = (str(peer[0]), int(peer[1])) if peer else ("", 0)
        if not address_allowed(address, self.allowed_networks):
            self.stats.refused_network += 1
            _LOGGER.info(
                "%s: virtual node refused %s (not in the allowed networks)",
                self.link.name,
                address,
            )
            transport.close()
            self._changed()
            return None
        if len(self._clients) >= self.max_clients:
            self.stats.refused_full += 1
            _LOGGER.info(
                "%s: virtual node refused %s (%d clients connected)",
                self.link.name,
                address,
                len(self._clients),
            )
            transport.close()
            self._changed()
            return None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_SEND_BUFFER
                )
        client = _Client(next(self._numbers), transport, address, port)
        self._clients[client.number] = client
        self.stats.accepted += 1
        self._arm_idle(client)
        _LOGGER.debug("%s: virtual node client %s:%d", self.link.name, address, port)
        self._changed()
        return client

    def _close(self, client: _Client, *, abort: bool = False) -> None:
        """Forget ``client`` and close its connection; its queued packets still go out."""
        if client.closed:
            return
        client.closed = True
        client.live = client.waiting = False
        self._live = None
        if client.idle_handle is not None:
            client.idle_handle.cancel()
            client.idle_handle = None
        self._clients.pop(client.number, None)
        self.stats.disconnected += 1
        if abort:
            client.transport.abort()
        else:
            client.transport.close()
        _LOGGER.debug(
            "%s: virtual node client %s:%d left",
            self.link.name,
            client.address,
            client.port,
        )
        self._changed()

    def _arm_idle(self, client: _Client) -> None:
        if self.idle_timeout is None:
            return
        loop = asyncio.get_running_loop()
        client.idle_handle = loop.call_at(
            client.last_rx + self.idle_timeout, self._idle_check, client
        )

    def _idle_check(self, client: _Client) -> None:
        client.idle_handle = None  # never called for a closed client (cancelled)
        assert self.idle_timeout is not None
        if asyncio.get_running_loop().time() < client.last_rx + self.idle_timeout:
            self._arm_idle(client)
            return
        self.stats.dropped_idle += 1
        _LOGGER.debug(
            "%s: virtual node client %s silent for %.0f s, closed",
            self.link.name,
            client.address,
            self.idle_timeout,
        )
        self._close(client)

    # -- from clients ------------------------------------------------------------

    def _received(self, client: _Client, data: bytes) -> None:
        client.last_rx = asyncio.get_running_loop().time()
        client.last_seen = time.time()
        decoder = client.decoder
        for payload in decoder.feed(data):
            if client.closed:
                break
            self._handle_to_radio(client, payload)
        self.stats.oversize_frames += decoder.stats.oversize_frames
        decoder.stats.oversize_frames = 0

    def _handle_to_radio(self, client: _Client, payload: bytes) -> None:
        """``PhoneAPI::handleToRadio`` of the virtual node."""
        if not payload:
            return  # zero-length frame: keepalive
        message = mesh_pb2.ToRadio()
        try:
            message.ParseFromString(payload)
        except (DecodeError, RuntimeWarning):
            self.stats.decode_errors += 1
            _LOGGER.debug(
                "%s: malformed ToRadio from %s ignored", self.link.name, client.address
            )
            return
        kind = message.WhichOneof("payload_variant")
        if kind == "want_config_id":
            self._start_config(client, int(message.want_config_id))
        elif kind == "heartbeat":
            client.heartbeats += 1
            self.stats.heartbeats += 1
            if message.heartbeat.nonce == 1:  # asks for a NodeInfo broadcast
                self._enqueue(client, message)
            if client.nonce is not None:
                status = mesh_pb2.FromRadio()
                status.queueStatus.free = self._node_free
                status.queueStatus.maxlen = self._node_maxlen
                self._send([client], status)
        elif kind == "mqttClientProxyMessage":
            client.proxy_dropped += 1
            self.stats.proxy_messages_dropped += 1
            _LOGGER.debug(
                "%s: MQTT proxy message from virtual node client %s dropped "
                "(Home Assistant is the node's MQTT proxy)",
                self.link.name,
                client.address,
            )
            self._changed()
        elif kind == "disconnect":
            self.stats.disconnect_requests += 1
            self._close(client)
        elif kind in _FORWARDED:
            if kind == "packet":
                client.packets += 1
                self.stats.packets_from_clients += 1
            self._enqueue(client, message)

    def _start_config(self, client: _Client, nonce: int) -> None:
        """Answer ``want_config_id`` from the cache (or once the node is known)."""
        client.nonce = nonce
        db = self._db
        if db is None:
            if not client.waiting:
                client.waiting = True
                self.stats.handshakes_deferred += 1
            return
        client.waiting = False
        self._send([client], *db.handshake(nonce))
        if client.closed:
            return
        client.live = True
        self._live = None
        client.handshakes += 1
        self.stats.handshakes += 1
        self._changed()

    def _enqueue(self, client: _Client, message: mesh_pb2.ToRadio) -> None:
        queue = client.queue
        if len(queue) >= self.client_queue_limit:
            queue.popleft()
            self._dropped(client, "queue_full")
        queue.append(_Queued(message, asyncio.get_running_loop().time()))
        if client not in self._turns:
            self._turns.append(client)
        self._work.set()

    def _dropped(self, client: _Client, reason: str) -> None:
        client.packets_dropped += 1
        self.stats.packets_dropped[reason] += 1
        self._changed()

    # -- to the node -------------------------------------------------------------

    async def _forward_loop(self) -> None:
        """Write queued client messages to the node: in order per client, in turns."""
        loop = asyncio.get_running_loop()
        while True:
            await self._work.wait()
            if not self._turns or not self.link.ready:
                self._work.clear()
                continue
            client = self._turns.popleft()
            item = client.queue.popleft()
            if client.queue:
                self._turns.append(client)
            if loop.time() - item.received > self.packet_max_age:
                self._dropped(client, "expired")
                continue
            message = item.message
            if message.WhichOneof("payload_variant") == "packet":
                await self._forward_packet(client, message.packet)
                continue
            # Re-serialising a parsed ToRadio never makes it longer: it fits.
            self.link.send(message)
            self.stats.forwarded += 1
            self._changed()
            await self.link.drain()

    async def _forward_packet(
        self, client: _Client, packet: mesh_pb2.MeshPacket
    ) -> None:
        """Send one client packet and wait for the node's ``queueStatus`` for it.

        One packet at a time: the firmware keeps only two ``queueStatus``
        answers for its client (``MAX_RX_QUEUESTATUS_TOPHONE``), and each
        client's TX-slot accounting depends on getting its own.
        """
        if not packet.id:  # the firmware would number it; routing needs the id
            packet.id = random.randint(1, 0xFFFFFFFF)
        packet_id = int(packet.id)
        self._origins[packet_id] = client
        self._origins.move_to_end(packet_id)
        while len(self._origins) > _ORIGINS_MAX:
            self._origins.popitem(last=False)
        try:
            await self.link.send_packet(packet, timeout=self.queue_status_timeout)
        except FrameTooLargeError:
            self._dropped(client, "too_large")
            return
        except LinkNotReadyError:
            pass  # written, then the link went down: the node may have it
        self.stats.forwarded += 1
        if self._changes_settings(packet):
            self._schedule_refresh()
        self._changed()

    def _changes_settings(self, packet: mesh_pb2.MeshPacket) -> bool:
        """Whether ``packet`` is an admin message changing this node's settings."""
        if not packet.HasField("decoded") or packet.decoded.portnum != _ADMIN:
            return False
        db = self._db
        if packet.to and (db is None or packet.to != db.node_num):
            return False  # remote administration of another node
        admin = admin_pb2.AdminMessage()
        try:
            admin.ParseFromString(packet.decoded.payload)
        except (DecodeError, RuntimeWarning):
            return False
        return admin.WhichOneof("payload_variant") in _CONFIG_CHANGES

    def _schedule_refresh(self) -> None:
        if self._refresh_handle is not None:
            self._refresh_handle.cancel()
        self._refresh_handle = asyncio.get_running_loop().call_later(
            self.refresh_delay, self._refresh
        )

    def _refresh(self) -> None:
        self._refresh_handle = None
        if self.link.request_config():
            self.stats.config_refreshes += 1
            _LOGGER.debug("%s: re-reading the node's settings", self.link.name)
        # Else the node is away or already re-read: its next handshake refreshes.

    # -- to clients --------------------------------------------------------------

    def _live_clients(self) -> list[_Client]:
        """The clients that completed a handshake (cached; never mutated in place)."""
        live = self._live
        if live is None:
            live = self._live = [c for c in self._clients.values() if c.live]
        return live

    def _write_all(self, clients: Sequence[_Client], body: bytes) -> None:
        """Write one message (``body``: serialized, no ``id``) to each client.

        The hot path of live traffic: per client one frame (own ``id``) and one
        ``transport.write``, which sends at once when nothing is buffered;
        only a client whose buffer then exceeds the limit takes the slow path.
        """
        limit = self.send_buffer_limit
        written = 0
        for client in clients:  # open: closing one empties the live cache
            client.from_radio_id = message_id = (
                client.from_radio_id + 1
            ) & 0xFFFFFFFF or 1
            transport = client.transport
            transport.write(_frame_with_id(body, message_id))
            client.messages += 1
            written += 1
            if transport.get_write_buffer_size() > limit:
                self._drop_slow(client)
        self.stats.messages_to_clients += written

    def _send(self, clients: Iterable[_Client], *messages: mesh_pb2.FromRadio) -> None:
        """Write ``messages`` to each client; drop a client that does not read."""
        targets = [client for client in clients if not client.closed]
        if not targets:
            return
        bodies = [_serialize(message) for message in messages]
        if len(bodies) == 1:
            self._write_all(targets, bodies[0])
            return
        for client in targets:
            frames = []
            for body in bodies:
                client.from_radio_id = (client.from_radio_id + 1) & 0xFFFFFFFF or 1
                frames.append(_frame_with_id(body, client.from_radio_id))
            transport = client.transport
            transport.write(b"".join(frames))  # a handshake: one write
            client.messages += len(frames)
            self.stats.messages_to_clients += len(frames)
            if transport.get_write_buffer_size() > self.send_buffer_limit:
                self._drop_slow(client)

    def _drop_slow(self, client: _Client) -> None:
        self.stats.dropped_slow += 1
        _LOGGER.info(
            "%s: virtual node client %s does not read (over %d bytes unsent), dropped",
            self.link.name,
            client.address,
            self.send_buffer_limit,
        )
        self._close(client, abort=True)

    def _load(self, messages: Sequence[mesh_pb2.FromRadio]) -> bool:
        try:
            self._db = NodeDb(messages, max_nodes=self.max_nodes)
        except ValueError as err:
            _LOGGER.warning("%s: node state not usable: %s", self.link.name, err)
            return False
        return True

    def _changed(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                _LOGGER.exception("%s: virtual node listener failed", self.link.name)
