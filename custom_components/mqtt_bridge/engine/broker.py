"""MQTT broker client for the proxy, on ``aiomqtt`` (paho-mqtt driven by asyncio, no thread).

:class:`BrokerClient` keeps one broker session alive and independent of the node
link: it reconnects with exponential backoff and jitter (1 s to 60 s), keeps a
bounded drop-oldest queue of outgoing messages while the broker is away and
flushes it on reconnect, publishes at QoS 1 with a window of in-flight messages
(Mosquitto grants ``ReceiveMaximum`` 20), and keeps the broker's subscriptions
equal to the wanted set of topic filters.

A CONNACK that rejects the credentials (MQTT 5 reason codes 134, 135, 138, 140;
3.1.1 return codes 4 and 5) stops the client in ``AUTH_FAILED`` instead of
retrying; :meth:`BrokerClient.update_settings` starts it again. A broker that
refuses MQTT 5 (reason 132 / return code 1) is retried with MQTT 3.1.1.
``TCP_NODELAY`` is set on the socket (``shared/reference/mqtt-broker.md`` §7:
88 ms per QoS-1 round trip without it).

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
import contextlib
from dataclasses import dataclass
import enum
import logging
import socket
import ssl
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTTMessage
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from .node_link import Backoff
from .rules import BrokerSettings

_LOGGER = logging.getLogger(__name__)

# CONNACK reason codes that mean "your credentials/identity are not accepted".
_AUTH_REASONS = {134, 135, 138, 140}
_AUTH_RC_V311 = {4, 5}
_UNSUPPORTED_PROTOCOL = {132}


class BrokerState(enum.StrEnum):
    """Connection state of a :class:`BrokerClient`."""

    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    AUTH_FAILED = "auth_failed"
    STOPPED = "stopped"


@dataclass(slots=True)
class OutgoingMessage:
    """One message waiting to be published (``payload`` bytes, QoS 1)."""

    topic: str
    payload: bytes
    retain: bool
    seq: int = 0


@dataclass(slots=True)
class BrokerStats:
    """Counters of one :class:`BrokerClient` since it was created."""

    connects: int = 0
    failures: int = 0
    published: int = 0
    received: int = 0
    dropped: int = 0
    invalid_topics: int = 0
    rejected_subscriptions: int = 0
    last_error: str | None = None


def _reason_value(rc: object) -> int | None:
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    if isinstance(rc, int):
        return rc
    return None


def _abandon(client: aiomqtt.Client) -> None:
    """Close a client whose connect was cancelled half-way (socket and misc task).

    aiomqtt has no public way to abort ``__aenter__``; paho's ``_sock_close``
    runs aiomqtt's socket-close callback, which stops its ``_misc_loop`` task.
    """
    with contextlib.suppress(Exception):
        client._client._sock_close()
    misc = getattr(client, "_misc_task", None)
    if misc is not None and not misc.done():
        misc.cancel()


def build_tls_context(*, verify: bool) -> ssl.SSLContext:
    """Return a client TLS context (blocking: loads CA certificates; use an executor).

    ``verify`` false accepts self-signed certificates: neither the chain nor the
    hostname is checked.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class BrokerClient:
    """One MQTT client session kept alive, with an outgoing queue and subscriptions.

    ``on_message(topic, payload, retained)`` is called for every received
    message; ``on_state(state)`` on every state change; ``on_published(n)`` after
    messages were acknowledged. Callbacks run in the event loop and must not
    block or raise.
    """

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        client_id: str,
        on_message: Callable[[str, bytes, bool], None],
        on_state: Callable[[BrokerState], None] | None = None,
        on_published: Callable[[int], None] | None = None,
        on_dropped: Callable[[int], None] | None = None,
        queue_size: int = 1000,
        keepalive: int = 60,
        inflight: int = 20,
        no_local: bool = True,
        backoff: Backoff | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """Prepare a client; nothing connects until :meth:`run`."""
        self.settings = settings
        self.client_id = client_id
        self.keepalive = min(keepalive, 60)
        self.inflight = max(1, inflight)
        self.no_local = no_local
        self.queue_size = max(1, queue_size)
        self.backoff = backoff or Backoff()
        self.state = BrokerState.DISCONNECTED
        self.stats = BrokerStats()
        self.protocol = aiomqtt.ProtocolVersion.V5
        self._on_message = on_message
        self._on_state = on_state
        self._on_published = on_published
        self._on_dropped = on_dropped
        self._session: _PublishSession | None = None
        self._seq = 0
        self._tls_context = tls_context
        self._queue: deque[OutgoingMessage] = deque()
        self._queue_ready = asyncio.Event()
        self._wanted: frozenset[str] = frozenset()
        self._active: set[str] = set()
        self._subs_changed = asyncio.Event()
        self._restart = asyncio.Event()

    # -- public API ------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Messages waiting to be sent (the in-flight window is not counted)."""
        return len(self._queue)

    @property
    def subscriptions(self) -> frozenset[str]:
        """The topic filters the client keeps subscribed (wanted)."""
        return self._wanted

    @property
    def active_subscriptions(self) -> frozenset[str]:
        """The topic filters the broker has granted on the current session."""
        return frozenset(self._active)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 now, or queue the message; never blocks.

        With a live session, no backlog and room in the in-flight window the
        PUBLISH is written at once; otherwise the message waits in the queue,
        which drops its oldest message when full (drop-oldest, as the
        firmware's own queues; counted, see :meth:`_trim_queue`).
        """
        self._seq += 1
        item = OutgoingMessage(topic, payload, retain, self._seq)
        session = self._session
        if session is not None and not self._queue and session.try_start(item):
            return
        self._queue.append(item)
        self._queue_ready.set()
        self._trim_queue()

    def _trim_queue(self) -> None:
        """Drop the oldest messages beyond ``queue_size``.

        Counted in ``stats.dropped`` and reported to ``on_dropped(n)``, whether
        a new message or re-queued unacknowledged ones overflowed the queue.
        """
        dropped = 0
        while len(self._queue) > self.queue_size:
            self._queue.popleft()
            dropped += 1
        if dropped:
            self.stats.dropped += dropped
            if self._on_dropped is not None:
                self._on_dropped(dropped)

    def _requeue(self, items: list[OutgoingMessage]) -> None:
        """Put unacknowledged messages back at the front, in their original order."""
        self._queue.extendleft(sorted(items, key=lambda m: m.seq, reverse=True))
        self._trim_queue()
        self._queue_ready.set()

    def set_subscriptions(self, filters: Iterable[str]) -> None:
        """Make ``filters`` the subscribed set (subscribe new, unsubscribe gone)."""
        wanted = frozenset(filters)
        if wanted != self._wanted:
            self._wanted = wanted
            self._subs_changed.set()

    def update_settings(self, settings: BrokerSettings) -> None:
        """Reconnect with new settings (also leaves ``AUTH_FAILED``); keeps the queue."""
        if settings != self.settings:
            self._tls_context = None
        self.settings = settings
        self.reconnect_now()

    def reconnect_now(self) -> None:
        """Skip the current backoff delay (or drop the session) and connect again."""
        self.backoff.reset()
        self._restart.set()

    async def run(self) -> None:
        """Connect and serve until cancelled; reconnect with backoff on failures."""
        try:
            while True:
                self._restart.clear()
                delay = await self._attempt()
                if self.state is BrokerState.AUTH_FAILED:
                    await self._restart.wait()
                    continue
                self._set_state(BrokerState.DISCONNECTED)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._restart.wait()
        finally:
            self._set_state(BrokerState.STOPPED)

    # -- internals -------------------------------------------------------------

    def _set_state(self, state: BrokerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_state is not None:
                self._on_state(state)

    def _failed(self, reason: str) -> float:
        self.stats.failures += 1
        self.stats.last_error = reason
        delay = self.backoff.next_delay()
        _LOGGER.debug(
            "broker %s: %s; retrying in %.1f s", self.settings.describe(), reason, delay
        )
        return delay

    async def _context(self) -> ssl.SSLContext | None:
        if not self.settings.tls:
            return None
        if self._tls_context is None:
            self._tls_context = await asyncio.get_running_loop().run_in_executor(
                None, lambda: build_tls_context(verify=self.settings.verify_tls)
            )
        return self._tls_context

    def _client(self, tls_context: ssl.SSLContext | None) -> aiomqtt.Client:
        settings = self.settings
        client = _DirectClient(
            settings.host,
            settings.port,
            deliver=self._deliver,
            username=settings.username,
            password=settings.password,
            identifier=self.client_id,
            protocol=self.protocol,
            keepalive=self.keepalive,
            timeout=15,
            max_inflight_messages=self.inflight,
            tls_context=tls_context,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        # aiomqtt warns above 10 pending calls; our window is deliberate.
        client.pending_calls_threshold = self.inflight + 16
        return client

    def _deliver(self, message: MQTTMessage) -> None:
        """Hand one received message to ``on_message`` (called in paho's callback)."""
        try:
            topic = message.topic
        except UnicodeDecodeError:
            self.stats.invalid_topics += 1  # MQTT requires UTF-8 topic names
            return
        self.stats.received += 1
        self._on_message(topic, message.payload, bool(message.retain))

    async def _attempt(self) -> float:
        self._set_state(BrokerState.CONNECTING)
        try:
            client = self._client(await self._context())
        except (ssl.SSLError, OSError, ValueError) as err:
            return self._failed(f"TLS set-up failed: {err}")
        try:
            await client.__aenter__()
        except asyncio.CancelledError:
            _abandon(client)  # unload/reload while the CONNECT is in flight
            raise
        except aiomqtt.MqttCodeError as err:
            code = _reason_value(err.rc)
            if code in _UNSUPPORTED_PROTOCOL or (
                self.protocol is aiomqtt.ProtocolVersion.V5 and code == 1
            ):
                _LOGGER.info(
                    "broker %s refuses MQTT 5; using MQTT 3.1.1",
                    self.settings.describe(),
                )
                self.protocol = aiomqtt.ProtocolVersion.V311
                return 0.0
            if code in _AUTH_REASONS or (
                isinstance(err.rc, int) and err.rc in _AUTH_RC_V311
            ):
                self.stats.failures += 1
                self.stats.last_error = f"broker rejected the credentials: {err}"
                _LOGGER.warning(
                    "broker %s rejected the credentials (%s); not retrying until "
                    "the settings change",
                    self.settings.describe(),
                    err,
                )
                self._set_state(BrokerState.AUTH_FAILED)
                return 0.0
            return self._failed(f"connection refused: {err}")
        except aiomqtt.MqttError as err:
            return self._failed(f"cannot connect: {err}")
        except Exception as err:
            _LOGGER.debug("unexpected connect error", exc_info=True)
            return self._failed(f"cannot connect: {type(err).__name__}: {err}")
        self.stats.connects += 1
        self.stats.last_error = None
        self.backoff.reset()
        self._set_state(BrokerState.CONNECTED)
        _LOGGER.debug("broker %s connected", self.settings.describe())
        try:
            reason = await self._serve(client)
        finally:
            self._active.clear()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await client.__aexit__(None, None, None)
        return self._failed(reason) if reason else 0.0

    async def _serve(self, client: aiomqtt.Client) -> str | None:
        """Run reader, publisher and subscriber until one fails; return why."""
        tasks = {
            asyncio.create_task(self._reader(client), name="mqtt reader"),
            asyncio.create_task(self._publisher(client), name="mqtt publisher"),
            asyncio.create_task(self._subscriber(client), name="mqtt subscriber"),
            asyncio.create_task(self._restart.wait(), name="mqtt restart"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in done:
            if task.cancelled():
                continue
            err = task.exception()
            if err is not None:
                if not isinstance(err, aiomqtt.MqttError | OSError):
                    raise err
                return f"connection lost: {err}"
        return None  # settings changed: reconnect at once

    async def _reader(self, client: aiomqtt.Client) -> None:
        """Return (raise) when the session ends; messages arrive via ``_deliver``."""
        async for _ in client.messages:  # never yields: _DirectClient delivers
            pass

    async def _subscriber(self, client: aiomqtt.Client) -> None:
        subscribed = self._active
        subscribed.clear()
        while True:
            self._subs_changed.clear()
            wanted = set(self._wanted)
            gone = sorted(subscribed - wanted)
            new = sorted(wanted - subscribed)
            if gone:
                await client.unsubscribe(gone)
                subscribed.difference_update(gone)
            if new:
                if self.protocol is aiomqtt.ProtocolVersion.V5:
                    topics: list[tuple[str, SubscribeOptions]] | list[tuple[str, int]]
                    topics = [
                        (f, SubscribeOptions(qos=1, noLocal=self.no_local)) for f in new
                    ]
                else:
                    topics = [(f, 1) for f in new]
                granted = await client.subscribe(topics)
                for topic_filter, code in zip(new, granted, strict=False):
                    value = _reason_value(code)
                    if value is not None and value >= 0x80:
                        self.stats.rejected_subscriptions += 1
                        self.stats.last_error = (
                            f"broker refused subscription {topic_filter} ({code})"
                        )
                        _LOGGER.warning(
                            "broker %s refused subscription %s (%s)",
                            self.settings.describe(),
                            topic_filter,
                            code,
                        )
                    else:
                        subscribed.add(topic_filter)
                _LOGGER.debug("subscribed to %s", ", ".join(new))
            await self._subs_changed.wait()

    async def _publisher(self, client: aiomqtt.Client) -> None:
        """Drain the queue into the session's in-flight window until it fails."""
        session = _PublishSession(self, client)
        self._session = session
        queue = self._queue
        try:
            while not session.failed.done():
                while queue:
                    item = queue.popleft()
                    if not session.try_start(item):
                        queue.appendleft(item)
                        break
                self._queue_ready.clear()
                waiter = asyncio.ensure_future(self._queue_ready.wait())
                try:
                    await asyncio.wait(
                        {waiter, session.failed}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    waiter.cancel()
            raise session.failed.result()
        finally:
            self._session = None
            await session.close()

    def _acknowledged(self) -> None:
        self.stats.published += 1
        if self._on_published is not None:
            self._on_published(1)


class _DirectClient(aiomqtt.Client):
    """An aiomqtt client that hands each message to a callback as paho receives it.

    aiomqtt's message iterator costs a task and an ``asyncio.wait`` per message
    and an unbounded queue; the proxy's own downlink queue is bounded, so the
    message goes straight there. (Overrides aiomqtt 2.x ``Client._on_message``.)
    """

    def __init__(
        self, *args: Any, deliver: Callable[[MQTTMessage], None], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._deliver = deliver

    def _on_message(self, client: Any, userdata: Any, message: MQTTMessage) -> None:
        self._deliver(message)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        """Register paho's socket for writing, unless it closed in the meantime.

        aiomqtt 2.x reads ``sock.fileno()`` when it schedules the registration;
        a PUBLISH queued just as a dead broker's socket is closed then makes
        ``add_writer`` fail on the stale descriptor (EBADF, or a reused one).
        Reading the descriptor when the registration runs avoids both.
        """
        loop = self._loop

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            fileno = sock.fileno()
            if fileno != -1:
                loop.add_writer(fileno, write)

        loop.call_soon_threadsafe(register)


class _PublishSession:
    """QoS-1 publishes of one broker session: a window of ``inflight`` messages.

    Unacknowledged messages go back to the owner's queue, in order, when the
    session ends.
    """

    def __init__(self, owner: BrokerClient, client: aiomqtt.Client) -> None:
        self.owner = owner
        self.client = client
        self.loop = asyncio.get_running_loop()
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.unacked: list[OutgoingMessage] = []
        self.failed: asyncio.Future[BaseException] = self.loop.create_future()

    def try_start(self, item: OutgoingMessage) -> bool:
        """Start publishing ``item`` now if the window has room; else return False."""
        if self.inflight >= self.owner.inflight or self.failed.done():
            return False
        self.inflight += 1
        # Eager: paho writes the PUBLISH before this returns (no extra loop pass).
        task = asyncio.Task(self._publish(item), loop=self.loop, eager_start=True)
        if task.done():
            self._finished(task)
        else:
            self.tasks.add(task)
            task.add_done_callback(self._finished)
        return True

    async def _publish(self, item: OutgoingMessage) -> None:
        try:
            await self.client.publish(
                item.topic, item.payload, qos=1, retain=item.retain
            )
        except BaseException as err:
            self.unacked.append(item)  # not acknowledged: send again later
            if not isinstance(err, asyncio.CancelledError) and not self.failed.done():
                self.failed.set_result(err)
            raise
        finally:
            self.inflight -= 1
            if self.owner._queue:
                self.owner._queue_ready.set()
        self.owner._acknowledged()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved; reported through `failed`

    async def close(self) -> None:
        """Cancel what is in flight and requeue everything unacknowledged."""
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks))
        if self.unacked:
            self.owner._requeue(self.unacked)
            self.unacked = []
