"""The bounded store of topics seen, behind the ``mqtt_topics`` tool.

:class:`TopicStore` remembers, per topic, how many messages were seen, when
the last one was, whether the broker holds a retained value and the first
bytes of the last payload; it holds at most ``capacity`` topics, the least
recently seen is evicted. :class:`~.mqtt_tools.MqttTools` feeds it from its
subscriptions on the readable patterns (and ``mqtt_topics`` scans) and
purges what a changed ACL no longer lets agents read. Pure: no I/O.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
import time

from .mqtt_client import Message
from .tool_output import is_utf8


class TopicEntry:
    """What the store knows of one topic.

    ``count``: messages counted; ``last``: when the last counted one arrived
    (seconds since the epoch); ``retained``: the broker holds a retained
    value; ``preview``: the first bytes of the last payload, ``size`` its
    length and ``text`` whether it is UTF-8; ``digest`` / ``retained_digest``:
    hashes of the last payload and of the retained one (repeats are not
    counted).
    """

    __slots__ = (
        "count",
        "digest",
        "last",
        "preview",
        "retained",
        "retained_digest",
        "size",
        "text",
    )

    def __init__(self) -> None:
        """Start an entry with nothing seen."""
        self.count = 0
        self.last = 0.0
        self.retained = False
        self.preview = b""
        self.size = 0
        self.text = True
        self.digest = 0
        self.retained_digest: int | None = None


class TopicStore:
    """Topics seen, least recently seen first; bounded (the oldest is evicted)."""

    def __init__(self, capacity: int, preview_bytes: int) -> None:
        """Keep at most ``capacity`` topics and ``preview_bytes`` of each payload."""
        self.capacity = max(1, capacity)
        self.preview_bytes = max(0, preview_bytes)
        self.entries: OrderedDict[str, TopicEntry] = OrderedDict()
        self.evicted = 0

    def record(self, message: Message) -> bool:
        """Record ``message``; return whether it counted as a new message.

        The broker sends retained values again on every SUBSCRIBE and
        reconnect: a retained message equal to the topic's last payload or to
        the retained value seen before marks the topic retained but is neither
        counted again nor shown instead of a newer live payload.
        """
        payload = message.payload
        digest = hash(payload)
        entry = self.entries.get(message.topic)
        if entry is None:
            entry = TopicEntry()
            self.entries[message.topic] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
                self.evicted += 1
        elif message.retain and digest in (entry.digest, entry.retained_digest):
            entry.retained = True
            entry.retained_digest = digest
            return False
        self.entries.move_to_end(message.topic)
        entry.count += 1
        entry.last = time.time()
        if message.retain:
            entry.retained = True
            entry.retained_digest = digest
        entry.size = len(payload)
        entry.text = is_utf8(payload)
        entry.preview = payload[: self.preview_bytes]
        entry.digest = digest
        return True

    def purge(self, keep: Callable[[str], bool]) -> None:
        """Forget every topic for which ``keep(topic)`` is false."""
        for topic in [t for t in self.entries if not keep(t)]:
            del self.entries[topic]
