"""Runtime of an MQTT broker entry: one broker session and the MQTT tools on it.

Thin glue only: the engines in :mod:`.engine` do the work. :class:`BrokerRuntime`
owns one :class:`~.engine.mqtt_client.MqttClient` per entry (run as a
supervised background task of the entry) and one
:class:`~.engine.mqtt_tools.MqttTools` on it, which reads the topic ACL through
:attr:`BrokerRuntime.acl`. Every tool call, from the MCP endpoint or from the
Assist LLM API, goes through :meth:`BrokerRuntime.async_call_tool`: it times
the call, counts it and fires the ``mqtt_bridge_tool_call`` bus event
(described by :mod:`.logbook`).

Option changes (rules, endpoint and LLM API settings) are applied live: the
entry is not reloaded and the broker session stays up
(:meth:`BrokerRuntime.needs_reload`); data changes (host, credentials, TLS)
reload the entry. Credentials the broker rejects start a reauth flow.

The entry's ``stdio_server`` config subentries are stdio MCP servers hosted on
the broker (:class:`~.hosted_servers.HostedServers`, :attr:`BrokerRuntime.hosted`,
each on an MQTT connection of its own); subentry changes are applied live too,
server by server, from the same update listener.

Entities write their state on :data:`SIGNAL_BROKER_UPDATE`: at once when the
connection comes or goes, otherwise at most once per ``UPDATE_THROTTLE``
seconds when a counter changed (a timer compares them, since messages arrive
without a tool call). Tool calls and denied calls are counted here; messages
published and received are the tools' (:class:`~.engine.mqtt_tools.ToolStats`:
published by agents, handed to agents); the client's own counters are in the
diagnostics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
import logging
import secrets
import time
from typing import Any, Final

from homeassistant.config_entries import ConfigEntry
from homeassistant.const import (
    ATTR_DEVICE_ID,
    CONF_HOST,
    CONF_PASSWORD,
    CONF_PORT,
    CONF_USERNAME,
    Platform,
)
from homeassistant.core import Context, HomeAssistant, callback
from homeassistant.helpers import device_registry as dr
from homeassistant.helpers.device_registry import DeviceEntryType, DeviceInfo
from homeassistant.helpers.dispatcher import async_dispatcher_send
from homeassistant.helpers.event import async_track_time_interval
from homeassistant.util.signal_type import SignalTypeFormat

from . import llm_api, remote_llm
from .conflicts import async_check_mcp_conflict
from .const import (
    ATTR_ALLOWED,
    ATTR_DURATION_MS,
    ATTR_ENTRY_ID,
    ATTR_IS_ERROR,
    ATTR_SOURCE,
    ATTR_TOOL,
    ATTR_TOPIC,
    ATTR_USER_ID,
    CONF_ALLOW_SELF_SIGNED,
    CONF_CA_FILE,
    CONF_CLIENT_ID_PREFIX,
    CONF_INCLUDE_ASSIST,
    CONF_REQUIRE_ADMIN,
    CONF_RULES,
    CONF_TLS,
    DEFAULT_CLIENT_ID_PREFIX,
    DEFAULT_INCLUDE_ASSIST,
    DEFAULT_REQUIRE_ADMIN,
    DOMAIN,
    EVENT_TOOL_CALL,
    UPDATE_THROTTLE,
)
from .engine.acl import Acl, AclImportError, rules_from_options, rules_to_json
from .engine.mqtt_client import PORT_PLAIN, ClientState, MqttClient, MqttSettings
from .engine.mqtt_tools import MqttTools, ToolResult
from .engine.supervisor import TaskHealth, supervise
from .engine.tool_specs import TOOL_NAMES
from .hosted_servers import HostedServers
from .models import EntryRuntime, EntrySource

_LOGGER = logging.getLogger(__name__)

type BrokerConfigEntry = ConfigEntry[BrokerRuntime]

# Sent (formatted with the entry id, no arguments) when the broker entry's
# entities should write their state.
SIGNAL_BROKER_UPDATE: Final[SignalTypeFormat[()]] = SignalTypeFormat(
    f"{DOMAIN}_{{}}_broker_update"
)

# The device of a broker entry (one per entry; its identifier is the entry id).
BROKER_MANUFACTURER: Final = "MQTT Bridge"
BROKER_MODEL: Final = "MQTT broker"

# Longest tool name and topic put into a tool call event; longer ones are cut
# and end with "…" (a topic may be 65,535 bytes; events are recorded).
MAX_EVENT_TOOL_CHARS: Final = 64
MAX_EVENT_TOPIC_CHARS: Final = 256
# Counted under this tool name: a tool the tools do not have.
UNKNOWN_TOOL: Final = "unknown"
# The MCP resource that lists the rules in use (mcpMQTT's `topics` JSON).
RESOURCE_ACL_RULES: Final = "mqtt-bridge://acl/rules"


def broker_settings(data: Mapping[str, Any]) -> MqttSettings:
    """Return the engine's connection settings for broker entry ``data``.

    Empty credentials and an empty CA file are none; the CA file is used only
    with TLS; the certificate is verified unless ``allow_self_signed``.
    """
    tls = bool(data.get(CONF_TLS, False))
    return MqttSettings(
        host=data[CONF_HOST],
        port=int(data.get(CONF_PORT) or PORT_PLAIN),
        tls=tls,
        verify_tls=not data.get(CONF_ALLOW_SELF_SIGNED, False),
        username=data.get(CONF_USERNAME) or None,
        password=data.get(CONF_PASSWORD) or None,
        ca_file=(data.get(CONF_CA_FILE) or None) if tls else None,
    )


def acl_from_options(options: Mapping[str, Any]) -> Acl:
    """Return the ACL of broker entry ``options`` (no rules, or unreadable: deny all).

    Rules whose pattern is invalid grant nothing (:attr:`.engine.acl.Acl.invalid`).
    """
    try:
        rules = rules_from_options(options.get(CONF_RULES) or [])
    except AclImportError as err:
        _LOGGER.warning("The stored topic rules cannot be read (%s); denying all", err)
        rules = []
    return Acl(rules)


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return f"{text[: limit - 1]}…"


@dataclass(slots=True)
class ToolCallStats:
    """Tool calls through :meth:`BrokerRuntime.async_call_tool` since set-up.

    ``denied``: the ACL refused the call; ``errors``: the result was an error
    (denied calls included); ``by_tool``: calls per tool name (names the tools
    do not have count as ``unknown``); ``last_call`` is a POSIX time in
    seconds; ``total_duration_ms`` sums the calls' durations.
    """

    calls: int = 0
    denied: int = 0
    errors: int = 0
    by_tool: dict[str, int] = field(default_factory=dict)
    last_call: float | None = None
    total_duration_ms: float = 0.0


class BrokerRuntime(EntryRuntime):
    """Runtime data of an MQTT broker entry: client, tools, ACL, counters, signals."""

    platforms = (Platform.BINARY_SENSOR, Platform.SENSOR)

    def __init__(self, hass: HomeAssistant, entry: BrokerConfigEntry) -> None:
        """Build the client and the tools and register the broker's device.

        Nothing connects until :meth:`start`.
        """
        super().__init__(hass, entry)
        data = entry.data
        self.settings = broker_settings(data)
        prefix = data.get(CONF_CLIENT_ID_PREFIX) or DEFAULT_CLIENT_ID_PREFIX
        self.client = MqttClient(
            self.settings, client_id=f"{prefix}-{secrets.token_hex(4)}"
        )
        self.health = TaskHealth()
        self._acl_rules: Any = entry.options.get(CONF_RULES)
        self._acl = acl_from_options(entry.options)
        self.tools = MqttTools(self.client, acl=lambda: self.acl)
        self.tool_names = frozenset(TOOL_NAMES)
        self.stats = ToolCallStats()
        self.signal_update = SIGNAL_BROKER_UPDATE.format(entry.entry_id)
        self.device_id = self._async_register_device()
        # The stdio MCP servers of the entry's subentries (started by start()).
        self.hosted = HostedServers(
            hass,
            entry,
            settings=self.settings,
            client_id_prefix=prefix,
            via_device=self.device_identifier,
        )
        self._written: tuple[int, ...] | None = None
        self._was_connected: bool | None = None
        self._reauth_started = False
        # Set on unload: the client still reports STOPPED after the on-unload
        # callbacks ran; nothing may be dispatched or started then.
        self._unloaded = False

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Run the client (supervised) and start the tools' topic store."""
        entry, hass = self.entry, self.hass
        entry.async_on_unload(self.client.add_state_listener(self._on_client_state))
        entry.async_create_background_task(
            hass,
            supervise("MQTT client", self.client.run, self.health),
            f"{DOMAIN} {entry.title} MQTT client",
        )
        entry.async_create_background_task(
            hass, self.tools.start(), f"{DOMAIN} {entry.title} MQTT tools"
        )
        self.hosted.start()
        entry.async_on_unload(
            async_track_time_interval(
                hass,
                self._async_tick,
                timedelta(seconds=UPDATE_THROTTLE),
                name=f"{DOMAIN} {entry.title} counters",
                cancel_on_shutdown=True,
            )
        )
        entry.async_on_unload(self._async_unload)
        # The same tools for Assist agents, while the entry is loaded.
        llm_api.async_register(hass, self)
        # MCP servers announced on the broker, each as an LLM API (remote_llm.py).
        self.remote_mcp = remote_llm.RemoteMcpManager(hass, self)
        self.remote_mcp.start()
        entry.async_create_background_task(
            hass, async_check_mcp_conflict(hass), f"{DOMAIN} mcp version check"
        )

    async def _async_unload(self) -> None:
        """Stop the tools (their subscriptions, pending calls)."""
        self._unloaded = True
        await self.tools.stop()

    def needs_reload(self) -> bool:
        """Whether the entry must be reloaded: only when its data changed.

        Changed options (rules, endpoint and LLM API settings) are applied
        here, live: the next tool call uses the new rules and the broker
        session stays up. So are changed ``stdio_server`` subentries
        (:meth:`.hosted_servers.HostedServers.sync`: only the added, changed
        or removed servers start, restart or stop).
        """
        current = EntrySource.of(self.entry)
        if current.data != self.source.data:
            return True
        self.hosted.sync()
        if current.options != self.source.options:
            self.source = current
            self.tools.refresh_acl()
            _LOGGER.debug(
                "%s: %d topic rules in use", self.entry.title, len(self.acl.rules)
            )
        return False

    # -- state -------------------------------------------------------------------

    @property
    def acl(self) -> Acl:
        """The topic ACL of the entry's current options.

        Rebuilt as soon as the stored rules are replaced, so even a tool call
        that comes before the update listener ran uses the new rules.
        """
        rules = self.entry.options.get(CONF_RULES)
        if rules is not self._acl_rules:
            self._acl_rules = rules
            self._acl = acl_from_options(self.entry.options)
        return self._acl

    def resources(self) -> dict[str, str]:
        """Return the MCP resources: ``{uri: text}``, the rules in use as JSON."""
        return {RESOURCE_ACL_RULES: rules_to_json(self.acl.rules)}

    @property
    def connected(self) -> bool:
        """Whether the broker session is up."""
        return self.client.connected

    @property
    def require_admin(self) -> bool:
        """Whether the HTTP endpoint accepts only administrators."""
        return bool(self.entry.options.get(CONF_REQUIRE_ADMIN, DEFAULT_REQUIRE_ADMIN))

    @property
    def include_assist_tools(self) -> bool:
        """Whether the entry's LLM API also offers the Assist API's tools."""
        return bool(self.entry.options.get(CONF_INCLUDE_ASSIST, DEFAULT_INCLUDE_ASSIST))

    @property
    def device_identifier(self) -> tuple[str, str]:
        """The device registry identifier of the broker (the entry id)."""
        return (DOMAIN, self.entry.entry_id)

    def unique_id(self, key: str) -> str:
        """Return the unique id of the entry's entity with description ``key``."""
        return f"{self.entry.entry_id}_{key}"

    @callback
    def _async_register_device(self) -> str:
        """Create or update the broker's device; return its device id."""
        return (
            dr.async_get(self.hass)
            .async_get_or_create(
                config_entry_id=self.entry.entry_id,
                **DeviceInfo(
                    identifiers={self.device_identifier},
                    manufacturer=BROKER_MANUFACTURER,
                    model=BROKER_MODEL,
                    name=self.entry.title,
                    entry_type=DeviceEntryType.SERVICE,
                ),
            )
            .id
        )

    # -- signals -----------------------------------------------------------------

    def _counters(self) -> tuple[int, ...]:
        tools = self.tools.stats
        return (
            self.stats.calls,
            self.stats.denied,
            tools.published,
            tools.received,
            self.tools.topics_known,
        )

    @callback
    def _dispatch(self) -> None:
        self._written = self._counters()
        async_dispatcher_send(self.hass, self.signal_update)

    @callback
    def _async_tick(self, _now: datetime) -> None:
        """Write the entities' state when a counter changed (every 2 s at most)."""
        if self._counters() != self._written:
            self._dispatch()

    def _on_client_state(self, state: ClientState) -> None:
        """Log availability once, start reauth, refresh entities at once."""
        if self._unloaded:
            return
        name = self.settings.describe()
        if state is ClientState.AUTH_FAILED and not self._reauth_started:
            self._reauth_started = True
            self.entry.async_start_reauth(self.hass)
        connected = state is ClientState.CONNECTED
        if connected:
            self._reauth_started = False
        if connected != self._was_connected and state in (
            ClientState.CONNECTED,
            ClientState.DISCONNECTED,
            ClientState.AUTH_FAILED,
        ):
            if connected and self._was_connected is False:
                _LOGGER.info("MQTT broker %s is back", name)
            elif not connected and self._was_connected:
                _LOGGER.info(
                    "MQTT broker %s is unavailable: %s",
                    name,
                    self.client.stats.last_error or "connection lost",
                )
            self._was_connected = connected
            self._dispatch()

    # -- tool calls --------------------------------------------------------------

    async def async_call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        *,
        source: str,
        user_id: str | None,
    ) -> ToolResult:
        """Call tool ``name`` with ``arguments`` for ``source`` (``mcp``/``assist``).

        The one path of every tool call. The tools enforce the ACL and never
        raise for bad input, denials or timeouts; an unexpected exception is
        logged and returned as an error result. The call is counted and the
        ``mqtt_bridge_tool_call`` event is fired (``entry_id``, ``device_id``,
        ``tool``, ``topic``, ``allowed``, ``source``, ``user_id``,
        ``duration_ms``, ``is_error``) with ``user_id`` in its context.
        """
        started = time.monotonic()
        try:
            result = await self.tools.call(name, arguments)
        except Exception:
            _LOGGER.exception("MQTT tool %s failed", name)
            result = ToolResult(
                structured={"error": "internal error; see the Home Assistant log"},
                text=f"The tool {name} failed with an internal error.",
                is_error=True,
                allowed=True,
                topic=None,
            )
        duration_ms = round((time.monotonic() - started) * 1000, 3)
        stats = self.stats
        stats.calls += 1
        stats.denied += not result.allowed
        stats.errors += result.is_error
        tool = name if name in self.tool_names else UNKNOWN_TOOL
        stats.by_tool[tool] = stats.by_tool.get(tool, 0) + 1
        stats.last_call = time.time()
        stats.total_duration_ms += duration_ms
        self.hass.bus.async_fire(
            EVENT_TOOL_CALL,
            {
                ATTR_ENTRY_ID: self.entry.entry_id,
                ATTR_DEVICE_ID: self.device_id,
                ATTR_TOOL: _clip(name, MAX_EVENT_TOOL_CHARS),
                ATTR_TOPIC: _clip(result.topic, MAX_EVENT_TOPIC_CHARS),
                ATTR_ALLOWED: result.allowed,
                ATTR_SOURCE: source,
                ATTR_USER_ID: user_id,
                ATTR_DURATION_MS: duration_ms,
                ATTR_IS_ERROR: result.is_error,
            },
            context=Context(user_id=user_id),
        )
        return result

    # -- diagnostics ---------------------------------------------------------------

    def diagnostics(self) -> dict[str, Any]:
        """Return the broker session, ACL, tool call and hosted server state.

        JSON-serialisable. Settings without credentials; hosted servers show
        the names of their environment variables, not the values; the caller
        redacts the entry data.
        """
        settings, client = self.settings, self.client
        registry = client.registry
        stats = self.stats
        return {
            "broker": {
                "host": settings.host,
                "port": settings.port,
                "tls": settings.tls,
                "verify_tls": settings.verify_tls,
                "ca_file": settings.ca_file,
                "client_id": client.client_id,
                "state": client.state.value,
                "protocol": "5" if client.protocol == 5 else "3.1.1",
                "stats": asdict(client.stats),
                "subscriptions": sorted(registry.filters),
                "granted_subscriptions": sorted(registry.granted),
                "refused_subscriptions": registry.refused(),
                "task_failures": self.health.as_dict(),
            },
            "acl": {
                "rules": [
                    {
                        "pattern": rule.pattern,
                        "permissions": sorted(rule.permissions),
                        "description": rule.description,
                    }
                    for rule in self.acl.rules
                ],
                "invalid_rules": [
                    {"pattern": rule.pattern, "problem": str(problem)}
                    for rule, problem in self.acl.invalid
                ],
            },
            "tools": {
                "names": sorted(self.tool_names),
                "topics_known": self.tools.topics_known,
                "engine_stats": asdict(self.tools.stats),
                "calls": stats.calls,
                "denied": stats.denied,
                "errors": stats.errors,
                "by_tool": dict(sorted(stats.by_tool.items())),
                "last_call": stats.last_call,
                "total_duration_ms": round(stats.total_duration_ms, 3),
            },
            "require_admin": self.require_admin,
            "include_assist_tools": self.include_assist_tools,
            "hosted_servers": self.hosted.diagnostics(),
            "remote_mcp_servers": self.remote_mcp.diagnostics(),
        }
