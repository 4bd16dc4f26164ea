"""The MCP servers announced on a broker (MCP-over-MQTT server presence).

Spec references are to the MCP-over-MQTT specification
(``shared/reference/mcp-over-mqtt.md`` §1): identifiers §1.2, topics §1.3,
lifecycle §1.5 "Discovery".

:class:`McpDirectory` subscribes ``$mcp-server/presence/+/#`` on a shared
:class:`~.mqtt_client.MqttClient` (server-names may contain ``/``, so the
server-name part is ``#``) and keeps one :class:`~.mcp_mqtt.ServerPresence`
per ``(server-id, server-name)``:

* a retained (or live) ``notifications/server/online`` on
  ``$mcp-server/presence/{server-id}/{server-name}`` announces an instance
  (params ``description``, ``meta``; the topic, not the payload, names it);
* an empty payload (the server's will or its clean shutdown) means the
  instance is gone (§1.5 "Discovery": "an empty retained payload = instance
  offline");
* anything else (not JSON, not an object, another method, ``params`` /
  ``description`` / ``meta`` of the wrong type, a server-id or server-name
  the spec does not allow, §1.2) is counted in
  :attr:`DirectoryStats.malformed` and ignored; a known instance keeps its
  last valid presence.

Listeners see changes of the servers whose server-name matches the patterns
(fnmatch-style, case-sensitive: ``*`` matches any characters including
``/``, ``?`` one character, ``[...]`` a set; ``None`` or empty = every
server). An announcement identical to the known one (a server re-publishing
its presence after a reconnect) is not a change.

After the shared client reconnects, the broker resends the retained presence
of every instance still online, but an instance that went away meanwhile
(its cleared presence was never seen, e.g. a broker restart without
persistence) would stay known: instances not announced again within
``resync_grace`` seconds of the new SUBACK are dropped (and reported as
removed).

Limits: at most ``max_servers`` instances are kept; further announcements are
counted in :attr:`DirectoryStats.dropped` and ignored. A second consumer of
the same filter on the same client gets no retained messages (the filter is
already subscribed), so run one directory per client.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
import contextlib
from dataclasses import dataclass
from fnmatch import fnmatchcase
import json
import logging
from typing import Final

from .mcp_mqtt import ONLINE, ServerPresence, validate_server_name
from .mqtt_client import ClientState, Message, MqttClient
from .subscriptions import SubscribeOptions, SubscriptionRefusedError

_LOGGER = logging.getLogger(__name__)

# Every instance's presence topic: $mcp-server/presence/{server-id}/{server-name}
# (spec §1.3); server-names have levels, hence "#".
PRESENCE_FILTER: Final = "$mcp-server/presence/+/#"
PRESENCE_PREFIX: Final = "$mcp-server/presence/"
# Seconds after a re-subscription's SUBACK within which the broker's retained
# presence messages are expected.
RESYNC_GRACE: Final = 1.0
MAX_SERVERS: Final = 256

type ServerKey = tuple[str, str]  # (server-id, server-name)
type DirectoryListener = Callable[[ServerPresence | None, ServerPresence | None], None]


class PresenceError(ValueError):
    """A presence message the spec does not allow (§1.3, §1.5 "Discovery")."""


@dataclass(slots=True)
class DirectoryStats:
    """Counters of one :class:`McpDirectory`.

    ``messages``: presence messages received; ``malformed``: ignored as
    invalid; ``dropped``: ignored because ``max_servers`` instances are known;
    ``added`` / ``removed``: instances that appeared / went away (all, matching
    the patterns or not); ``expired``: removed because not announced again
    after a reconnect; ``listener_errors``: listeners that raised;
    ``refused``: the broker refused the presence subscription (e.g. its ACL
    lacks ``$mcp-server/#``).
    """

    messages: int = 0
    malformed: int = 0
    dropped: int = 0
    added: int = 0
    removed: int = 0
    expired: int = 0
    listener_errors: int = 0
    refused: int = 0


def server_key(topic: str) -> ServerKey:
    """Return ``(server-id, server-name)`` of a presence topic.

    Raises:
        PresenceError: not ``$mcp-server/presence/{server-id}/{server-name}``
            with a valid server-id (no ``/``, ``+``, ``#``, not empty) and
            server-name (:func:`~.mcp_mqtt.validate_server_name`), spec §1.2.

    """
    if not topic.startswith(PRESENCE_PREFIX):
        raise PresenceError(f"{topic!r} is not a presence topic")
    server_id, _sep, server_name = topic[len(PRESENCE_PREFIX) :].partition("/")
    if not server_id or "+" in server_id or "#" in server_id:
        raise PresenceError(f"invalid server-id in {topic!r}")
    try:
        validate_server_name(server_name)
    except ValueError as err:
        raise PresenceError(str(err)) from None
    return server_id, server_name


def parse_presence(server_id: str, server_name: str, payload: bytes) -> ServerPresence:
    """Return the presence announced by a non-empty ``payload`` (spec §1.5 "Discovery").

    The payload is the JSON-RPC notification ``notifications/server/online``;
    ``params.description`` (string) and ``params.meta`` (object) are optional.

    Raises:
        PresenceError: the payload is not such a notification.

    """
    try:
        body = json.loads(payload)
    except ValueError as err:  # UnicodeDecodeError included
        raise PresenceError(f"not JSON: {err}") from None
    if not isinstance(body, dict):
        raise PresenceError("not a JSON object")
    if body.get("method") != ONLINE:
        raise PresenceError(f"method is {body.get('method')!r}, not {ONLINE!r}")
    params = body.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise PresenceError("params is not an object")
    description = params.get("description")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise PresenceError("params.description is not a string")
    meta = params.get("meta")
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise PresenceError("params.meta is not an object")
    return ServerPresence(server_id, server_name, description, meta)


def name_matches(server_name: str, patterns: Sequence[str] | None) -> bool:
    """Whether ``server_name`` matches one of ``patterns`` (``None``/empty: all).

    fnmatch-style and case-sensitive (server-names are topic levels): ``*``
    also matches ``/``.
    """
    if not patterns:
        return True
    return any(fnmatchcase(server_name, pattern) for pattern in patterns)


class McpDirectory:
    """The MCP server instances announced on the broker of ``client``.

    Run :meth:`run` as a task (cancel it to stop); read :meth:`servers`; follow
    changes with :meth:`add_listener`.
    """

    def __init__(
        self,
        client: MqttClient,
        *,
        name_patterns: Sequence[str] | None,
        resync_grace: float = RESYNC_GRACE,
        max_servers: int = MAX_SERVERS,
    ) -> None:
        """Prepare the directory; nothing is subscribed until :meth:`run`.

        ``name_patterns``: fnmatch-style server-name patterns, ``None`` or
        empty for all; ``resync_grace`` in seconds (see the module text).
        """
        self.client = client
        self.name_patterns: tuple[str, ...] = tuple(name_patterns or ())
        self.resync_grace = resync_grace
        self.max_servers = max_servers
        self.stats = DirectoryStats()
        self._known: dict[ServerKey, ServerPresence] = {}
        self._listeners: list[DirectoryListener] = []
        self._seen: set[ServerKey] | None = None
        self._reconnected = asyncio.Event()
        self._was_connected = client.connected

    # -- reading -------------------------------------------------------------------

    def matches(self, presence: ServerPresence) -> bool:
        """Whether ``presence``'s server-name matches the patterns."""
        return name_matches(presence.server_name, self.name_patterns)

    def servers(self) -> list[ServerPresence]:
        """The announced instances matching the patterns, by server-name then server-id."""
        return sorted(
            (p for p in self._known.values() if self.matches(p)),
            key=lambda p: (p.server_name, p.server_id),
        )

    def add_listener(self, listener: DirectoryListener) -> Callable[[], None]:
        """Call ``listener(added, removed)`` on every change; return a remover.

        An appearing instance: ``(presence, None)``; a vanishing one:
        ``(None, presence)``; a changed announcement (description, meta):
        ``(new, old)``. Only instances matching the patterns are reported.
        Called in the event loop from the MQTT message callback; it must not
        block. A listener that raises is logged and counted.
        """
        self._listeners.append(listener)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return remove

    def set_patterns(self, name_patterns: Sequence[str] | None) -> None:
        """Use new server-name patterns; listeners see who left and who entered."""
        before = {key for key, p in self._known.items() if self.matches(p)}
        self.name_patterns = tuple(name_patterns or ())
        after = {key for key, p in self._known.items() if self.matches(p)}
        for key in sorted(before - after):
            self._notify(None, self._known[key])
        for key in sorted(after - before):
            self._notify(self._known[key], None)

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the presence topics until cancelled (spec §1.5 "Discovery").

        On cancel the subscription ends and the known instances are
        forgotten (listeners are not called).
        """
        subscription = self.client.subscribe(
            PRESENCE_FILTER, self._on_message, SubscribeOptions(qos=1)
        )
        remove = self.client.add_state_listener(self._on_state)
        try:
            await self._wait_granted(subscription.wait_granted)
            while True:
                await self._reconnected.wait()
                self._reconnected.clear()
                if not await self._wait_granted(subscription.wait_granted):
                    continue
                await asyncio.sleep(self.resync_grace)
                if not self._reconnected.is_set():
                    self._expire_unseen()
        finally:
            remove()
            subscription.cancel()
            self._seen = None
            self._known.clear()

    async def _wait_granted(self, wait: Callable[[], Awaitable[None]]) -> bool:
        """Wait for the SUBACK; ``False`` (logged, counted) when the broker refuses."""
        try:
            await wait()
        except SubscriptionRefusedError as err:
            self.stats.refused += 1
            _LOGGER.warning(
                "MCP server discovery is off: %s (the broker's ACL must allow "
                "subscribing $mcp-server/presence/#)",
                err,
            )
            return False
        return True

    def _on_state(self, state: ClientState) -> None:
        if state is ClientState.CONNECTED:
            if self._was_connected:
                # Presence seen from now on counts for the resync.
                self._seen = set()
                self._reconnected.set()
            self._was_connected = True

    def _expire_unseen(self) -> None:
        """Drop the instances not announced again since the reconnect."""
        seen, self._seen = self._seen or set(), None
        for key in [key for key in self._known if key not in seen]:
            self.stats.expired += 1
            _LOGGER.debug("MCP server %s/%s not announced again: gone", *key)
            self._forget(key)

    # -- messages ------------------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        """One presence message: announce, update, or (empty payload) remove."""
        self.stats.messages += 1
        try:
            key = server_key(message.topic)
            presence = (
                parse_presence(*key, message.payload) if message.payload else None
            )
        except PresenceError as err:
            self.stats.malformed += 1
            _LOGGER.debug("presence on %s ignored: %s", message.topic, err)
            return
        if self._seen is not None:
            self._seen.add(key)
        if presence is None:
            self._forget(key)
            return
        old = self._known.get(key)
        if old == presence:
            return
        if old is None and len(self._known) >= self.max_servers:
            self.stats.dropped += 1
            _LOGGER.warning(
                "MCP server %s/%s ignored: %d servers are known already",
                *key,
                self.max_servers,
            )
            return
        self._known[key] = presence
        if old is None:
            self.stats.added += 1
        if self.matches(presence):
            self._notify(presence, old)

    def _forget(self, key: ServerKey) -> None:
        old = self._known.pop(key, None)
        if old is None:
            return
        self.stats.removed += 1
        if self.matches(old):
            self._notify(None, old)

    def _notify(
        self, added: ServerPresence | None, removed: ServerPresence | None
    ) -> None:
        for listener in list(self._listeners):
            try:
                listener(added, removed)
            except Exception:
                self.stats.listener_errors += 1
                _LOGGER.exception("MCP directory listener failed")


def parse_patterns(text: str | Iterable[str]) -> list[str]:
    """Split server-name patterns given as text (commas or new lines) or a list.

    Blank entries are dropped, the others stripped; the order is kept and
    duplicates removed.

    Raises:
        ValueError: a pattern contains an MQTT wildcard (``+``, ``#``: server-names
            never do, spec §1.2; use ``*``) or a control character.

    """
    items = text.replace("\n", ",").split(",") if isinstance(text, str) else text
    patterns: list[str] = []
    for item in items:
        pattern = item.strip()
        if not pattern or pattern in patterns:
            continue
        if "+" in pattern or "#" in pattern:
            raise ValueError(
                f"pattern {pattern!r} has an MQTT wildcard; use * and ? instead"
            )
        if any(ord(char) < 0x20 or char == "\x7f" for char in pattern):
            raise ValueError(f"pattern {pattern!r} contains a control character")
        patterns.append(pattern)
    return patterns
