"""Sharing the node: a node entry's virtual node server, glued to Home Assistant.

The firmware's TCP API serves one client, and Home Assistant is it. With
"Share this node" on (the node entry's options, :class:`~.flow_node.NodeOptionsFlow`),
Home Assistant serves the node's stream API on a port of its own (default
4404, MeshMonitor's Virtual Node port) to the phone apps, the ``meshtastic``
CLI, MeshMonitor and the upstream Meshtastic integration, through the engine's
:class:`~.engine.virtual_node.VirtualNodeServer` on the entry's
:class:`~.engine.node_link.NodeLink`, which stays the node's only client. Home
Assistant alone proxies MQTT: clients' ``mqttClientProxyMessage``s are dropped.

- **Settings** (:class:`ShareSettings`, from the entry options): on/off,
  port, bind address, allowed networks (CIDRs; none = the local networks,
  :data:`~.engine.virtual_node.LOCAL_NETWORKS`). A change of the options
  reloads the node entry (:meth:`.models.EntryRuntime.needs_reload`): the
  link reconnects and every client of the shared node reconnects too.
- **Lifecycle**: :meth:`NodeSharing.start` runs the server as a background
  task of the entry; unloading the entry cancels it, which closes the port
  and every client connection.
- **Port problems**: a port that cannot be bound (in use, e.g. by MeshMonitor's
  own Virtual Node; no permission; an address this machine does not have)
  raises the repair issue ``virtual_node_port_in_use`` and is tried again with
  backoff (:data:`BIND_RETRY_BASE` doubling up to :data:`BIND_RETRY_CAP`
  seconds); the issue is deleted once the port is bound, and on unload.
- **Entities**: the server's change callbacks (a client came, finished its
  handshake or left, packets forwarded or dropped, node lost or back) go to
  ``on_change``, the runtime's rate-limited update signal.
- **Flow checks**: :func:`parse_network_text`, :func:`normalize_bind_address`
  and :func:`bind_problem` validate what the options flow saves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
import contextlib
from dataclasses import dataclass
import errno
import ipaddress
import logging
import re
import socket
from typing import Any, Final

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant

from .const import (
    CONF_SHARE_HOST,
    CONF_SHARE_NETWORKS,
    CONF_SHARE_NODE,
    CONF_SHARE_PORT,
    DEFAULT_SHARE_HOST,
    DOMAIN,
)
from .engine.backoff import Backoff
from .engine.node_link import NodeLink
from .engine.virtual_node import (
    DEFAULT_PORT,
    ClientInfo,
    VirtualNodeBindError,
    VirtualNodeServer,
    parse_networks,
)
from .issues import NodeIssues

_LOGGER = logging.getLogger(__name__)

# Seconds before binding the port is tried again: doubling from the base up to
# the cap, with jitter (engine.backoff.Backoff).
BIND_RETRY_BASE: Final = 5.0
BIND_RETRY_CAP: Final = 300.0

# Separators of the allowed networks in the options form: commas, white space.
_NETWORK_SEPARATORS: Final = re.compile(r"[,\s]+")


@dataclass(frozen=True, slots=True)
class ShareSettings:
    """How a node entry shares its node (read from the entry's options).

    ``port`` is 1..65535; ``host`` the IP address to listen on (``0.0.0.0``:
    every IPv4 interface, ``::``: every IPv6 interface); ``networks`` the CIDRs
    clients may connect from, empty for the local networks.
    """

    enabled: bool = False
    port: int = DEFAULT_PORT
    host: str = DEFAULT_SHARE_HOST
    networks: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ShareSettings:
        """Return the settings in node entry ``options`` (defaults where absent)."""
        return cls(
            enabled=bool(options.get(CONF_SHARE_NODE, False)),
            port=int(options.get(CONF_SHARE_PORT, DEFAULT_PORT)),
            host=str(options.get(CONF_SHARE_HOST) or DEFAULT_SHARE_HOST),
            networks=tuple(str(n) for n in options.get(CONF_SHARE_NETWORKS) or ()),
        )

    @property
    def allowed_networks(self) -> list[str] | None:
        """The server's ``allowed_networks``: ``None`` (local networks) when empty."""
        return list(self.networks) or None


def parse_network_text(text: str) -> list[str]:
    """Parse the options form's allowed networks: CIDRs separated by commas or lines.

    Each entry is normalised (``192.168.1.5/24`` → ``192.168.1.0/24``, a bare
    address → ``/32`` or ``/128``); duplicates are dropped; blank text gives
    ``[]`` (the local networks).

    Raises:
        InvalidNetworkError: an entry is not an IP network (the message names it).

    """
    entries = [entry for entry in _NETWORK_SEPARATORS.split(text) if entry]
    normalised = [str(network) for network in parse_networks(entries)]
    return list(dict.fromkeys(normalised))


def normalize_bind_address(text: str) -> str:
    """Return ``text`` as a canonical IP address to listen on.

    Raises:
        ValueError: ``text`` is not an IPv4 or IPv6 address (host names are
            not accepted: what they resolve to may change).

    """
    return str(ipaddress.ip_address(text.strip()))


def bind_problem(host: str, port: int) -> tuple[str, str] | None:
    """Try to bind ``host``:``port`` as the server would; ``None`` if it works.

    The socket is closed again at once; like :func:`asyncio.loop.create_server`
    it uses ``SO_REUSEADDR`` (a port in ``TIME_WAIT`` is free) and, for IPv6,
    ``IPV6_V6ONLY``. Returns ``(error key, operating system message)`` with the
    keys of the options flow: ``share_port_in_use`` (``EADDRINUSE``),
    ``share_address_unavailable`` (``EADDRNOTAVAIL``: not an address of this
    machine), ``share_cannot_bind`` (anything else, e.g. ``EACCES``).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
    except OSError as err:
        detail = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            return "share_port_in_use", detail
        if err.errno == errno.EADDRNOTAVAIL:
            return "share_address_unavailable", detail
        return "share_cannot_bind", detail
    return None


def format_client(client: ClientInfo) -> str:
    """Return ``address:port`` (``[address]:port`` for IPv6) of a client."""
    if ":" in client.address:
        return f"[{client.address}]:{client.port}"
    return f"{client.address}:{client.port}"


class NodeSharing:
    """The virtual node server of one node entry, when sharing is on.

    Built with the entry's runtime (nothing listens until :meth:`start`).
    Settings the engine rejects (only possible when the options were not
    written by the options flow) are logged as an error, kept in
    :attr:`error` and shown in diagnostics; the node itself keeps working.
    """

    def __init__(
        self,
        hass: HomeAssistant,
        entry: ConfigEntry[Any],
        link: NodeLink,
        issues: NodeIssues,
        on_change: Callable[[], None],
    ) -> None:
        """Read the settings from ``entry.options``; build the server if sharing is on."""
        self.hass = hass
        self.entry = entry
        self.settings = ShareSettings.from_options(entry.options)
        self.server: VirtualNodeServer | None = None
        # Why the node is not shared although it should be (bad settings, or
        # the last bind error while retrying); None when listening or off.
        self.error: str | None = None
        self.bind_failures = 0
        self._issues = issues
        self._on_change = on_change
        if not self.settings.enabled:
            return
        try:
            self.server = VirtualNodeServer(
                link,
                host=self.settings.host,
                port=self.settings.port,
                allowed_networks=self.settings.allowed_networks,
                on_change=on_change,
            )
        except ValueError as err:  # InvalidNetworkError, a bad port
            self.error = f"invalid settings: {err}"
        if self.error is not None:
            _LOGGER.error(
                "%s: the node is not shared: %s; correct them in the entry's options",
                entry.title,
                self.error,
            )

    # -- state for entities and diagnostics -----------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether "Share this node" is on in the entry's options."""
        return self.settings.enabled

    @property
    def listening(self) -> bool:
        """Whether the shared node's port is open."""
        return self.server is not None and self.server.listening

    @property
    def clients(self) -> list[ClientInfo]:
        """The connected clients, oldest first (none when not shared)."""
        return self.server.clients if self.server is not None else []

    @property
    def client_addresses(self) -> list[str]:
        """``address:port`` of each connected client, oldest first."""
        return [format_client(client) for client in self.clients]

    @property
    def packets_from_clients(self) -> int:
        """``ToRadio`` packets received from clients since the entry was set up."""
        return self.server.stats.packets_from_clients if self.server else 0

    def diagnostics(self) -> dict[str, Any]:
        """Settings, errors and the server's own dump (clients, counters), JSON-ready.

        Client addresses and ports are included; the stream API carries no
        credentials.
        """
        return {
            "enabled": self.settings.enabled,
            "port": self.settings.port,
            "host": self.settings.host,
            "allowed_networks": list(self.settings.networks) or "local networks",
            "error": self.error,
            "bind_failures": self.bind_failures,
            "server": self.server.diagnostics() if self.server is not None else None,
        }

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Serve the node as a background task of the entry (nothing when not shared).

        Unloading the entry cancels the task, which closes the port and every
        client connection before the entry is set up again.
        """
        server = self.server
        if server is None:
            return
        self.entry.async_create_background_task(
            self.hass,
            self._async_serve(server),
            f"{DOMAIN} {self.entry.title} shared node",
        )

    async def _async_serve(self, server: VirtualNodeServer) -> None:
        """Bind the port (retrying with backoff, repair issue meanwhile); stop at the end."""
        backoff = Backoff(base=BIND_RETRY_BASE, cap=BIND_RETRY_CAP)
        try:
            while True:
                try:
                    await server.start()
                except VirtualNodeBindError as err:
                    self._bind_failed(err)
                    await asyncio.sleep(backoff.next_delay())
                    continue
                break
            if self.bind_failures:
                _LOGGER.info(
                    "%s: the node is shared on port %d now",
                    self.entry.title,
                    server.port,
                )
            self.error = None
            self._issues.async_share_port_bound()
            self._on_change()
            await asyncio.Event().wait()  # until the entry is unloaded
        finally:
            await server.stop()

    def _bind_failed(self, err: VirtualNodeBindError) -> None:
        message = err.strerror or str(err)
        if message != self.error:
            _LOGGER.warning(
                "%s: cannot share the node on %s:%d (%s); trying again",
                self.entry.title,
                self.settings.host,
                self.settings.port,
                message,
            )
        self.error = message
        self.bind_failures += 1
        self._issues.async_share_port_unavailable(self.settings.port, message)
        self._on_change()
