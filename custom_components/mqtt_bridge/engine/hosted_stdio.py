"""A stdio MCP server hosted on MQTT: one MQTT connection, both layouts, one ``run``.

:class:`HostedStdioServer` is what the Home Assistant glue
(``hosted_servers.py``, one per ``stdio_server`` subentry) and
``mqtt-bridge-mcp serve`` (:mod:`.cli`) both run. Built from
:class:`HostedStdioConfig`, it owns

* one :class:`~.mqtt_client.MqttClient`: the given client id, which is the
  server-id (spec §1.2), the server's will, an empty retained presence
  (:meth:`~.mcp_mqtt.McpMqttServer.will`, spec §1.3), and the CONNECT user
  property ``MCP-COMPONENT-TYPE: mcp-server`` (spec §1.4). The presence will
  belongs to one MQTT connection, so every hosted server-name needs its own;
* an :class:`~.mcp_mqtt.McpMqttServer` (the specification layout) whose
  sessions are served by a :class:`~.stdio_host.StdioHost`: one child process
  per MCP client session, at most ``max_sessions``, ended after
  ``idle_timeout`` seconds without traffic;
* with a ``request_topic``, a :class:`~.mcp_mqtt_simple.SimpleMcpMqttServer`
  on the same connection (the simple-device layout: a fixed request topic,
  MQTT 5 Response Topic and Correlation Data, no ``initialize``) served by a
  second :class:`~.stdio_host.StdioHost`, so that its one long-lived child is
  counted and logged apart, as ``"{name} (simple devices)"``.

What is counted (:meth:`HostedStdioServer.counters`, a :class:`HostedCounters`):
see that class; :meth:`HostedStdioServer.diagnostics` shows every engine
counter as it is.

:meth:`HostedStdioServer.run` runs the client and the servers until it is
cancelled, then stops them in order: first the MCP servers (the specification
layout sends ``notifications/disconnected`` to its sessions, lets the stdio
host stop every child and clears the retained presence with an acknowledged
empty retained message, within :data:`STOP_TIMEOUT` seconds; the
simple-device layout answers the device requests still waiting with
``-32603`` and stops its child), then the MQTT client (within
:data:`CLIENT_STOP_TIMEOUT`). Why this order: spec §1.5 "Discovery" asks a
server going offline to clear its presence, and a clean DISCONNECT does not
fire the will (MQTT 5 §3.1.2.5), so were the client stopped first (or
together, as two tasks cancelled at once), the presence would stay behind.

With a :class:`~.supervisor.TaskHealth`, the client and the servers are
supervised (:func:`~.supervisor.supervise`: a failure is logged, recorded and
followed by a restart), so ``run`` only ends by cancellation. Without one
(the CLI), the first of them to end ends ``run``: the others are stopped in
the same order and its exception (e.g.
:class:`~.subscriptions.SubscriptionRefusedError`) is raised.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field, replace
import logging
import ssl
import time
from typing import Any, Final

from .mcp_mqtt import (
    SERVER_COMPONENT,
    McpMqttServer,
    connect_user_properties,
    control_topic,
    validate_server_name,
)
from .mcp_mqtt_simple import SimpleMcpMqttServer, request_topic_problem
from .mqtt_client import MqttClient, MqttSettings
from .stdio_host import StdioHost, StdioServerConfig
from .subscriptions import FilterState
from .supervisor import TaskHealth, supervise

_LOGGER = logging.getLogger(__name__)

# Seconds the MCP servers get to end their sessions (each stops its child:
# close stdin, 2 s, terminate) and clear the presence before they are
# cancelled again; within the 10 s Home Assistant waits for an entry's tasks.
STOP_TIMEOUT: Final = 8.0
# Seconds the MQTT client gets to disconnect after that.
CLIENT_STOP_TIMEOUT: Final = 2.0


def simple_host_name(name: str) -> str:
    """The log name of the stdio host serving simple devices: ``"{name} (simple devices)"``."""
    return f"{name} (simple devices)"


@dataclass(frozen=True, slots=True)
class HostedStdioConfig:
    """What to host: ``command`` ``args`` in ``cwd`` with ``env`` added, as ``server_name``.

    ``env`` holds the configured variables only (the stdio host adds the
    minimal environment); ``cwd`` is ``None`` for the current directory;
    ``description`` goes into the presence message; ``request_topic`` is
    ``None`` when simple devices are not served; ``name`` prefixes log lines
    and task names (``""``: the server-name); ``qos`` (0 or 1) is used for
    every MCP message of both layouts; ``max_sessions`` bounds concurrent
    client sessions (one child each); ``idle_timeout`` (seconds) ends a
    session without traffic.
    """

    server_name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    description: str = ""
    request_topic: str | None = None
    name: str = ""
    qos: int = 1
    max_sessions: int = 16
    idle_timeout: float = 600.0

    @property
    def log_name(self) -> str:
        """``name``, or the server-name when it is empty."""
        return self.name or self.server_name

    def validate(self) -> None:
        """Check what the engine would refuse later, with one clear message.

        Raises:
            ValueError: an invalid server-name (spec §1.2, the message of
                :func:`~.mcp_mqtt.validate_server_name`), a request topic that
                :func:`~.mcp_mqtt_simple.request_topic_problem` refuses
                (``"request topic 'a/+': wildcard"``), an empty command, a
                QoS other than 0 or 1, a ``max_sessions`` below 1 or an
                ``idle_timeout`` that is not positive.

        """
        validate_server_name(self.server_name)
        topic = self.request_topic
        if topic is not None and (problem := request_topic_problem(topic)):
            raise ValueError(f"request topic {topic!r}: {problem}")
        if not self.command:
            raise ValueError("the command is empty")
        if self.qos not in (0, 1):
            raise ValueError(f"QoS {self.qos} is not 0 or 1")
        if self.max_sessions < 1 or self.idle_timeout <= 0:
            raise ValueError(
                f"max_sessions ({self.max_sessions}) and idle_timeout "
                f"({self.idle_timeout:g} s) must be positive"
            )

    def stdio(self) -> StdioServerConfig:
        """The stdio host's start configuration of the child processes."""
        return StdioServerConfig(self.command, self.args, dict(self.env), self.cwd)


