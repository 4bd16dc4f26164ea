"""The project's one MQTT client: paho-mqtt driven by the asyncio event loop.

:class:`MqttClient` keeps one broker session alive for any number of
consumers (the node proxy now, the MQTT tools and the MCP-over-MQTT transport
next). It follows Home Assistant core's ``mqtt`` client
(``homeassistant/components/mqtt/client.py``): paho's blocking ``connect``
(DNS, TCP, TLS handshake) runs in the default executor, after which paho's
public socket callbacks (``on_socket_open``/``close``/``register_write``/
``unregister_write``) register the socket with ``loop.add_reader`` and
``loop.add_writer``, and ``loop_misc`` runs once a second for keep-alive. No
thread runs paho's network loop and no private paho method is used.

Properties kept from the earlier aiomqtt-based client and measured by
``bench/proxy.py``: no task per message (paho's ``on_message`` hands each
message to :class:`~.subscriptions.SubscriptionRegistry` directly), a bounded
receive path (paho reads what the socket holds; consumers keep their own
bounded queues), ``TCP_NODELAY`` on the socket (88 ms per QoS-1 round trip
without it, ``shared/reference/mqtt-broker.md`` §7), and writes registered
against the live socket object (no stale-descriptor race when the broker dies
mid-publish: paho unregisters the writer before it closes the socket).

Behaviour:

* MQTT 5 first; a broker that refuses it (CONNACK 132, 3.1.1 return code 1, or
  a connection closed before CONNACK) is asked again with MQTT 3.1.1 at once.
* Clean start, session expiry 0: every session starts empty and the
  :class:`~.subscriptions.SubscriptionRegistry` subscribes again after each
  reconnect (SUBACK-confirmed per filter).
* Credentials refused (CONNACK 134, 135, 138, 140; 3.1.1 codes 4 and 5) stop
  the client in :attr:`ClientState.AUTH_FAILED` until :meth:`update_settings`
  or :meth:`reconnect_now`.
* Reconnect delays: :class:`~.backoff.Backoff` from 1 s, capped at
  :data:`RECONNECT_CAP` (12 s): a broker that comes back is reconnected to
  within 12 s.
* Topic names and filters are validated (:mod:`.topics`) before anything is
  sent: a control character would make Mosquitto drop the connection.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field
import enum
import functools
import logging
import secrets
import socket
import ssl
from typing import Any, Final

from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions as PahoSubscribeOptions

from .backoff import Backoff
from .subscriptions import (
    MessageCallback,
    SubscribeOptions,
    Subscription,
    SubscriptionRegistry,
)
from .topics import validate_topic_name

_LOGGER = logging.getLogger(__name__)

PORT_PLAIN: Final = 1883
PORT_TLS: Final = 8883
# Longest reconnect delay in seconds (issue: recovery must not be slower than the outage).
RECONNECT_CAP: Final = 12.0
# Seconds to wait for CONNACK after the TCP/TLS connection is up.
CONNACK_TIMEOUT: Final = 10.0
# Seconds paho waits for the TCP connection itself (in the executor).
CONNECT_TIMEOUT: Final = 10.0
# Distinct PublishProperties values whose paho Properties are kept (LRU).
PROPERTIES_CACHE: Final = 256

# CONNACK reason codes (MQTT 5 §3.2.2.2; paho maps the 3.1.1 return codes onto
# them: 1 -> 132, 4 -> 134, 5 -> 135).
UNSUPPORTED_PROTOCOL: Final = 132
AUTH_REASON_CODES: Final = frozenset({134, 135, 138, 140})
CONNACK_REASONS: Final = {
    128: "unspecified error",
    129: "malformed packet",
    130: "protocol error",
    131: "implementation specific error",
    132: "unsupported protocol version",
    133: "client identifier not valid",
    134: "bad user name or password",
    135: "not authorized",
    136: "server unavailable",
    137: "server busy",
    138: "banned",
    140: "bad authentication method",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
    154: "retain not supported",
    155: "QoS not supported",
    156: "use another server",
    157: "server moved",
    159: "connection rate exceeded",
}


def connack_reason(code: int) -> str:
    """Return the MQTT 5 name of a CONNACK reason code (§3.2.2.2), e.g. ``not authorized``."""
    return CONNACK_REASONS.get(code, f"reason code {code}")


class ProtocolVersion(enum.IntEnum):
    """MQTT protocol levels (the CONNECT packet's protocol level byte)."""

    V311 = 4
    V5 = 5


class ClientState(enum.StrEnum):
    """Connection state of an :class:`MqttClient`."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


class MqttError(Exception):
    """Base of the client's errors."""


class MqttAuthError(MqttError):
    """The broker rejected the credentials or the client (CONNACK 134/135/138/140)."""


class MqttTlsError(MqttError):
    """The TLS handshake failed (certificate, host name, protocol)."""


class MqttTimeoutError(MqttError, TimeoutError):
    """The broker did not answer CONNECT in time."""


class MqttConnectError(MqttError):
    """The broker is unreachable or refused the connection for another reason.

    ``reason_code`` is the CONNACK reason code when the broker sent one.
    """

    def __init__(self, message: str, reason_code: int | None = None) -> None:
        """Keep the CONNACK ``reason_code`` if there was one."""
        super().__init__(message)
        self.reason_code = reason_code


class NotConnectedError(MqttError):
    """There is no broker session to publish on."""


class ConnectionLostError(MqttError):
    """The session ended before the broker acknowledged a publish."""


class PublishRefusedError(MqttError):
    """The broker refused a publish (MQTT 5 PUBACK reason code >= 0x80)."""

    def __init__(self, reason_code: int, reason: str) -> None:
        """Keep the PUBACK ``reason_code``."""
        super().__init__(f"broker refused the publish: {reason} ({reason_code})")
        self.reason_code = reason_code


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """Where and how to connect: broker address, TLS and credentials.

    ``port`` is a TCP port; ``verify_tls`` false accepts self-signed
    certificates (neither chain nor host name is checked); ``ca_file`` is a
    PEM file of extra trusted CAs. The password never appears in ``repr``.
    """

    host: str
    port: int = PORT_PLAIN
    tls: bool = False
    verify_tls: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    def describe(self) -> str:
        """Return ``mqtts://user@host:port`` without the password (for logs/UI)."""
        scheme = "mqtts" if self.tls else "mqtt"
        user = f"{self.username}@" if self.username else ""
        return f"{scheme}://{user}{self.host}:{self.port}"


def build_tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """Return the client TLS context for ``settings``.

    Blocking (loads CA certificates): call it in an executor.

    Raises:
        OSError, ssl.SSLError: the CA file cannot be read or parsed.

    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if settings.ca_file:
        context.load_verify_locations(cafile=settings.ca_file)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@dataclass(frozen=True, slots=True)
class PublishProperties:
    """MQTT 5 PUBLISH properties (§3.3.2.3) this project uses; ignored on 3.1.1.

    ``message_expiry_interval`` is in seconds; ``payload_format_indicator`` 1
    means the payload is UTF-8 text.
    """

    user_properties: tuple[tuple[str, str], ...] = ()
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry_interval: int | None = None
    content_type: str | None = None
    payload_format_indicator: int | None = None

    def to_paho(self) -> Properties:
        """Return paho's PUBLISH ``Properties`` with the fields that are set."""
        props = Properties(PacketTypes.PUBLISH)
        if self.user_properties:
            props.UserProperty = list(self.user_properties)
        if self.response_topic is not None:
            props.ResponseTopic = self.response_topic
        if self.correlation_data is not None:
            props.CorrelationData = self.correlation_data
        if self.message_expiry_interval is not None:
            props.MessageExpiryInterval = self.message_expiry_interval
        if self.content_type is not None:
            props.ContentType = self.content_type
        if self.payload_format_indicator is not None:
            props.PayloadFormatIndicator = self.payload_format_indicator
        return props

    @classmethod
    def from_paho(cls, props: Properties | None) -> PublishProperties | None:
        """Return the properties of a received PUBLISH, ``None`` if it has none."""
        if props is None:
            return None
        values = props.__dict__
        user = values.get("UserProperty")
        result = cls(
            user_properties=tuple((str(k), str(v)) for k, v in user) if user else (),
            response_topic=values.get("ResponseTopic"),
            correlation_data=values.get("CorrelationData"),
            message_expiry_interval=values.get("MessageExpiryInterval"),
            content_type=values.get("ContentType"),
            payload_format_indicator=values.get("PayloadFormatIndicator"),
        )
        return None if result == _NO_PROPERTIES else result


_NO_PROPERTIES = PublishProperties()


@functools.lru_cache(maxsize=PROPERTIES_CACHE)
def _paho_properties(properties: PublishProperties) -> Properties:
    """Paho's ``Properties`` for ``properties``, built once per distinct value.

    Building one costs about 15 µs (paho validates every attribute set); a
    publisher sends the same properties again and again (the MCP-over-MQTT
    user properties are constant per session). Sharing the object is safe:
    paho's ``publish`` only reads it (``Properties.pack`` when the packet is
    built, and again for a QoS > 0 retransmission) and never changes it.
    Bounded LRU: values that change per message (correlation data) only
    displace each other.
    """
    return properties.to_paho()


class Message:
    """A received PUBLISH: ``topic`` name, ``payload`` bytes, ``qos``, ``retain``.

    ``properties`` (MQTT 5) is converted from paho's on first access only, so
    consumers that do not read them pay nothing.
    """

    __slots__ = (
        "_converted",
        "_properties",
        "_raw",
        "payload",
        "qos",
        "retain",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        raw_properties: Properties | None = None,
        properties: PublishProperties | None = None,
    ) -> None:
        """Create a message; pass paho's ``raw_properties`` or ready ``properties``."""
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self._raw = raw_properties
        self._properties = properties
        self._converted = raw_properties is None

    @property
    def properties(self) -> PublishProperties | None:
        """The MQTT 5 properties, ``None`` on 3.1.1 or when there are none."""
        if not self._converted:
            self._properties = PublishProperties.from_paho(self._raw)
            self._converted = True
        return self._properties

    def __repr__(self) -> str:
        """Show topic, size and flags, not the payload."""
        return (
            f"Message({self.topic!r}, {len(self.payload)} bytes, qos={self.qos}, "
            f"retain={self.retain})"
        )


@dataclass(frozen=True, slots=True)
class Will:
    """The will message the broker publishes if the session ends uncleanly."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = False
    properties: PublishProperties | None = None


@dataclass(slots=True)
class ClientStats:
    """Counters of one :class:`MqttClient` since it was created."""

    connects: int = 0
    failures: int = 0
    published: int = 0
    refused_publishes: int = 0
    lost_publishes: int = 0
    received: int = 0
    invalid_topics: int = 0
    last_error: str | None = None


type PublishCallback = Callable[[MqttError | None], None]
type StateListener = Callable[[ClientState], None]


class _SessionEnded(Exception):
    """Internal: the connection of a session ended; the message says why."""


class _ProtocolRefusedError(MqttConnectError):
    """Internal: the broker does not speak the protocol version we offered."""


class _Connection:
    """One network connection: a fresh paho client wired to the event loop."""

    def __init__(self, owner: MqttClient, protocol: ProtocolVersion) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.protocol = protocol
        settings = owner.settings
        self.paho = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=owner.client_id,
            protocol=paho.MQTTv5 if protocol is ProtocolVersion.V5 else paho.MQTTv311,
            clean_session=None if protocol is ProtocolVersion.V5 else True,
            reconnect_on_failure=False,
        )
        client = self.paho
        client.suppress_exceptions = True
        client.connect_timeout = CONNECT_TIMEOUT
        client.max_inflight_messages_set(owner.inflight)
        client.max_queued_messages_set(0)
        if settings.username:
            client.username_pw_set(settings.username, settings.password)
        if owner.tls_context is not None:
            client.tls_set_context(owner.tls_context)
        if (will := owner.will) is not None:
            client.will_set(
                will.topic,
                will.payload,
                will.qos,
                will.retain,
                properties=(
                    will.properties.to_paho()
                    if will.properties and protocol is ProtocolVersion.V5
                    else None
                ),
            )
        client.on_socket_open = self._on_socket_open_threadsafe
        client.on_socket_register_write = self._on_register_write_threadsafe
        client.on_socket_close = self._on_socket_close
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = owner._on_paho_message
        client.on_publish = owner._on_paho_publish
        client.on_subscribe = owner._on_paho_subscribe
        client.on_unsubscribe = owner._on_paho_unsubscribe
        self.connack: asyncio.Future[None] = self.loop.create_future()
        self.ended: asyncio.Future[str] = self.loop.create_future()
        self.abandoned = False
        # Inside a paho call that is followed by flush(): a write paho asks
        # for is left to flush() (see _on_register_write).
        self.busy = False
        self.deferring = False
        # Whether loop.add_writer is active for the socket.
        self._writer = False
        # Whether the broker accepts Subscription Identifiers (set at CONNACK).
        self.subscription_identifiers = False
        self._misc: asyncio.TimerHandle | None = None
        self._sock: Any = None

    # -- connect -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and wait for a successful CONNACK.

        Raises:
            MqttAuthError, MqttTlsError, MqttTimeoutError, MqttConnectError,
            _ProtocolRefusedError: as the names say.

        """
        settings = self.owner.settings
        properties = None
        if self.protocol is ProtocolVersion.V5 and self.owner.connect_user_properties:
            properties = Properties(PacketTypes.CONNECT)
            properties.UserProperty = list(self.owner.connect_user_properties)
        connect = functools.partial(
            self.paho.connect,
            settings.host,
            settings.port,
            keepalive=self.owner.keepalive,
            properties=properties,
            clean_start=(
                True
                if self.protocol is ProtocolVersion.V5
                else paho.MQTT_CLEAN_START_FIRST_ONLY
            ),
        )
        try:
            await self.loop.run_in_executor(None, connect)
        except ssl.SSLError as err:
            raise MqttTlsError(f"TLS failed: {err}") from err
        except TimeoutError as err:
            raise MqttTimeoutError(
                f"no connection within {CONNECT_TIMEOUT:g} s"
            ) from err
        except (OSError, ValueError) as err:
            raise MqttConnectError(f"cannot connect: {err}") from err
        # From here on paho calls back only from the event loop.
        self.paho.on_socket_open = self._on_socket_open
        self.paho.on_socket_register_write = self._on_register_write
        try:
            async with asyncio.timeout(CONNACK_TIMEOUT):
                await asyncio.shield(self.connack)
        except TimeoutError as err:
            raise MqttTimeoutError(f"no CONNACK within {CONNACK_TIMEOUT:g} s") from err

    def abandon(self) -> None:
        """Give up a connect in progress (cancelled); close whatever it opens."""
        self.abandoned = True
        self.close()

    def close(self) -> None:
        """Close the connection now: DISCONNECT if possible, then the socket."""
        if self._sock is not None:
            with contextlib.suppress(Exception):
                self.paho.disconnect()
                self.paho.loop_write()
        self._stop_io()

    def _stop_io(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
            with contextlib.suppress(Exception):
                sock.close()
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._end("closed")

    def _end(self, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)
        if not self.connack.done():
            self.connack.set_exception(
                _ProtocolRefusedError(f"connection closed before CONNACK ({reason})")
                if self.protocol is ProtocolVersion.V5
                else MqttConnectError(f"connection closed before CONNACK ({reason})")
            )
            self.connack.exception()  # retrieved here; open() re-raises it

    # -- socket callbacks ----------------------------------------------------------

    def _on_socket_open_threadsafe(
        self, client: paho.Client, _u: Any, sock: Any
    ) -> None:
        _set_nodelay(sock)
        self.loop.call_soon_threadsafe(self._on_socket_open, client, _u, sock)

    def _on_socket_open(self, client: paho.Client, _u: Any, sock: Any) -> None:
        _set_nodelay(sock)
        if self.abandoned or self.ended.done():
            # A connect cancelled while paho was still connecting in the
            # executor: let paho close the socket it just opened.
            with contextlib.suppress(Exception):
                client.disconnect()
            sock.close()
            return
        self._sock = sock
        self.loop.add_reader(sock, self._readable)
        self._misc = self.loop.call_later(1.0, self._tick)

    def _on_register_write_threadsafe(
        self, client: paho.Client, _u: Any, sock: Any
    ) -> None:
        self.loop.call_soon_threadsafe(self._on_register_write, client, _u, sock)

    def _on_register_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        """Watch the socket for writability: paho has bytes to write.

        Not while ``busy`` or ``deferring``: :meth:`flush` follows and
        writes at once, registering the writer only for what the socket did
        not take. Saves two ``epoll_ctl`` calls per publish.
        """
        if self.busy or self.deferring or self._writer:
            return
        if sock is self._sock and sock.fileno() != -1:
            self.loop.add_writer(sock, self._writable)
            self._writer = True

    def _on_unregister_write(self, client: paho.Client, _u: Any, sock: Any) -> None:
        if self._writer and sock.fileno() != -1:
            self.loop.remove_writer(sock)
        self._writer = False

    def _on_socket_close(self, client: paho.Client, _u: Any, sock: Any) -> None:
        if sock is self._sock:
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
            self._writer = False
            self._sock = None
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._end("connection closed")

    def _readable(self) -> None:
        self.busy = True
        try:
            rc = self.paho.loop_read()
        except Exception as err:
            # paho raises on a packet it cannot parse (Mosquitto 2.0 answers an
            # oversize publish with PUBACK reason 0x95, invalid for PUBACK):
            # a protocol error, so close instead of spinning on the socket.
            _LOGGER.warning("invalid packet from the broker (%r); disconnecting", err)
            self._end(f"protocol error: {err!r}")
            self._stop_io()
            return
        finally:
            self.busy = False
        if rc != paho.MQTT_ERR_SUCCESS:
            self._end(paho.error_string(rc))
        else:
            # Acknowledgements and answers queued by the callbacks go out now.
            self.flush()

    def _writable(self) -> None:
        self.busy = True
        try:
            rc = self.paho.loop_write()
        finally:
            self.busy = False
        if rc != paho.MQTT_ERR_SUCCESS:
            self._end(paho.error_string(rc))

    def flush(self) -> None:
        """Write what paho has queued now instead of one loop pass later.

        What the socket does not take is written when it becomes writable.
        """
        if self.busy or self._sock is None or not self.paho.want_write():
            return
        self._writable()
        sock = self._sock
        if sock is not None and not self._writer and self.paho.want_write():
            self.loop.add_writer(sock, self._writable)
            self._writer = True

    def _tick(self) -> None:
        self._misc = None
        self.busy = True
        try:
            rc = self.paho.loop_misc()
        finally:
            self.busy = False
        if rc == paho.MQTT_ERR_SUCCESS and self._sock is not None:
            self._misc = self.loop.call_later(1.0, self._tick)
            self.flush()
        else:
            self._end(
                "keep-alive timeout"
                if rc == paho.MQTT_ERR_SUCCESS
                else paho.error_string(rc)
            )

    # -- protocol callbacks --------------------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _u: Any,
        _flags: Any,
        reason_code: ReasonCode,
        props: Any,
    ) -> None:
        if self.connack.done():
            return
        code = int(reason_code.value)
        if code < 0x80:
            # Absent means available (MQTT 5 §3.2.2.3.12); Mosquitto omits it.
            self.subscription_identifiers = self.protocol is ProtocolVersion.V5 and (
                getattr(props, "SubscriptionIdentifierAvailable", 1) == 1
            )
            user = getattr(props, "UserProperty", None) or ()
            self.owner.connack_user_properties = tuple(
                (str(key), str(value)) for key, value in user
            )
            self.connack.set_result(None)
            return
        text = f"broker refused the connection: {connack_reason(code)} ({code})"
        error: MqttError
        if code in AUTH_REASON_CODES:
            error = MqttAuthError(text)
        elif code == UNSUPPORTED_PROTOCOL:
            error = _ProtocolRefusedError(text, code)
        else:
            error = MqttConnectError(text, code)
        self.connack.set_exception(error)
        self.connack.exception()

    def _on_disconnect(
        self,
        client: paho.Client,
        _u: Any,
        _flags: Any,
        reason_code: ReasonCode,
        _props: Any,
    ) -> None:
        self._end(
            f"disconnected: {reason_code}" if reason_code.value else "disconnected"
        )


def _set_nodelay(sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttClient:
    """One MQTT session kept alive, shared by any number of consumers.

    Consumers :meth:`subscribe` (callbacks get a :class:`Message` in the event
    loop; they must not block; one that raises is logged and counted and the
    others still get the message) and :meth:`publish`. Run :meth:`run` as a
    task; cancelling it closes the session. State changes go to every listener
    added with :meth:`add_state_listener`.
    """

    def __init__(
        self,
        settings: MqttSettings,
        *,
        client_id: str,
        will: Will | None = None,
        keepalive: int = 60,
        inflight: int = 20,
        backoff: Backoff | None = None,
        protocol: ProtocolVersion = ProtocolVersion.V5,
        tls_context: ssl.SSLContext | None = None,
        connect_user_properties: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """Prepare a client; nothing connects until :meth:`run`.

        ``keepalive`` is in seconds (at most 60 is used); ``inflight`` bounds
        QoS ≥ 1 publishes awaiting acknowledgement (Mosquitto grants 20).
        ``protocol`` V311 skips the MQTT 5 attempt. ``connect_user_properties``
        go into every MQTT 5 CONNECT (§3.1.2.11.8; e.g. the MCP-over-MQTT
        ``MCP-COMPONENT-TYPE`` and ``MCP-META``); the user properties of the
        last CONNACK are in :attr:`connack_user_properties`.
        """
        self.settings = settings
        self.client_id = client_id
        self.will = will
        self.connect_user_properties = connect_user_properties
        self.connack_user_properties: tuple[tuple[str, str], ...] = ()
        self.keepalive = min(max(keepalive, 5), 60)
        self.inflight = max(1, inflight)
        self.backoff = backoff or Backoff(cap=RECONNECT_CAP)
        self.tls_context = tls_context
        self.stats = ClientStats()
        self.state = ClientState.DISCONNECTED
        self.registry = SubscriptionRegistry(self._schedule_sync)
        self._preferred = protocol
        self.protocol = protocol
        self._retry_preferred = False
        self._connection: _Connection | None = None
        self._pending: dict[int, PublishCallback | None] = {}
        self._sub_mids: dict[int, list[str]] = {}
        self._listeners: list[StateListener] = []
        self._sync_handle: asyncio.Handle | None = None
        self._restart = asyncio.Event()
        self._connected = asyncio.Event()

    # -- consumers -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a session is up (CONNACK received, not yet lost)."""
        return self.state is ClientState.CONNECTED

    def add_state_listener(self, listener: StateListener) -> Callable[[], None]:
        """Call ``listener(state)`` on every state change; return a remover."""
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    async def wait_connected(self) -> None:
        """Wait until a session is up (use ``asyncio.timeout`` around it)."""
        await self._connected.wait()

    def subscribe(
        self,
        topic_filter: str,
        callback: MessageCallback,
        options: SubscribeOptions | None = None,
    ) -> Subscription:
        """Subscribe ``callback`` to ``topic_filter`` (now or on the next session).

        Returns the :class:`~.subscriptions.Subscription` (``cancel()`` ends it,
        ``await wait_granted()`` waits for the SUBACK).

        Raises:
            TopicError: the filter is invalid (nothing is sent).

        """
        return self.registry.add(topic_filter, callback, options)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        properties: PublishProperties | None = None,
        on_done: PublishCallback | None = None,
    ) -> None:
        """Publish on the current session, written at once when the socket allows.

        ``on_done(error)`` is called in the event loop once the publish is
        complete: ``None`` when written (QoS 0) or acknowledged (QoS 1, 2),
        :class:`PublishRefusedError` for a refusing PUBACK,
        :class:`ConnectionLostError` when the session ended first. For QoS 0
        it may be called from inside this method (the PUBLISH was written at
        once); for QoS 1 and 2 only later, from the loop.

        Raises:
            TopicError: ``topic`` is not a valid topic name.
            NotConnectedError: there is no session (nothing is queued; the
                caller decides whether to keep the message).

        """
        validate_topic_name(topic)
        connection = self._connection
        if connection is None or self.state is not ClientState.CONNECTED:
            raise NotConnectedError(f"not connected to {self.settings.describe()}")
        client = connection.paho
        # With on_publish set, paho builds a ReasonCode and a Properties
        # (about 20 µs) for every QoS 0 packet it writes: it is set only while
        # a publish needs the callback (QoS > 0, or on_done).
        tracked = qos > 0 or on_done is not None
        if tracked or self._pending:
            client.on_publish = self._on_paho_publish
        else:
            client.on_publish = None
        connection.deferring = True  # flush() below writes it
        try:
            info = client.publish(
                topic,
                payload,
                qos,
                retain,
                _paho_properties(properties)
                if properties is not None and connection.protocol is ProtocolVersion.V5
                else None,
            )
        finally:
            connection.deferring = False
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise NotConnectedError(paho.error_string(info.rc))
        if tracked:
            self._pending[info.mid] = on_done
            connection.flush()
            return
        connection.flush()
        # is_published() raises for a failed publish (rc NO_CONN: the session
        # is ending; the message is lost like a pending one).
        if info.rc == paho.MQTT_ERR_SUCCESS and info.is_published():
            self.stats.published += 1
        else:  # the socket did not take it all: count it when paho has written it
            self._pending[info.mid] = None
            client.on_publish = self._on_paho_publish

    async def publish_wait(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: PublishProperties | None = None,
    ) -> None:
        """Publish and wait until written (QoS 0) or acknowledged (QoS ≥ 1).

        Raises:
            TopicError, NotConnectedError, PublishRefusedError,
            ConnectionLostError: see :meth:`publish`.

        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished(error: MqttError | None) -> None:
            if done.done():
                return
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

        self.publish(
            topic,
            payload,
            qos=qos,
            retain=retain,
            properties=properties,
            on_done=finished,
        )
        await done

    def update_settings(
        self, settings: MqttSettings, tls_context: ssl.SSLContext | None = None
    ) -> None:
        """Use new settings: reconnect now (also leaves ``AUTH_FAILED``)."""
        if settings != self.settings:
            self.tls_context = tls_context
            self.protocol = self._preferred
        self.settings = settings
        self.reconnect_now()

    def reconnect_now(self) -> None:
        """Skip the current backoff delay (or drop the session) and connect again."""
        self.backoff.reset()
        self._restart.set()

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Connect and serve until cancelled; reconnect with backoff on failures."""
        try:
            while True:
                self._restart.clear()
                delay = await self._attempt()
                if self.state is ClientState.AUTH_FAILED:
                    await self._restart.wait()
                    continue
                self._set_state(ClientState.DISCONNECTED)
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._restart.wait()
        finally:
            self._set_state(ClientState.STOPPED)

    async def _attempt(self) -> float:
        """Run one connection; return the delay before the next attempt."""
        self._set_state(ClientState.CONNECTING)
        if self.settings.tls and self.tls_context is None:
            try:
                self.tls_context = await asyncio.get_running_loop().run_in_executor(
                    None, build_tls_context, self.settings
                )
            except (OSError, ssl.SSLError) as err:
                return self._failed(f"TLS set-up failed: {err}")
        connection = _Connection(self, self.protocol)
        try:
            await connection.open()
        except asyncio.CancelledError:
            connection.abandon()
            raise
        except _ProtocolRefusedError as err:
            connection.close()
            _LOGGER.info(
                "broker %s does not accept MQTT 5 (%s); using MQTT 3.1.1",
                self.settings.describe(),
                err,
            )
            self.protocol = ProtocolVersion.V311
            # A broker that closed the connection without a CONNACK may just
            # have been restarting: MQTT 5 is tried again after this session.
            self._retry_preferred = err.reason_code != UNSUPPORTED_PROTOCOL
            return 0.0
        except MqttAuthError as err:
            connection.close()
            self.stats.failures += 1
            self.stats.last_error = str(err)
            _LOGGER.warning(
                "broker %s rejected the credentials (%s); not retrying until the "
                "settings change",
                self.settings.describe(),
                err,
            )
            self._set_state(ClientState.AUTH_FAILED)
            return 0.0
        except MqttError as err:
            connection.close()
            return self._failed(str(err))
        self._connection = connection
        self.stats.connects += 1
        self.stats.last_error = None
        self.backoff.reset()
        _LOGGER.debug(
            "broker %s connected (MQTT %s)",
            self.settings.describe(),
            "5" if self.protocol is ProtocolVersion.V5 else "3.1.1",
        )
        self._set_state(ClientState.CONNECTED)
        self._sync()
        restart = asyncio.ensure_future(self._restart.wait())
        waiting: set[asyncio.Future[Any]] = {connection.ended, restart}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            restart.cancel()
            reason = connection.ended.result() if connection.ended.done() else None
            self._connection = None
            connection.close()
            self._session_ended()
            if self._retry_preferred:
                self._retry_preferred = False
                self.protocol = self._preferred
        if reason is None:
            return 0.0  # settings changed: reconnect at once
        return self._failed(f"connection lost: {reason}")

    def _session_ended(self) -> None:
        """Fail what was in flight and forget the broker-side subscriptions."""
        self._connected.clear()
        self.registry.session_lost()
        self._sub_mids.clear()
        pending, self._pending = self._pending, {}
        if self._sync_handle is not None:
            self._sync_handle.cancel()
            self._sync_handle = None
        # Listeners learn first (the state change), so that callbacks below can
        # see the client is down and queue instead of publishing.
        self._set_state(ClientState.DISCONNECTED)
        lost = ConnectionLostError("the broker session ended")
        for callback in pending.values():
            if callback is not None:
                self.stats.lost_publishes += 1
                _call(callback, lost)

    def _failed(self, reason: str) -> float:
        self.stats.failures += 1
        self.stats.last_error = reason
        delay = self.backoff.next_delay()
        _LOGGER.debug(
            "broker %s: %s; retrying in %.1f s", self.settings.describe(), reason, delay
        )
        return delay

    def _set_state(self, state: ClientState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is ClientState.CONNECTED:
            self._connected.set()
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                _LOGGER.exception("MQTT state listener failed")

    # -- subscriptions -------------------------------------------------------------

    def _schedule_sync(self) -> None:
        if self._sync_handle is None and self._connection is not None:
            self._sync_handle = asyncio.get_running_loop().call_soon(self._sync)

    def _sync(self) -> None:
        """Send the SUBSCRIBE/UNSUBSCRIBE the registry asks for (one packet each)."""
        self._sync_handle = None
        connection = self._connection
        if connection is None:
            return
        client = connection.paho
        removed = self.registry.take_removed()
        if removed:
            client.unsubscribe(removed)
        pending = self.registry.take_pending()
        if pending and connection.protocol is ProtocolVersion.V311:
            _rc, mid = client.subscribe([(f, options.qos) for f, options, _ in pending])
            if mid is not None:
                self._sub_mids[mid] = [f for f, _, _ in pending]
        elif pending and not connection.subscription_identifiers:
            _rc, mid = client.subscribe(
                [(f, _paho_options(options)) for f, options, _ in pending]
            )
            if mid is not None:
                self._sub_mids[mid] = [f for f, _, _ in pending]
        else:
            # A Subscription Identifier applies to the whole SUBSCRIBE packet:
            # one packet per filter, so each filter has its own (§3.8.2.1.2).
            for topic_filter, options, identifier in pending:
                properties = Properties(PacketTypes.SUBSCRIBE)
                properties.SubscriptionIdentifier = identifier
                _rc, mid = client.subscribe(
                    [(topic_filter, _paho_options(options))], properties=properties
                )
                if mid is not None:
                    self._sub_mids[mid] = [topic_filter]
        connection.flush()

    # -- paho callbacks (event loop) -----------------------------------------------

    def _on_paho_message(
        self, _client: paho.Client, _u: Any, msg: paho.MQTTMessage
    ) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self.stats.invalid_topics += 1  # MQTT requires UTF-8 topic names
            return
        self.stats.received += 1
        properties = getattr(msg, "properties", None)
        self.registry.dispatch(
            Message(
                topic,
                msg.payload,
                qos=msg.qos,
                retain=bool(msg.retain),
                raw_properties=properties,
            ),
            getattr(properties, "SubscriptionIdentifier", None),
        )

    def _on_paho_publish(
        self,
        client: paho.Client,
        _u: Any,
        mid: int,
        reason_code: ReasonCode,
        _props: Any,
    ) -> None:
        if mid not in self._pending:
            return  # an untracked QoS 0 publish, counted by publish()
        callback = self._pending.pop(mid)
        if not self._pending:
            client.on_publish = None
        error: MqttError | None = None
        if reason_code.is_failure:
            self.stats.refused_publishes += 1
            error = PublishRefusedError(int(reason_code.value), str(reason_code))
        else:
            self.stats.published += 1
        if callback is not None:
            _call(callback, error)

    def _on_paho_subscribe(
        self,
        _client: paho.Client,
        _u: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        _props: Any,
    ) -> None:
        filters = self._sub_mids.pop(mid, [])
        for topic_filter, code in zip(filters, reason_codes, strict=False):
            self.registry.acknowledged(
                topic_filter, str(code) if code.is_failure else None
            )

    def _on_paho_unsubscribe(self, *_args: Any) -> None:
        """UNSUBACK: nothing to do (the registry forgot the filter already)."""


def _paho_options(options: SubscribeOptions) -> PahoSubscribeOptions:
    """Return paho's MQTT 5 subscription options for ``options``."""
    return PahoSubscribeOptions(
        qos=options.qos,
        noLocal=options.no_local,
        retainAsPublished=options.retain_as_published,
        retainHandling=int(options.retain_handling),
    )


def _call(callback: PublishCallback, error: MqttError | None) -> None:
    try:
        callback(error)
    except Exception:
        _LOGGER.exception("publish completion callback failed")


async def _open_and_close(client: MqttClient, protocol: ProtocolVersion) -> None:
    """Open one connection of ``client`` with ``protocol`` and close it again."""
    connection = _Connection(client, protocol)
    try:
        await connection.open()
    finally:
        connection.close()


async def check_connection(settings: MqttSettings, *, timeout: float = 10.0) -> None:
    """Connect once (MQTT 5, then 3.1.1 if the broker refuses 5) and disconnect.

    Used by the config flows. ``timeout`` is in seconds for the whole check.

    Raises:
        MqttAuthError: the broker rejected the credentials.
        MqttTlsError: the TLS handshake or the certificate check failed.
        MqttTimeoutError: no CONNACK in time.
        MqttConnectError: the broker is unreachable or refused the connection.

    """
    client = MqttClient(settings, client_id=f"mqtt-bridge-check-{secrets.token_hex(6)}")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            if settings.tls:
                try:
                    client.tls_context = await loop.run_in_executor(
                        None, build_tls_context, settings
                    )
                except (OSError, ssl.SSLError) as err:
                    raise MqttTlsError(f"TLS set-up failed: {err}") from err
            try:
                await _open_and_close(client, ProtocolVersion.V5)
            except _ProtocolRefusedError:
                # A refusal of 3.1.1 too is a MqttConnectError (its base class).
                await _open_and_close(client, ProtocolVersion.V311)
    except TimeoutError as err:
        if isinstance(err, MqttError):
            raise
        raise MqttTimeoutError(f"no answer within {timeout:g} s") from err
