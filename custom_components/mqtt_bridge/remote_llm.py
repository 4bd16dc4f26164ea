"""MCP servers announced on the broker as Home Assistant LLM APIs (one per server).

What core's ``mcp`` integration does for one HTTP server (an ``llm.API`` whose
tools come from ``tools/list``; ``mcp-over-mqtt.md`` §4.2), done here for every
MCP-over-MQTT server on the broker entry's broker:

* :class:`RemoteMcpManager` (one per broker entry, started by
  :meth:`.broker_runtime.BrokerRuntime.start`) follows the server presence
  with an :class:`~.engine.mcp_directory.McpDirectory` on the entry's shared
  MQTT client. Each announced server whose server-name matches the option
  ``mcp_servers`` (server-name patterns, ``*`` = all, empty = none; applied
  live) gets one :class:`RemoteMcpApi`, id
  ``mqtt_bridge-<entry_id>-remote-<server-name>`` (one per server-name:
  instances of one name are interchangeable, spec §1.2; the id survives a
  restart of the server, whose server-id changes) (characters
  other than letters, digits, ``_`` and ``-`` replaced by ``_``, plus a short
  hash when something was replaced, so ids stay unique), name
  ``<server-name> (MQTT)``. It is unregistered, and its MCP session closed,
  when the presence is cleared, the option no longer matches, or the entry
  unloads. A server hosted by this Home Assistant (``stdio_server``
  subentries) is announced like any other, so it is reachable this way too.
* :meth:`RemoteMcpApi.async_get_api_instance` lists the tools on demand
  (:meth:`.engine.mcp_remote.RemoteMcpServer.list_tools`: cached until the
  server says ``tools/list_changed``), converts each ``inputSchema`` with
  :func:`.compat.schema_from_json` (a tool whose schema cannot be converted is
  left out and counted) and offers them under tool names agents accept
  (``[A-Za-z0-9_-]``, at most 64 characters; the remote name is kept for the
  call).
* :meth:`RemoteMcpTool.async_call` calls the tool over the persistent MCP
  session (deadline 30 s) and returns ``structuredContent`` when the server
  gives it, else ``{"result": <text content joined>}``; an ``isError`` result
  becomes ``{"error": <text>}`` for the model. Unreachable servers, error
  answers and timeouts raise a translated :class:`HomeAssistantError`
  (``remote_mcp_error`` / ``remote_mcp_timeout``) naming the server.

These APIs are plain ``llm.API`` registrations: agents list them, and core
``mcp_server`` (2025.7+) serves them at ``/api/mcp/<api id>``
(``home-assistant.md`` §5).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass
import hashlib
import logging
import re
from typing import TYPE_CHECKING, Any, Final

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant, callback
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import llm
from homeassistant.util.json import JsonObjectType
from mcp import types
import voluptuous as vol

from .compat import schema_from_json
from .const import (
    CONF_CLIENT_ID_PREFIX,
    CONF_MCP_SERVERS,
    DEFAULT_CLIENT_ID_PREFIX,
    DEFAULT_MCP_SERVERS,
    DOMAIN,
)
from .engine.mcp_directory import McpDirectory, parse_patterns
from .engine.mcp_mqtt import ServerPresence
from .engine.mcp_remote import (
    RemoteMcpError,
    RemoteMcpServer,
    RemoteMcpTimeout,
)

if TYPE_CHECKING:
    from .broker_runtime import BrokerRuntime

_LOGGER = logging.getLogger(__name__)

# Agents' tool names: letters, digits, _ and - (provider rules; home-assistant.md §5).
TOOL_NAME_MAX: Final = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# Seconds: deadline of a tool call and of opening an MCP session.
CALL_TIMEOUT: Final = 30.0
CONNECT_TIMEOUT: Final = 10.0

API_PROMPT: Final = (
    'The following tools are available from the MCP server "{name}", reached over MQTT.'
)


def _safe(text: str) -> str:
    """``text`` with unsafe characters replaced, plus a hash when any was."""
    safe = _UNSAFE.sub("_", text)
    if safe != text:
        safe += "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return safe


def remote_api_id(entry_id: str, server_name: str) -> str:
    """The LLM API id of one server-name announced on a broker entry's broker.

    Stable across restarts of the server (its server-id, the MQTT client id,
    usually changes), so a conversation agent keeps its choice.
    """
    return _safe(f"{DOMAIN}-{entry_id}-remote-{server_name}")


def server_patterns(options: Mapping[str, Any]) -> list[str]:
    """The server-name patterns of broker entry ``options`` (``[]`` = none).

    A missing option is :data:`.const.DEFAULT_MCP_SERVERS` (all servers); a
    stored value that is not a valid pattern list turns the feature off
    (logged).
    """
    value = options.get(CONF_MCP_SERVERS, DEFAULT_MCP_SERVERS)
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        try:
            return parse_patterns(value)
        except ValueError as err:
            problem = str(err)
    else:
        problem = f"not a list of patterns: {value!r}"
    _LOGGER.warning("The MCP server patterns cannot be used (%s); none used", problem)
    return []


def _part_text(part: Mapping[str, Any]) -> str:
    """One MCP content block as text: text as is, anything else described."""
    kind = part.get("type")
    if kind == "text":
        return str(part.get("text", ""))
    if kind == "resource":
        resource = part.get("resource") or {}
        if "text" in resource:
            return str(resource["text"])
        return f"[resource {resource.get('uri', '')}]"
    if kind == "resource_link":
        return f"[resource link {part.get('uri', '')}]"
    mime = part.get("mimeType")
    return f"[{kind} content{f' ({mime})' if mime else ''}]"


def tool_result(result: types.CallToolResult) -> JsonObjectType:
    """The model's view of a tool result.

    ``isError`` → ``{"error": text}``; ``structuredContent`` (a JSON object)
    as is; else ``{"result": text}``, the content blocks' text joined by new
    lines (non-text blocks described, e.g. ``[image content (image/png)]``).
    """
    wire = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    text = "\n".join(_part_text(part) for part in wire.get("content") or ())
    if wire.get("isError"):
        return {"error": text or "The tool reported an error without a message."}
    structured = wire.get("structuredContent")
    if isinstance(structured, dict):
        return structured
    return {"result": text}


def _translated(err: RemoteMcpError) -> HomeAssistantError:
    key = (
        "remote_mcp_timeout"
        if isinstance(err, RemoteMcpTimeout)
        else "remote_mcp_error"
    )
    return HomeAssistantError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders={"error": str(err)},
    )


class RemoteMcpTool(llm.Tool):
    """One tool of a remote MCP server, called over its MCP session."""

    def __init__(
        self,
        server: RemoteMcpServer,
        *,
        name: str,
        remote_name: str,
        description: str | None,
        parameters: vol.Schema,
    ) -> None:
        """Describe the tool; ``remote_name`` is the server's name for it."""
        self.server = server
        self.name = name
        self.remote_name = remote_name
        self.description = description
        self.parameters = parameters

    async def async_call(
        self,
        hass: HomeAssistant,
        tool_input: llm.ToolInput,
        llm_context: llm.LLMContext,
    ) -> JsonObjectType:
        """Call the tool; see :func:`tool_result` for what the model gets.

        Raises:
            HomeAssistantError: the server is unreachable, answered with an
                error or missed the deadline (translated, naming the server).

        """
        try:
            result = await self.server.call_tool(self.remote_name, tool_input.tool_args)
        except RemoteMcpError as err:
            raise _translated(err) from err
        return tool_result(result)


