"""Meshtastic MQTT client proxy: forwards ``mqttClientProxyMessage`` traffic both ways.

:class:`MeshtasticProxy` listens to a :class:`~.node_link.NodeLink`. After each
completed handshake it checks the node's MQTT settings (``mqtt.enabled`` and
``proxy_to_client_enabled`` must be on), works out the broker and the
subscriptions as the firmware and the apps do (:mod:`.rules`), and keeps one
:class:`~.broker.BrokerClient` for them. Uplinks (node -> broker) are published
at QoS 1 with the node's ``retained`` flag and queued, bounded and drop-oldest,
while the broker is away. Downlinks (broker -> node) are checked against the
firmware's limits, queued (bounded, drop-oldest, at most ``downlink_max_age``
seconds old) and written as ``data`` one at a time, each after the transport has
drained, and only while the link is live (after ``config_complete_id``).

Every message that is not forwarded is counted by reason in
:attr:`ProxyStats.dropped`. The broker session survives node reconnects and the
node link survives broker outages. This module imports nothing from Home
Assistant.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
import contextlib
from dataclasses import dataclass, field, replace
import enum
import logging
import time

from meshtastic.protobuf import mesh_pb2

from .broker import BrokerClient, BrokerState
from .node_link import (
    LinkNotReadyError,
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
)
from .rules import (
    BrokerSettings,
    DownlinkDrop,
    InvalidAddressError,
    ProxyRequirement,
    UplinkDrop,
    broker_from_node,
    check_downlink,
    make_client_id,
    missing_proxy_settings,
    subscription_filters,
    uplink_payload,
)

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BrokerOverride:
    """A broker to use instead of the one in the node's settings.

    The topic root still comes from the node (its uplink topics carry it).
    """

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """User options of the proxy.

    ``verify_tls`` false accepts self-signed broker certificates;
    ``forward_retained`` forwards retained broker messages (stale replays) to
    the node; ``forward_own_echoes`` forwards envelopes this node published
    itself, which the firmware turns into implicit ACKs ("delivered via MQTT")
    at the cost of one extra write to the node per uplink. Queue sizes are in
    messages; ``downlink_max_age`` in seconds.
    """

    broker_override: BrokerOverride | None = None
    verify_tls: bool = True
    forward_retained: bool = False
    forward_own_echoes: bool = False
    uplink_queue_size: int = 1000
    downlink_queue_size: int = 256
    downlink_max_age: float = 60.0


class ProxyStatus(enum.StrEnum):
    """What the proxy is doing."""

    WAITING_FOR_NODE = "waiting_for_node"
    NODE_SETTINGS_MISSING = "node_settings_missing"
    INVALID_BROKER_ADDRESS = "invalid_broker_address"
    RUNNING = "running"
    BROKER_AUTH_FAILED = "broker_auth_failed"


@dataclass(slots=True)
class ProxyStats:
    """Proxy counters; times are ``time.time()`` seconds, ``None`` if never."""

    uplink_messages: int = 0
    downlink_messages: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    last_uplink: float | None = None
    last_downlink: float | None = None

    @property
    def dropped_total(self) -> int:
        """All messages not forwarded, in either direction."""
        return sum(self.dropped.values())


@dataclass(slots=True)
class _Downlink:
    topic: str
    payload: bytes
    retained: bool
    received: float


class MeshtasticProxy(NodeLinkListener):
    """Forwards a node's MQTT client proxy traffic to and from a broker.

    Attach with :meth:`attach` (or ``link.add_listener``) and run :meth:`run` as
    a task next to ``link.run()``. ``on_change()`` is called after any change of
    status or counters (callers rate-limit their own reactions).
    """

    def __init__(
        self,
        link: NodeLink,
        options: ProxyOptions | None = None,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """Create a proxy for ``link``; it registers itself as a link listener."""
        self.link = link
        self.options = options or ProxyOptions()
        self.status = ProxyStatus.WAITING_FOR_NODE
        self.missing_settings: list[ProxyRequirement] = []
        self.broker: BrokerClient | None = None
        self.broker_settings: BrokerSettings | None = None
        self.gateway_id: str | None = None
        self.stats = ProxyStats()
        self.error: str | None = None
        self._on_change = on_change
        self._snapshot: NodeSnapshot | None = None
        self._config_key: bytes | None = None
        self._reconfigure = asyncio.Event()
        self._downlinks: deque[_Downlink] = deque()
        self._downlink_ready = asyncio.Event()
        self._writing = False
        self._link_ready = asyncio.Event()
        self._broker_task: asyncio.Task[None] | None = None
        self._remove_listener = link.add_listener(self)

    # -- NodeLinkListener --------------------------------------------------------

    def on_state(self, state: LinkState) -> None:
        """Track whether downlinks can be written."""
        if state is LinkState.READY:
            self._link_ready.set()
        else:
            self._link_ready.clear()
        self._changed()

    def on_ready(self, snapshot: NodeSnapshot) -> None:
        """Re-read the node's settings after every handshake."""
        self._snapshot = snapshot
        self._reconfigure.set()

    def on_config_changed(self, snapshot: NodeSnapshot) -> None:
        """Re-read the node's settings after a live config update."""
        self._snapshot = snapshot
        self._reconfigure.set()

    def on_proxy_message(self, message: mesh_pb2.MqttClientProxyMessage) -> None:
        """Publish one uplink (node -> broker), or count why not."""
        payload, reason = uplink_payload(message)
        if reason is not None:
            self._drop("uplink", reason)
            return
        broker = self.broker
        if broker is None:
            self._drop("uplink", "proxy_not_running")
            return
        broker.publish(message.topic, payload, retain=message.retained)
        self._changed()

    # -- broker callbacks --------------------------------------------------------

    def _on_broker_message(self, topic: str, payload: bytes, retained: bool) -> None:
        reason = check_downlink(
            topic,
            payload,
            retained=retained,
            gateway_id=self.gateway_id or "",
            forward_retained=self.options.forward_retained,
            forward_own_echoes=self.options.forward_own_echoes,
        )
        if reason is not None:
            self._drop("downlink", reason)
            return
        queue = self._downlinks
        item = _Downlink(topic, payload, retained, time.monotonic())
        # Idle link: write now instead of waking the writer task.
        idle = not queue and not self._writing and self.link.write_buffer_size() == 0
        if idle and self._write(item):
            return
        if len(queue) >= self.options.downlink_queue_size:
            queue.popleft()
            self._drop("downlink", DownlinkDrop.QUEUE_FULL)
        queue.append(item)
        self._downlink_ready.set()

    def _on_broker_state(self, state: BrokerState) -> None:
        if state is BrokerState.AUTH_FAILED:
            self.status = ProxyStatus.BROKER_AUTH_FAILED
            self.error = self.broker.stats.last_error if self.broker else None
        elif state is BrokerState.CONNECTED and (
            self.status is ProxyStatus.BROKER_AUTH_FAILED
        ):
            self.status = ProxyStatus.RUNNING
            self.error = None
        self._changed()

    def _on_uplinks_dropped(self, count: int) -> None:
        self._drop("uplink", UplinkDrop.QUEUE_FULL, count)

    def _on_published(self, count: int) -> None:
        self.stats.uplink_messages += count
        self.stats.last_uplink = time.time()
        self._changed()

    # -- state -------------------------------------------------------------------

    @property
    def uplink_queue_depth(self) -> int:
        """Uplinks waiting for the broker."""
        return self.broker.queue_depth if self.broker else 0

    @property
    def downlink_queue_depth(self) -> int:
        """Downlinks waiting for the node."""
        return len(self._downlinks)

    @property
    def broker_connected(self) -> bool:
        """Whether the broker session is up."""
        return self.broker is not None and self.broker.state is BrokerState.CONNECTED

    @property
    def subscriptions(self) -> frozenset[str]:
        """Topic filters currently wanted on the broker."""
        return self.broker.subscriptions if self.broker else frozenset()

    @property
    def active_subscriptions(self) -> frozenset[str]:
        """Topic filters the broker has granted (SUBACK received)."""
        return self.broker.active_subscriptions if self.broker else frozenset()

    def _drop(self, direction: str, reason: str, count: int = 1) -> None:
        self.stats.dropped[f"{direction}_{reason}"] += count
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                _LOGGER.exception("proxy change callback failed")

    # -- running -----------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled: apply node settings, run broker and downlink writer."""
        writer = asyncio.create_task(self._downlink_writer(), name="proxy downlinks")
        try:
            if self.link.snapshot is not None and self._snapshot is None:
                self._snapshot = self.link.snapshot
                self._reconfigure.set()
            while True:
                await self._reconfigure.wait()
                self._reconfigure.clear()
                if self._snapshot is not None:
                    await self._apply(self._snapshot)
        finally:
            self._remove_listener()
            writer.cancel()
            tasks = {writer}
            if self._broker_task is not None:
                self._broker_task.cancel()
                tasks.add(self._broker_task)
            await asyncio.wait(tasks)

    def _resolve_broker(self, snapshot: NodeSnapshot) -> BrokerSettings:
        override = self.options.broker_override
        node_settings = broker_from_node(
            snapshot.mqtt, verify_tls=self.options.verify_tls
        )
        if override is None:
            return node_settings
        return replace(
            node_settings,
            host=override.host,
            port=override.port,
            tls=override.tls,
            username=override.username,
            password=override.password,
        )

    async def _apply(self, snapshot: NodeSnapshot) -> None:
        key = snapshot.proxy_key()
        if key == self._config_key and self.status is not ProxyStatus.WAITING_FOR_NODE:
            return
        self._config_key = key
        self.gateway_id = snapshot.node_id
        self.missing_settings = missing_proxy_settings(snapshot.mqtt)
        if self.missing_settings:
            self.status = ProxyStatus.NODE_SETTINGS_MISSING
            self.error = "node setting missing: " + ", ".join(self.missing_settings)
            _LOGGER.warning("%s: proxy not started, %s", self.link.name, self.error)
            await self._stop_broker()
            self._changed()
            return
        try:
            settings = self._resolve_broker(snapshot)
        except InvalidAddressError as err:
            self.status = ProxyStatus.INVALID_BROKER_ADDRESS
            self.error = str(err)
            _LOGGER.warning("%s: %s", self.link.name, err)
            await self._stop_broker()
            self._changed()
            return
        filters = subscription_filters(settings.root, snapshot.channels, snapshot.lora)
        self.broker_settings = settings
        if self.broker is None:
            self.broker = BrokerClient(
                settings,
                client_id=make_client_id(snapshot.node_id),
                on_message=self._on_broker_message,
                on_state=self._on_broker_state,
                on_published=self._on_published,
                on_dropped=self._on_uplinks_dropped,
                queue_size=self.options.uplink_queue_size,
                no_local=not self.options.forward_own_echoes,
            )
            self._broker_task = asyncio.create_task(
                self.broker.run(), name="proxy broker"
            )
        elif settings != self.broker.settings:
            self.broker.update_settings(settings)
        self.broker.set_subscriptions(filters)
        if self.status is not ProxyStatus.BROKER_AUTH_FAILED or (
            self.broker.state is not BrokerState.AUTH_FAILED
        ):
            self.status = ProxyStatus.RUNNING
            self.error = None
        _LOGGER.info(
            "%s: proxy to %s, subscribed to %s",
            self.link.name,
            settings.describe(),
            ", ".join(filters) or "nothing (no channel has downlink)",
        )
        self._changed()

    async def _stop_broker(self) -> None:
        task, self._broker_task = self._broker_task, None
        self.broker = None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    def _write(self, item: _Downlink) -> bool:
        """Write one downlink to the node as ``data``; False if the link is down."""
        message = mesh_pb2.ToRadio()
        proxy = message.mqttClientProxyMessage
        proxy.topic = item.topic
        proxy.data = item.payload
        proxy.retained = item.retained
        try:
            self.link.send(message)
        except LinkNotReadyError:
            return False
        self.stats.downlink_messages += 1
        self.stats.last_downlink = time.time()
        self._changed()
        return True

    async def _downlink_writer(self) -> None:
        """Write queued downlinks to the node, one at a time, paced by drain()."""
        queue = self._downlinks
        max_age = self.options.downlink_max_age
        while True:
            if not queue:
                self._downlink_ready.clear()
                await self._downlink_ready.wait()
                continue
            if not self.link.ready:
                await self._link_ready.wait()
                now = time.monotonic()
                while queue and now - queue[0].received > max_age:
                    queue.popleft()
                    self._drop("downlink", DownlinkDrop.NODE_GONE)
                continue
            self._writing = True
            try:
                item = queue.popleft()
                if not self._write(item):
                    queue.appendleft(item)  # link died between the checks
                    self._link_ready.clear()
                    continue
                await self.link.drain()
            finally:
                self._writing = False

    def detach(self) -> None:
        """Stop listening to the link (``run`` does this when cancelled)."""
        with contextlib.suppress(Exception):
            self._remove_listener()
