"""Asyncio client of the Meshtastic stream API (TCP port 4403 or serial).

:class:`NodeLink` keeps one connection to a node alive: it connects, performs the
``want_config_id`` handshake with a fresh nonce, collects the node's state until
``config_complete_id`` (a :class:`NodeSnapshot`), then delivers live
``FromRadio`` traffic to its listeners. It sends ``ToRadio.heartbeat`` (nonce 0,
never 1, which forces a NodeInfo broadcast over RF) well inside the firmware's
15-minute idle timeout, declares a silent link dead, and reconnects with
exponential backoff and jitter (1 s to 60 s), handshaking afresh each time.
``FromRadio.rebooted`` ends the session and starts a new handshake.

Sources: firmware ``src/mesh/PhoneAPI.cpp`` (handshake states, heartbeat ->
``queueStatus`` since 2.7.4), ``src/mesh/StreamAPI.cpp`` (framing),
``src/mesh/api/ServerAPI.cpp`` (single TCP client, ``TCP_IDLE_TIMEOUT_MS``).

No thread is started and nothing blocks the event loop. This module imports
nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
import contextlib
from dataclasses import dataclass, field
import enum
import logging
import random
import socket
import time
from typing import Any, Protocol

from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from meshtastic.protobuf import (
    channel_pb2,
    config_pb2,
    localonly_pb2,
    mesh_pb2,
    module_config_pb2,
    portnums_pb2,
    telemetry_pb2,
)

from .backoff import Backoff
from .rules import node_id
from .stream import WAKE_BYTES, FrameDecoder, encode_frame

_LOGGER = logging.getLogger(__name__)

DEFAULT_TCP_PORT = 4403
DEFAULT_BAUDRATE = 115200
# Nonces the firmware gives a meaning (PhoneAPI: SPECIAL_NONCE_ONLY_CONFIG/ONLY_NODES).
_RESERVED_NONCES = {0, 69420, 69421}
# Handshake items the proxy has no use for (PhoneAPI STATE_SEND_UIDATA,
# STATE_SEND_FILEMANIFEST; lockdown builds' status).
_HANDSHAKE_EXTRAS = {"deviceuiConfig", "fileInfo", "lockdown_status"}
# Every FromRadio kind a handshake consists of (config_complete_id excluded).
_HANDSHAKE_KINDS = _HANDSHAKE_EXTRAS | {
    "my_info",
    "node_info",
    "metadata",
    "channel",
    "config",
    "moduleConfig",
}


class StreamWriterLike(Protocol):
    """The part of :class:`asyncio.StreamWriter` the link uses (serialx matches it)."""

    def write(self, data: bytes) -> None:
        """Queue bytes for sending."""

    async def drain(self) -> None:
        """Wait until the write buffer is below its high-water mark."""

    def close(self) -> None:
        """Close the transport."""

    async def wait_closed(self) -> None:
        """Wait until closed."""

    def is_closing(self) -> bool:
        """Return whether the transport is closing."""


type Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, StreamWriterLike]]]


def tcp_connector(host: str, port: int = DEFAULT_TCP_PORT) -> Connector:
    """Return a connector opening a TCP stream to a node (``TCP_NODELAY`` and keepalive on)."""

    async def connect() -> tuple[asyncio.StreamReader, StreamWriterLike]:
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                if hasattr(socket, "TCP_KEEPIDLE"):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        return reader, writer

    return connect


def serial_connector(device: str, baudrate: int = DEFAULT_BAUDRATE) -> Connector:
    """Return a connector opening a serial port with ``serialx`` (exclusive access)."""

    async def connect() -> tuple[asyncio.StreamReader, StreamWriterLike]:
        import serialx

        try:
            return await serialx.open_serial_connection(device, baudrate=baudrate)
        except serialx.SerialException as err:
            raise OSError(str(err)) from err

    return connect


class LinkState(enum.StrEnum):
    """Connection state of a :class:`NodeLink`."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    HANDSHAKING = "handshaking"
    READY = "ready"
    STOPPED = "stopped"


class LinkError(Exception):
    """The node link failed; the message says why."""