@dataclass(slots=True, kw_only=True)
class RemoteMcpApi(llm.API):
    """The LLM API of one MCP server announced on the broker."""

    server: RemoteMcpServer
    skipped_tools: int = 0

    async def async_get_api_instance(
        self, llm_context: llm.LLMContext
    ) -> llm.APIInstance:
        """The server's tools now (listed on demand, cached until they change).

        Raises:
            HomeAssistantError: the tools cannot be listed (translated).

        """
        try:
            remote_tools = await self.server.list_tools()
        except RemoteMcpError as err:
            raise _translated(err) from err
        tools: list[llm.Tool] = []
        used: set[str] = set()
        for tool in remote_tools:
            converted = self._convert(tool, used)
            if converted is not None:
                tools.append(converted)
        presence = self.server.presence
        prompt = API_PROMPT.format(name=presence.server_name)
        if presence.description:
            prompt += f" It describes itself as: {presence.description}"
        return llm.APIInstance(
            api=self, api_prompt=prompt, llm_context=llm_context, tools=tools
        )

    def _convert(self, tool: types.Tool, used: set[str]) -> RemoteMcpTool | None:
        """One remote tool for agents; ``None`` (logged, counted) if unusable."""
        wire = tool.model_dump(by_alias=True, mode="json", exclude_none=True)
        remote_name = str(wire["name"])
        try:
            parameters = schema_from_json(wire.get("inputSchema") or {})
        except Exception as err:  # any schema the converter cannot take
            self.skipped_tools += 1
            _LOGGER.warning(
                "Tool %s of MCP server %s left out: its input schema cannot be "
                "converted (%s)",
                remote_name,
                self.server.label,
                err,
            )
            return None
        name = _UNSAFE.sub("_", remote_name)[:TOOL_NAME_MAX] or "tool"
        number = 2
        while name in used:
            suffix = f"_{number}"
            name = name[: TOOL_NAME_MAX - len(suffix)] + suffix
            number += 1
        used.add(name)
        return RemoteMcpTool(
            self.server,
            name=name,
            remote_name=remote_name,
            description=wire.get("description") or wire.get("title"),
            parameters=parameters,
        )


