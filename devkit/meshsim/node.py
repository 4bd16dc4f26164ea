"""A simulated Meshtastic node speaking the stream API with MQTT client proxy.

Models the 2.7-branch firmware as described in
``shared/reference/meshtastic-proxy.md`` (sections 1-4 and the addendum):

- ``src/mesh/StreamAPI.cpp``: framing and the receive state machine
  (:mod:`devkit.meshsim.stream`);
- ``src/mesh/api/ServerAPI.cpp``: TCP server, one client at a time, a new
  connection force-closes the old one;
- ``src/mesh/PhoneAPI.cpp``: handshake states, heartbeat -> ``queueStatus``,
  proxy ``ToRadio`` ignored before ``config_complete_id`` (>= 2.7.13), idle
  timeout, ``getFromRadio`` priorities in the live state;
- ``src/mesh/MeshService.cpp``: global to-phone queues shared by every client
  (``toPhoneMqttProxyQueue`` = 8 entries drop-oldest, ``toPhoneQueue``,
  ``toPhoneQueueStatusQueue``), ``sendToMesh`` -> ``queueStatus``;
- ``src/mqtt/MQTT.cpp``: ``onSend`` uplink rules and envelopes, ``publish``
  truncation, ``onClientProxyReceive``/``onReceiveProto`` downlink rules with
  the exact channel-name match and the own-gateway implicit ACK.

Pure asyncio (callbacks, no tasks or threads of its own); every timer it arms
is cancelled by :meth:`SimulatedNode.stop`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable
import contextlib
import copy
from dataclasses import dataclass, field
import errno
import hashlib
import ipaddress
import logging
import os
import random
import time
import tty

from google.protobuf.message import DecodeError
from meshtastic.protobuf import (
    admin_pb2,
    channel_pb2,
    config_pb2,
    mesh_pb2,
    module_config_pb2,
    mqtt_pb2,
    portnums_pb2,
    telemetry_pb2,
)

from .crypto import DEFAULT_PSK, channel_hash, crypt, expand_psk
from .profile import MAX_NUM_CHANNELS, NodeProfile
from .stream import Frame, FrameParser, RejectedHeader, encode_frame

_LOGGER = logging.getLogger(__name__)

BROADCAST_NUM = 0xFFFFFFFF
#: ``SPECIAL_NONCE_ONLY_CONFIG`` / ``SPECIAL_NONCE_ONLY_NODES`` (``src/mesh/PhoneAPI.h``).
SPECIAL_NONCE_ONLY_CONFIG = 69420
SPECIAL_NONCE_ONLY_NODES = 69421
#: Queue depths (``src/mesh/mesh-pb-constants.h``).
MAX_RX_MQTTPROXY_TOPHONE = 8
MAX_RX_QUEUESTATUS_TOPHONE = 2
MAX_TX_QUEUE = 16
#: nanopb field limits (``src/mesh/generated/meshtastic/mesh.pb.h``), in bytes.
PROXY_TOPIC_MAX = 59  # char topic[60]
PROXY_DATA_MAX = 435  # pb_bytes_array data[435]
PROXY_TEXT_MAX = 434  # char text[435]
DATA_PAYLOAD_MAX = 233
ENCRYPTED_MAX = 256
PUBLIC_KEY_MAX = 32
XMODEM_BUFFER_MAX = 128
#: ``HOP_MAX`` (``src/mesh/MeshTypes.h``).
HOP_MAX = 7
#: ``default_mqtt_address`` (``src/mesh/Default.h``).
DEFAULT_MQTT_ADDRESS = "mqtt.meshtastic.org"
#: ``BITFIELD_OK_TO_MQTT_MASK`` / ``BITFIELD_WANT_RESPONSE_MASK`` (``src/mesh/MeshTypes.h``).
BITFIELD_OK_TO_MQTT = 0x01
BITFIELD_WANT_RESPONSE = 0x02
#: ``PacketHistory`` capacity used for duplicate suppression (approximate).
PACKET_HISTORY_SIZE = 100
#: Bytes kept for a serial host that is not reading (a UART drops the rest).
SERIAL_OUT_MAX = 64 * 1024
#: Bound of :attr:`SimulatedNode.from_radio`.
FROM_RADIO_LOG_MAX = 2000
#: ``DEFAULT_REBOOT_SECONDS`` (``src/configuration.h``): delay of the reboot that
#: ``AdminModule::saveChanges`` schedules after a settings change.
DEFAULT_REBOOT_SECONDS = 7.0

_PORT = portnums_pb2.PortNum
_TEXT = _PORT.TEXT_MESSAGE_APP
_ROUTING = _PORT.ROUTING_APP

#: Classic-ESP32 boards: ``MAX_RX_TOPHONE`` is 8 there, 32 elsewhere.
_CLASSIC_ESP32 = frozenset(
    {
        "TLORA_V2",
        "TLORA_V1",
        "TLORA_V2_1_1P6",
        "TBEAM",
        "HELTEC_V2_0",
        "TBEAM_V0P7",
        "TLORA_V1_1P3",
        "HELTEC_V2_1",
        "HELTEC_V1",
        "RAK11200",
        "NANO_G1",
        "TLORA_V2_1_1P8",
        "NANO_G1_EXPLORER",
        "STATION_G1",
        "M5STACK",
        "DIY_V1",
    }
)
#: Boards without WiFi (nRF52, RP2040, STM32): ``DeviceMetadata.hasWifi`` false.
_NO_WIFI = frozenset(
    {
        "T_ECHO",
        "RAK4631",
        "NRF52_UNKNOWN",
        "NRF52840_PCA10059",
        "NANO_G2_ULTRA",
        "WIO_WM1110",
        "RAK2560",
        "T_ECHO_PLUS",
        "CANARYONE",
        "TRACKER_T1000_E",
        "HELTEC_MESH_NODE_T114",
        "SEEED_XIAO_NRF52840_KIT",
        "RPI_PICO",
        "RP2040_LORA",
        "RAK11310",
        "SENSELORA_RP2040",
        "RAK3172",
        "WIO_E5",
        "PORTDUINO",
    }
)

_NOTHING = "nothing"  # STATE_SEND_NOTHING
_CONFIG = "config"  # STATE_SEND_MY_INFO .. STATE_SEND_COMPLETE_ID
_LIVE = "live"  # STATE_SEND_PACKETS


def _from(packet: mesh_pb2.MeshPacket) -> int:
    return getattr(packet, "from")


def _set_from(packet: mesh_pb2.MeshPacket, value: int) -> None:
    setattr(packet, "from", value)


def _random_packet_id() -> int:
    """``generatePacketId``: a non-zero 32-bit id."""
    return random.randint(1, 0xFFFFFFFE)


def _address_is_private(address: str) -> bool:
    """``isMqttServerAddressPrivate`` (``src/mqtt/MQTT.cpp``).

    ``IPAddress::fromString`` accepts only a bare dotted quad (``host:port``
    fails), and only 10/8, 172.16/12, 192.168/16, 169.254/16 and the literal
    127.0.0.1 count.
    """
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    if str(ip) == "127.0.0.1":
        return True
    return any(
        ip in ipaddress.IPv4Network(net)
        for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
    )


@dataclass
class _Session:
    """One ``PhoneAPI`` instance bound to a TCP connection or the serial port."""

    kind: str  # "tcp" | "serial"
    write: Callable[[bytes], None]
    close_transport: Callable[[], None] | None
    abort_transport: Callable[[], None] | None = None
    parser: FrameParser = field(default_factory=FrameParser)
    state: str = _NOTHING
    nonce: int = 0
    handshake: deque[mesh_pb2.FromRadio] = field(default_factory=deque)
    from_radio_id: int = 0
    heartbeat_received: bool = False
    last_contact: float = 0.0
    idle_handle: asyncio.TimerHandle | None = None
    recent_ids: list[int] = field(default_factory=list)
    closed: bool = False


class _TcpProtocol(asyncio.Protocol):
    """``ServerAPI``: one accepted TCP client."""

    def __init__(self, node: SimulatedNode) -> None:
        self._node = node
        self.session: _Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.session = self._node._tcp_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.session is not None and not self.session.closed:
            self._node._feed(self.session, data)

    def eof_received(self) -> bool:
        return False  # close our side as well

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self._node._tcp_lost(self.session)


class _SerialPort:
    """Device side of a pty: non-blocking reads/writes on a dup of the master fd.

    While no process holds the slave open, reads fail with ``EIO``; the port then
    polls every 50 ms (a USB device keeps running when the host closes it) and
    drops what it writes beyond ``SERIAL_OUT_MAX`` bytes.
    """

    def __init__(self, node: SimulatedNode, master_fd: int) -> None:
        self._node = node
        self._loop = asyncio.get_running_loop()
        self.fd = os.dup(master_fd)
        os.set_blocking(self.fd, False)
        self._out = bytearray()
        self._writer_armed = False
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self._loop.add_reader(self.fd, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.EIO:
                _LOGGER.debug("serial read error: %s", err)
            data = b""
        if not data:  # slave side closed: poll until a host opens it again
            self._loop.remove_reader(self.fd)
            self._retry = self._loop.call_later(0.05, self._resume)
            return
        self._node._serial_data(data)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self.fd, self._on_readable)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._out:
            if len(self._out) + len(data) <= SERIAL_OUT_MAX:
                self._out += data
            return
        try:
            sent = os.write(self.fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # nobody listening: bytes are lost, as on a UART
        if sent < len(data):
            self._out += data[sent:]
            if not self._writer_armed:
                self._loop.add_writer(self.fd, self._on_writable)
                self._writer_armed = True

    def _on_writable(self) -> None:
        try:
            sent = os.write(self.fd, self._out)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self._out)
        del self._out[:sent]
        if not self._out:
            self._loop.remove_writer(self.fd)
            self._writer_armed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self.fd)
        if self._writer_armed:
            self._loop.remove_writer(self.fd)
        if self._retry is not None:
            self._retry.cancel()
        os.close(self.fd)


class SimulatedNode:
    """A Meshtastic node (firmware 2.7) with MQTT ``proxy_to_client_enabled``.

    Serve it with :meth:`start_tcp` (``APIServerPort``, like port 4403) and/or
    :meth:`serve_serial` (a pty master).  Drive the mesh side with
    :meth:`receive_text`, :meth:`receive_packet`, :meth:`send_telemetry`,
    :meth:`inject_uplink`; observe with the counters and lists below and
    :meth:`wait_for`.  ``idle_timeout`` is in seconds (firmware: 900 s,
    ``TCP_IDLE_TIMEOUT_MS`` / ``SERIAL_CONNECTION_TIMEOUT``).

    Observation attributes:

    - ``connections``: TCP connections accepted so far;
    - ``handshakes``: ``config_complete_id`` frames sent;
    - ``heartbeats``: ``ToRadio.heartbeat`` frames received;
    - ``downlinks``: proxy ``ToRadio`` messages handed to ``MQTT::onClientProxyReceive``;
    - ``ignored_downlinks``: proxy ``ToRadio`` ignored (handshake not complete, or
      MQTT/proxy off / no channel with up- or downlink and no map reporting);
    - ``dropped_frames``: frames dropped whole (header length > 512, protobuf
      decode failure, nanopb size overflow such as a topic > 59 or data > 435
      bytes);
    - ``sent_packets``: ``ToRadio.packet`` from clients, as received;
    - ``mesh_injected``: downlink packets accepted onto the mesh (copies with
      ``via_mqtt`` set, as queued to the router);
    - ``implicit_acks``: own-gateway echoes turned into a local Routing ACK;
    - ``uplinks_dropped``: overflow of the 8-entry to-client proxy queue;
    - ``phone_dropped``: overflow of the to-phone packet queue;
    - ``from_radio``: the last 2000 ``FromRadio`` written to any client;
    - ``admin_messages``: ``AdminMessage`` payloads of client packets addressed to
      this node (``AdminModule``: owner, config and channel getters, ``set_owner``,
      ``reboot_seconds``; others are recorded and acknowledged only).

    ``admin_reboot_delay`` (seconds, default ``DEFAULT_REBOOT_SECONDS``; ``None``
    = never) is the reboot ``AdminModule::saveChanges`` schedules after a
    ``set_owner`` that changed something.
    """

    def __init__(
        self, profile: NodeProfile | None = None, *, idle_timeout: float = 900.0
    ) -> None:
        self.profile: NodeProfile = profile if profile is not None else NodeProfile()
        self.idle_timeout = idle_timeout
        self.port: int = 0
        self.connections = 0
        self.handshakes = 0
        self.heartbeats = 0
        self.ignored_downlinks = 0
        self.dropped_frames = 0
        self.implicit_acks = 0
        self.uplinks_dropped = 0
        self.phone_dropped = 0
        self.reboot_count = 0
        self.downlinks: list[mesh_pb2.MqttClientProxyMessage] = []
        self.sent_packets: list[mesh_pb2.MeshPacket] = []
        self.mesh_injected: list[mesh_pb2.MeshPacket] = []
        self.from_radio: deque[mesh_pb2.FromRadio] = deque(maxlen=FROM_RADIO_LOG_MAX)
        self.admin_messages: list[admin_pb2.AdminMessage] = []
        self.admin_reboot_delay: float | None = DEFAULT_REBOOT_SECONDS
        self._reboot_handle: asyncio.TimerHandle | None = None
        self._reboot_task: asyncio.Task[None] | None = None
        self._session_passkey = os.urandom(8)
        self._active: NodeProfile = self._load_profile()
        self._proxy_queue: deque[mesh_pb2.MqttClientProxyMessage] = deque()
        self._phone_queue: deque[mesh_pb2.MeshPacket] = deque()
        self._qs_queue: deque[mesh_pb2.QueueStatus] = deque()
        self._history: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._tcp_session: _Session | None = None
        self._serial_session: _Session | None = None
        self._serial: _SerialPort | None = None
        self._server: asyncio.Server | None = None
        self._host = "127.0.0.1"
        self._changed = asyncio.Event()
        self._boot_time = time.monotonic()

    # ------------------------------------------------------------------ profile

    def _load_profile(self) -> NodeProfile:
        """Snapshot the profile (the firmware loads its prefs at boot)."""
        self.profile.validate()
        return copy.deepcopy(self.profile)

    @property
    def node_id(self) -> str:
        """Own user id ``!xxxxxxxx`` (``owner.id``) of the running configuration."""
        return self._active.node_id

    def channel_name(self, channel_index: int) -> str:
        """``Channels::getName``: the channel's name or the modem preset display name.

        ``LongFast``, ``MediumFast``, ``LongMod``, ``ShortTurbo``, ... for a blank
        name; ``Custom`` when ``use_preset`` is false (``src/mesh/Channels.cpp``).
        """
        return self._active.channel_name(channel_index)

    def topic_for(self, channel_index: int) -> str:
        """``{root or 'msh'}/2/e/{channel_name}/{!id}``: the uplink topic (``MQTT::onSend``)."""
        root = self._active.topic_root()
        return f"{root}/2/e/{self.channel_name(channel_index)}/{self.node_id}"

    def _active_channels(self) -> list[int]:
        return [
            i
            for i, spec in enumerate(self._active.channels[:MAX_NUM_CHANNELS])
            if spec.role != "DISABLED"
        ]

    def _channel_key(self, index: int) -> bytes | None:
        """``Channels::getKey``: expanded key, ``b""`` for no crypto, ``None`` if unusable."""
        spec = self._active.channel_spec(index)
        if spec is None or spec.role == "DISABLED":
            return None
        if not spec.psk and spec.role == "SECONDARY":
            for i, other in enumerate(self._active.channels):
                if other.role == "PRIMARY":
                    return expand_psk(other.psk) if i != index else b""
        return expand_psk(spec.psk)

    def _channel_hash(self, index: int) -> int:
        key = self._channel_key(index) or b""
        return channel_hash(self.channel_name(index), key)

    def _any_mqtt_channel(self) -> bool:
        """``Channels::anyMqttEnabled``: an active channel with uplink or downlink."""
        return any(
            self._active.channels[i].uplink or self._active.channels[i].downlink
            for i in self._active_channels()
        )

    def _any_downlink(self) -> bool:
        return any(self._active.channels[i].downlink for i in self._active_channels())

    def _proxy_gate(self) -> bool:
        """``PhoneAPI::handleToRadio`` gate for proxy ``ToRadio`` (``src/mesh/PhoneAPI.cpp``)."""
        a = self._active
        return (
            a.mqtt_enabled
            and a.proxy_to_client_enabled
            and (self._any_mqtt_channel() or a.mqtt_map_reporting_enabled)
        )

    @property
    def _to_phone_depth(self) -> int:
        """``MAX_RX_TOPHONE``: 8 on classic ESP32, 32 elsewhere."""
        return 8 if self._active.hw_model in _CLASSIC_ESP32 else 32

    # ------------------------------------------------------------------ serving

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen like ``APIServerPort`` (``src/mesh/api/ServerAPI.cpp``); return the port.

        One client at a time: a new connection force-closes the previous one.
        """
        if self._server is not None:
            raise RuntimeError("TCP server already started")
        self._host = host
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _TcpProtocol(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        _LOGGER.debug("meshsim %s listening on %s:%d", self.node_id, host, self.port)
        return self.port

    async def serve_serial(self, master_fd: int) -> None:
        r"""Serve the stream API on a pty master (``StreamAPI`` over ``SerialConsole``).

        The pty is switched to raw mode (on Linux, termios of a master apply to
        its slave).  Plain-text log lines (``DEBUG | 12:00:01 42 [Thread] ...\\r\\n``)
        are interleaved between frames, as the firmware's serial console does.
        The caller keeps ownership of ``master_fd``.
        """
        if self._serial is not None:
            raise RuntimeError("serial already served")
        with contextlib.suppress(OSError):
            tty.setraw(master_fd)
        self._serial = _SerialPort(self, master_fd)
        self._serial_session = _Session(
            kind="serial", write=self._serial.write, close_transport=None
        )
        self._serial_session.last_contact = asyncio.get_running_loop().time()
        self._boot_log()

    async def stop(self) -> None:
        """Close the server, every client and the serial port; cancel all timers."""
        self._schedule_reboot(None)
        task = self._reboot_task
        self._reboot_task = None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sessions = [s for s in (self._tcp_session, self._serial_session) if s]
        for session in sessions:
            self._cancel_idle(session)
        if self._server is not None:
            self._server.close()
        tcp = self._tcp_session
        if tcp is not None and tcp.close_transport is not None:
            tcp.closed = True
            tcp.close_transport()
        if self._serial is not None:
            self._serial.close()
            self._serial = None
            self._serial_session = None
        for _ in range(50):
            if self._tcp_session is None:
                break
            await asyncio.sleep(0.01)
        if tcp is not None and self._tcp_session is tcp and tcp.abort_transport:
            tcp.abort_transport()  # peer not reading: do not wait for the flush
            await asyncio.sleep(0)
            self._tcp_session = None
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        self._notify()

    # ------------------------------------------------------------------ state

    @property
    def client_connected(self) -> bool:
        """A TCP client is attached, or a serial client has started a session."""
        serial = self._serial_session
        return self._tcp_session is not None or (
            serial is not None and serial.state != _NOTHING
        )

    @property
    def config_complete(self) -> bool:
        """Some client is in the live state (``STATE_SEND_PACKETS``)."""
        return any(
            s is not None and s.state == _LIVE
            for s in (self._tcp_session, self._serial_session)
        )

    @property
    def pending_uplinks(self) -> int:
        """Proxy messages waiting in the to-client queue (0-8)."""
        return len(self._proxy_queue)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float = 5.0
    ) -> None:
        """Wait until ``predicate()`` is true; raise ``TimeoutError`` after ``timeout`` s.

        Re-checked on every state change of the node and at least every 50 ms.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout} s")
            event = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(0.05, remaining))

    # ------------------------------------------------------------------ TCP

    def _tcp_made(self, transport: asyncio.Transport) -> _Session:
        self.connections += 1
        old = self._tcp_session
        if old is not None:
            _LOGGER.debug("meshsim: force close previous TCP connection")
            self._close_session(old)
        session = _Session(
            kind="tcp",
            write=transport.write,
            close_transport=transport.close,
            abort_transport=transport.abort,
        )
        session.last_contact = asyncio.get_running_loop().time()
        self._tcp_session = session
        self._notify()
        return session

    def _tcp_lost(self, session: _Session) -> None:
        session.closed = True
        self._phone_api_close(session)
        if self._tcp_session is session:
            self._tcp_session = None
        self._notify()

    def _close_session(self, session: _Session) -> None:
        """``PhoneAPI::close`` (+ ``client.stop()`` for TCP)."""
        self._phone_api_close(session)
        if session.kind == "tcp" and not session.closed:
            session.closed = True
            if session.close_transport is not None:
                session.close_transport()
        self._notify()

    def _phone_api_close(self, session: _Session) -> None:
        self._cancel_idle(session)
        session.state = _NOTHING
        session.handshake.clear()
        session.heartbeat_received = False
        session.nonce = 0

    def _cancel_idle(self, session: _Session) -> None:
        if session.idle_handle is not None:
            session.idle_handle.cancel()
            session.idle_handle = None

    # ------------------------------------------------------------------ serial

    def _serial_data(self, data: bytes) -> None:
        if self._serial_session is not None:
            self._feed(self._serial_session, data)

    def _serial_log(self, level: str, thread: str, message: str) -> None:
        """One firmware-style console line on the serial port (not on TCP)."""
        if self._serial is None:
            return
        uptime = int(time.monotonic() - self._boot_time)
        stamp = time.strftime("%H:%M:%S")
        line = f"{level:<5} | {stamp} {uptime} [{thread}] {message}\r\n"
        self._serial.write(line.encode())

    def _boot_log(self) -> None:
        a = self._active
        self._serial_log("INFO", "Main", "")
        self._serial_log("INFO", "Main", "//\\ E S H T /\\ S T / C")
        self._serial_log(
            "INFO",
            "Main",
            f"Booted, wake cause 0 (boot count {self.reboot_count + 1}), "
            f"reset_reason=reset",
        )
        self._serial_log("DEBUG", "Main", f"Firmware {a.firmware_version} {a.hw_model}")
        self._serial_log("INFO", "Main", f"Use nodenum {a.node_num:#010x}")
        if a.mqtt_enabled and a.proxy_to_client_enabled:
            self._serial_log("INFO", "mqtt", "MQTT configured to use client proxy")

    # ------------------------------------------------------------------ input

    def _feed(self, session: _Session, data: bytes) -> None:
        """``StreamAPI::runOncePart``: read everything available, then write."""
        for item in session.parser.feed(data):
            if session.closed:
                return
            if isinstance(item, RejectedHeader):
                self.dropped_frames += 1
                _LOGGER.debug("meshsim: rejected frame header, len=%d", item.length)
                continue
            assert isinstance(item, Frame)
            self._handle_to_radio(session, item.payload)
        self._pump(session)
        self._notify()

    def _touch(self, session: _Session) -> None:
        loop = asyncio.get_running_loop()
        session.last_contact = loop.time()
        if session.idle_handle is None and session.state != _NOTHING:
            session.idle_handle = loop.call_at(
                session.last_contact + self.idle_timeout, self._idle_check, session
            )

    def _idle_check(self, session: _Session) -> None:
        """``PhoneAPI::checkConnectionTimeout``."""
        session.idle_handle = None
        if session.closed or session.state == _NOTHING:
            return
        loop = asyncio.get_running_loop()
        due = session.last_contact + self.idle_timeout
        if loop.time() < due:
            session.idle_handle = loop.call_at(due, self._idle_check, session)
            return
        _LOGGER.debug("meshsim: lost phone connection (idle)")
        self._serial_log("INFO", "PhoneAPI", "Lost phone connection")
        self._close_session(session)

    @staticmethod
    def _nanopb_fits(to_radio: mesh_pb2.ToRadio) -> bool:
        """Return whether nanopb would decode this ``ToRadio`` (fixed-size fields)."""
        which = to_radio.WhichOneof("payload_variant")
        if which == "mqttClientProxyMessage":
            msg = to_radio.mqttClientProxyMessage
            if len(msg.topic.encode()) > PROXY_TOPIC_MAX:
                return False
            if len(msg.data) > PROXY_DATA_MAX:
                return False
            if len(msg.text.encode()) > PROXY_TEXT_MAX:
                return False
        elif which == "packet":
            packet = to_radio.packet
            if len(packet.decoded.payload) > DATA_PAYLOAD_MAX:
                return False
            if len(packet.encrypted) > ENCRYPTED_MAX:
                return False
            if len(packet.public_key) > PUBLIC_KEY_MAX:
                return False
        elif which == "xmodemPacket":
            return len(to_radio.xmodemPacket.buffer) <= XMODEM_BUFFER_MAX
        return True

    def _handle_to_radio(self, session: _Session, payload: bytes) -> None:
        """``PhoneAPI::handleToRadio`` (``src/mesh/PhoneAPI.cpp``)."""
        self._touch(session)
        to_radio = mesh_pb2.ToRadio()
        try:
            to_radio.ParseFromString(payload)
        except DecodeError:
            to_radio = None
        if to_radio is None or not self._nanopb_fits(to_radio):
            self.dropped_frames += 1
            self._serial_log(
                "ERROR", "SerialConsole", "Error: ignore malformed toradio"
            )
            return
        which = to_radio.WhichOneof("payload_variant")
        if which == "want_config_id":
            self._start_config(session, to_radio.want_config_id)
        elif which == "heartbeat":
            self.heartbeats += 1
            if to_radio.heartbeat.nonce == 1:
                self._serial_log("INFO", "SerialConsole", "Broadcast nodeinfo ping")
                self._send_own_nodeinfo()
            else:
                self._serial_log("DEBUG", "SerialConsole", "Got client heartbeat")
                session.heartbeat_received = True
        elif which == "packet":
            self._handle_to_radio_packet(session, to_radio.packet)
        elif which == "mqttClientProxyMessage":
            self._serial_log("DEBUG", "SerialConsole", "Got MqttClientProxy message")
            msg = to_radio.mqttClientProxyMessage
            if session.state != _LIVE:
                self.ignored_downlinks += 1
                self._serial_log(
                    "WARN",
                    "SerialConsole",
                    "Ignore MqttClientProxy message while completing config handshake",
                )
            elif not self._proxy_gate():
                self.ignored_downlinks += 1
                self._serial_log(
                    "WARN", "SerialConsole", "MqttClientProxy received but proxy is off"
                )
            else:
                self.downlinks.append(msg)
                self._mqtt_on_client_proxy_receive(msg)
        elif which == "disconnect":
            self._serial_log("INFO", "SerialConsole", "Disconnect from phone")
            self._close_session(session)
        # xmodemPacket: no filesystem modelled; None: zero-length keepalive / nop.

    def _start_config(self, session: _Session, nonce: int) -> None:
        """``PhoneAPI::handleStartConfig``: (re)start the handshake state machine."""
        self._serial_log("INFO", "SerialConsole", f"Client wants config, nonce={nonce}")
        session.nonce = nonce
        session.handshake = deque(self._build_handshake(nonce))
        session.state = _CONFIG
        self._touch(session)

    # ------------------------------------------------------------------ output

    def _emit(self, session: _Session, from_radio: mesh_pb2.FromRadio) -> None:
        if session.kind == "serial":
            which = from_radio.WhichOneof("payload_variant")
            if which == "config":
                section = from_radio.config.WhichOneof("payload_variant")
                self._serial_log("DEBUG", "SerialConsole", f"Send config: {section}")
            elif which == "moduleConfig":
                module = from_radio.moduleConfig.WhichOneof("payload_variant")
                self._serial_log(
                    "DEBUG", "SerialConsole", f"Send module config: {module}"
                )
        session.from_radio_id += 1
        from_radio.id = session.from_radio_id
        self.from_radio.append(from_radio)
        session.write(encode_frame(from_radio.SerializeToString()))

    def _next_from_radio(self, session: _Session) -> mesh_pb2.FromRadio | None:
        """``PhoneAPI::getFromRadio``: heartbeat reply first, then by state."""
        if session.heartbeat_received:
            session.heartbeat_received = False
            return mesh_pb2.FromRadio(queueStatus=self._queue_status())
        if session.state == _CONFIG:
            item = session.handshake.popleft()
            if item.WhichOneof("payload_variant") == "config_complete_id":
                session.state = _LIVE
                self.handshakes += 1
                self._serial_log("INFO", "SerialConsole", "Config Send Complete")
            return item
        if session.state == _LIVE:
            if self._qs_queue:
                return mesh_pb2.FromRadio(queueStatus=self._qs_queue.popleft())
            if self._proxy_queue:
                msg = self._proxy_queue.popleft()
                return mesh_pb2.FromRadio(mqttClientProxyMessage=msg)
            if self._phone_queue:
                return mesh_pb2.FromRadio(packet=self._phone_queue.popleft())
        return None

    def _pump(self, session: _Session) -> None:
        """``StreamAPI::writeStream``: emit every ``FromRadio`` available."""
        while not session.closed:
            item = self._next_from_radio(session)
            if item is None:
                break
            self._emit(session, item)

    def _pump_all(self) -> None:
        for session in (self._tcp_session, self._serial_session):
            if session is not None:
                self._pump(session)
        self._notify()

    @staticmethod
    def _queue_status(res: int = 0, packet_id: int = 0) -> mesh_pb2.QueueStatus:
        """``Router::getQueueStatus``: TX queue of 16, always drained in the sim."""
        return mesh_pb2.QueueStatus(
            res=res, free=MAX_TX_QUEUE, maxlen=MAX_TX_QUEUE, mesh_packet_id=packet_id
        )

    # ------------------------------------------------------------------ handshake

    def _own_user(self) -> mesh_pb2.User:
        a = self._active
        return mesh_pb2.User(
            id=a.node_id,
            long_name=a.long_name,
            short_name=a.short_name,
            macaddr=b"\x24\x6f" + a.node_num.to_bytes(4, "big"),
            hw_model=mesh_pb2.HardwareModel.Value(a.hw_model),
            role=config_pb2.Config.DeviceConfig.Role.Value(a.role),
            public_key=self._key_bytes(a.node_num, b"public"),
        )

    @staticmethod
    def _key_bytes(node_num: int, salt: bytes) -> bytes:
        return hashlib.sha256(salt + node_num.to_bytes(4, "big")).digest()

    def _own_position(self) -> mesh_pb2.Position | None:
        pos = self._active.position
        if pos is None:
            return None
        return mesh_pb2.Position(
            latitude_i=round(pos[0] * 1e7),
            longitude_i=round(pos[1] * 1e7),
            altitude=pos[2],
            time=int(time.time()),
        )

    def _device_metrics(self) -> telemetry_pb2.DeviceMetrics:
        a = self._active
        return telemetry_pb2.DeviceMetrics(
            battery_level=a.battery_level,
            voltage=a.voltage,
            channel_utilization=a.channel_utilization,
            air_util_tx=a.air_util_tx,
            uptime_seconds=int(time.monotonic() - self._boot_time),
        )

    def _build_handshake(self, nonce: int) -> list[mesh_pb2.FromRadio]:
        """The ``STATE_SEND_*`` sequence of ``PhoneAPI::getFromRadio``."""
        a = self._active
        now = int(time.time())
        out: list[mesh_pb2.FromRadio] = []
        only_nodes = nonce == SPECIAL_NONCE_ONLY_NODES
        hw_model = mesh_pb2.HardwareModel.Value(a.hw_model)
        role = config_pb2.Config.DeviceConfig.Role.Value(a.role)

        if not only_nodes:
            out.append(
                mesh_pb2.FromRadio(
                    my_info=mesh_pb2.MyNodeInfo(
                        my_node_num=a.node_num,
                        reboot_count=self.reboot_count,
                        min_app_version=30200,
                        device_id=self._key_bytes(a.node_num, b"device")[:16],
                        pio_env=a.hw_model.lower(),
                        nodedb_count=1 + len(a.other_nodes),
                    )
                )
            )
            ui = mesh_pb2.FromRadio()
            ui.deviceuiConfig.SetInParent()
            out.append(ui)

        own = mesh_pb2.NodeInfo(
            num=a.node_num,
            user=self._own_user(),
            last_heard=now,
            device_metrics=self._device_metrics(),
            is_favorite=True,
        )
        position = self._own_position()
        if position is not None:
            own.position.CopyFrom(position)
        out.append(mesh_pb2.FromRadio(node_info=own))

        if not only_nodes:
            out.append(
                mesh_pb2.FromRadio(
                    metadata=mesh_pb2.DeviceMetadata(
                        firmware_version=a.firmware_version,
                        device_state_version=24,
                        canShutdown=True,
                        hasWifi=a.hw_model not in _NO_WIFI,
                        hasBluetooth=True,
                        hasEthernet=False,
                        role=role,
                        position_flags=811,
                        hw_model=hw_model,
                        hasRemoteHardware=False,
                        hasPKC=True,
                    )
                )
            )
            out.extend(mesh_pb2.FromRadio(channel=ch) for ch in self._channels_pb())
            out.extend(self._config_frames())
            out.extend(self._module_config_frames())

        if nonce != SPECIAL_NONCE_ONLY_CONFIG:
            out.extend(
                mesh_pb2.FromRadio(node_info=info) for info in self._other_node_infos()
            )
        if not only_nodes:
            out.extend(
                mesh_pb2.FromRadio(
                    fileInfo=mesh_pb2.FileInfo(file_name=name, size_bytes=size)
                )
                for name, size in a.files
            )
        out.append(mesh_pb2.FromRadio(config_complete_id=nonce))
        return out

    def _channels_pb(self) -> list[channel_pb2.Channel]:
        channels = []
        for index in range(MAX_NUM_CHANNELS):
            spec = self._active.channel_spec(index)
            channel = channel_pb2.Channel(index=index)
            channel.settings.SetInParent()
            if spec is None:
                channel.role = channel_pb2.Channel.Role.DISABLED
            else:
                channel.role = channel_pb2.Channel.Role.Value(spec.role)
                channel.settings.psk = spec.psk
                channel.settings.name = spec.name
                channel.settings.uplink_enabled = spec.uplink
                channel.settings.downlink_enabled = spec.downlink
            channels.append(channel)
        return channels

    def _config_frames(self) -> list[mesh_pb2.FromRadio]:
        """``STATE_SEND_CONFIG``: device .. security, then empty sessionkey, device_ui."""
        a = self._active
        cfg = config_pb2.Config
        sections: list[config_pb2.Config] = [
            cfg(
                device=cfg.DeviceConfig(
                    role=cfg.DeviceConfig.Role.Value(a.role),
                    node_info_broadcast_secs=10800,
                )
            ),
            cfg(
                position=cfg.PositionConfig(
                    position_broadcast_secs=900,
                    position_broadcast_smart_enabled=True,
                    gps_update_interval=120,
                    position_flags=811,
                    broadcast_smart_minimum_distance=100,
                    broadcast_smart_minimum_interval_secs=30,
                    gps_mode=cfg.PositionConfig.GpsMode.ENABLED,
                )
            ),
            cfg(power=cfg.PowerConfig(ls_secs=300)),
            cfg(
                network=cfg.NetworkConfig(
                    wifi_enabled=False, ntp_server="meshtastic.pool.ntp.org"
                )
            ),
            cfg(display=cfg.DisplayConfig(screen_on_secs=600)),
            cfg(
                lora=cfg.LoRaConfig(
                    use_preset=a.use_preset,
                    modem_preset=cfg.LoRaConfig.ModemPreset.Value(a.modem_preset),
                    region=cfg.LoRaConfig.RegionCode.Value(a.region),
                    hop_limit=a.hop_limit,
                    tx_enabled=True,
                    sx126x_rx_boosted_gain=True,
                    config_ok_to_mqtt=a.ok_to_mqtt,
                )
            ),
            cfg(
                bluetooth=cfg.BluetoothConfig(
                    enabled=True,
                    mode=cfg.BluetoothConfig.PairingMode.RANDOM_PIN,
                    fixed_pin=123456,
                )
            ),
            cfg(
                security=cfg.SecurityConfig(
                    public_key=self._key_bytes(a.node_num, b"public"),
                    private_key=self._key_bytes(a.node_num, b"private"),
                    serial_enabled=True,
                )
            ),
        ]
        session_key = cfg()
        session_key.sessionkey.SetInParent()
        device_ui = cfg()
        device_ui.device_ui.SetInParent()
        sections += [session_key, device_ui]
        return [mesh_pb2.FromRadio(config=section) for section in sections]

    def _module_config_frames(self) -> list[mesh_pb2.FromRadio]:
        """``STATE_SEND_MODULECONFIG``: 16 entries, MQTT first, the last 3 empty."""
        a = self._active
        mc = module_config_pb2.ModuleConfig
        mqtt = mc.MQTTConfig(
            enabled=a.mqtt_enabled,
            address=a.mqtt_address,
            username=a.mqtt_username,
            password=a.mqtt_password,
            encryption_enabled=a.mqtt_encryption_enabled,
            json_enabled=False,
            tls_enabled=a.mqtt_tls_enabled,
            root=a.mqtt_root,
            proxy_to_client_enabled=a.proxy_to_client_enabled,
            map_reporting_enabled=a.mqtt_map_reporting_enabled,
        )
        if a.mqtt_map_reporting_enabled:
            mqtt.map_report_settings.publish_interval_secs = a.map_publish_interval_secs
            mqtt.map_report_settings.position_precision = a.map_position_precision
            mqtt.map_report_settings.should_report_location = a.position is not None
        num = a.node_num
        modules: list[module_config_pb2.ModuleConfig] = [
            mc(mqtt=mqtt),
            mc(serial=mc.SerialConfig()),
            mc(external_notification=mc.ExternalNotificationConfig()),
            mc(store_forward=mc.StoreForwardConfig()),
            mc(range_test=mc.RangeTestConfig()),
            mc(
                telemetry=mc.TelemetryConfig(
                    device_update_interval=1800, environment_update_interval=1800
                )
            ),
            mc(canned_message=mc.CannedMessageConfig()),
            mc(audio=mc.AudioConfig()),
            mc(remote_hardware=mc.RemoteHardwareConfig()),
            mc(neighbor_info=mc.NeighborInfoConfig()),
            mc(
                ambient_lighting=mc.AmbientLightingConfig(
                    current=10,
                    red=(num >> 16) & 0xFF,
                    green=(num >> 8) & 0xFF,
                    blue=num & 0xFF,
                )
            ),
            mc(detection_sensor=mc.DetectionSensorConfig(minimum_broadcast_secs=45)),
            mc(paxcounter=mc.PaxcounterConfig()),
        ]
        # statusmessage, traffic_management, tak: no case in the 2.7 switch ->
        # an empty ModuleConfig is sent for each (addendum item 5).
        modules += [mc(), mc(), mc()]
        frames = []
        for module in modules:
            frame = mesh_pb2.FromRadio()
            frame.moduleConfig.CopyFrom(module)
            frame.moduleConfig.SetInParent()
            frames.append(frame)
        return frames

    def _other_node_infos(self) -> list[mesh_pb2.NodeInfo]:
        now = int(time.time())
        models = ("RAK4631", "HELTEC_V3", "T_ECHO", "TBEAM", "STATION_G2")
        infos = []
        for i, (num, long_name, short_name) in enumerate(self._active.other_nodes):
            info = mesh_pb2.NodeInfo(
                num=num,
                user=mesh_pb2.User(
                    id=f"!{num:08x}",
                    long_name=long_name,
                    short_name=short_name,
                    macaddr=b"\xde\xad" + num.to_bytes(4, "big"),
                    hw_model=mesh_pb2.HardwareModel.Value(models[i % len(models)]),
                    public_key=self._key_bytes(num, b"public"),
                ),
                snr=6.25 - i * 2.5,
                last_heard=now - 60 * (i + 1) * 7,
                device_metrics=telemetry_pb2.DeviceMetrics(
                    battery_level=max(5, 95 - 17 * i),
                    voltage=4.1 - 0.1 * i,
                    channel_utilization=8.0 + i,
                    air_util_tx=1.0 + 0.5 * i,
                    uptime_seconds=3600 * (i + 2),
                ),
                hops_away=min(i, 3),
            )
            infos.append(info)
        return infos

    # ------------------------------------------------------------------ packets from the client

    def _seen_recently(self, session: _Session, packet_id: int) -> bool:
        """``PhoneAPI::wasSeenRecently``: the last 20 ids from this client."""
        if packet_id in session.recent_ids:
            return True
        session.recent_ids.append(packet_id)
        del session.recent_ids[:-20]
        return False

    def _handle_to_radio_packet(
        self, session: _Session, packet: mesh_pb2.MeshPacket
    ) -> None:
        """``PhoneAPI::handleToRadioPacket`` -> ``MeshService::handleToRadio``."""
        self._serial_log(
            "DEBUG", "SerialConsole", f"PACKET FROM PHONE id={packet.id:#x}"
        )
        if packet.id and self._seen_recently(session, packet.id):
            return
        sent = mesh_pb2.MeshPacket()
        sent.CopyFrom(packet)
        self.sent_packets.append(sent)
        p = mesh_pb2.MeshPacket()
        p.CopyFrom(packet)
        _set_from(p, self._active.node_num)
        if not p.id:
            p.id = _random_packet_id()
        p.rx_time = int(time.time())
        p.hop_start = p.hop_limit
        self._qs_enqueue(self._queue_status(0, p.id))
        if p.to == self._active.node_num:
            # Handled locally, never transmitted.
            if p.HasField("decoded") and p.decoded.portnum == _PORT.ADMIN_APP:
                self._handle_admin(p)
            return
        decoded = None
        if p.HasField("decoded"):
            p.decoded.bitfield = (
                BITFIELD_OK_TO_MQTT if self._active.ok_to_mqtt else 0
            ) | (BITFIELD_WANT_RESPONSE if p.decoded.want_response else 0)
            decoded = mesh_pb2.MeshPacket()
            decoded.CopyFrom(p)
        encrypted = self._encrypt(p, p.channel) if decoded is not None else p
        self._remember(_from(p), p.id)
        if encrypted is not None:
            self._mqtt_on_send(encrypted, decoded, p.channel)
        if p.want_ack and self._active.simulate_acks:
            self._simulate_ack(p)

    # ------------------------------------------------------------------ admin

    def _handle_admin(self, packet: mesh_pb2.MeshPacket) -> None:
        """``AdminModule::handleReceivedProtobuf`` for a packet from the client.

        Local admin (from the API client) needs no session passkey.  Getters
        answer with a response packet to the phone when ``want_response`` is
        set; anything else that wants a response gets a Routing ``NONE`` ACK.
        """
        admin = admin_pb2.AdminMessage()
        try:
            admin.ParseFromString(packet.decoded.payload)
        except DecodeError:
            self._serial_log("WARN", "Admin", "Undecodable admin payload")
            return
        self.admin_messages.append(admin)
        which = admin.WhichOneof("payload_variant")
        self._serial_log("INFO", "Admin", f"Handle admin payload {which}")
        reply: admin_pb2.AdminMessage | None = None
        if which == "get_owner_request":
            reply = admin_pb2.AdminMessage(get_owner_response=self._own_user())
        elif which == "get_config_request":
            reply = self._config_response(admin.get_config_request)
        elif which == "get_channel_request":
            index = admin.get_channel_request - 1
            if 0 <= index < MAX_NUM_CHANNELS:
                reply = admin_pb2.AdminMessage(
                    get_channel_response=self._channels_pb()[index]
                )
        elif which == "set_owner":
            self._set_owner(admin.set_owner)
        elif which == "reboot_seconds":
            self._schedule_reboot(float(admin.reboot_seconds))
        if not packet.decoded.want_response:
            return
        if reply is None:
            response = self._routing_ack(
                self._active.node_num,
                self._active.node_num,
                packet.id,
                packet.channel,
            )
        else:
            reply.session_passkey = self._session_passkey
            response = mesh_pb2.MeshPacket(
                to=self._active.node_num,
                id=_random_packet_id(),
                channel=packet.channel,
                rx_time=int(time.time()),
                decoded=mesh_pb2.Data(
                    portnum=_PORT.ADMIN_APP,
                    payload=reply.SerializeToString(),
                    request_id=packet.id,
                ),
            )
            _set_from(response, self._active.node_num)
        self._to_phone(response)

    def _config_response(self, config_type: int) -> admin_pb2.AdminMessage:
        """``handleGetConfig``: the section as in the handshake (``sessionkey`` empty)."""
        name = admin_pb2.AdminMessage.ConfigType.Name(
            admin_pb2.AdminMessage.ConfigType.ValueType(config_type)
        )
        section = name.removesuffix("_CONFIG").lower().replace("deviceui", "device_ui")
        reply = admin_pb2.AdminMessage()
        for frame in self._config_frames():
            if frame.config.WhichOneof("payload_variant") == section:
                reply.get_config_response.CopyFrom(frame.config)
        return reply

    def _set_owner(self, user: mesh_pb2.User) -> None:
        """``handleSetOwner``: new names, ``reloadOwner`` (NodeInfo broadcast), saved.

        The change is persisted (written to :attr:`profile`, so it survives
        :meth:`reboot`) and, if anything changed, the reboot of ``saveChanges``
        is scheduled after :attr:`admin_reboot_delay` seconds.
        """
        changed = False
        for attr in ("long_name", "short_name"):
            value = getattr(user, attr)
            if value and value != getattr(self._active, attr):
                setattr(self._active, attr, value)
                setattr(self.profile, attr, value)
                changed = True
        if not changed:
            return
        self._serial_log("INFO", "Admin", f"Owner set to {self._active.long_name!r}")
        self._send_own_nodeinfo()
        self._schedule_reboot(self.admin_reboot_delay)
        self._notify()

    def _schedule_reboot(self, seconds: float | None) -> None:
        """``AdminModule::reboot``: (re)arm the reboot; ``None`` or < 0 cancels it."""
        if self._reboot_handle is not None:
            self._reboot_handle.cancel()
            self._reboot_handle = None
        if seconds is None or seconds < 0:
            return
        self._reboot_handle = asyncio.get_running_loop().call_later(
            seconds, self._reboot_due
        )

    def _reboot_due(self) -> None:
        self._reboot_handle = None
        self._reboot_task = asyncio.create_task(self.reboot(), name="meshsim reboot")

    def _simulate_ack(self, packet: mesh_pb2.MeshPacket) -> None:
        """The ACK a healthy mesh returns for a ``want_ack`` packet.

        Broadcast: the implicit ACK when a neighbour's rebroadcast is heard
        (``ReliableRouter``), local.  DM to a known node: that node's Routing ACK
        heard over RF.  DM to an unknown node: nothing (the firmware would NAK
        with ``MAX_RETRANSMIT`` after its retries, not modelled).
        """
        own = self._active.node_num
        if packet.to == BROADCAST_NUM:
            self._to_phone(self._routing_ack(own, own, packet.id, packet.channel))
        elif packet.to in {num for num, _, _ in self._active.other_nodes}:
            ack = self._routing_ack(packet.to, own, packet.id, packet.channel)
            ack.hop_limit = ack.hop_start = self._active.hop_limit
            ack.rx_snr, ack.rx_rssi = 5.0, -90
            ack.decoded.bitfield = BITFIELD_OK_TO_MQTT
            self._receive(ack, packet.channel)

    @staticmethod
    def _routing_ack(
        sender: int, to: int, request_id: int, channel: int
    ) -> mesh_pb2.MeshPacket:
        ack = mesh_pb2.MeshPacket(
            to=to,
            id=_random_packet_id(),
            channel=channel,
            rx_time=int(time.time()),
            priority=mesh_pb2.MeshPacket.Priority.ACK,
            decoded=mesh_pb2.Data(
                portnum=_ROUTING,
                payload=mesh_pb2.Routing(
                    error_reason=mesh_pb2.Routing.Error.NONE
                ).SerializeToString(),
                request_id=request_id,
            ),
        )
        _set_from(ack, sender)
        return ack

    # ------------------------------------------------------------------ crypto

    def _encrypt(
        self, decoded: mesh_pb2.MeshPacket, channel_index: int
    ) -> mesh_pb2.MeshPacket | None:
        """``Router::perhapsEncode``: channel AES-CTR; ``None`` if the channel is unusable."""
        enc = mesh_pb2.MeshPacket()
        enc.CopyFrom(decoded)
        plain = decoded.decoded.SerializeToString()
        enc.ClearField("decoded")
        if decoded.pki_encrypted:
            # Curve25519 PKI is not modelled: opaque bytes of plausible length.
            enc.encrypted = hashlib.sha256(plain).digest()[:8] + os.urandom(
                len(plain) + 4
            )
            enc.channel = 0
            return enc
        key = self._channel_key(channel_index)
        if key is None:
            return None
        enc.encrypted = crypt(key, decoded.id, _from(decoded), plain)
        enc.channel = self._channel_hash(channel_index)
        return enc

    def _perhaps_decode(
        self, packet: mesh_pb2.MeshPacket
    ) -> tuple[int, mesh_pb2.Data] | None:
        """``perhapsDecode``: try every active channel whose hash matches."""
        for index in self._active_channels():
            key = self._channel_key(index)
            if key is None or self._channel_hash(index) != (packet.channel & 0xFF):
                continue
            plain = crypt(key, packet.id, _from(packet), packet.encrypted)
            data = mesh_pb2.Data()
            try:
                data.ParseFromString(plain)
            except DecodeError:
                continue
            if (
                data.portnum != _PORT.UNKNOWN_APP
                and len(data.payload) <= DATA_PAYLOAD_MAX
            ):
                return index, data
        return None

    # ------------------------------------------------------------------ mesh side

    def _remember(self, sender: int, packet_id: int) -> bool:
        """``PacketHistory::wasSeenRecently``; return True if already seen."""
        key = (sender, packet_id)
        if key in self._history:
            self._history.move_to_end(key)
            return True
        self._history[key] = None
        while len(self._history) > PACKET_HISTORY_SIZE:
            self._history.popitem(last=False)
        return False

    def _to_phone(self, packet: mesh_pb2.MeshPacket) -> None:
        """``MeshService::sendToPhone``: ``toPhoneQueue`` shared by all clients.

        When full, text messages push out the oldest entry, other packets are
        dropped (both counted in ``phone_dropped``).
        """
        if len(self._phone_queue) >= self._to_phone_depth:
            self.phone_dropped += 1
            if packet.decoded.portnum in (_TEXT, _PORT.RANGE_TEST_APP):
                self._phone_queue.popleft()
            else:
                return
        self._phone_queue.append(packet)
        self._pump_all()

    def _qs_enqueue(self, status: mesh_pb2.QueueStatus) -> None:
        """``MeshService::sendQueueStatusToPhone``: 2 entries, drop-oldest."""
        if len(self._qs_queue) >= MAX_RX_QUEUESTATUS_TOPHONE:
            self._qs_queue.popleft()
        self._qs_queue.append(status)

    def _receive(
        self, packet: mesh_pb2.MeshPacket, channel_index: int
    ) -> mesh_pb2.MeshPacket | None:
        """``Router::handleReceived`` for a packet heard over LoRa.

        Returns the decoded packet (as the phone sees it), or ``None`` when the
        packet was a duplicate or could not be decoded.
        """
        p = mesh_pb2.MeshPacket()
        p.CopyFrom(packet)
        if not p.id:
            p.id = _random_packet_id()
        if not p.rx_time:
            p.rx_time = int(time.time())
        p.transport_mechanism = mesh_pb2.MeshPacket.TransportMechanism.TRANSPORT_LORA
        sender = _from(p)
        if sender == self._active.node_num or self._remember(sender, p.id):
            return None
        if p.HasField("decoded"):
            decoded = p
            if not p.pki_encrypted:
                decoded.channel = channel_index
            encrypted = self._encrypt(decoded, channel_index)
            if encrypted is None:
                return None
        elif p.pki_encrypted:
            decoded, encrypted = None, p
        else:
            found = self._perhaps_decode(p)
            if found is None:
                return None  # not one of our channels: neither delivered nor uplinked
            channel_index, data = found
            decoded = mesh_pb2.MeshPacket()
            decoded.CopyFrom(p)
            decoded.decoded.CopyFrom(data)
            decoded.channel = channel_index
            encrypted = p
        if decoded is not None:
            self._deliver_if_for_us(decoded)
        self._mqtt_on_send(encrypted, decoded, channel_index)
        return decoded

    def _deliver_if_for_us(self, decoded: mesh_pb2.MeshPacket) -> None:
        """``RoutingModule``: broadcasts and packets to us go to the phone."""
        if _from(decoded) and decoded.to in (BROADCAST_NUM, self._active.node_num):
            phone = mesh_pb2.MeshPacket()
            phone.CopyFrom(decoded)
            self._to_phone(phone)

    def _send_own_nodeinfo(self) -> None:
        """``NodeInfoModule::sendOurNodeInfo``: broadcast over RF (and MQTT uplink)."""
        p = mesh_pb2.MeshPacket(
            to=BROADCAST_NUM,
            id=_random_packet_id(),
            channel=0,
            hop_limit=self._active.hop_limit,
            hop_start=self._active.hop_limit,
            rx_time=int(time.time()),
            decoded=mesh_pb2.Data(
                portnum=_PORT.NODEINFO_APP,
                payload=self._own_user().SerializeToString(),
                bitfield=BITFIELD_OK_TO_MQTT if self._active.ok_to_mqtt else 0,
            ),
        )
        _set_from(p, self._active.node_num)
        self._remember(self._active.node_num, p.id)
        encrypted = self._encrypt(p, 0)
        if encrypted is not None:
            self._mqtt_on_send(encrypted, p, 0)

    # ------------------------------------------------------------------ MQTT

    def _publish(self, topic: str, data: bytes, retained: bool = False) -> None:
        """``MQTT::publish`` in proxy mode -> ``sendMqttMessageToClientProxy``.

        Topic truncated to 59 bytes, data to 435 bytes; into the 8-entry
        drop-oldest ``toPhoneMqttProxyQueue`` (``src/mesh/MeshService.cpp``).
        """
        msg = mesh_pb2.MqttClientProxyMessage(
            topic=topic.encode()[:PROXY_TOPIC_MAX].decode(errors="ignore"),
            data=data[:PROXY_DATA_MAX],
            retained=retained,
        )
        self._proxy_enqueue(msg)

    def _proxy_enqueue(self, msg: mesh_pb2.MqttClientProxyMessage) -> None:
        if len(self._proxy_queue) >= MAX_RX_MQTTPROXY_TOPHONE:
            self._proxy_queue.popleft()
            self.uplinks_dropped += 1
        self._proxy_queue.append(msg)
        self._serial_log("DEBUG", "mqtt", f"MQTT Publish {msg.topic}")
        self._pump_all()

    def _mqtt_on_send(
        self,
        encrypted: mesh_pb2.MeshPacket,
        decoded: mesh_pb2.MeshPacket | None,
        channel_index: int,
    ) -> None:
        """``MQTT::onSend`` (``src/mqtt/MQTT.cpp``): uplink one packet."""
        a = self._active
        if not (a.mqtt_enabled and a.proxy_to_client_enabled):
            return  # no MQTT object / direct connection not modelled
        if encrypted.via_mqtt:
            return
        if not any(spec.uplink for spec in a.channels[:MAX_NUM_CHANNELS]):
            return
        spec = a.channel_spec(channel_index)
        uplink = spec is not None and spec.uplink
        if decoded is not None and decoded.HasField("decoded"):
            data = decoded.decoded
            dont_uplink = not data.HasField("bitfield") or not (
                data.bitfield & BITFIELD_OK_TO_MQTT
            )
            psk = spec.psk if spec is not None else b""
            # Literal condition of the source (a non-default 16-byte key counts).
            default_key = (
                len(psk) < 2
                or (len(psk) == 16 and psk != DEFAULT_PSK)
                or len(psk) == 32
            )
            if (
                _from(decoded) != a.node_num
                and not _address_is_private(a.mqtt_address)
                and dont_uplink
                and default_key
            ):
                return
            if a.mqtt_address == DEFAULT_MQTT_ADDRESS and data.portnum in (
                _PORT.RANGE_TEST_APP,
                _PORT.DETECTION_SENSOR_APP,
            ):
                return
        pki = encrypted.pki_encrypted or (decoded is not None and decoded.pki_encrypted)
        if not (uplink or pki):
            return
        channel_id = "PKI" if pki else self.channel_name(channel_index)
        if a.mqtt_encryption_enabled:
            packet = encrypted
        elif decoded is not None and decoded.HasField("decoded"):
            packet = decoded
        else:
            return
        envelope = mqtt_pb2.ServiceEnvelope(
            packet=packet, channel_id=channel_id, gateway_id=a.node_id
        )
        topic = f"{a.topic_root()}/2/e/{channel_id}/{a.node_id}"
        self._publish(topic, envelope.SerializeToString())

    def _mqtt_on_client_proxy_receive(
        self, msg: mesh_pb2.MqttClientProxyMessage
    ) -> None:
        """``MQTT::onClientProxyReceive`` -> ``onReceive`` -> ``onReceiveProto``."""
        if msg.WhichOneof("payload_variant") == "text":
            # <= 2.7.26 reads payload_variant.data of the union: text is misparsed
            # (its first bytes become a length) and never yields an envelope.
            self._serial_log("ERROR", "mqtt", "Invalid MQTT service envelope")
            return
        if not msg.data:
            self._serial_log(
                "WARN", "mqtt", f"Empty MQTT payload received, topic {msg.topic}!"
            )
            return
        self._on_receive_proto(msg.data)

    def _on_receive_proto(self, payload: bytes) -> None:
        """``onReceiveProto`` (2.7 branch order, reference §1.2 and addendum)."""
        a = self._active
        envelope = mqtt_pb2.ServiceEnvelope()
        try:
            envelope.ParseFromString(payload)
        except DecodeError:
            return
        if not (
            envelope.channel_id and envelope.gateway_id and envelope.HasField("packet")
        ):
            return
        # 2. channel: "PKI" (if some channel has downlink) or an exact name match
        #    of an active channel with downlink enabled.
        channel_index = 0
        if envelope.channel_id == "PKI":
            if not self._any_downlink():
                return
        else:
            found = None
            for index in self._active_channels():
                if self.channel_name(index).lower() == envelope.channel_id.lower():
                    found = index
                    break
            if (
                found is None
                or self.channel_name(found) != envelope.channel_id
                or not a.channels[found].downlink
            ):
                return
            channel_index = found
        packet = envelope.packet
        sender = _from(packet)
        # 3. own gateway: implicit ACK for our own packets, else ignore.
        if envelope.gateway_id == a.node_id:
            if sender == a.node_num:
                self.implicit_acks += 1
                ack = self._routing_ack(
                    a.node_num, a.node_num, packet.id, channel_index
                )
                ack.transport_mechanism = (
                    mesh_pb2.MeshPacket.TransportMechanism.TRANSPORT_MQTT
                )
                self._to_phone(ack)
            return
        # 4. our packet via another gateway.
        if sender == a.node_num:
            return
        # 5. hop sanity.
        if packet.hop_limit > HOP_MAX or packet.hop_start > HOP_MAX:
            return
        # 6. copy for the router.
        p = mesh_pb2.MeshPacket()
        p.CopyFrom(packet)
        p.via_mqtt = True
        p.transport_mechanism = mesh_pb2.MeshPacket.TransportMechanism.TRANSPORT_MQTT
        if sender in (0, BROADCAST_NUM):
            return
        # 7. decoded payloads.
        decoded: mesh_pb2.MeshPacket | None = None
        if p.HasField("decoded"):
            if a.mqtt_encryption_enabled or p.decoded.portnum == _PORT.ADMIN_APP:
                return
            p.channel = channel_index
            decoded = p
        elif envelope.channel_id == "PKI":
            # 8. PKI: to us, or both ends known (Curve25519 not modelled).
            known = {num for num, _, _ in a.other_nodes} | {a.node_num}
            if not (p.to == a.node_num or (sender in known and p.to in known)):
                return
        else:
            found_key = self._perhaps_decode(p)
            if found_key is None:
                return  # 2.7: undecodable -> silent drop
            decoded = mesh_pb2.MeshPacket()
            decoded.CopyFrom(p)
            decoded.decoded.CopyFrom(found_key[1])
            decoded.channel = found_key[0]
        # Router: duplicate suppression by (sender, id) (addendum item 7).
        if self._remember(sender, p.id):
            return
        self.mesh_injected.append(p)
        self._serial_log("INFO", "mqtt", f"Received MQTT packet id={p.id:#x}")
        if decoded is not None:
            if not decoded.rx_time:
                decoded.rx_time = int(time.time())
            self._deliver_if_for_us(decoded)
        self._notify()

    # ------------------------------------------------------------------ driving it

    def inject_uplink(
        self,
        topic: str,
        data: bytes | None = None,
        text: str | None = None,
        retained: bool = False,
    ) -> None:
        """Queue a raw ``MqttClientProxyMessage`` as ``MQTT::publish`` would.

        ``data`` (bytes) or ``text`` (str), not both; topic truncated to 59 bytes,
        data to 435 bytes, text to 434 bytes (nanopb field sizes).  Goes into the
        8-entry drop-oldest queue; delivered only to a client in the live state,
        whether or not one is attached (``src/mesh/MeshService.cpp``).
        """
        if data is not None and text is not None:
            raise ValueError("give data or text, not both")
        msg = mesh_pb2.MqttClientProxyMessage(
            topic=topic.encode()[:PROXY_TOPIC_MAX].decode(errors="ignore"),
            retained=retained,
        )
        if text is not None:
            msg.text = text.encode()[:PROXY_TEXT_MAX].decode(errors="ignore")
        else:
            msg.data = (data or b"")[:PROXY_DATA_MAX]
        self._proxy_enqueue(msg)

    def receive_text(  # noqa: PLR0917 - signature fixed by the public API
        self,
        from_num: int,
        text: str,
        channel_index: int = 0,
        to: int = BROADCAST_NUM,
        snr: float = 6.25,
        rssi: int = -80,
    ) -> mesh_pb2.MeshPacket:
        """A ``TEXT_MESSAGE_APP`` packet heard over LoRa from ``from_num``.

        Delivered to the client (``FromRadio.packet``, decoded, ``channel`` =
        index) when broadcast or addressed to us, and uplinked per
        ``MQTT::onSend`` (the simulated sender sets ``OK_TO_MQTT``).  ``snr`` in
        dB, ``rssi`` in dBm.  Returns the decoded packet as the client sees it.
        """
        payload = text.encode()
        if len(payload) > DATA_PAYLOAD_MAX:
            raise ValueError(f"text longer than {DATA_PAYLOAD_MAX} bytes")
        packet = mesh_pb2.MeshPacket(
            to=to,
            id=_random_packet_id(),
            channel=channel_index,
            rx_time=int(time.time()),
            rx_snr=snr,
            rx_rssi=rssi,
            hop_limit=self._active.hop_limit,
            hop_start=self._active.hop_limit,
            decoded=mesh_pb2.Data(
                portnum=_TEXT, payload=payload, bitfield=BITFIELD_OK_TO_MQTT
            ),
        )
        _set_from(packet, from_num)
        result = self._receive(packet, channel_index)
        return result if result is not None else packet

    def receive_packet(
        self, packet: mesh_pb2.MeshPacket, channel_index: int = 0
    ) -> None:
        """Any packet heard over LoRa (position, telemetry, nodeinfo, ...).

        ``decoded`` packets are encrypted with the channel key for the uplink;
        ``encrypted`` ones are decrypted with a channel whose hash matches
        (``channel_index`` is then taken from that channel) or ignored.  Zero
        ``id``/``rx_time`` are filled in; duplicates (same sender and id) are
        dropped as by ``PacketHistory``.
        """
        self._receive(packet, channel_index)

    def receive_position(
        self,
        from_num: int,
        latitude: float,
        longitude: float,
        altitude: int = 0,
        channel_index: int = 0,
    ) -> None:
        """A ``POSITION_APP`` broadcast from ``from_num`` (degrees, metres)."""
        position = mesh_pb2.Position(
            latitude_i=round(latitude * 1e7),
            longitude_i=round(longitude * 1e7),
            altitude=altitude,
            time=int(time.time()),
            precision_bits=32,
        )
        self._receive(
            self._rf_packet(from_num, _PORT.POSITION_APP, position.SerializeToString()),
            channel_index,
        )

    def receive_telemetry(
        self,
        from_num: int,
        *,
        battery_level: int = 80,
        voltage: float = 3.95,
        channel_utilization: float = 10.0,
        air_util_tx: float = 1.5,
        channel_index: int = 0,
    ) -> None:
        """A ``TELEMETRY_APP`` device-metrics broadcast from ``from_num`` (%, V, %, %)."""
        telemetry = telemetry_pb2.Telemetry(
            time=int(time.time()),
            device_metrics=telemetry_pb2.DeviceMetrics(
                battery_level=battery_level,
                voltage=voltage,
                channel_utilization=channel_utilization,
                air_util_tx=air_util_tx,
                uptime_seconds=4242,
            ),
        )
        self._receive(
            self._rf_packet(
                from_num, _PORT.TELEMETRY_APP, telemetry.SerializeToString()
            ),
            channel_index,
        )

    def receive_nodeinfo(
        self, from_num: int, long_name: str, short_name: str, channel_index: int = 0
    ) -> None:
        """A ``NODEINFO_APP`` broadcast (``User``) from ``from_num``."""
        user = mesh_pb2.User(
            id=f"!{from_num:08x}",
            long_name=long_name,
            short_name=short_name,
            hw_model=mesh_pb2.HardwareModel.HELTEC_V3,
        )
        self._receive(
            self._rf_packet(from_num, _PORT.NODEINFO_APP, user.SerializeToString()),
            channel_index,
        )

    def _rf_packet(
        self, from_num: int, portnum: int, payload: bytes
    ) -> mesh_pb2.MeshPacket:
        packet = mesh_pb2.MeshPacket(
            to=BROADCAST_NUM,
            id=_random_packet_id(),
            rx_time=int(time.time()),
            rx_snr=round(random.uniform(-7.5, 9.0) * 4) / 4,
            rx_rssi=random.randint(-120, -60),
            hop_limit=self._active.hop_limit,
            hop_start=self._active.hop_limit,
            decoded=mesh_pb2.Data(
                portnum=portnum, payload=payload, bitfield=BITFIELD_OK_TO_MQTT
            ),
        )
        _set_from(packet, from_num)
        return packet

    def send_telemetry(self, *, uplink: bool = True) -> None:
        """Own ``TELEMETRY_APP`` device metrics (``DeviceTelemetryModule``).

        Sent to the client as ``FromRadio.packet`` (``sendToMesh(..., ccToPhone)``)
        with ``battery_level`` %, ``voltage`` V, ``channel_utilization`` % and
        ``air_util_tx`` % from the profile, and, being an own packet sent on
        channel 0, uplinked per ``MQTT::onSend`` unless ``uplink`` is false.
        """
        a = self._active
        a.battery_level = self.profile.battery_level
        a.voltage = self.profile.voltage
        a.channel_utilization = self.profile.channel_utilization
        a.air_util_tx = self.profile.air_util_tx
        telemetry = telemetry_pb2.Telemetry(
            time=int(time.time()), device_metrics=self._device_metrics()
        )
        p = mesh_pb2.MeshPacket(
            to=BROADCAST_NUM,
            id=_random_packet_id(),
            channel=0,
            rx_time=int(time.time()),
            hop_limit=a.hop_limit,
            hop_start=a.hop_limit,
            priority=mesh_pb2.MeshPacket.Priority.BACKGROUND,
            decoded=mesh_pb2.Data(
                portnum=_PORT.TELEMETRY_APP,
                payload=telemetry.SerializeToString(),
                bitfield=BITFIELD_OK_TO_MQTT if a.ok_to_mqtt else 0,
            ),
        )
        _set_from(p, a.node_num)
        self._remember(a.node_num, p.id)
        phone = mesh_pb2.MeshPacket()
        phone.CopyFrom(p)
        self._to_phone(phone)
        if uplink:
            encrypted = self._encrypt(p, 0)
            if encrypted is not None:
                self._mqtt_on_send(encrypted, p, 0)

    def send_map_report(self) -> bool:
        """``MQTT::perhapsReportToMap``: publish a ``MapReport`` to ``{root}/2/map/``.

        Needs ``mqtt_map_reporting_enabled``, proxy mode and a ``position``;
        returns whether a report was queued.  Position is truncated to
        ``map_position_precision`` bits (clamped to 12-15) and centred.
        """
        a = self._active
        if not (
            a.mqtt_enabled
            and a.mqtt_map_reporting_enabled
            and a.proxy_to_client_enabled
            and a.position is not None
        ):
            return False
        precision = min(max(a.map_position_precision, 12), 15)
        lat_i = round(a.position[0] * 1e7)
        lon_i = round(a.position[1] * 1e7)
        mask = (0xFFFFFFFF << (32 - precision)) & 0xFFFFFFFF

        def _quantise(value: int) -> int:
            raw = ((value & 0xFFFFFFFF) & mask) + (1 << (31 - precision))
            raw &= 0xFFFFFFFF
            return raw - (1 << 32) if raw & 0x80000000 else raw

        report = mqtt_pb2.MapReport(
            long_name=a.long_name,
            short_name=a.short_name,
            role=config_pb2.Config.DeviceConfig.Role.Value(a.role),
            hw_model=mesh_pb2.HardwareModel.Value(a.hw_model),
            firmware_version=a.firmware_version,
            region=config_pb2.Config.LoRaConfig.RegionCode.Value(a.region),
            modem_preset=config_pb2.Config.LoRaConfig.ModemPreset.Value(a.modem_preset),
            has_default_channel=any(
                spec.psk == b"\x01" and not spec.name for spec in a.channels
            ),
            latitude_i=_quantise(lat_i),
            longitude_i=_quantise(lon_i),
            altitude=a.position[2],
            position_precision=precision,
            num_online_local_nodes=len(a.other_nodes),
        )
        p = mesh_pb2.MeshPacket(
            to=BROADCAST_NUM,
            decoded=mesh_pb2.Data(
                portnum=_PORT.MAP_REPORT_APP, payload=report.SerializeToString()
            ),
        )
        _set_from(p, a.node_num)
        primary = next(
            (i for i, spec in enumerate(a.channels) if spec.role == "PRIMARY"), 0
        )
        envelope = mqtt_pb2.ServiceEnvelope(
            packet=p, channel_id=self.channel_name(primary), gateway_id=a.node_id
        )
        self._publish(f"{a.topic_root()}/2/map/", envelope.SerializeToString())
        return True

    async def drop_client(self) -> None:
        """The node closes the current TCP connection (serial: ends the session)."""
        session = self._tcp_session
        if session is not None:
            self._close_session(session)
            for _ in range(100):
                if self._tcp_session is not session:
                    break
                await asyncio.sleep(0.01)
        if self._serial_session is not None:
            self._close_session(self._serial_session)
        self._notify()

    async def reboot(self, *, downtime: float = 0.0) -> None:
        """Reboot the node and reload :attr:`profile`.

        Sends ``FromRadio.rebooted`` to a live TCP client (always on serial,
        ``StreamAPI::emitRebooted``), closes the TCP client and loses RAM state
        (queues, packet history).

        ``downtime`` (seconds) keeps the TCP port closed for that long.
        """
        for session in (self._tcp_session, self._serial_session):
            if session is None or session.closed:
                continue
            if session.state == _LIVE or session.kind == "serial":
                self._emit(session, mesh_pb2.FromRadio(rebooted=True))
        tcp = self._tcp_session
        if tcp is not None:
            self._close_session(tcp)
        if self._serial_session is not None:
            self._phone_api_close(self._serial_session)
            self._serial_session.parser = FrameParser()
        self._proxy_queue.clear()
        self._phone_queue.clear()
        self._qs_queue.clear()
        self._history.clear()
        self.reboot_count += 1
        self._active = self._load_profile()
        self._boot_time = time.monotonic()
        for _ in range(100):
            if self._tcp_session is None:
                break
            await asyncio.sleep(0.01)
        if downtime > 0 and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            await asyncio.sleep(downtime)
            await self.start_tcp(self._host, self.port)
        self._boot_log()
        self._notify()


__all__ = ["SimulatedNode"]
