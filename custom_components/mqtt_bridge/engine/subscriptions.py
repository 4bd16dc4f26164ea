"""Subscription registry: reference-counted topic filters and message fan-out.

Several consumers share one MQTT session (the node proxy today; the MQTT tools
and the MCP-over-MQTT transport next). Each consumer adds a
:class:`Subscription` (a topic filter, its options and a callback); the
registry keeps one broker subscription per filter with the options merged
over its consumers, tells the client what to SUBSCRIBE and UNSUBSCRIBE, records
the SUBACK result per filter, and hands each received message to every
consumer whose filter matches the message's topic (matching follows MQTT §4.7,
see :mod:`.topics`).

Merged options (MQTT 5 §3.8.3.1): the highest QoS, No Local only if every
consumer asks for it, Retain As Published if any does, and the most generous
retain handling. A consumer that asks for retained messages (retain handling
0) on a filter that is already subscribed makes the client SUBSCRIBE again, so
the broker sends the retained messages once more (to every consumer of that
filter, flagged retained).

Overlapping filters: a broker may send one copy of a message per matching
subscription (Mosquitto does on MQTT 5). Each filter therefore gets its own
MQTT 5 Subscription Identifier (§3.8.2.1.2); a message that carries
identifiers goes only to the consumers of those filters, so every consumer gets
each copy meant for it exactly once. Without identifiers (MQTT 3.1.1, or a
broker that does not offer them) the message goes to every consumer whose
filter matches its topic.

A consumer callback that raises is logged and counted; the other consumers
still get the message. Nothing here does I/O. This module imports nothing
from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
import enum
import logging
from typing import TYPE_CHECKING

from paho.mqtt.matcher import MQTTMatcher

from .topics import split_shared, validate_topic_filter

if TYPE_CHECKING:
    from .mqtt_client import Message

_LOGGER = logging.getLogger(__name__)

# MQTT 5 §3.8.2.1.2: a Subscription Identifier is 1 .. 268,435,455.
MAX_SUBSCRIPTION_ID = 268_435_455


class RetainHandling(enum.IntEnum):
    """When the broker sends retained messages for a new subscription (MQTT 5 §3.8.3.1)."""

    SEND_ON_SUBSCRIBE = 0
    SEND_IF_NEW = 1
    DONT_SEND = 2


@dataclass(frozen=True, slots=True)
class SubscribeOptions:
    """Subscription options (MQTT 5 §3.8.3.1); only ``qos`` applies on MQTT 3.1.1.

    ``no_local`` asks the broker not to send this session's own publishes back.
    """

    qos: int = 1
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: RetainHandling = RetainHandling.SEND_ON_SUBSCRIBE


class FilterState(enum.StrEnum):
    """Where one filter stands with the broker."""

    PENDING = "pending"  # not sent on this session yet
    SENT = "sent"  # SUBSCRIBE sent, no SUBACK yet
    GRANTED = "granted"
    REFUSED = "refused"


class SubscriptionRefusedError(Exception):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""


type MessageCallback = Callable[[Message], None]


class Subscription:
    """One consumer's subscription; :meth:`cancel` removes it.

    ``topic_filter`` is the filter as given (``$share/...`` included).
    """

    __slots__ = ("_entry", "_registry", "callback", "options", "topic_filter")

    def __init__(
        self,
        registry: SubscriptionRegistry,
        entry: _FilterEntry,
        callback: MessageCallback,
        options: SubscribeOptions,
    ) -> None:
        """Bind a consumer to its filter entry (use :meth:`SubscriptionRegistry.add`)."""
        self._registry: SubscriptionRegistry | None = registry
        self._entry = entry
        self.callback = callback
        self.options = options
        self.topic_filter = entry.topic_filter

    @property
    def active(self) -> bool:
        """Whether the subscription has not been cancelled."""
        return self._registry is not None

    @property
    def state(self) -> FilterState:
        """The broker-side state of this subscription's filter."""
        return self._entry.state

    async def wait_granted(self) -> None:
        """Wait until the broker has granted the filter (SUBACK).

        Raises:
            SubscriptionRefusedError: the broker refused it.

        """
        while True:
            entry = self._entry
            if entry.state is FilterState.GRANTED:
                return
            if entry.state is FilterState.REFUSED:
                raise SubscriptionRefusedError(
                    f"broker refused {self.topic_filter!r}: {entry.reason}"
                )
            waiter = asyncio.get_running_loop().create_future()
            entry.waiters.append(waiter)
            await waiter

    def cancel(self) -> None:
        """Remove the subscription; the filter is unsubscribed with its last consumer."""
        if self._registry is not None:
            self._registry.remove(self)
            self._registry = None