class LinkNotReadyError(LinkError):
    """A send was attempted while the node is not connected and configured."""


class _NodeRebootedError(LinkError):
    """The node announced ``FromRadio.rebooted``."""


@dataclass(slots=True)
class NodeSnapshot:
    """Everything the node reported in its handshake, kept current by live updates.

    ``channels`` has one entry per index 0..7 (DISABLED where unused); ``nodes``
    maps node numbers to ``NodeInfo``, including this node.
    """

    my_info: mesh_pb2.MyNodeInfo = field(default_factory=mesh_pb2.MyNodeInfo)
    metadata: mesh_pb2.DeviceMetadata | None = None
    nodes: dict[int, mesh_pb2.NodeInfo] = field(default_factory=dict)
    channels: list[channel_pb2.Channel] = field(default_factory=list)
    config: localonly_pb2.LocalConfig = field(default_factory=localonly_pb2.LocalConfig)
    module_config: localonly_pb2.LocalModuleConfig = field(
        default_factory=localonly_pb2.LocalModuleConfig
    )

    @property
    def node_num(self) -> int:
        """This node's number."""
        return int(self.my_info.my_node_num)

    @property
    def node_id(self) -> str:
        """This node's id, ``!xxxxxxxx`` (the gateway id in envelopes)."""
        return node_id(self.node_num)

    @property
    def user(self) -> mesh_pb2.User:
        """This node's ``User`` (names, hardware model)."""
        info = self.nodes.get(self.node_num)
        return info.user if info is not None else mesh_pb2.User()

    @property
    def long_name(self) -> str:
        """The node's long name, or its id when unnamed."""
        return self.user.long_name or self.node_id

    @property
    def firmware_version(self) -> str | None:
        """Firmware version from the metadata (e.g. ``2.7.15.567b8ea``)."""
        return self.metadata.firmware_version if self.metadata else None

    @property
    def hw_model(self) -> str | None:
        """Hardware model name (e.g. ``TBEAM``), if known."""
        model = self.user.hw_model or (self.metadata.hw_model if self.metadata else 0)
        if not model:
            return None
        try:
            return mesh_pb2.HardwareModel.Name(mesh_pb2.HardwareModel.ValueType(model))
        except ValueError:
            return str(model)

    @property
    def mqtt(self) -> module_config_pb2.ModuleConfig.MQTTConfig:
        """The node's MQTT module settings."""
        return self.module_config.mqtt

    @property
    def lora(self) -> config_pb2.Config.LoRaConfig:
        """The node's LoRa settings (modem preset)."""
        return self.config.lora

    def node_name(self, num: int) -> str | None:
        """Return the long name of a known node, else ``None``."""
        info = self.nodes.get(num)
        if info is None or not info.user.long_name:
            return None
        return info.user.long_name

    def proxy_key(self) -> bytes:
        """Return a digest of what the proxy depends on (MQTT, channels, LoRa)."""
        parts = [self.mqtt.SerializeToString(deterministic=True)]
        parts.extend(c.SerializeToString(deterministic=True) for c in self.channels)
        parts.append(self.lora.SerializeToString(deterministic=True))
        parts.append(str(self.node_num).encode())
        return b"\x00".join(parts)


def _apply_oneof(target: Any, message: Any) -> bool:
    """Copy the set oneof section of ``message`` into the same field of ``target``."""
    section = message.WhichOneof("payload_variant")
    if section is None or section not in target.DESCRIPTOR.fields_by_name:
        return False
    getattr(target, section).CopyFrom(getattr(message, section))
    return True


