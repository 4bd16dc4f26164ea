"""Stdio MCP servers hosted on MQTT by an MQTT broker entry: one per ``stdio_server`` subentry.

Thin glue over the engine: each config subentry of type ``stdio_server``
(:data:`.const.SUBENTRY_STDIO_SERVER`, written by :mod:`.flow_stdio`) becomes a
:class:`HostedServer`, which runs

* its own :class:`~.engine.mqtt_client.MqttClient` (the entry's broker
  settings, client id ``{prefix}-mcp-{8 hex digits}``, which is the server-id,
  and the server's will: an empty retained presence,
  :meth:`~.engine.mcp_mqtt.McpMqttServer.will`). The presence will belongs to
  one MQTT connection, so every hosted server-name has its own connection
  (issue 7 brief);
* an :class:`~.engine.mcp_mqtt.McpMqttServer` for the subentry's server-name
  and description, whose sessions are served by a
  :class:`~.engine.stdio_host.StdioHost`: one child process per MCP client
  session, with the engine's session limit (16) and idle timeout (600 s);
* when the subentry has a ``request_topic``, a
  :class:`~.engine.mcp_mqtt_simple.SimpleMcpMqttServer` on the same MQTT
  client: the simple-device layout (a fixed request topic, MQTT 5 Response
  Topic and Correlation Data, QoS 1) served by one shared MCP session, which
  the bridge initializes itself, on a second
  :class:`~.engine.stdio_host.StdioHost` (so its child process, which runs as
  long as the server does, is counted and logged apart, as
  ``"{title} (simple devices)"``).

They run supervised (:func:`~.engine.supervisor.supervise`) as child tasks of
one entry background task per server (``entry.async_create_background_task``).
That task stops them in order when it is cancelled, by a subentry change, the
entry's unload or Home Assistant's shutdown: first the MCP servers (the
specification layout tells its sessions ``notifications/disconnected``, lets
the stdio host stop every child process and clears the retained presence with
an acknowledged empty retained message; the simple-device layout answers the
device requests still waiting with ``-32603`` and stops its child), then the
MQTT client. Had the two been separate entry
tasks, Home Assistant would cancel them together and the client could
disconnect (cleanly, so without its will) before the presence was cleared.
Home Assistant waits for the entry's background tasks when it unloads an entry,
so when the unload returns, no presence is left and no child process runs.

Subentry changes are applied live by :meth:`HostedServers.sync` (called from
the entry's update listener through
:meth:`.broker_runtime.BrokerRuntime.needs_reload`, which stays ``False`` for
them): a new subentry starts its server, a changed one restarts only that
server (the new instance starts once the old one has stopped, so two
instances never announce the same server-name), a removed one stops it; a
new title alone only renames the device (sessions stay up). The broker
session and the other hosted servers are not touched.

Each server has a device (identifiers ``(DOMAIN, f"{entry_id}_{subentry_id}")``,
linked to the subentry, via the broker's device) with the entities of
:mod:`.sensor` and :mod:`.binary_sensor`; entities of a subentry added later
are added on :data:`SIGNAL_HOSTED_ADDED`. Removing a subentry removes its
device and entities: Home Assistant does that itself (2025.4.4
``ConfigEntries.async_remove_subentry`` clears the subentry from the device
and entity registries, which removes a device left without config entry).

The entities' counters add up both layouts (:class:`HostedCounters`);
diagnostics show the simple-device layout's own counters under
``simple_devices``.

Counters survive a reconfiguration (an instance's counts are added to the
server's totals when it stops), so ``total_increasing`` sensors do not reset.
States are written on the server's update signal: at once when its MQTT
connection comes or goes, otherwise at most once per ``UPDATE_THROTTLE``
seconds when a value changed (a timer compares them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
import logging
import secrets
import time
from typing import Any, Final

from homeassistant.config_entries import ConfigEntry, ConfigSubentry
from homeassistant.const import CONF_COMMAND, CONF_DESCRIPTION
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers.device_registry import DeviceEntryType
from homeassistant.helpers.dispatcher import async_dispatcher_send
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.util.signal_type import SignalTypeFormat

from .const import (
    CONF_ARGS,
    CONF_CWD,
    CONF_ENV,
    CONF_REQUEST_TOPIC,
    CONF_SERVER_NAME,
    DOMAIN,
    SUBENTRY_STDIO_SERVER,
    UPDATE_THROTTLE,
)
from .engine.mcp_mqtt import (
    SERVER_COMPONENT,
    McpMqttServer,
    connect_user_properties,
    control_topic,
)
from .engine.mcp_mqtt_simple import SimpleMcpMqttServer
from .engine.mqtt_client import ClientState, MqttClient, MqttSettings
from .engine.stdio_host import StdioHost, StdioServerConfig
from .engine.subscriptions import FilterState
from .engine.supervisor import TaskHealth, supervise

_LOGGER = logging.getLogger(__name__)

# Sent (formatted with the entry id) with the HostedServer whose entities the
# platforms should add: a subentry added while the entry is loaded.
SIGNAL_HOSTED_ADDED: Final[SignalTypeFormat[HostedServer]] = SignalTypeFormat(
    f"{DOMAIN}_{{}}_hosted_added"
)
# Sent (formatted with "<entry id>_<subentry id>", no arguments) when one hosted
# server's entities should write their state.
SIGNAL_HOSTED_UPDATE: Final[SignalTypeFormat[()]] = SignalTypeFormat(
    f"{DOMAIN}_{{}}_hosted_update"
)

HOSTED_MANUFACTURER: Final = "MQTT Bridge"
HOSTED_MODEL: Final = "stdio MCP server"

# Seconds the MCP server gets to end its sessions (each stops its child: close
# stdin, 2 s, terminate) and clear its presence before it is cancelled again;
# within the 10 s Home Assistant waits for an entry's tasks on unload.
STOP_TIMEOUT: Final = 8.0
# Seconds the MQTT client gets to disconnect after that.
CLIENT_STOP_TIMEOUT: Final = 2.0


@dataclass(frozen=True, slots=True)
class HostedServerConfig:
    """What one ``stdio_server`` subentry asks for (its title and data).

    ``env`` holds the configured variables only (the engine adds the minimal
    environment); ``cwd`` is ``None`` for Home Assistant's working directory;
    ``request_topic`` is ``None`` when simple devices are not served.
    """

    title: str
    server_name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    description: str = ""
    request_topic: str | None = None

    @classmethod
    def from_subentry(cls, subentry: ConfigSubentry) -> HostedServerConfig:
        """Read a subentry's title and data (missing optional keys: defaults)."""
        data = subentry.data
        return cls(
            title=subentry.title,
            server_name=str(data[CONF_SERVER_NAME]),
            command=str(data[CONF_COMMAND]),
            args=tuple(str(arg) for arg in data.get(CONF_ARGS) or ()),
            env={str(k): str(v) for k, v in (data.get(CONF_ENV) or {}).items()},
            cwd=data.get(CONF_CWD) or None,
            description=str(data.get(CONF_DESCRIPTION) or ""),
            request_topic=str(data.get(CONF_REQUEST_TOPIC) or "") or None,
        )

    def stdio(self) -> StdioServerConfig:
        """The engine's start configuration of the child processes."""
        return StdioServerConfig(self.command, self.args, dict(self.env), self.cwd)