class _FilterEntry:
    """The broker subscription of one filter and its consumers."""

    __slots__ = (
        "consumers",
        "identifier",
        "match_key",
        "options",
        "reason",
        "state",
        "topic_filter",
        "waiters",
    )

    def __init__(self, topic_filter: str, match_key: str, identifier: int) -> None:
        self.topic_filter = topic_filter
        self.match_key = match_key
        self.identifier = identifier
        self.consumers: list[Subscription] = []
        self.options = SubscribeOptions()
        self.state = FilterState.PENDING
        self.reason: str | None = None
        self.waiters: list[asyncio.Future[None]] = []

    def merged_options(self) -> SubscribeOptions:
        options = [sub.options for sub in self.consumers]
        return SubscribeOptions(
            qos=max(o.qos for o in options),
            no_local=all(o.no_local for o in options),
            retain_as_published=any(o.retain_as_published for o in options),
            retain_handling=min(o.retain_handling for o in options),
        )

    def set_state(self, state: FilterState, reason: str | None = None) -> None:
        self.state = state
        self.reason = reason
        if state in (FilterState.GRANTED, FilterState.REFUSED):
            waiters, self.waiters = self.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


@dataclass(slots=True)
class RegistryStats:
    """Counters of a :class:`SubscriptionRegistry`."""

    delivered: int = 0
    unmatched: int = 0
    consumer_errors: int = 0
    refused: int = 0