def apply_from_radio(snapshot: NodeSnapshot, msg: mesh_pb2.FromRadio) -> bool:
    """Fold a handshake/config ``FromRadio`` into ``snapshot``; return whether it was one."""
    kind = msg.WhichOneof("payload_variant")
    if kind == "my_info":
        snapshot.my_info.CopyFrom(msg.my_info)
    elif kind == "metadata":
        snapshot.metadata = mesh_pb2.DeviceMetadata()
        snapshot.metadata.CopyFrom(msg.metadata)
    elif kind == "node_info":
        info = mesh_pb2.NodeInfo()
        info.CopyFrom(msg.node_info)
        snapshot.nodes[int(info.num)] = info
    elif kind == "channel":
        channel = msg.channel
        index = int(channel.index)
        if not 0 <= index < 8:
            return True
        while len(snapshot.channels) <= index:
            snapshot.channels.append(
                channel_pb2.Channel(
                    index=len(snapshot.channels), role=channel_pb2.Channel.DISABLED
                )
            )
        snapshot.channels[index].CopyFrom(channel)
    elif kind == "config":
        _apply_oneof(snapshot.config, msg.config)
    elif kind == "moduleConfig":
        _apply_oneof(snapshot.module_config, msg.moduleConfig)
    else:
        return False
    return True


_FROM_RADIO_PROXY_FIELD = mesh_pb2.FromRadio.DESCRIPTOR.fields_by_name[
    "mqttClientProxyMessage"
].number
_PROXY_TOPIC_FIELD = mesh_pb2.MqttClientProxyMessage.DESCRIPTOR.fields_by_name[
    "topic"
].number


def undecodable_proxy_topic(payload: bytes) -> bytes | None:
    """Return the raw topic if an undecodable ``FromRadio`` is an MQTT proxy uplink.

    protobuf refuses a whole ``FromRadio`` whose ``string`` field holds invalid
    UTF-8 (e.g. a channel name the firmware copied byte for byte). Parsed as
    an empty message, every field stays an unknown field with its raw bytes,
    so the uplink can still be recognised and counted. Returns ``None`` for
    anything else (including garbage).
    """
    outer = empty_pb2.Empty()
    try:
        outer.ParseFromString(payload)
        for field_ in UnknownFieldSet(outer):
            if field_.field_number == _FROM_RADIO_PROXY_FIELD and isinstance(
                field_.data, bytes
            ):
                inner = empty_pb2.Empty()
                inner.ParseFromString(field_.data)
                for item in UnknownFieldSet(inner):
                    if item.field_number == _PROXY_TOPIC_FIELD and isinstance(
                        item.data, bytes
                    ):
                        return item.data
                return b""
    except (DecodeError, RuntimeWarning):
        return None
    return None


class NodeLinkListener:
    """Receives :class:`NodeLink` events; override what you need.

    Callbacks run in the event loop and must not block or raise.
    """

    def on_state(self, state: LinkState) -> None:
        """The link state changed."""

    def on_ready(self, snapshot: NodeSnapshot) -> None:
        """A handshake completed (``config_complete_id`` received)."""

    def on_config_changed(self, snapshot: NodeSnapshot) -> None:
        """The node sent a live config, channel or module config update."""

    def on_packet(self, packet: mesh_pb2.MeshPacket) -> None:
        """A mesh packet reached the node (``FromRadio.packet``)."""

    def on_proxy_message(self, message: mesh_pb2.MqttClientProxyMessage) -> None:
        """The node handed over an MQTT uplink (``mqttClientProxyMessage``)."""

    def on_invalid_proxy_message(self, topic: bytes) -> None:
        """An uplink that cannot be decoded (its topic is not UTF-8) was lost.

        ``topic`` is the raw topic bytes, for logs.
        """

    def on_telemetry(self, metrics: telemetry_pb2.DeviceMetrics) -> None:
        """The node reported its own device metrics (handshake or telemetry packet)."""

    def on_from_radio(self, message: mesh_pb2.FromRadio) -> None:
        """Every decoded ``FromRadio`` the node sent after ``config_complete_id``.

        Called before the link's own handling of the message (so also for
        ``rebooted``, ``mqttClientProxyMessage`` and ``queueStatus``), never for
        the items of a handshake, including a refresh (:meth:`NodeLink.request_config`).
        The message is shared: do not modify it.
        """

    # A listener may also define ``on_from_radio_frame(message, payload)``
    # (see :meth:`NodeLink._emit_from_radio`); it is not declared here so that
    # listeners without it keep getting :meth:`on_from_radio`.