@dataclass(slots=True)
class HostedCounters:
    """Totals of a hosted server's instances (all counts since set-up).

    ``requests``: client requests passed to a child process
    (:attr:`.engine.stdio_host.StdioHostStats.requests`) plus the requests of
    simple devices (:attr:`.engine.mcp_mqtt_simple.SimpleMcpMqttStats.requests`,
    also those answered by the bridge itself, like ``initialize``);
    ``errors``: the MCP server's errors, parse errors and refused sessions plus
    the stdio hosts' errors (JSON-RPC error answers, start failures) plus, for
    simple devices, each bad input or failure once: payloads that are not
    JSON-RPC, requests without a usable Response Topic, refused and timed-out
    requests, failed upstream sessions (an error answer that comes from the
    child is counted by its stdio host only); ``restarts``: child processes
    started again after they died (both stdio hosts); ``sessions``: MCP
    sessions of specification-layout clients started.
    """

    requests: int = 0
    errors: int = 0
    restarts: int = 0
    sessions: int = 0

    def add(self, other: HostedCounters) -> None:
        """Add ``other``'s counts to these."""
        self.requests += other.requests
        self.errors += other.errors
        self.restarts += other.restarts
        self.sessions += other.sessions


class _Instance:
    """One run of a configuration: MQTT client, MCP server, stdio host, task."""

    def __init__(
        self, config: HostedServerConfig, settings: MqttSettings, client_id: str
    ) -> None:
        """Build the engine objects; nothing connects until :meth:`run`.

        Raises:
            ValueError: the server-name is invalid (spec §1.2) or the request
                topic is not a topic name (``TopicError``).

        """
        self.config = config
        self.client = MqttClient(
            settings,
            client_id=client_id,
            will=McpMqttServer.will(client_id, config.server_name),
            connect_user_properties=connect_user_properties(SERVER_COMPONENT),
        )
        self.host = StdioHost(config.stdio(), name=config.title)
        self.server = McpMqttServer(
            self.client,
            config.server_name,
            description=config.description,
            handler=self.host.serve_session,
        )
        self.control = control_topic(client_id, config.server_name)
        self.simple_host: StdioHost | None = None
        self.simple: SimpleMcpMqttServer | None = None
        if config.request_topic is not None:
            self.simple_host = StdioHost(
                config.stdio(), name=_simple_name(config.title)
            )
            self.simple = SimpleMcpMqttServer(
                self.client,
                config.request_topic,
                handler=self.simple_host.serve_session,
            )
        self.task: asyncio.Task[None] | None = None

    @property
    def announced(self) -> bool:
        """Whether the presence is announced: connected, control topic granted.

        The server publishes its retained presence once the broker has granted
        its control topic (after a reconnect, once its sessions' topics are
        granted again too, at most a few seconds later): a close and cheap
        reading of "reachable by clients" without subscribing to it.
        """
        return (
            self.client.connected
            and self.client.registry.state_of(self.control) is FilterState.GRANTED
        )

    def counters(self) -> HostedCounters:
        """This instance's counts (see :class:`HostedCounters`)."""
        server, host = self.server.stats, self.host.stats
        counters = HostedCounters(
            requests=host.requests,
            errors=server.errors
            + server.parse_errors
            + server.rejected_sessions
            + host.errors,
            restarts=host.restarts,
            sessions=server.sessions_started,
        )
        if self.simple is not None and self.simple_host is not None:
            simple, simple_host = self.simple.stats, self.simple_host.stats
            counters.requests += simple.requests
            counters.errors += (
                simple.parse_errors
                + simple.no_response_topic
                + simple.rejected
                + simple.timeouts
                + simple.handler_failures
                + simple_host.errors
            )
            counters.restarts += simple_host.restarts
        return counters

    def simple_diagnostics(self) -> dict[str, Any] | None:
        """The simple-device layout's state and counters, or ``None`` when it is off."""
        simple, simple_host = self.simple, self.simple_host
        if simple is None or simple_host is None:
            return None
        server_info = (simple.initialize_result or {}).get("serverInfo")
        return {
            "request_topic": simple.request_topic,
            "notifications_topic": simple.notifications_topic,
            "ready": simple.ready,
            "pending_requests": simple.pending_requests,
            "upstream_server": server_info,
            "stats": asdict(simple.stats),
            "stdio_host": asdict(simple_host.stats),
        }

    async def run(
        self, previous: asyncio.Task[None] | None, health: TaskHealth
    ) -> None:
        """Serve until cancelled, after ``previous`` (the replaced instance) ended.

        On cancel: the MCP servers first (sessions, children, presence), then
        the MQTT client (see the module docstring).
        """
        if previous is not None:
            await asyncio.wait({previous})
        title = self.config.title
        loop = asyncio.get_running_loop()
        client_task = loop.create_task(
            supervise(f"{title} MQTT client", self.client.run, health),
            name=f"{DOMAIN} {title} hosted MQTT client",
        )
        server_tasks = {
            loop.create_task(
                supervise(f"{title} MCP server", self.server.run, health),
                name=f"{DOMAIN} {title} hosted MCP server",
            )
        }
        if self.simple is not None:
            server_tasks.add(
                loop.create_task(
                    supervise(f"{title} simple MCP bridge", self.simple.run, health),
                    name=f"{DOMAIN} {title} hosted simple MCP bridge",
                )
            )
        try:
            await asyncio.wait({client_task, *server_tasks})
        finally:
            for task in server_tasks:
                task.cancel()
            try:
                _done, pending = await asyncio.wait(server_tasks, timeout=STOP_TIMEOUT)
                for task in pending:  # pragma: no cover - a handler ignored its stop
                    _LOGGER.warning(
                        "%s: %s did not stop in time", title, task.get_name()
                    )
                    task.cancel()
            finally:
                client_task.cancel()
                await asyncio.wait({client_task}, timeout=CLIENT_STOP_TIMEOUT)


