"""Meshtastic MQTT client proxy: forwards ``mqttClientProxyMessage`` traffic both ways.

:class:`MeshtasticProxy` listens to a :class:`~.node_link.NodeLink`. After each
completed handshake it checks the node's MQTT settings (``mqtt.enabled`` and
``proxy_to_client_enabled`` must be on), works out the broker and the
subscriptions as the firmware and the apps do (:mod:`.rules`), and keeps one
:class:`~.mqtt_client.MqttClient` for them. Uplinks (node -> broker) are
published at QoS 1 with the node's ``retained`` flag through a
:class:`~.publish_queue.PublishQueue` (bounded, drop-oldest while the broker is
away; a message that keeps the broker dropping the connection is dropped). Downlinks (broker -> node) are checked against the
firmware's limits, queued (bounded, drop-oldest, at most ``downlink_max_age``
seconds old) and written as ``data`` one at a time, each after the transport has
drained, and only while the link is live (after ``config_complete_id``).

Every message that is not forwarded is counted by reason in
:attr:`ProxyStats.dropped`. The broker session survives node reconnects and the
node link survives broker outages. Channels whose names cannot be topic levels
are skipped (and reported) while the others keep working. The broker client and
the downlink writer run supervised (:mod:`.supervisor`): a failure is logged,
shown as status ``task_failed`` and the task restarted. This module imports
nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
import enum
import logging
import time
from typing import Any

from meshtastic.protobuf import mesh_pb2

from .mqtt_client import ClientState, Message, MqttClient, MqttSettings
from .node_link import (
    LinkNotReadyError,
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
)
from .publish_queue import DropReason, PublishQueue
from .rules import (
    DownlinkDrop,
    InvalidAddressError,
    NodeBroker,
    ProxyRequirement,
    broker_from_node,
    check_downlink,
    make_client_id,
    missing_proxy_settings,
    subscription_filters,
    uplink_payload,
)
from .subscriptions import SubscribeOptions, Subscription
from .supervisor import TaskHealth, supervise
from .topics import TopicProblem

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
    TASK_FAILED = "task_failed"


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

    Run :meth:`run` as a task next to ``link.run()``; the proxy registers itself
    as a listener of ``link`` when created. ``on_change()`` is called after any
    change of status or counters (callers rate-limit their own reactions).
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
        self.missing_settings: list[ProxyRequirement] = []
        self.client: MqttClient | None = None
        self.uplinks: PublishQueue | None = None
        self.broker: NodeBroker | None = None
        self.gateway_id: str | None = None
        self.stats = ProxyStats()
        self.invalid_channels: dict[str, TopicProblem] = {}
        self.health = TaskHealth(self._changed)
        self._status = ProxyStatus.WAITING_FOR_NODE
        self._error: str | None = None
        self._on_change = on_change
        self._snapshot: NodeSnapshot | None = None
        self._config_key: bytes | None = None
        self._reconfigure = asyncio.Event()
        self._subscriptions: dict[str, Subscription] = {}
        self._downlinks: deque[_Downlink] = deque()
        self._downlink_ready = asyncio.Event()
        self._writing = False
        self._link_ready = asyncio.Event()
        self._client_task: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = link.add_listener(self)

    # -- status ------------------------------------------------------------------

    @property
    def status(self) -> ProxyStatus:
        """What the proxy is doing; ``task_failed`` while a failed task restarts."""
        if self.health.restarting:
            return ProxyStatus.TASK_FAILED
        return self._status

    @property
    def error(self) -> str | None:
        """Why the proxy is not running normally, or ``None``."""
        if self.health.restarting:
            return self.health.last_error
        return self._error

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
        uplinks = self.uplinks
        if uplinks is None:
            self._drop("uplink", "proxy_not_running")
            return
        uplinks.put(message.topic, payload, retain=message.retained)
        self._changed()

    def on_invalid_proxy_message(self, topic: bytes) -> None:
        """Count an uplink the link could not decode (its topic is not UTF-8)."""
        _LOGGER.debug(
            "%s: uplink with undecodable topic %r lost", self.link.name, topic
        )
        self._drop("uplink", DropReason.INVALID_TOPIC)

    # -- broker callbacks --------------------------------------------------------

    def _on_broker_message(self, message: Message) -> None:
        topic, payload, retained = message.topic, message.payload, message.retain
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

    def _on_client_state(self, state: ClientState) -> None:
        if state is ClientState.AUTH_FAILED:
            self._status = ProxyStatus.BROKER_AUTH_FAILED
            self._error = self.client.stats.last_error if self.client else None
        elif state is ClientState.CONNECTED and (
            self._status is ProxyStatus.BROKER_AUTH_FAILED
        ):
            self._status = ProxyStatus.RUNNING
            self._error = None
        self._changed()

    def _on_uplinks_dropped(self, reason: DropReason, count: int) -> None:
        self._drop("uplink", reason, count)

    def _on_published(self, count: int) -> None:
        self.stats.uplink_messages += count
        self.stats.last_uplink = time.time()
        self._changed()

    # -- state -------------------------------------------------------------------

    @property
    def uplink_queue_depth(self) -> int:
        """Uplinks waiting for the broker."""
        return self.uplinks.depth if self.uplinks else 0

    @property
    def downlink_queue_depth(self) -> int:
        """Downlinks waiting for the node."""
        return len(self._downlinks)

    @property
    def broker_connected(self) -> bool:
        """Whether the broker session is up."""
        return self.client is not None and self.client.connected

    @property
    def broker_settings(self) -> MqttSettings | None:
        """The broker in use (node settings or the override), ``None`` if none."""
        return self.broker.settings if self.broker else None

    @property
    def subscriptions(self) -> frozenset[str]:
        """Topic filters currently wanted on the broker."""
        return frozenset(self._subscriptions)

    @property
    def active_subscriptions(self) -> frozenset[str]:
        """Topic filters the broker has granted (SUBACK received)."""
        if self.client is None:
            return frozenset()
        return self.client.registry.granted & self.subscriptions

    def diagnostics(self) -> dict[str, Any]:
        """Return the proxy's state as JSON-serialisable data.

        Shape: ``status``, ``error``, ``missing_settings``, ``gateway_id``,
        ``broker`` (settings without the password, ``root``), ``client``
        (``state``, ``protocol``, ``stats``, ``registry`` stats), ``subscriptions``
        (wanted, granted, refused), ``invalid_channels`` (name -> problem),
        queue depths, ``stats`` and ``task_failures``. Callers redact
        ``username``.
        """
        broker = self.broker
        client = self.client
        return {
            "status": self.status.value,
            "error": self.error,
            "missing_settings": [str(item) for item in self.missing_settings],
            "gateway_id": self.gateway_id,
            "broker": (
                {
                    "host": broker.settings.host,
                    "port": broker.settings.port,
                    "tls": broker.settings.tls,
                    "verify_tls": broker.settings.verify_tls,
                    "username": broker.settings.username,
                    "root": broker.root,
                }
                if broker
                else None
            ),
            "client": (
                {
                    "state": client.state.value,
                    "protocol": "5" if client.protocol == 5 else "3.1.1",
                    "stats": asdict(client.stats),
                    "registry": asdict(client.registry.stats),
                }
                if client
                else None
            ),
            "subscriptions": sorted(self.subscriptions),
            "granted_subscriptions": sorted(self.active_subscriptions),
            "refused_subscriptions": client.registry.refused() if client else {},
            "invalid_channels": {k: str(v) for k, v in self.invalid_channels.items()},
            "uplink_queue_depth": self.uplink_queue_depth,
            "uplinks_in_flight": self.uplinks.in_flight if self.uplinks else 0,
            "downlink_queue_depth": self.downlink_queue_depth,
            "stats": {
                "uplink_messages": self.stats.uplink_messages,
                "downlink_messages": self.stats.downlink_messages,
                "dropped_total": self.stats.dropped_total,
                "dropped": dict(self.stats.dropped),
                "last_uplink": self.stats.last_uplink,
                "last_downlink": self.stats.last_downlink,
            },
            "task_failures": self.health.as_dict(),
        }

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
        if self._remove_listener is None:  # started again after a failure
            self._remove_listener = self.link.add_listener(self)
            self._config_key = None
        writer = asyncio.create_task(
            supervise("downlink writer", self._downlink_writer, self.health),
            name="proxy downlinks",
        )
        try:
            if self.link.snapshot is not None and self._snapshot is None:
                self._snapshot = self.link.snapshot
            if self._snapshot is not None:
                self._reconfigure.set()
            while True:
                await self._reconfigure.wait()
                self._reconfigure.clear()
                if self._snapshot is not None:
                    self._apply(self._snapshot)
        finally:
            if self._remove_listener is not None:
                self._remove_listener()
                self._remove_listener = None
            writer.cancel()
            tasks = {writer}
            if (task := self._stop_client()) is not None:
                tasks.add(task)
            await asyncio.wait(tasks)

    def _resolve_broker(self, snapshot: NodeSnapshot) -> NodeBroker:
        override = self.options.broker_override
        node_broker = broker_from_node(
            snapshot.mqtt, verify_tls=self.options.verify_tls
        )
        if override is None:
            return node_broker
        return NodeBroker(
            MqttSettings(
                override.host,
                override.port,
                tls=override.tls,
                verify_tls=self.options.verify_tls,
                username=override.username,
                password=override.password,
            ),
            node_broker.root,
        )

    def _apply(self, snapshot: NodeSnapshot) -> None:
        key = snapshot.proxy_key()
        if key == self._config_key and self._status is not ProxyStatus.WAITING_FOR_NODE:
            return
        self._config_key = key
        self.gateway_id = snapshot.node_id
        self.missing_settings = missing_proxy_settings(snapshot.mqtt)
        if self.missing_settings:
            self._stopped(
                ProxyStatus.NODE_SETTINGS_MISSING,
                "node setting missing: " + ", ".join(self.missing_settings),
            )
            return
        try:
            broker = self._resolve_broker(snapshot)
        except InvalidAddressError as err:
            self._stopped(ProxyStatus.INVALID_BROKER_ADDRESS, str(err))
            return
        plan = subscription_filters(broker.root, snapshot.channels, snapshot.lora)
        if plan.invalid != self.invalid_channels:
            for name, problem in plan.invalid.items():
                _LOGGER.warning(
                    "%s: channel %r cannot be subscribed (%s); the other channels "
                    "are proxied",
                    self.link.name,
                    name,
                    problem,
                )
            self.invalid_channels = plan.invalid
        self.broker = broker
        client = self.client
        if client is None:
            client = self.client = MqttClient(
                broker.settings, client_id=make_client_id(snapshot.node_id)
            )
            client.add_state_listener(self._on_client_state)
            self.uplinks = PublishQueue(
                client,
                size=self.options.uplink_queue_size,
                on_published=self._on_published,
                on_dropped=self._on_uplinks_dropped,
            )
            self._client_task = asyncio.create_task(
                supervise("broker client", client.run, self.health),
                name="proxy broker",
            )
        elif broker.settings != client.settings:
            client.update_settings(broker.settings)
        self._set_subscriptions(client, plan.filters)
        if self._status is not ProxyStatus.BROKER_AUTH_FAILED or (
            client.state is not ClientState.AUTH_FAILED
        ):
            self._status = ProxyStatus.RUNNING
            self._error = None
        _LOGGER.info(
            "%s: proxy to %s, subscribed to %s",
            self.link.name,
            broker.settings.describe(),
            ", ".join(plan.filters) or "nothing (no channel has downlink)",
        )
        self._changed()

    def _set_subscriptions(self, client: MqttClient, filters: list[str]) -> None:
        wanted = set(filters)
        for topic_filter in set(self._subscriptions) - wanted:
            self._subscriptions.pop(topic_filter).cancel()
        options = SubscribeOptions(qos=1, no_local=not self.options.forward_own_echoes)
        for topic_filter in sorted(wanted - set(self._subscriptions)):
            self._subscriptions[topic_filter] = client.subscribe(
                topic_filter, self._on_broker_message, options
            )

    def _stopped(self, status: ProxyStatus, error: str) -> None:
        """Stop forwarding for a reason the user must fix on the node."""
        self._status = status
        self._error = error
        _LOGGER.warning("%s: proxy not started, %s", self.link.name, error)
        self._stop_client()
        self._changed()

    def _stop_client(self) -> asyncio.Task[None] | None:
        """Cancel the broker client task (returned, to be awaited) and forget it."""
        task, self._client_task = self._client_task, None
        if self.uplinks is not None:
            self.uplinks.close()
        self.client = self.uplinks = self.broker = None
        self._subscriptions.clear()
        if task is not None:
            task.cancel()
        return task

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