@dataclass(slots=True)
class HostedCounters:
    """Counts of a hosted server, both layouts added up.

    ``requests``: client requests passed to a child process
    (:attr:`.stdio_host.StdioHostStats.requests`) plus the requests of simple
    devices (:attr:`.mcp_mqtt_simple.SimpleMcpMqttStats.requests`, also those
    answered by the bridge itself, like ``initialize``); ``errors``: the MCP
    server's errors, parse errors and refused sessions plus the stdio hosts'
    errors (JSON-RPC error answers, start failures) plus, for simple devices,
    each bad input or failure once: payloads that are not JSON-RPC, requests
    without a usable Response Topic, refused and timed-out requests, failed
    upstream sessions (an error answer that comes from the child is counted by
    its stdio host only); ``restarts``: child processes started again after
    they died (both stdio hosts); ``sessions``: MCP sessions of
    specification-layout clients started.
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


class HostedStdioServer:
    """One stdio MCP server on MQTT: client, MCP server(s), stdio host(s); see the module doc."""

    def __init__(
        self,
        settings: MqttSettings,
        config: HostedStdioConfig,
        *,
        client_id: str,
        tls_context: ssl.SSLContext | None = None,
        health: TaskHealth | None = None,
    ) -> None:
        """Build the engine objects; nothing connects until :meth:`run`.

        ``client_id`` is the MQTT client id and so the server-id (no ``/``,
        ``+`` or ``#``); ``tls_context`` is passed to the
        :class:`~.mqtt_client.MqttClient` (default: built from ``settings``);
        ``health`` turns supervision on (see the module doc).

        Raises:
            ValueError: see :meth:`HostedStdioConfig.validate`.

        """
        config.validate()
        self.config = config
        self.health = health
        self.client = MqttClient(
            settings,
            client_id=client_id,
            will=McpMqttServer.will(client_id, config.server_name),
            tls_context=tls_context,
            connect_user_properties=connect_user_properties(SERVER_COMPONENT),
        )
        self.host = StdioHost(config.stdio(), name=config.log_name)
        self.server = McpMqttServer(
            self.client,
            config.server_name,
            description=config.description,
            handler=self.host.serve_session,
            max_sessions=config.max_sessions,
            idle_timeout=config.idle_timeout,
            qos=config.qos,
        )
        self._control = control_topic(client_id, config.server_name)
        self.simple_host: StdioHost | None = None
        self.simple: SimpleMcpMqttServer | None = None
        if config.request_topic is not None:
            self.simple_host = StdioHost(
                config.stdio(), name=simple_host_name(config.log_name)
            )
            self.simple = SimpleMcpMqttServer(
                self.client,
                config.request_topic,
                handler=self.simple_host.serve_session,
                qos=config.qos,
            )

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
            and self.client.registry.state_of(self._control) is FilterState.GRANTED
        )

    def rename(self, name: str) -> None:
        """Take a new log name (stdio hosts' log prefixes) without a restart.

        Task names and supervision names keep the name :meth:`run` started with.
        """
        self.config = replace(self.config, name=name)
        self.host.name = self.config.log_name
        if self.simple_host is not None:
            self.simple_host.name = simple_host_name(self.config.log_name)

    def counters(self) -> HostedCounters:
        """The counts of this server since it was built (see :class:`HostedCounters`)."""
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

    def diagnostics(self) -> dict[str, Any]:
        """State and engine counters, JSON-serialisable.

        ``{"server_id", "client_state", "stats": {"mcp_server", "stdio_host",
        "mqtt_client"}, "sessions": [{"client_id", "requests", "age_s",
        "idle_s"}], "simple_devices": {...} or None}``; ages in seconds.
        """
        now = time.monotonic()
        return {
            "server_id": self.client.client_id,
            "client_state": self.client.state.value,
            "stats": {
                "mcp_server": asdict(self.server.stats),
                "stdio_host": asdict(self.host.stats),
                "mqtt_client": asdict(self.client.stats),
            },
            "sessions": [
                {
                    "client_id": info.client_id,
                    "requests": info.requests,
                    "age_s": round(now - info.started, 1),
                    "idle_s": round(now - info.last_activity, 1),
                }
                for info in self.server.sessions.values()
            ],
            "simple_devices": self._simple_diagnostics(),
        }

    def _simple_diagnostics(self) -> dict[str, Any] | None:
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

    def _start(
        self, what: str, factory: Callable[[], Coroutine[Any, Any, None]]
    ) -> asyncio.Task[None]:
        """Start ``factory()`` as a task named ``"{name} {what}"`` (supervised with a health)."""
        label = f"{self.config.log_name} {what}"
        coro = (
            factory() if self.health is None else supervise(label, factory, self.health)
        )
        return asyncio.get_running_loop().create_task(coro, name=f"hosted {label}")

    async def run(self) -> None:
        """Serve until cancelled; then stop the servers, then the client (module doc).

        Raises:
            Exception: without a health only: what ended the client or a
                server first (``RuntimeError`` if one returned), after the
                others were stopped.

        """
        client_task = self._start("MQTT client", self.client.run)
        server_tasks = [self._start("MCP server", self.server.run)]
        if self.simple is not None:
            server_tasks.append(self._start("simple MCP bridge", self.simple.run))
        try:
            await asyncio.wait(
                {client_task, *server_tasks}, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            await self._stop(server_tasks, client_task)
        for task in (*server_tasks, client_task):
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        raise RuntimeError(f"{self.config.log_name}: a task stopped unexpectedly")

    async def _stop(
        self, server_tasks: list[asyncio.Task[None]], client_task: asyncio.Task[None]
    ) -> None:
        """Cancel the servers and wait for them, then the client (bounded waits)."""
        for task in server_tasks:
            task.cancel()
        try:
            _done, pending = await asyncio.wait(server_tasks, timeout=STOP_TIMEOUT)
            for task in pending:  # pragma: no cover - a handler ignored its stop
                _LOGGER.warning(
                    "%s: %s did not stop in time",
                    self.config.log_name,
                    task.get_name(),
                )
                task.cancel()
        finally:
            client_task.cancel()
            await asyncio.wait({client_task}, timeout=CLIENT_STOP_TIMEOUT)
