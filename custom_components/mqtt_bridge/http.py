"""The MCP endpoint of broker entries: ``POST /api/mqtt_bridge/mcp/{entry_id}``.

MCP Streamable HTTP (specification 2025-06-18, "Transports"), stateless and
JSON-only like HA core's own ``/api/mcp`` (core ``mcp_server/http.py``): each
POST carries one JSON-RPC message and gets one JSON response (or 202 for
notifications and responses); a GET (server-to-client stream) is answered 405.
The JSON-RPC work is the engine's (:func:`.engine.mcp_server.handle_post`).

Security: Home Assistant authentication is required (a long-lived access token
works); the entry's option "require an administrator" refuses other users
(403); a browser ``Origin`` that is not Home Assistant's own address is refused
(403), against DNS rebinding (specification, "Security Warning"): Home
Assistant's own address is one of its configured URLs, or the address the
request was sent to when that is an IP address or ``localhost``. Tool calls go
through :meth:`BrokerRuntime.async_call_tool` with source ``mcp``, where the
topic ACL is enforced and the call audited.

The path lives under ``/api/mqtt_bridge/``: core owns ``/api/mcp`` and
``/api/mcp/{api_id}``.
"""

from __future__ import annotations

from collections.abc import Mapping
import http
from ipaddress import ip_address
import json
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from homeassistant.components.http.const import KEY_HASS_USER
from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant
from homeassistant.helpers.http import KEY_HASS, HomeAssistantView
from homeassistant.helpers.network import NoURLAvailableError, get_url
from homeassistant.loader import async_get_loaded_integration
from yarl import URL

from .const import CONF_ENTRY_TYPE, CONF_REQUIRE_ADMIN, DOMAIN, EntryType
from .engine.mcp_server import build_server, handle_post

if TYPE_CHECKING:
    from .broker_runtime import BrokerRuntime
    from .engine.mqtt_tools import ToolResult
    from .engine.tool_specs import ToolSpec

MCP_PATH: Final = "/api/mqtt_bridge/mcp/{entry_id}"
SOURCE_MCP: Final = "mcp"
# Largest accepted request body in bytes (a tool call with a 64 KiB payload
# fits many times over).
MAX_BODY: Final = 1024 * 1024


class _AuditedTools:
    """The runtime's tools as seen by one MCP request: calls go through the runtime."""

    def __init__(self, runtime: BrokerRuntime, user_id: str | None) -> None:
        self._runtime = runtime
        self._user_id = user_id

    def specs(self) -> list[ToolSpec]:
        return self._runtime.tools.specs()

    async def call(self, name: str, arguments: Mapping[str, Any]) -> ToolResult:
        return await self._runtime.async_call_tool(
            name, arguments, source=SOURCE_MCP, user_id=self._user_id
        )


type _Origin = tuple[str, str | None, int | None]


def _origin(url: str | URL) -> _Origin:
    """Return ``(scheme, host, port)`` of a URL or ``Origin`` value, default ports filled."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
    except ValueError:  # not a URL: matches nothing
        return ("", None, None)
    return (parsed.scheme.lower(), parsed.host, parsed.port)


def _dns_proof(host: str) -> bool:
    """Whether a host name cannot be re-pointed by DNS (an IP literal or localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        ip_address(host)
    except ValueError:
        return False
    return True


def _own_origins(hass: HomeAssistant, request: web.Request) -> set[_Origin]:
    """Return the origins of Home Assistant itself.

    Its configured internal, external and cloud URLs; and the address the
    request was sent to only when that is an IP address or ``localhost``: in a
    DNS rebinding attack the attacker's own host name resolves to Home
    Assistant, so ``Host`` and ``Origin`` name the attacker's site and agree
    with each other.
    """
    origins: set[_Origin] = set()
    if _dns_proof(request.url.host or ""):
        origins.add(_origin(request.url))
    for kwargs in (
        {"prefer_external": False},
        {"prefer_external": True},
        {"require_cloud": True},
    ):
        try:
            url = get_url(hass, allow_ip=True, **kwargs)
        except NoURLAvailableError:
            continue
        origins.add(_origin(url))
    return origins


def _error(status: http.HTTPStatus, message: str) -> web.Response:
    """Return a JSON-RPC error without id for a request refused before parsing."""
    return web.json_response(
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}},
        status=status,
    )


class McpView(HomeAssistantView):
    """MCP Streamable HTTP endpoint of one MQTT broker entry."""

    url = MCP_PATH
    name = f"api:{DOMAIN}:mcp"
    requires_auth = True

    async def get(self, request: web.Request, entry_id: str) -> web.Response:
        """No server-to-client stream: 405 (specification, Streamable HTTP)."""
        return web.Response(
            status=http.HTTPStatus.METHOD_NOT_ALLOWED, headers={"Allow": "POST"}
        )

    async def post(self, request: web.Request, entry_id: str) -> web.Response:
        """Answer one JSON-RPC message."""
        hass = request.app[KEY_HASS]
        entry = hass.config_entries.async_get_entry(entry_id)
        if (
            entry is None
            or entry.domain != DOMAIN
            or entry.data.get(CONF_ENTRY_TYPE) != EntryType.MQTT_BROKER
        ):
            return _error(http.HTTPStatus.NOT_FOUND, "no such MQTT broker entry")
        user = request[KEY_HASS_USER]
        if entry.options.get(CONF_REQUIRE_ADMIN, False) and not user.is_admin:
            return _error(
                http.HTTPStatus.FORBIDDEN, "this endpoint needs an administrator"
            )
        origin = request.headers.get("Origin")
        if origin is not None and _origin(origin) not in _own_origins(hass, request):
            return _error(http.HTTPStatus.FORBIDDEN, f"origin {origin} not allowed")
        if entry.state is not ConfigEntryState.LOADED:
            return _error(
                http.HTTPStatus.SERVICE_UNAVAILABLE, "the entry is not loaded"
            )
        accept = request.headers.get("Accept", "*/*")
        if not any(
            kind in accept for kind in ("application/json", "*/*", "application/*")
        ):
            return _error(
                http.HTTPStatus.NOT_ACCEPTABLE, "Accept must allow application/json"
            )
        if request.content_type != "application/json":
            return _error(
                http.HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "Content-Type must be application/json",
            )
        if request.content_length is not None and request.content_length > MAX_BODY:
            return _error(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large")
        # StreamReader.read(n) returns what has arrived so far (one network
        # chunk), not n bytes: read until the end, refusing more than MAX_BODY.
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(
                    http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request too large"
                )
        runtime: BrokerRuntime = entry.runtime_data
        tools = _AuditedTools(runtime, user.id)
        version = str(async_get_loaded_integration(hass, DOMAIN).version)
        status, payload = await handle_post(
            bytes(body),
            lambda: build_server(
                tools, entry.title, resources=runtime.resources, version=version
            ),
            # Above the tools' own 60 s cap, so a long call ends with its result.
            timeout=65,
            protocol_version=request.headers.get("MCP-Protocol-Version"),
        )
        if payload is None:
            return web.Response(status=status)
        return web.json_response(payload, status=status, dumps=json.dumps)


def async_register(hass: HomeAssistant) -> None:
    """Register the endpoint once (from ``async_setup``)."""
    hass.http.register_view(McpView())