class SubscriptionRegistry:
    """Consumers' subscriptions, merged per filter, and the fan-out of messages.

    ``on_change()`` is called (synchronously) whenever the broker needs a
    SUBSCRIBE or UNSUBSCRIBE; the client then calls :meth:`take_pending` and
    :meth:`take_removed`.
    """

    def __init__(self, on_change: Callable[[], None] | None = None) -> None:
        """Create an empty registry."""
        self._entries: dict[str, _FilterEntry] = {}
        self._by_identifier: dict[int, _FilterEntry] = {}
        self._next_identifier = 1
        self._matcher = MQTTMatcher()
        self._removed: set[str] = set()
        self._on_change = on_change
        self.stats = RegistryStats()

    # -- consumers ---------------------------------------------------------------

    def add(
        self,
        topic_filter: str,
        callback: MessageCallback,
        options: SubscribeOptions | None = None,
    ) -> Subscription:
        """Add a consumer of ``topic_filter``; return its :class:`Subscription`.

        Raises:
            TopicError: ``topic_filter`` is not a valid filter (nothing is added).

        """
        validate_topic_filter(topic_filter)
        options = options or SubscribeOptions()
        entry = self._entries.get(topic_filter)
        if entry is None:
            _group, match_key = split_shared(topic_filter)
            entry = _FilterEntry(topic_filter, match_key, self._new_identifier())
            self._entries[topic_filter] = entry
            self._by_identifier[entry.identifier] = entry
            try:
                self._matcher[match_key].append(entry)
            except KeyError:
                self._matcher[match_key] = [entry]
        subscription = Subscription(self, entry, callback, options)
        entry.consumers.append(subscription)
        merged = entry.merged_options()
        resend = (
            merged != entry.options
            or options.retain_handling is RetainHandling.SEND_ON_SUBSCRIBE
            or entry.state is FilterState.REFUSED
        )
        entry.options = merged
        self._removed.discard(topic_filter)
        if resend or len(entry.consumers) == 1:
            entry.set_state(FilterState.PENDING)
            self._changed()
        return subscription

    def remove(self, subscription: Subscription) -> None:
        """Remove one consumer; the filter goes with its last consumer."""
        entry = self._entries.get(subscription.topic_filter)
        if entry is None or subscription not in entry.consumers:
            return
        entry.consumers.remove(subscription)
        if entry.consumers:
            merged = entry.merged_options()
            if merged != entry.options:
                entry.options = merged
                entry.set_state(FilterState.PENDING)
                self._changed()
            return
        del self._entries[entry.topic_filter]
        del self._by_identifier[entry.identifier]
        entries = self._matcher[entry.match_key]
        entries.remove(entry)
        if not entries:
            del self._matcher[entry.match_key]
        previous = entry.state
        entry.set_state(FilterState.REFUSED, "unsubscribed")
        if previous is not FilterState.PENDING:
            self._removed.add(entry.topic_filter)
            self._changed()

    def _new_identifier(self) -> int:
        """Return a Subscription Identifier no current filter uses."""
        while True:
            identifier = self._next_identifier
            self._next_identifier = identifier % MAX_SUBSCRIPTION_ID + 1
            if identifier not in self._by_identifier:
                return identifier

    def dispatch(self, message: Message, identifiers: list[int] | None = None) -> int:
        """Hand ``message`` to its consumers; return how many got it.

        ``identifiers`` are the message's MQTT 5 Subscription Identifiers: the
        consumers of exactly those filters get it. Without them, every consumer
        whose filter matches the topic does.
        """
        delivered = 0
        if identifiers:
            for identifier in identifiers:
                entry = self._by_identifier.get(identifier)
                if entry is not None:
                    delivered += self._deliver(entry, message)
        else:
            for entries in self._matcher.iter_match(message.topic):
                for entry in entries:
                    delivered += self._deliver(entry, message)
        if delivered:
            self.stats.delivered += delivered
        else:
            self.stats.unmatched += 1
        return delivered

    def _deliver(self, entry: _FilterEntry, message: Message) -> int:
        for subscription in entry.consumers:
            try:
                subscription.callback(message)
            except Exception:
                self.stats.consumer_errors += 1
                _LOGGER.exception(
                    "consumer of %r failed on a message from %r",
                    subscription.topic_filter,
                    message.topic,
                )
        return len(entry.consumers)

    # -- broker side -------------------------------------------------------------

    @property
    def filters(self) -> frozenset[str]:
        """Every filter that has at least one consumer."""
        return frozenset(self._entries)

    @property
    def granted(self) -> frozenset[str]:
        """The filters the broker has granted on the current session (SUBACK)."""
        return frozenset(
            f for f, e in self._entries.items() if e.state is FilterState.GRANTED
        )

    def state_of(self, topic_filter: str) -> FilterState | None:
        """Return the broker-side state of ``topic_filter`` (``None``: not wanted)."""
        entry = self._entries.get(topic_filter)
        return entry.state if entry is not None else None

    def refused(self) -> dict[str, str]:
        """Return ``{filter: reason}`` for the filters the broker refused."""
        return {
            f: e.reason or ""
            for f, e in self._entries.items()
            if e.state is FilterState.REFUSED
        }

    def take_pending(self) -> list[tuple[str, SubscribeOptions, int]]:
        """Return the filters to SUBSCRIBE now and mark them sent.

        Each item is ``(filter, merged options, subscription identifier)``, in
        filter order.
        """
        pending = sorted(
            (f, e) for f, e in self._entries.items() if e.state is FilterState.PENDING
        )
        for _filter, entry in pending:
            entry.set_state(FilterState.SENT)
        return [(f, e.options, e.identifier) for f, e in pending]

    def take_removed(self) -> list[str]:
        """Return the filters to UNSUBSCRIBE now (in name order)."""
        removed = sorted(self._removed)
        self._removed.clear()
        return removed

    def acknowledged(self, topic_filter: str, reason: str | None) -> None:
        """Record the SUBACK result of ``topic_filter``: ``reason`` is set if refused."""
        entry = self._entries.get(topic_filter)
        if entry is None or entry.state is not FilterState.SENT:
            return  # removed, or changed again since this SUBSCRIBE
        if reason is None:
            entry.set_state(FilterState.GRANTED)
            return
        self.stats.refused += 1
        entry.set_state(FilterState.REFUSED, reason)
        _LOGGER.warning("broker refused subscription %r: %s", topic_filter, reason)

    def session_lost(self) -> None:
        """Forget the broker side: every filter is subscribed again on the next session."""
        self._removed.clear()
        for entry in self._entries.values():
            entry.state = FilterState.PENDING
            entry.reason = None

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