def _simple_name(title: str) -> str:
    """The log name of the stdio host serving simple devices."""
    return f"{title} (simple devices)"


class HostedServer:
    """One ``stdio_server`` subentry's server: its device, entities' state, instance."""

    def __init__(self, manager: HostedServers, subentry: ConfigSubentry) -> None:
        """Read the subentry; nothing runs until :meth:`start`."""
        self.manager = manager
        self.subentry_id = subentry.subentry_id
        self.config = HostedServerConfig.from_subentry(subentry)
        key = f"{manager.entry.entry_id}_{subentry.subentry_id}"
        self.device_identifier = (DOMAIN, key)
        self.signal_update = SIGNAL_HOSTED_UPDATE.format(key)
        self._unique_prefix = key
        self.health = TaskHealth()
        # Why the configuration cannot run (an invalid server-name), or None.
        self.problem: str | None = None
        self.device_id: str | None = None
        self._instance: _Instance | None = None
        self._retiring: set[_Instance] = set()
        self._totals = HostedCounters()
        self._written: tuple[Any, ...] | None = None
        self._remove_listener: Callable[[], None] | None = None

    def unique_id(self, key: str) -> str:
        """The unique id of this server's entity with description ``key``."""
        return f"{self._unique_prefix}_{key}"

    # -- lifecycle -----------------------------------------------------------------

    @callback
    def register_device(self) -> None:
        """Create or update the server's device (name = the subentry's title)."""
        manager = self.manager
        self.device_id = (
            dr.async_get(manager.hass)
            .async_get_or_create(
                config_entry_id=manager.entry.entry_id,
                config_subentry_id=self.subentry_id,
                identifiers={self.device_identifier},
                manufacturer=HOSTED_MANUFACTURER,
                model=HOSTED_MODEL,
                name=self.config.title,
                entry_type=DeviceEntryType.SERVICE,
                via_device=manager.via_device,
            )
            .id
        )

    @callback
    def start(self, previous: asyncio.Task[None] | None = None) -> None:
        """Start an instance of the current configuration (after ``previous``)."""
        manager = self.manager
        client_id = f"{manager.client_id_prefix}-mcp-{secrets.token_hex(4)}"
        try:
            instance = _Instance(self.config, manager.settings, client_id)
        except ValueError as err:
            self.problem = str(err)
        else:
            self.problem = None
        if self.problem is not None:
            _LOGGER.error(
                "The stdio MCP server %s cannot be hosted: %s",
                self.config.title,
                self.problem,
            )
            return
        self._instance = instance
        self._remove_listener = instance.client.add_state_listener(self._on_state)
        instance.task = manager.entry.async_create_background_task(
            manager.hass,
            instance.run(previous, self.health),
            f"{DOMAIN} {manager.entry.title} hosted {self.config.server_name}",
        )

    @callback
    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the running instance; return its task (done once it stopped).

        Its counts are added to the totals when the task ends.
        """
        instance, self._instance = self._instance, None
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if instance is None or instance.task is None:
            return None
        task = instance.task
        self._retiring.add(instance)

        def retired(_task: asyncio.Task[None]) -> None:
            self._retiring.discard(instance)
            self._totals.add(instance.counters())

        task.add_done_callback(retired)
        task.cancel()
        return task

    @callback
    def rename(self, title: str) -> None:
        """Take a new title (device name, log prefix) without a restart."""
        self.config = replace(self.config, title=title)
        if self._instance is not None:
            self._instance.host.name = title
            if self._instance.simple_host is not None:
                self._instance.simple_host.name = _simple_name(title)
        self.register_device()

    @callback
    def reconfigure(self, config: HostedServerConfig) -> None:
        """Run ``config`` instead: the old instance stops, then the new one starts."""
        title_changed = config.title != self.config.title
        self.config = config
        previous = self.stop()
        self.start(previous)
        if title_changed:
            self.register_device()
        self._dispatch()

    # -- state ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server is announced on the broker (see :attr:`_Instance.announced`).

        Not "a child process is alive": children run only while MCP clients
        have sessions, so an idle server that clients can reach is running.
        """
        return self._instance is not None and self._instance.announced

    @property
    def active_sessions(self) -> int:
        """MCP client sessions being served now."""
        return len(self._instance.server.sessions) if self._instance else 0

    def counters(self) -> HostedCounters:
        """Totals over every instance since set-up (see :class:`HostedCounters`)."""
        totals = HostedCounters()
        totals.add(self._totals)
        for instance in (*self._retiring, self._instance):
            if instance is not None:
                totals.add(instance.counters())
        return totals

    def _state(self) -> tuple[Any, ...]:
        counts = self.counters()
        return (
            self.running,
            self.active_sessions,
            counts.requests,
            counts.errors,
            counts.restarts,
        )

    @callback
    def _dispatch(self) -> None:
        self._written = self._state()
        async_dispatcher_send(self.manager.hass, self.signal_update)

    @callback
    def tick(self) -> None:
        """Write the entities' state if a value changed since the last write."""
        if self._state() != self._written:
            self._dispatch()

    def _on_state(self, state: ClientState) -> None:
        """Write the state at once when the server's MQTT connection comes or goes."""
        if state in (ClientState.CONNECTED, ClientState.DISCONNECTED):
            self._dispatch()

    def diagnostics(self) -> dict[str, Any]:
        """The server's configuration (variable names only) and state, JSON-serialisable."""
        config, instance = self.config, self._instance
        counts = self.counters()
        data: dict[str, Any] = {
            "subentry_id": self.subentry_id,
            "name": config.title,
            "server_name": config.server_name,
            "description": config.description,
            "command": config.command,
            "args": list(config.args),
            "env": sorted(config.env),
            "cwd": config.cwd,
            "request_topic": config.request_topic,
            "problem": self.problem,
            "running": self.running,
            "stats": {
                "active_sessions": self.active_sessions,
                **asdict(counts),
            },
            "task_failures": self.health.as_dict(),
        }
        if instance is not None:
            now = time.monotonic()
            data["server_id"] = instance.client.client_id
            data["client_state"] = instance.client.state.value
            data["stats"] |= {
                "mcp_server": asdict(instance.server.stats),
                "stdio_host": asdict(instance.host.stats),
                "mqtt_client": asdict(instance.client.stats),
            }
            data["sessions"] = [
                {
                    "client_id": info.client_id,
                    "requests": info.requests,
                    "age_s": round(now - info.started, 1),
                    "idle_s": round(now - info.last_activity, 1),
                }
                for info in instance.server.sessions.values()
            ]
            data["simple_devices"] = instance.simple_diagnostics()
        return data