@dataclass(slots=True)
class _Refresh:
    """A handshake requested on a live connection (:meth:`NodeLink.request_config`)."""

    nonce: int
    snapshot: NodeSnapshot = field(default_factory=NodeSnapshot)
    messages: list[mesh_pb2.FromRadio] = field(default_factory=list)


@dataclass(slots=True)
class LinkStats:
    """Counters of one :class:`NodeLink` since it was created."""

    connects: int = 0
    handshakes: int = 0
    failures: int = 0
    frames_rx: int = 0
    frames_tx: int = 0
    decode_errors: int = 0
    garbage_bytes: int = 0
    oversize_frames: int = 0
    last_error: str | None = None
    refreshes: int = 0


class NodeLink:
    """Keeps one stream API connection to a Meshtastic node alive.

    ``run()`` loops until cancelled. ``heartbeat_interval`` (seconds, default 60)
    must stay well below the firmware's 900 s idle timeout; the link is declared
    dead after ``silence_timeout`` seconds without any frame once the node has
    shown it answers heartbeats (firmware >= 2.7.4), and a handshake that stalls
    for ``handshake_timeout`` seconds fails.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        name: str = "node",
        heartbeat_interval: float = 60.0,
        silence_timeout: float = 150.0,
        handshake_timeout: float = 30.0,
        connect_timeout: float = 15.0,
        backoff: Backoff | None = None,
    ) -> None:
        """Prepare a link; nothing connects until :meth:`run`."""
        self._connector = connector
        self.name = name
        self.heartbeat_interval = heartbeat_interval
        self.silence_timeout = silence_timeout
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.state = LinkState.DISCONNECTED
        self.snapshot: NodeSnapshot | None = None
        self.stats = LinkStats()
        self.metrics: telemetry_pb2.DeviceMetrics | None = None
        self._listeners: list[NodeLinkListener] = []
        self._writer: StreamWriterLike | None = None
        self._last_rx = 0.0
        self._live_armed = False
        self._pending: dict[int, asyncio.Future[mesh_pb2.QueueStatus]] = {}
        self._nonce_rng = random.Random()
        # Items of the last complete handshake, in the order the node sent them
        # (``config_complete_id`` excluded), for replay by a virtual node.
        self.handshake_messages: tuple[mesh_pb2.FromRadio, ...] = ()
        self._handshake_log: list[mesh_pb2.FromRadio] = []
        self._refresh: _Refresh | None = None
        # Woken on every state change (wait_settled).
        self._state_changed = asyncio.Event()

    # -- listeners -----------------------------------------------------------

    def add_listener(self, listener: NodeLinkListener) -> Callable[[], None]:
        """Register ``listener``; return a function that removes it."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def _emit(self, method: str, *args: Any) -> None:
        for listener in list(self._listeners):
            try:
                getattr(listener, method)(*args)
            except Exception:
                _LOGGER.exception("%s: listener %s failed", self.name, method)

    def _set_state(self, state: LinkState) -> None:
        if state != self.state:
            self.state = state
            self._state_changed.set()
            self._state_changed = asyncio.Event()
            self._emit("on_state", state)

    async def wait_settled(self, timeout: float) -> None:
        """Wait while the link is on its way to ready, at most ``timeout`` seconds.

        Returns at once, or as soon as the state is no longer ``CONNECTING`` or
        ``HANDSHAKING`` (also a settings re-read, :meth:`request_config`): ready,
        disconnected (the node is away; waiting would rarely help) or stopped.
        Never raises for the timeout; the caller's send then succeeds or fails
        as usual.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.state in (LinkState.CONNECTING, LinkState.HANDSHAKING):
            try:
                async with asyncio.timeout_at(deadline):
                    await self._state_changed.wait()
            except TimeoutError:
                return

    # -- sending ---------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the handshake completed and the link is live."""
        return self.state is LinkState.READY and self._writer is not None

    def send(self, message: mesh_pb2.ToRadio) -> None:
        """Frame and write one ``ToRadio`` (non-blocking; see :meth:`drain`).

        Raises:
            LinkNotReadyError: the link is not live.
            FrameTooLargeError: the encoded message exceeds 512 bytes.

        """
        if not self.ready or self._writer is None:
            raise LinkNotReadyError(f"{self.name} is not connected")
        self._writer.write(encode_frame(message.SerializeToString()))
        self.stats.frames_tx += 1

    @property
    def refreshing(self) -> bool:
        """Whether a :meth:`request_config` handshake is under way."""
        return self._refresh is not None

    def request_config(self) -> bool:
        """Ask the live node for its whole state again (a new ``want_config_id``).

        Used after a client changed the node's settings through admin messages
        that do not reboot it. The firmware restarts its handshake state machine
        on the open connection (``PhoneAPI::handleStartConfig``) and ignores proxy
        downlinks until it completes, so the link is ``HANDSHAKING`` meanwhile
        (:meth:`send` raises :class:`LinkNotReadyError`); on the matching
        ``config_complete_id`` it replaces :attr:`snapshot` and
        :attr:`handshake_messages`, goes ``READY`` again and calls ``on_ready``.
        A refresh that stalls for ``handshake_timeout`` seconds ends the
        connection (reconnect with a full handshake).

        Returns ``False`` (and does nothing) unless the link is ready and no
        refresh is under way.
        """
        writer = self._writer
        if not self.ready or writer is None or self._refresh is not None:
            return False
        nonce = self._new_nonce()
        self._refresh = _Refresh(nonce)
        writer.write(
            encode_frame(mesh_pb2.ToRadio(want_config_id=nonce).SerializeToString())
        )
        self.stats.frames_tx += 1
        self._set_state(LinkState.HANDSHAKING)
        return True

    def write_buffer_size(self) -> int:
        """Bytes waiting in the transport's write buffer (1 if unknown or down)."""
        writer = self._writer
        transport = getattr(writer, "transport", None)
        if transport is None or not self.ready:
            return 1
        try:
            return int(transport.get_write_buffer_size())
        except (AttributeError, NotImplementedError):
            return 1

    async def drain(self) -> None:
        """Wait until the transport can take more data (flow control)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(ConnectionError, OSError):
                await writer.drain()

    async def send_packet(
        self, packet: mesh_pb2.MeshPacket, timeout: float = 5.0
    ) -> mesh_pb2.QueueStatus | None:
        """Send a mesh packet and wait for the node's ``queueStatus`` for it.

        Gives the packet a random id when it has none. Returns the
        ``QueueStatus`` (``res`` 0 = queued) or ``None`` if the node did not
        answer within ``timeout`` seconds (firmware older than 2.7).

        Raises:
            LinkNotReadyError: the link is not live.

        """
        if not packet.id:
            packet.id = self._nonce_rng.randint(1, 0xFFFFFFFF)
        future: asyncio.Future[mesh_pb2.QueueStatus] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[int(packet.id)] = future
        try:
            self.send(mesh_pb2.ToRadio(packet=packet))
            await self.drain()
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return None
        finally:
            self._pending.pop(int(packet.id), None)

    # -- main loop ---------------------------------------------------------------

    async def run(self) -> None:
        """Connect, handshake and serve forever, reconnecting with backoff."""
        try:
            while True:
                delay = await self._attempt()
                self._set_state(LinkState.DISCONNECTED)
                await asyncio.sleep(delay)
        finally:
            self._set_state(LinkState.STOPPED)

    async def _attempt(self) -> float:
        """Run one connection; return the delay before the next attempt."""
        self._set_state(LinkState.CONNECTING)
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await self._connector()
        except (OSError, TimeoutError) as err:
            return self._failed(f"cannot connect: {err or type(err).__name__}")
        except Exception as err:
            _LOGGER.debug("%s: unexpected connect error", self.name, exc_info=True)
            return self._failed(f"cannot connect: {type(err).__name__}: {err}")
        self.stats.connects += 1
        self._writer = writer
        try:
            await self._session(reader)
        except _NodeRebootedError:
            _LOGGER.info("%s: node rebooted, handshaking again", self.name)
            self.backoff.reset()
            return 1.0
        except (LinkError, OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            return self._failed(str(err) or type(err).__name__)
        finally:
            self._writer = None
            self._fail_pending()
            writer.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await writer.wait_closed()
        return self._failed("connection closed by the node")

    def _failed(self, reason: str) -> float:
        self.stats.failures += 1
        self.stats.last_error = reason
        delay = self.backoff.next_delay()
        _LOGGER.debug("%s: %s; retrying in %.1f s", self.name, reason, delay)
        return delay

    def _fail_pending(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkNotReadyError(f"{self.name} disconnected"))
                future.exception()  # mark retrieved
        self._pending.clear()

    def _new_nonce(self) -> int:
        while True:
            nonce = self._nonce_rng.randint(2, 0xFFFFFFFF)
            if nonce not in _RESERVED_NONCES:
                return nonce

    async def _session(self, reader: asyncio.StreamReader) -> None:
        """Handshake on the open connection, then serve until it ends."""
        decoder = FrameDecoder(on_garbage=self._log_text)
        writer = self._writer
        assert writer is not None
        nonce = self._new_nonce()
        writer.write(
            WAKE_BYTES
            + encode_frame(mesh_pb2.ToRadio(want_config_id=nonce).SerializeToString())
        )
        self.stats.frames_tx += 1
        self._set_state(LinkState.HANDSHAKING)
        self._live_armed = False
        self._handshake_log = []
        self._refresh = None
        snapshot = NodeSnapshot()
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        complete = False
        heartbeat: asyncio.Task[None] | None = None
        try:
            while True:
                timeout = (
                    self.handshake_timeout if not complete or self.refreshing else None
                )
                try:
                    async with asyncio.timeout(timeout):
                        data = await reader.read(65536)
                except TimeoutError:
                    raise LinkError(
                        f"handshake stalled for {self.handshake_timeout:.0f} s"
                    ) from None
                if not data:
                    break
                self._last_rx = loop.time()
                for payload in decoder.feed(data):
                    message = self._decode(payload)
                    if message is None:
                        continue
                    if not complete:
                        if message.WhichOneof("payload_variant") in _HANDSHAKE_KINDS:
                            self._handshake_log.append(message)
                        if self._handshake_step(snapshot, message, nonce):
                            complete = True
                            heartbeat = asyncio.create_task(
                                self._heartbeat_loop(), name=f"{self.name} heartbeat"
                            )
                    elif not self.refreshing or not self._refresh_step(message):
                        self._handle_live(message, payload)
                self._sync_decoder_stats(decoder)
        finally:
            self._refresh = None
            self._sync_decoder_stats(decoder)
            if heartbeat is not None:
                heartbeat.cancel()
                await asyncio.wait({heartbeat})
        if heartbeat is not None and not heartbeat.cancelled():
            err = heartbeat.exception()
            if err is not None:
                raise err  # the heartbeat loop declared the link dead

    def _sync_decoder_stats(self, decoder: FrameDecoder) -> None:
        stats = decoder.stats
        self.stats.garbage_bytes += stats.garbage_bytes
        self.stats.oversize_frames += stats.oversize_frames
        self.stats.frames_rx += stats.frames
        stats.garbage_bytes = stats.oversize_frames = stats.frames = 0

    def _decode(self, payload: bytes) -> mesh_pb2.FromRadio | None:
        if not payload:
            return None  # zero-length keepalive frame
        message = mesh_pb2.FromRadio()
        try:
            message.ParseFromString(payload)
        except (DecodeError, RuntimeWarning):
            self.stats.decode_errors += 1
            _LOGGER.debug(
                "%s: undecodable FromRadio (%d bytes)", self.name, len(payload)
            )
            topic = undecodable_proxy_topic(payload)
            if topic is not None and self.snapshot is not None:
                self._emit("on_invalid_proxy_message", topic)
            return None
        return message

    def _handshake_step(
        self, snapshot: NodeSnapshot, message: mesh_pb2.FromRadio, nonce: int
    ) -> bool:
        """Fold one handshake message in; return True on our ``config_complete_id``."""
        kind = message.WhichOneof("payload_variant")
        if kind == "config_complete_id":
            if message.config_complete_id != nonce:
                return False  # stale answer to an earlier request
            if not snapshot.my_info.my_node_num:
                raise LinkError("handshake completed without my_info")
            self.stats.handshakes += 1
            self.backoff.reset()
            self.stats.last_error = None
            self._adopt(snapshot, self._handshake_log)
            return True
        if kind == "rebooted":
            raise _NodeRebootedError("rebooted during handshake")
        if not apply_from_radio(snapshot, message) and kind not in _HANDSHAKE_EXTRAS:
            _LOGGER.debug("%s: %s before config complete, ignored", self.name, kind)
        return False

    def _adopt(
        self, snapshot: NodeSnapshot, messages: Iterable[mesh_pb2.FromRadio]
    ) -> None:
        """Use a completed handshake (first or refresh): snapshot, metrics, READY."""
        self.snapshot = snapshot
        self.handshake_messages = tuple(messages)
        own = snapshot.nodes.get(snapshot.node_num)
        if own is not None and own.HasField("device_metrics"):
            self._update_metrics(own.device_metrics)
        self._set_state(LinkState.READY)
        self._emit("on_ready", snapshot)

    def _refresh_step(self, message: mesh_pb2.FromRadio) -> bool:
        """Fold one item of a refresh handshake in; ``False``: a live message."""
        refresh = self._refresh
        assert refresh is not None
        kind = message.WhichOneof("payload_variant")
        if kind == "config_complete_id":
            if message.config_complete_id != refresh.nonce:
                return True  # answer to an earlier request
            if not refresh.snapshot.my_info.my_node_num:
                raise LinkError("refresh completed without my_info")
            self._refresh = None
            self.stats.refreshes += 1
            self._adopt(refresh.snapshot, refresh.messages)
            return True
        if kind not in _HANDSHAKE_KINDS:
            return False
        apply_from_radio(refresh.snapshot, message)
        refresh.messages.append(message)
        return True

    def _emit_from_radio(
        self, message: mesh_pb2.FromRadio, payload: bytes | None
    ) -> None:
        """Give a live ``FromRadio`` to every listener, before the link handles it.

        A listener defining ``on_from_radio_frame(message, payload)`` gets that
        *instead of* :meth:`NodeLinkListener.on_from_radio`: ``payload`` is the
        frame's payload exactly as the node sent it (the serialized
        ``FromRadio`` without the 4-byte stream header, ``id`` included), so a
        relay can pass the node's bytes on without serializing ``message``
        again. Both are shared: do not modify them. ``payload`` ``None`` (a
        message not read from the stream) is serialized here, once.
        """
        for listener in list(self._listeners):
            try:
                framed = getattr(listener, "on_from_radio_frame", None)
                if framed is not None:
                    if payload is None:
                        payload = message.SerializeToString()
                    framed(message, payload)
                    continue
                callback = getattr(listener, "on_from_radio", None)
                if callback is not None:
                    callback(message)
            except Exception:
                _LOGGER.exception("%s: listener on_from_radio failed", self.name)

    def _handle_live(
        self, message: mesh_pb2.FromRadio, payload: bytes | None = None
    ) -> None:
        kind = message.WhichOneof("payload_variant")
        snapshot = self.snapshot
        assert snapshot is not None
        self._emit_from_radio(message, payload)
        if kind == "mqttClientProxyMessage":
            self._emit("on_proxy_message", message.mqttClientProxyMessage)
        elif kind == "packet":
            self._handle_packet(snapshot, message.packet)
        elif kind == "queueStatus":
            self._live_armed = True
            status = message.queueStatus
            future = self._pending.get(int(status.mesh_packet_id))
            if future is not None and not future.done():
                future.set_result(status)
        elif kind == "rebooted":
            raise _NodeRebootedError("node rebooted")
        elif kind in ("config", "moduleConfig", "channel"):
            apply_from_radio(snapshot, message)
            self._emit("on_config_changed", snapshot)
        elif kind in ("node_info", "my_info", "metadata"):
            apply_from_radio(snapshot, message)
        elif kind == "log_record":
            _LOGGER.debug("%s log: %s", self.name, message.log_record.message)
        elif kind == "clientNotification":
            _LOGGER.info(
                "%s notification: %s", self.name, message.clientNotification.message
            )

    def _handle_packet(
        self, snapshot: NodeSnapshot, packet: mesh_pb2.MeshPacket
    ) -> None:
        if packet.HasField("decoded"):
            sender = getattr(packet, "from")
            port = packet.decoded.portnum
            if port == portnums_pb2.PortNum.NODEINFO_APP:
                user = mesh_pb2.User()
                with contextlib.suppress(DecodeError, RuntimeWarning):
                    user.ParseFromString(packet.decoded.payload)
                    info = snapshot.nodes.setdefault(
                        int(sender), mesh_pb2.NodeInfo(num=sender)
                    )
                    info.user.CopyFrom(user)
            elif port == portnums_pb2.PortNum.TELEMETRY_APP and (
                sender == snapshot.node_num
            ):
                telemetry = telemetry_pb2.Telemetry()
                with contextlib.suppress(DecodeError, RuntimeWarning):
                    telemetry.ParseFromString(packet.decoded.payload)
                    if telemetry.HasField("device_metrics"):
                        self._update_metrics(telemetry.device_metrics)
        self._emit("on_packet", packet)

    def _update_metrics(self, metrics: telemetry_pb2.DeviceMetrics) -> None:
        self.metrics = telemetry_pb2.DeviceMetrics()
        self.metrics.CopyFrom(metrics)
        self._emit("on_telemetry", self.metrics)

    async def _heartbeat_loop(self) -> None:
        """Send heartbeats; raise :class:`LinkError` when the node went silent."""
        loop = asyncio.get_running_loop()
        heartbeat = mesh_pb2.ToRadio()
        heartbeat.heartbeat.SetInParent()  # nonce 0: no RF traffic (never 1)
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            silent = loop.time() - self._last_rx
            if self._live_armed and silent > self.silence_timeout:
                # Closing the writer ends the read loop in _session.
                reason = f"node silent for {silent:.0f} s"
                self.stats.last_error = reason
                _LOGGER.info("%s: %s, reconnecting", self.name, reason)
                if self._writer is not None:
                    self._writer.close()
                raise LinkError(reason)
            writer = self._writer
            if writer is None or writer.is_closing():
                return
            # Written directly: also during a refresh (state HANDSHAKING).
            writer.write(encode_frame(heartbeat.SerializeToString()))
            self.stats.frames_tx += 1

    def _log_text(self, data: bytes) -> None:
        if _LOGGER.isEnabledFor(logging.DEBUG):
            text = data.decode(errors="replace").strip()
            if text:
                _LOGGER.debug("%s console: %s", self.name, text[:200])


async def probe_node(connector: Connector, timeout: float = 20.0) -> NodeSnapshot:
    """Connect once, complete a handshake and disconnect; return the node's state.

    Used by the config flow to show the node before creating an entry.

    Raises:
        LinkError: the connection or handshake failed (message says why).
        TimeoutError: no complete handshake within ``timeout`` seconds.

    """
    link = NodeLink(connector, name="probe", handshake_timeout=timeout)
    ready: asyncio.Future[NodeSnapshot] = asyncio.get_running_loop().create_future()

    class _Probe(NodeLinkListener):
        def on_ready(self, snapshot: NodeSnapshot) -> None:
            if not ready.done():
                ready.set_result(snapshot)

    link.add_listener(_Probe())
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        reader, writer = await connector()
    link._writer = writer
    session = asyncio.create_task(link._session(reader))
    try:
        remaining = max(0.1, timeout - (time.monotonic() - started))
        waiting: set[asyncio.Future[Any]] = {session, ready}
        done, _ = await asyncio.wait(
            waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        if ready.done():
            with contextlib.suppress(LinkError, OSError):
                link.send(mesh_pb2.ToRadio(disconnect=True))
                await link.drain()
            return ready.result()
        if session in done:
            err = session.exception()
            raise LinkError(str(err) if err else "connection closed by the node")
        raise TimeoutError(f"no handshake within {timeout:.0f} s")
    finally:
        session.cancel()
        with contextlib.suppress(BaseException):
            await session
        if not ready.done():
            ready.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await writer.wait_closed()
