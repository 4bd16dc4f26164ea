"""Stdio MCP servers hosted on MQTT by an MQTT broker entry: one per ``stdio_server`` subentry.

Thin glue over the engine: each config subentry of type ``stdio_server``
(:data:`.const.SUBENTRY_STDIO_SERVER`, written by :mod:`.flow_stdio`) becomes a
:class:`HostedServer`, whose configuration (:func:`config_from_subentry`: the
subentry's data, its title as the log name) runs as an
:class:`~.engine.hosted_stdio.HostedStdioServer`: its own MQTT connection
(the entry's broker settings, client id ``{prefix}-mcp-{8 hex digits}``, which
is the server-id, the server's presence will), the specification layout
(one child process per MCP client session, at most 16, 600 s idle timeout)
and, when the subentry has a ``request_topic``, the simple-device layout on a
second stdio host (logged as ``"{title} (simple devices)"``). See that module
for what runs, what is counted and the stop order.

Each instance runs supervised (a :class:`~.engine.supervisor.TaskHealth` per
server) as one entry background task (``entry.async_create_background_task``),
which stops the MCP servers before the MQTT client when it is cancelled, by
a subentry change, the entry's unload or Home Assistant's shutdown. Had the
two been separate entry tasks, Home Assistant would cancel them together and
the client could disconnect (cleanly, so without its will) before the
presence was cleared. Home Assistant waits for the entry's background tasks
when it unloads an entry, so when the unload returns, no presence is left and
no child process runs.

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

The entities' counters add up both layouts
(:class:`~.engine.hosted_stdio.HostedCounters`); diagnostics show the
simple-device layout's own counters under ``simple_devices``.

Counters survive a reconfiguration (an instance's counts are added to the
server's totals when it stops), so ``total_increasing`` sensors do not reset.
States are written on the server's update signal: at once when its MQTT
connection comes or goes, otherwise at most once per ``UPDATE_THROTTLE``
seconds when a value changed (a timer compares them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timedelta
import logging
import secrets
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
from .engine.hosted_stdio import HostedCounters, HostedStdioConfig, HostedStdioServer
from .engine.mqtt_client import ClientState, MqttSettings
from .engine.supervisor import TaskHealth

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


def config_from_subentry(subentry: ConfigSubentry) -> HostedStdioConfig:
    """What one ``stdio_server`` subentry asks for: its data, its title as ``name``.

    Missing optional keys take the defaults (``env``: none added, ``cwd``:
    Home Assistant's working directory, ``request_topic``: no simple devices);
    QoS 1, 16 sessions and a 600 s idle timeout, as the engine's defaults.
    """
    data = subentry.data
    return HostedStdioConfig(
        server_name=str(data[CONF_SERVER_NAME]),
        command=str(data[CONF_COMMAND]),
        args=tuple(str(arg) for arg in data.get(CONF_ARGS) or ()),
        env={str(k): str(v) for k, v in (data.get(CONF_ENV) or {}).items()},
        cwd=data.get(CONF_CWD) or None,
        description=str(data.get(CONF_DESCRIPTION) or ""),
        request_topic=str(data.get(CONF_REQUEST_TOPIC) or "") or None,
        name=subentry.title,
    )


async def _run_after(
    instance: HostedStdioServer, previous: asyncio.Task[None] | None
) -> None:
    """Run ``instance`` once ``previous`` (the instance it replaces) has ended."""
    if previous is not None:
        await asyncio.wait({previous})
    await instance.run()


class HostedServer:
    """One ``stdio_server`` subentry's server: its device, entities' state, instance."""

    def __init__(self, manager: HostedServers, subentry: ConfigSubentry) -> None:
        """Read the subentry; nothing runs until :meth:`start`."""
        self.manager = manager
        self.subentry_id = subentry.subentry_id
        self.config = config_from_subentry(subentry)
        key = f"{manager.entry.entry_id}_{subentry.subentry_id}"
        self.device_identifier = (DOMAIN, key)
        self.signal_update = SIGNAL_HOSTED_UPDATE.format(key)
        self._unique_prefix = key
        self.health = TaskHealth()
        # Why the configuration cannot run (an invalid server-name), or None.
        self.problem: str | None = None
        self.device_id: str | None = None
        self._instance: HostedStdioServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[HostedStdioServer] = set()
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
                name=self.config.name,
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
            instance = HostedStdioServer(
                manager.settings, self.config, client_id=client_id, health=self.health
            )
        except ValueError as err:
            self.problem = str(err)
        else:
            self.problem = None
        if self.problem is not None:
            _LOGGER.error(
                "The stdio MCP server %s cannot be hosted: %s",
                self.config.name,
                self.problem,
            )
            return
        self._instance = instance
        self._remove_listener = instance.client.add_state_listener(self._on_state)
        self._task = manager.entry.async_create_background_task(
            manager.hass,
            _run_after(instance, previous),
            f"{DOMAIN} {manager.entry.title} hosted {self.config.server_name}",
        )

    @callback
    def stop(self) -> asyncio.Task[None] | None:
        """Cancel the running instance; return its task (done once it stopped).

        Its counts are added to the totals when the task ends.
        """
        instance, self._instance = self._instance, None
        task, self._task = self._task, None
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if instance is None or task is None:
            return None
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
        self.config = replace(self.config, name=title)
        if self._instance is not None:
            self._instance.rename(title)
        self.register_device()

    @callback
    def reconfigure(self, config: HostedStdioConfig) -> None:
        """Run ``config`` instead: the old instance stops, then the new one starts."""
        title_changed = config.name != self.config.name
        self.config = config
        previous = self.stop()
        self.start(previous)
        if title_changed:
            self.register_device()
        self._dispatch()

    # -- state ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server is announced on the broker (:attr:`HostedStdioServer.announced`).

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
            "name": config.name,
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
            engine = instance.diagnostics()
            data["stats"] |= engine.pop("stats")
            data |= engine
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
            _LOGGER.debug("Stopping the hosted server %s", server.config.name)
            server.stop()
        for subentry_id, subentry in wanted.items():
            current = self.servers.get(subentry_id)
            if current is None:
                added = self.servers[subentry_id] = HostedServer(self, subentry)
                added.register_device()
                added.start()
                async_dispatcher_send(self.hass, self.signal_added, added)
                continue
            config = config_from_subentry(subentry)
            if config == current.config:
                continue
            if replace(current.config, name=config.name) == config:
                current.rename(config.name)
            else:
                _LOGGER.debug("Restarting the hosted server %s", config.name)
                current.reconfigure(config)

    @callback
    def _async_tick(self, _now: datetime) -> None:
        for server in self.servers.values():
            server.tick()

    def diagnostics(self) -> list[dict[str, Any]]:
        """Every hosted server's diagnostics, by title."""
        return [
            server.diagnostics()
            for server in sorted(self.servers.values(), key=lambda s: s.config.name)
        ]