class HostedServers:
    """The hosted stdio MCP servers of one broker entry (``BrokerRuntime.hosted``)."""

    def __init__(
        self,
        hass: HomeAssistant,
        entry: ConfigEntry[Any],
        *,
        settings: MqttSettings,
        client_id_prefix: str,
        via_device: tuple[str, str],
    ) -> None:
        """Read the entry's ``stdio_server`` subentries and register their devices.

        ``via_device`` is the broker's device identifier. Nothing runs until
        :meth:`start`; the platforms add the servers' entities in between.
        """
        self.hass = hass
        self.entry = entry
        self.settings = settings
        self.client_id_prefix = client_id_prefix
        self.via_device = via_device
        self.signal_added = SIGNAL_HOSTED_ADDED.format(entry.entry_id)
        self.servers: dict[str, HostedServer] = {}
        self._stopped = False
        for subentry_id, subentry in self._wanted().items():
            server = self.servers[subentry_id] = HostedServer(self, subentry)
            server.register_device()

    def _wanted(self) -> dict[str, ConfigSubentry]:
        return {
            subentry_id: subentry
            for subentry_id, subentry in self.entry.subentries.items()
            if subentry.subentry_type == SUBENTRY_STDIO_SERVER
        }

    @callback
    def start(self) -> None:
        """Start every server and the state timer; stop with the entry."""
        entry = self.entry
        for server in self.servers.values():
            server.start()
        entry.async_on_unload(
            async_track_time_interval(
                self.hass,
                self._async_tick,
                timedelta(seconds=UPDATE_THROTTLE),
                name=f"{DOMAIN} {entry.title} hosted servers",
                cancel_on_shutdown=True,
            )
        )
        entry.async_on_unload(self._on_unload)

    @callback
    def _on_unload(self) -> None:
        """No more changes: Home Assistant cancels and awaits the servers' tasks."""
        self._stopped = True

    @callback
    def sync(self) -> None:
        """Start, restart or stop servers so that they match ``entry.subentries``.

        Only the servers whose subentry was added, changed or removed are
        touched. Called by the entry's update listener, which exists only
        after :meth:`start`; does nothing once the entry is unloading.
        """
        if self._stopped:
            return
        wanted = self._wanted()
        for subentry_id in [s for s in self.servers if s not in wanted]:
            server = self.servers.pop(subentry_id)
            _LOGGER.debug("Stopping the hosted server %s", server.config.title)
            server.stop()
        for subentry_id, subentry in wanted.items():
            current = self.servers.get(subentry_id)
            if current is None:
                added = self.servers[subentry_id] = HostedServer(self, subentry)
                added.register_device()
                added.start()
                async_dispatcher_send(self.hass, self.signal_added, added)
                continue
            config = HostedServerConfig.from_subentry(subentry)
            if config == current.config:
                continue
            if replace(current.config, title=config.title) == config:
                current.rename(config.title)
            else:
                _LOGGER.debug("Restarting the hosted server %s", config.title)
                current.reconfigure(config)

    @callback
    def _async_tick(self, _now: datetime) -> None:
        for server in self.servers.values():
            server.tick()

    def diagnostics(self) -> list[dict[str, Any]]:
        """Every hosted server's diagnostics, by title."""
        return [
            server.diagnostics()
            for server in sorted(self.servers.values(), key=lambda s: s.config.title)
        ]