@dataclass(slots=True)
class _Remote:
    """One registered server: its API (with its MCP client) and its unregister."""

    api: RemoteMcpApi
    unregister: Callable[[], None]


class RemoteMcpManager:
    """The LLM APIs of the MCP servers announced on one broker entry's broker."""

    def __init__(self, hass: HomeAssistant, runtime: BrokerRuntime) -> None:
        """Prepare the manager; :meth:`start` starts discovery."""
        self.hass = hass
        self.runtime = runtime
        self.entry: ConfigEntry[Any] = runtime.entry
        prefix = self.entry.data.get(CONF_CLIENT_ID_PREFIX) or DEFAULT_CLIENT_ID_PREFIX
        self.client_id_prefix = f"{prefix}-mcpc"
        self.patterns: list[str] = []
        self.directory: McpDirectory | None = None
        self.registered = 0
        self.register_errors = 0
        # By server-name: one API per name, whichever instance serves it.
        self._remotes: dict[str, _Remote] = {}
        self._task: asyncio.Task[None] | None = None
        self._remove_listener: Callable[[], None] | None = None
        self._stopped = False

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Follow the option and the announced servers until the entry unloads."""
        entry = self.entry
        entry.async_on_unload(self._async_stop)
        entry.async_on_unload(entry.add_update_listener(self._async_entry_updated))
        self._apply(server_patterns(entry.options))

    async def _async_entry_updated(
        self, _hass: HomeAssistant, entry: ConfigEntry[Any]
    ) -> None:
        """Apply a changed ``mcp_servers`` option live (no reload)."""
        patterns = server_patterns(entry.options)
        if patterns != self.patterns and not self._stopped:
            self._apply(patterns)

    @callback
    def _apply(self, patterns: list[str]) -> None:
        """Use ``patterns``: start or stop discovery, or re-filter the servers."""
        self.patterns = patterns
        if not patterns:
            self._stop_directory()
        elif self.directory is None:
            directory = self.directory = McpDirectory(
                self.runtime.client, name_patterns=patterns
            )
            self._remove_listener = directory.add_listener(self._on_change)
            self._task = self.entry.async_create_background_task(
                self.hass,
                directory.run(),
                f"{DOMAIN} {self.entry.title} MCP server discovery",
            )
        else:
            self.directory.set_patterns(patterns)

    @callback
    def _stop_directory(self) -> None:
        """Stop discovery and drop every API."""
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.directory = None
        for key in list(self._remotes):
            self._remove(key)

    async def _async_stop(self) -> None:
        """On unload: no more changes, every API unregistered and session closed."""
        self._stopped = True
        remotes = list(self._remotes.values())
        self._remotes.clear()
        self._stop_directory()
        for remote in remotes:
            remote.unregister()
        for remote in remotes:
            await remote.api.server.close()

    # -- servers ---------------------------------------------------------------------

    @callback
    def _on_change(
        self, added: ServerPresence | None, removed: ServerPresence | None
    ) -> None:
        """A server appeared, changed or went away (directory listener).

        Instances announcing the same server-name are interchangeable (spec
        §1.2): one API per server-name, on one of its instances; when that
        instance goes away the API moves to another one, if any.
        """
        if self._stopped or self.directory is None:
            return
        names = {p.server_name for p in (added, removed) if p is not None}
        announced = self.directory.servers()
        for name in sorted(names):
            instances = [p for p in announced if p.server_name == name]
            remote = self._remotes.get(name)
            if remote is None:
                if instances:
                    self._add(instances[0])
                continue
            server = remote.api.server
            current = next(
                (p for p in instances if p.server_id == server.presence.server_id),
                None,
            )
            if current is not None:  # e.g. a new description: same API, session
                server.presence = current
            elif instances:
                self._switch(remote, instances[0])
            else:
                self._remove(name)

    def _server(self, presence: ServerPresence) -> RemoteMcpServer:
        """An MCP client (not connected yet) for the server instance ``presence``."""
        entry, hass = self.entry, self.hass

        def task_factory(
            coro: Coroutine[Any, Any, None], name: str
        ) -> asyncio.Task[None]:
            return entry.async_create_background_task(hass, coro, f"{DOMAIN} {name}")

        return RemoteMcpServer(
            self.runtime.settings,
            presence,
            client_id_prefix=self.client_id_prefix,
            call_timeout=CALL_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
            tls_context=self.runtime.client.tls_context,
            task_factory=task_factory,
        )

    @callback
    def _switch(self, remote: _Remote, presence: ServerPresence) -> None:
        """Move ``remote``'s API to another instance of its server-name."""
        old = remote.api.server
        remote.api.server = self._server(presence)
        _LOGGER.debug(
            "MCP server %s gone; its API now uses %s",
            old.label,
            remote.api.server.label,
        )
        self._close(old)

    def _close(self, server: RemoteMcpServer) -> None:
        """Close ``server``'s MCP session in the background."""
        self.entry.async_create_task(
            self.hass, server.close(), f"{DOMAIN} close MCP client {server.label}"
        )

    @callback
    def _add(self, presence: ServerPresence) -> None:
        hass = self.hass

        server = self._server(presence)
        api = RemoteMcpApi(
            hass=hass,
            id=remote_api_id(self.entry.entry_id, presence.server_name),
            name=f"{presence.server_name} (MQTT)",
            server=server,
        )
        try:
            unregister = llm.async_register_api(hass, api)
        except HomeAssistantError as err:
            self.register_errors += 1
            _LOGGER.warning(
                "MCP server %s not offered to Assist: %s", server.label, err
            )
            return
        self.registered += 1
        self._remotes[presence.server_name] = _Remote(api, unregister)
        _LOGGER.debug("MCP server %s offered as LLM API %s", server.label, api.id)

    @callback
    def _remove(self, name: str) -> None:
        remote = self._remotes.pop(name)
        remote.unregister()
        server = remote.api.server
        _LOGGER.debug("MCP server %s no longer offered", server.label)
        self._close(server)

    # -- state -----------------------------------------------------------------------

    def api_ids(self) -> list[str]:
        """The ids of the registered APIs."""
        return sorted(remote.api.id for remote in self._remotes.values())

    def diagnostics(self) -> dict[str, Any]:
        """Patterns, discovery counters and each server's API and session state."""
        directory = self.directory
        return {
            "patterns": list(self.patterns),
            "discovery": asdict(directory.stats) if directory is not None else None,
            "registered": self.registered,
            "register_errors": self.register_errors,
            "servers": [
                {
                    "server_id": server.presence.server_id,
                    "server_name": server.presence.server_name,
                    "description": server.presence.description,
                    "api_id": remote.api.id,
                    "connected": server.connected,
                    "skipped_tools": remote.api.skipped_tools,
                    "stats": asdict(server.stats),
                }
                for remote in self._remotes.values()
                for server in (remote.api.server,)
            ],
        }
