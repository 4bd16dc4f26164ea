"""A bounded queue of QoS-1 publishes that survives broker outages.

:class:`PublishQueue` sits on an :class:`~.mqtt_client.MqttClient` for a
producer that must not lose messages to short outages (the node proxy's
uplinks). Messages are written at once while the session is up and the window
of in-flight publishes has room; otherwise they wait, in order, in a queue that
drops its oldest message when full (as the firmware's own queues do).

Unacknowledged messages go back to the front of the queue, in their original
order, when the session ends, and are sent again on the next one. A message
that was in flight when a connection was lost is a *suspect*: it is sent again
alone, and nothing else is sent until it is acknowledged, so one message that
makes the broker drop the connection (a "poison" message, e.g. one the broker
considers malformed) is found and, after :attr:`PublishQueue.max_strikes`
connection losses, dropped and counted instead of blocking every later message
forever. Topic names are validated before a message is queued (MQTT §4.7).

Every message not published is counted by :class:`DropReason` through
``on_dropped``. This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
import enum
import functools
import logging

from .mqtt_client import (
    ClientState,
    ConnectionLostError,
    MqttClient,
    MqttError,
    NotConnectedError,
    PublishRefusedError,
)
from .topics import topic_name_problem

_LOGGER = logging.getLogger(__name__)


class DropReason(enum.StrEnum):
    """Why a queued message was not published."""

    INVALID_TOPIC = "invalid_topic"
    QUEUE_FULL = "queue_full"
    BROKER_REFUSED = "broker_refused"
    CONNECTION_LOSSES = "lost_connection_repeatedly"


@dataclass(slots=True)
class QueuedMessage:
    """One message to publish at QoS 1; ``strikes`` counts connection losses in flight."""

    topic: str
    payload: bytes
    retain: bool
    seq: int
    strikes: int = 0


class PublishQueue:
    """QoS-1 publishes with a bounded drop-oldest queue and an in-flight window.

    ``size`` bounds the waiting messages; ``window`` the publishes awaiting
    PUBACK (Mosquitto grants ``ReceiveMaximum`` 20); ``max_strikes`` is how
    many connection losses a message may be in flight for before it is dropped.
    ``on_published(n)`` and ``on_dropped(reason, n)`` run in the event loop.
    """

    def __init__(
        self,
        client: MqttClient,
        *,
        size: int = 1000,
        window: int = 20,
        max_strikes: int = 3,
        on_published: Callable[[int], None] | None = None,
        on_dropped: Callable[[DropReason, int], None] | None = None,
    ) -> None:
        """Attach to ``client``; messages flow whenever it is connected."""
        self.client = client
        self.size = max(1, size)
        self.window = max(1, window)
        self.max_strikes = max(1, max_strikes)
        self._on_published = on_published
        self._on_dropped = on_dropped
        self._queue: deque[QueuedMessage] = deque()
        self._inflight = 0
        self._suspect_in_flight = False
        self._seq = 0
        self._remove_listener = client.add_state_listener(self._on_state)

    @property
    def depth(self) -> int:
        """Messages waiting (those in flight are not counted)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Messages sent and not yet acknowledged."""
        return self._inflight

    def close(self) -> None:
        """Stop following the client's state (queued messages stay where they are)."""
        self._remove_listener()

    def put(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish ``payload`` to ``topic`` at QoS 1 now, or queue it; never blocks.

        A topic that is not a valid topic name is dropped and counted as
        :attr:`DropReason.INVALID_TOPIC` (logged at debug level).
        """
        if (problem := topic_name_problem(topic)) is not None:
            _LOGGER.debug("not publishing to %r: %s", topic, problem)
            self._drop(DropReason.INVALID_TOPIC)
            return
        self._seq += 1
        item = QueuedMessage(topic, payload, retain, self._seq)
        if not self._queue and self._can_start(item) and self._start(item):
            return
        self._queue.append(item)
        self._trim()

    # -- internals -------------------------------------------------------------------

    def _can_start(self, item: QueuedMessage) -> bool:
        if not self.client.connected or self._suspect_in_flight:
            return False
        if item.strikes:
            return self._inflight == 0  # a suspect goes alone
        return self._inflight < self.window

    def _start(self, item: QueuedMessage) -> bool:
        """Publish ``item``; False if the client had no session after all."""
        try:
            self.client.publish(
                item.topic,
                item.payload,
                qos=1,
                retain=item.retain,
                on_done=functools.partial(self._done, item),
            )
        except NotConnectedError:
            return False
        self._inflight += 1
        if item.strikes:
            self._suspect_in_flight = True
        return True

    def _pump(self) -> None:
        queue = self._queue
        while queue and self._can_start(queue[0]):
            item = queue.popleft()
            if not self._start(item):
                queue.appendleft(item)
                return

    def _done(self, item: QueuedMessage, error: MqttError | None) -> None:
        self._inflight -= 1
        if item.strikes:
            self._suspect_in_flight = False
        if error is None:
            if self._on_published is not None:
                self._on_published(1)
        elif isinstance(error, PublishRefusedError):
            _LOGGER.warning("broker refused a publish to %r: %s", item.topic, error)
            self._drop(DropReason.BROKER_REFUSED)
        elif isinstance(error, ConnectionLostError):
            item.strikes += 1
            if item.strikes >= self.max_strikes:
                _LOGGER.warning(
                    "dropping a message to %r: the connection was lost %d times "
                    "while it was in flight",
                    item.topic,
                    item.strikes,
                )
                self._drop(DropReason.CONNECTION_LOSSES)
            else:
                self._requeue(item)
        self._pump()

    def _requeue(self, item: QueuedMessage) -> None:
        """Put ``item`` back in sequence order (it is older than what waits behind it)."""
        queue = self._queue
        index = 0
        while index < len(queue) and queue[index].seq < item.seq:
            index += 1
        queue.insert(index, item)
        self._trim()

    def _trim(self) -> None:
        dropped = 0
        while len(self._queue) > self.size:
            self._queue.popleft()
            dropped += 1
        if dropped:
            self._drop(DropReason.QUEUE_FULL, dropped)

    def _drop(self, reason: DropReason, count: int = 1) -> None:
        if self._on_dropped is not None:
            self._on_dropped(reason, count)

    def _on_state(self, state: ClientState) -> None:
        if state is ClientState.CONNECTED:
            self._pump()
