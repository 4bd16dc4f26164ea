"""MCP over the MQTT tools: a lowlevel ``mcp`` server and stateless Streamable HTTP.

Two entry points, both free of Home Assistant:

* :func:`build_server` turns a tool set (``MqttTools`` or anything with the same
  ``specs()`` / ``call()`` shape, see :class:`ToolProvider`) and an optional
  resource source into an ``mcp.server.lowlevel.Server`` serving ``tools/list``,
  ``tools/call``, ``resources/list``, ``resources/templates/list`` and
  ``resources/read`` (plus ``initialize`` and ``ping``, which the SDK owns).
* :func:`handle_post` answers one HTTP POST body the way a *stateless* MCP
  Streamable HTTP endpoint must (MCP 2025-06-18, "Transports" §Streamable HTTP,
  "Sending Messages to the Server"): it validates the JSON-RPC envelope itself,
  then runs a fresh server for exactly that one message over in-memory streams
  and returns ``(http_status, json_body)``. The aiohttp view in the integration
  (auth, ``Accept`` / ``Content-Type`` / ``Origin`` checks) and the tests call it.

One code path runs on ``mcp`` 1.12+ (what Home Assistant 2025.4's pins resolve)
and on ``mcp`` 2.x (Home Assistant 2026.x). The SDK differences are confined to
the small ``_v1_*`` / ``_v2_*`` shims below:

=======================  ==========================================  ===============================================
concern                  mcp 1.x                                     mcp 2.x
=======================  ==========================================  ===============================================
handler registration     ``server.request_handlers[RequestType]``    ``Server(on_list_tools=..., on_call_tool=...)``
                         ``(request) -> ServerResult``               ``(ctx, params) -> Result``
tool input validation    ``@server.call_tool()`` validates with      none in the lowlevel server
                         ``jsonschema`` (bypassed: raw handler)
stateless run            ``Server.run(..., stateless=True)``         ``serve_connection`` with a born-ready
                                                                     ``Connection.from_envelope`` (what the SDK's
                                                                     own stateless HTTP manager does)
served methods           request types in ``request_handlers``       ``server.get_request_handler(method)``
handshake versions       ``mcp.shared.version``                      ``mcp.types.version.HANDSHAKE_PROTOCOL_VERSIONS``
JSON-RPC message         ``RootModel`` ``JSONRPCMessage``            plain union; one ``TypeAdapter`` parses both
=======================  ==========================================  ===============================================

Model objects are built with the wire (camelCase) names, which both SDKs accept.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
import functools
import importlib
import inspect
import json
import logging
from typing import TYPE_CHECKING, Any, Final, Protocol, cast, get_args
import weakref

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.server.lowlevel import Server
from mcp.shared.message import SessionMessage
from pydantic import BaseModel, TypeAdapter, ValidationError

_LOGGER = logging.getLogger(__name__)

# JSON-RPC 2.0 §5.1 error codes (the same values as mcp.types' constants).
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
#: Implementation-defined server error (JSON-RPC 2.0 §5.1 range -32000..-32099;
#: the value mcp 2.x names ``REQUEST_TIMEOUT``): the server did not answer in time.
REQUEST_TIMEOUT: Final = -32001
#: MCP 2025-06-18 "Resources" §Error Handling: "Resource not found: -32002".
RESOURCE_NOT_FOUND: Final = -32002

#: ``mimeType`` of every resource this server lists (the texts are JSON).
RESOURCE_MIME_TYPE: Final = "application/json"

#: The version a server assumes when a request carries no ``MCP-Protocol-Version``
#: header (MCP 2025-06-18 "Transports" §Protocol Version Header).
DEFAULT_NEGOTIATED_VERSION: Final = "2025-03-26"

#: True on mcp 2.x: handlers are passed to the ``Server`` constructor.
_SDK2: Final = hasattr(Server, "add_request_handler")
# The handlers behind each server built by build_server(), for the direct
# ``tools/call`` path of handle_post() (see there).
_HANDLERS: weakref.WeakKeyDictionary[Server[Any], _Handlers] = (
    weakref.WeakKeyDictionary()
)


# --------------------------------------------------------------------------- #
# The tool set, duck-typed (engine/mqtt_tools.py provides the real one)
# --------------------------------------------------------------------------- #


class ToolAnnotationsLike(Protocol):
    """Hints about a tool (``tool_specs.ToolAnnotations``); MCP ``ToolAnnotations``."""

    @property
    def read_only(self) -> bool:
        """``readOnlyHint``: the tool does not modify its environment."""

    @property
    def destructive(self) -> bool:
        """``destructiveHint``: the tool may perform destructive updates."""

    @property
    def open_world(self) -> bool:
        """``openWorldHint``: the tool interacts with an open world (the broker)."""

    @property
    def idempotent(self) -> bool:
        """``idempotentHint``: repeating a call with the same arguments has no extra effect."""


class ToolSpecLike(Protocol):
    """One tool's definition (``tool_specs.ToolSpec``)."""

    @property
    def name(self) -> str:
        """The tool name (``mqtt_publish``, ...)."""

    @property
    def description(self) -> str:
        """The description the model reads (includes the allowed patterns)."""

    @property
    def input_schema(self) -> Mapping[str, Any]:
        """JSON Schema of the arguments, an ``"object"`` schema with ``required``."""

    @property
    def annotations(self) -> ToolAnnotationsLike:
        """Behaviour hints."""


class ToolResultLike(Protocol):
    """The outcome of one call (``mqtt_tools.ToolResult``)."""

    @property
    def structured(self) -> Mapping[str, Any]:
        """JSON-serialisable object: MCP ``structuredContent``."""

    @property
    def text(self) -> str:
        """Text for the model: the single MCP ``TextContent`` block."""

    @property
    def is_error(self) -> bool:
        """MCP ``isError``: a tool-level failure (bad arguments, denied, timeout)."""


class ToolProvider(Protocol):
    """What :func:`build_server` needs of a tool set (``mqtt_tools.MqttTools``)."""

    def specs(self) -> Sequence[ToolSpecLike]:
        """The current tool definitions (re-read on every request)."""

    def call(
        self, name: str, arguments: Mapping[str, Any]
    ) -> Awaitable[ToolResultLike]:
        """Run a tool; never raises for bad input, denial or timeouts."""


if TYPE_CHECKING:
    from .mqtt_tools import MqttTools

    def _mqtt_tools_fit(tools: MqttTools) -> ToolProvider:
        """Let mypy prove that the real tool set has the shape this module uses."""
        return tools


#: ``resources()`` returns ``{uri: json_text}``, e.g.
#: ``{"mqtt-bridge://acl/rules": '[{"pattern": ...}]'}``; re-read on every request.
ResourceSource = Callable[[], Mapping[str, str]]


# --------------------------------------------------------------------------- #
# build_server
# --------------------------------------------------------------------------- #


def _error(code: int, message: str, data: Any = None) -> types.ErrorData:
    """A JSON-RPC error object (returned by handlers; both SDKs send it as is)."""
    return types.ErrorData(code=code, message=message, data=data)


def _internal_error(what: str, err: Exception) -> types.ErrorData:
    """-32603 for an exception raised by the tool set or the resource source."""
    _LOGGER.exception("MCP %s failed", what)
    return _error(
        INTERNAL_ERROR, f"Internal error in {what}: {type(err).__name__}: {err}"
    )


def _resource_name(uri: str) -> str:
    """``mqtt-bridge://acl/rules`` -> ``acl/rules`` (MCP ``Resource.name`` is required)."""
    return uri.split("://", 1)[-1] or uri


class _Handlers:
    """The SDK-independent request logic; the shims adapt it to each SDK."""

    def __init__(self, tools: ToolProvider, resources: ResourceSource | None) -> None:
        self.tools = tools
        self.resources = resources

    def _tool(self, spec: ToolSpecLike) -> types.Tool:
        ann = spec.annotations
        return types.Tool(
            name=spec.name,
            description=spec.description,
            # MCP requires an object schema at the root ("type": "object").
            inputSchema={"type": "object", **spec.input_schema},
            annotations=types.ToolAnnotations(
                readOnlyHint=ann.read_only,
                destructiveHint=ann.destructive,
                idempotentHint=ann.idempotent,
                openWorldHint=ann.open_world,
            ),
        )

    async def list_tools(self) -> types.ListToolsResult | types.ErrorData:
        try:
            tools = [self._tool(spec) for spec in self.tools.specs()]
        except Exception as err:
            return _internal_error("tools/list", err)
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None
    ) -> types.CallToolResult | types.ErrorData:
        try:
            known = [spec.name for spec in self.tools.specs()]
            if name not in known:
                # MCP 2025-06-18 "Tools" §Error Handling: unknown tools are
                # protocol errors (-32602), not isError results.
                return _error(
                    INVALID_PARAMS,
                    f"Unknown tool: {name}",
                    {"tool": name, "available": known},
                )
            result = await self.tools.call(name, dict(arguments or {}))
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=result.text)],
                structuredContent=dict(result.structured),
                isError=result.is_error,
            )
        except Exception as err:
            return _internal_error(f"tools/call {name!r}", err)

    def _resource_map(self) -> Mapping[str, str]:
        assert self.resources is not None  # only registered when given
        return self.resources()

    async def list_resources(self) -> types.ListResourcesResult | types.ErrorData:
        try:
            uris = list(self._resource_map())
        except Exception as err:
            return _internal_error("resources/list", err)
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=uri,  # type: ignore[arg-type]  # pydantic validates str -> AnyUrl on 1.x
                    name=_resource_name(uri),
                    mimeType=RESOURCE_MIME_TYPE,
                )
                for uri in uris
            ]
        )

    async def list_resource_templates(self) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resourceTemplates=[])

    async def read_resource(
        self, uri: str
    ) -> types.ReadResourceResult | types.ErrorData:
        try:
            text = self._resource_map().get(uri)
        except Exception as err:
            return _internal_error("resources/read", err)
        if text is None:
            return _error(RESOURCE_NOT_FOUND, "Resource not found", {"uri": uri})
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(
                    uri=uri,  # type: ignore[arg-type]  # pydantic validates str -> AnyUrl on 1.x
                    mimeType=RESOURCE_MIME_TYPE,
                    text=text,
                )
            ]
        )


def build_server(
    tools: ToolProvider,
    name: str,
    *,
    instructions: str | None = None,
    resources: ResourceSource | None = None,
    version: str = "unknown",
) -> Server[Any]:
    """Return a lowlevel MCP server exposing ``tools`` (and ``resources``).

    Args:
        tools: the tool set; ``specs()`` is re-read for every ``tools/list`` and
            ``tools/call``, so rule changes show without rebuilding the server.
        name: ``serverInfo.name`` in the ``initialize`` result.
        instructions: ``instructions`` in the ``initialize`` result.
        resources: ``() -> {uri: json_text}``; when given, the server declares the
            ``resources`` capability and lists/reads those texts as
            ``application/json`` (e.g. ``mqtt-bridge://acl/rules``).
        version: ``serverInfo.version`` (the integration's manifest version). Given
            explicitly so mcp 1.x does not read package metadata in the event loop.

    Behaviour (MCP 2025-06-18, "Server Features"):

    * ``tools/list``: one ``Tool`` per spec, ``inputSchema`` as given (``"type":
      "object"`` added when missing), ``annotations`` = ``readOnlyHint``,
      ``destructiveHint``, ``idempotentHint``, ``openWorldHint``; no pagination.
    * ``tools/call``: ``CallToolResult(content=[TextContent(text)],
      structuredContent=structured, isError=is_error)``. Arguments reach the tool
      unvalidated by the SDK (the tool validates them and answers with an
      ``isError`` result, "Tools" §Error Handling; mcp 1.x's ``jsonschema`` check
      is bypassed). No ``outputSchema`` is declared, so no client or server
      validates ``structuredContent`` either. An unknown tool name is a
      JSON-RPC error -32602 ``Unknown tool: {name}``.
    * ``resources/list`` / ``resources/read``: the mapping's entries; an unknown
      URI is error -32002 "Resource not found" with ``data: {"uri": ...}``
      ("Resources" §Error Handling). ``resources/templates/list`` is empty.
    * An exception raised by the tool set or the resource source is answered with
      -32603 ``Internal error in {method}: {Type}: {message}`` and logged.

    """
    handlers = _Handlers(tools, resources)
    if _SDK2:
        server = _v2_build(handlers, name, version, instructions)
    else:
        server = _v1_build(handlers, name, version, instructions)
    _HANDLERS[server] = handlers
    return server


def _v1_build(
    handlers: _Handlers, name: str, version: str, instructions: str | None
) -> Server[Any]:
    """On mcp 1.x, raw request handlers keyed by request type, answering ``ServerResult``."""
    server: Server[Any] = Server(name, version=version, instructions=instructions)

    def wrap(result: Any) -> Any:
        # ErrorData is passed through: Server._handle_request responds with it.
        if isinstance(result, types.ErrorData):
            return result
        return types.ServerResult(result)

    async def list_tools(_req: Any) -> Any:
        return wrap(await handlers.list_tools())

    async def call_tool(req: Any) -> Any:
        return wrap(await handlers.call_tool(req.params.name, req.params.arguments))

    async def list_resources(_req: Any) -> Any:
        return wrap(await handlers.list_resources())

    async def list_resource_templates(_req: Any) -> Any:
        return wrap(await handlers.list_resource_templates())

    async def read_resource(req: Any) -> Any:
        return wrap(await handlers.read_resource(str(req.params.uri)))

    table: dict[type, Callable[..., Awaitable[Any]]] = {
        types.ListToolsRequest: list_tools,
        types.CallToolRequest: call_tool,
    }
    if handlers.resources is not None:
        table[types.ListResourcesRequest] = list_resources
        table[types.ListResourceTemplatesRequest] = list_resource_templates
        table[types.ReadResourceRequest] = read_resource
    server.request_handlers.update(table)
    return server


def _v2_build(
    handlers: _Handlers, name: str, version: str, instructions: str | None
) -> Server[Any]:
    """On mcp 2.x, ``on_*`` constructor handlers ``(ctx, params) -> result``."""

    async def on_list_tools(_ctx: Any, _params: Any) -> Any:
        return await handlers.list_tools()

    async def on_call_tool(_ctx: Any, params: Any) -> Any:
        return await handlers.call_tool(params.name, params.arguments)

    async def on_list_resources(_ctx: Any, _params: Any) -> Any:
        return await handlers.list_resources()

    async def on_list_resource_templates(_ctx: Any, _params: Any) -> Any:
        return await handlers.list_resource_templates()

    async def on_read_resource(_ctx: Any, params: Any) -> Any:
        return await handlers.read_resource(str(params.uri))

    kwargs: dict[str, Any] = {
        "version": version,
        "instructions": instructions,
        "on_list_tools": on_list_tools,
        "on_call_tool": on_call_tool,
    }
    if handlers.resources is not None:
        kwargs |= {
            "on_list_resources": on_list_resources,
            "on_list_resource_templates": on_list_resource_templates,
            "on_read_resource": on_read_resource,
        }
    server_cls: Any = Server
    return cast("Server[Any]", server_cls(name, **kwargs))


# --------------------------------------------------------------------------- #
# Stateless Streamable HTTP
# --------------------------------------------------------------------------- #


@functools.cache
def supported_protocol_versions() -> tuple[str, ...]:
    """Protocol versions the installed SDK negotiates through ``initialize``.

    mcp 1.12: ``2024-11-05``, ``2025-03-26``, ``2025-06-18``; mcp 2.x adds
    ``2025-11-25`` (its ``2026-07-28`` "modern" era has no ``initialize`` and is
    not served by this stateless endpoint).
    """
    try:
        version_mod: Any = importlib.import_module("mcp.types.version")
        return tuple(version_mod.HANDSHAKE_PROTOCOL_VERSIONS)
    except ImportError:  # mcp 1.x
        legacy: Any = importlib.import_module("mcp.shared.version")
        return tuple(legacy.SUPPORTED_PROTOCOL_VERSIONS)


_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)


def _error_body(
    request_id: Any, code: int, message: str, data: Any = None
) -> dict[str, Any]:
    """A JSON-RPC error response object (JSON-RPC 2.0 §5)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _valid_id(value: Any) -> bool:
    """MCP request ids: string or integer, never null (MCP 2025-06-18 "Basic" §Requests)."""
    return isinstance(value, str) or (
        isinstance(value, int) and not isinstance(value, bool)
    )


def _reject_constant(name: str) -> Any:
    """``NaN`` / ``Infinity`` are not JSON (RFC 8259 §6); Python's parser takes them."""
    raise ValueError(f"invalid JSON number {name}")


def _envelope_problem(obj: Any) -> str | None:
    """Why ``obj`` is not one JSON-RPC 2.0 request, notification or response."""
    if not isinstance(obj, dict):
        return "a JSON-RPC message must be a JSON object"
    if obj.get("jsonrpc") != "2.0":
        return 'member "jsonrpc" must be exactly "2.0"'
    if "method" in obj:
        if not isinstance(obj["method"], str):
            return 'member "method" must be a string'
        if "id" in obj and not _valid_id(obj["id"]):
            return 'member "id" must be a string or an integer'
        if "params" in obj and not isinstance(obj["params"], dict):
            return 'member "params" must be an object'
        return None
    if "id" not in obj:
        return 'a request or notification needs "method", a response needs "id"'
    if ("result" in obj) == ("error" in obj):
        return 'a response has exactly one of "result" and "error"'
    if "error" in obj and not isinstance(obj["error"], dict):
        return 'member "error" must be an object'
    return None


#: Methods of the MCP 2026-07-28 "modern" era (mcp 2.x registers a default
#: ``server/discover``); this endpoint serves the ``initialize`` era only, so they
#: are answered -32601 on every SDK (a 2.x client in ``mode="auto"`` then falls
#: back to ``initialize``).
_MODERN_ONLY_METHODS: Final = frozenset({"server/discover", "subscriptions/listen"})


@functools.cache
def _request_types() -> dict[str, type[BaseModel]]:
    """``{method: request model}`` for every client request the SDK defines.

    ``types.ClientRequest`` is a ``RootModel`` over the union on mcp 1.x and the
    bare union on mcp 2.x; each member declares ``method: Literal["..."]``.
    """
    root = getattr(types.ClientRequest, "model_fields", {}).get("root")
    members = get_args(root.annotation if root is not None else types.ClientRequest)
    table: dict[str, type[BaseModel]] = {}
    for cls in members:
        for method in get_args(cls.model_fields["method"].annotation):
            if isinstance(method, str) and method not in _MODERN_ONLY_METHODS:
                table[method] = cls
    return table


def _serves(server: Server[Any], method: str) -> bool:
    """Whether ``server`` answers ``method`` (``initialize`` and ``ping`` always)."""
    request_type = _request_types().get(method)
    if request_type is None:
        return False
    if method == "initialize":
        return True
    if _SDK2:
        getter: Any = getattr(server, "get_request_handler")  # noqa: B009
        return getter(method) is not None
    return request_type in server.request_handlers


def _params_problem(method: str, obj: Mapping[str, Any]) -> str | None:
    """Why the request's ``params`` do not fit ``method`` (checked before the SDK).

    Both SDKs answer such requests with a bare -32602 "Invalid request
    parameters" (mcp 1.x after logging every union member's errors at WARNING on
    the root logger); checking here gives one clear message on both.
    """
    candidate = {"method": method}
    if "params" in obj:
        candidate["params"] = obj["params"]
    try:
        _request_types()[method].model_validate(candidate)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}"
    return None


async def _v1_run_stateless(
    server: Server[Any],
    read: MemoryObjectReceiveStream[SessionMessage | Exception],
    write: MemoryObjectSendStream[SessionMessage],
    _protocol_version: str,
) -> None:
    """On mcp 1.x, ``Server.run(stateless=True)`` (the session starts initialized)."""
    await server.run(
        read, write, server.create_initialization_options(), stateless=True
    )


@functools.cache
def _v2_stateless_api() -> tuple[Any, Any, Any, Any]:
    """On mcp 2.x, the pieces its own stateless Streamable HTTP manager uses."""
    return (
        importlib.import_module("mcp.server.connection").Connection,
        importlib.import_module("mcp.server.runner").serve_connection,
        importlib.import_module("mcp.shared.jsonrpc_dispatcher").JSONRPCDispatcher,
        importlib.import_module("mcp.shared.transport_context").TransportContext,
    )


async def _v2_run_stateless(
    server: Server[Any],
    read: MemoryObjectReceiveStream[SessionMessage | Exception],
    write: MemoryObjectSendStream[SessionMessage],
    protocol_version: str,
) -> None:
    """On mcp 2.x, a born-ready connection (no handshake needed), no back-channel.

    ``Server.run`` lost ``stateless`` in 2.0 (its connection waits for
    ``initialize``); this mirrors ``StreamableHTTPSessionManager``'s stateless
    path: ``JSONRPCDispatcher`` + ``Connection.from_envelope`` + ``serve_connection``.
    """
    connection_cls, serve_connection, dispatcher_cls, transport_cls = (
        _v2_stateless_api()
    )
    transport = transport_cls(kind="streamable-http", can_send_request=False)
    dispatcher = dispatcher_cls(
        read,
        write,
        inline_methods=frozenset({"initialize"}),
        transport_builder=lambda _metadata: transport,
    )
    connection = connection_cls.from_envelope(protocol_version, None, None)
    srv: Any = server
    async with srv.lifespan(srv) as lifespan_state:
        await serve_connection(
            srv,
            dispatcher,
            connection=connection,
            lifespan_state=lifespan_state,
            init_options=srv.create_initialization_options(),
        )


_run_stateless = _v2_run_stateless if _SDK2 else _v1_run_stateless


async def _exchange(
    server: Server[Any],
    message: Any,
    request_id: str | int,
    protocol_version: str,
    timeout: float,
) -> dict[str, Any]:
    """Run ``server`` for one request; return its JSON-RPC response object."""
    to_server, server_reads = anyio.create_memory_object_stream[
        SessionMessage | Exception
    ](1)
    server_writes, from_server = anyio.create_memory_object_stream[SessionMessage](16)
    failure: list[Exception] = []

    async def serve() -> None:
        try:
            await _run_stateless(server, server_reads, server_writes, protocol_version)
        except Exception as err:
            _LOGGER.exception("MCP server failed while handling a request")
            failure.append(err)
        finally:
            server_writes.close()

    response: dict[str, Any] | None = None
    async with (
        to_server,
        server_reads,
        server_writes,
        from_server,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve)
        await to_server.send(SessionMessage(message))
        with anyio.move_on_after(timeout):
            async for out in from_server:
                dumped = out.message.model_dump(
                    by_alias=True, mode="json", exclude_none=True
                )
                # Server-to-client requests/notifications cannot be delivered
                # in a JSON (non-SSE) response; only our response counts.
                if "method" not in dumped and dumped.get("id") == request_id:
                    response = dumped
                    break
            else:
                response = _error_body(
                    request_id,
                    INTERNAL_ERROR,
                    "Internal error: the MCP server ended without a response"
                    + (
                        f" ({type(failure[0]).__name__}: {failure[0]})"
                        if failure
                        else ""
                    ),
                )
        tg.cancel_scope.cancel()
    if response is None:
        _LOGGER.warning("MCP request %r timed out after %s s", request_id, timeout)
        response = _error_body(
            request_id,
            REQUEST_TIMEOUT,
            f"Request timed out after {timeout:g} s",
            {"timeout": timeout},
        )
    return response


async def handle_post(
    body: bytes,
    server_factory: Callable[[], Server[Any]],
    *,
    timeout: float = 60,
    protocol_version: str | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """Answer one POST to a stateless MCP Streamable HTTP endpoint.

    Args:
        body: the raw request body (the view has checked ``Content-Type`` and
            ``Accept``; MCP 2025-06-18 "Transports" §Sending Messages to the Server).
        server_factory: builds a fresh server (e.g. ``lambda: build_server(...)``);
            called once per message that is a request, never for notifications.
        timeout: seconds to wait for the server's answer (give it more than the
            longest tool deadline).
        protocol_version: the ``MCP-Protocol-Version`` header, if any.

    Returns:
        ``(http_status, json_body)``; ``json_body`` is ``None`` only with 202.

    Rules, in order:

    1. Body not JSON (or not UTF-8, or ``NaN``) -> ``400``, error -32700, ``id: null``
       (JSON-RPC 2.0 §5.1).
    2. A JSON array -> ``400``, error -32600 "batch not supported": MCP 2025-06-18
       removed JSON-RPC batching ("Changelog"; "Transports": the body "MUST be a
       single JSON-RPC request, notification, or response").
    3. Not a JSON-RPC 2.0 request, notification or response (``jsonrpc`` not
       ``"2.0"``, ``id`` null/float/bool, ``params`` not an object, ...) -> ``400``,
       error -32600, ``id`` echoed when it is a valid id, else null.
    4. For anything but ``initialize``: an ``MCP-Protocol-Version`` the SDK does not
       support -> ``400``, error -32600 ("Transports" §Protocol Version Header:
       "MUST respond with 400 Bad Request"); ``data`` lists the supported ones.
       No header means ``2025-03-26`` (same section).
    5. Notification or response -> ``(202, None)`` (nothing to deliver them to in a
       stateless server).
    6. A method the server does not serve (including the 2026-07-28 era's
       ``server/discover``) -> ``200``, error -32601 with ``data: method``
       (JSON-RPC 2.0 §5.1); the server is built but not run.
    7. ``params`` that do not fit the method's request type (e.g. ``tools/call``
       without ``name``) -> ``200``, error -32602 ``Invalid params for {method}:
       {field}: {problem}``; checked here so both SDKs give the same message and
       mcp 1.x does not log the whole request union at WARNING.
    8. Otherwise the server runs once, statelessly, and its JSON-RPC response is
       returned with ``200``: a result or a handler error from
       :func:`build_server`. ``initialize`` answers with the client's
       ``protocolVersion`` when supported ("Lifecycle" §Version Negotiation).
    9. No answer within ``timeout`` -> ``200``, error -32001 "Request timed out
       after N s"; the server is cancelled. A crash of the server or of
       ``server_factory`` -> ``200``, error -32603 naming the exception.

    """
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        return 400, _error_body(None, PARSE_ERROR, f"Parse error: {err}")
    if isinstance(obj, list):
        return 400, _error_body(
            None,
            INVALID_REQUEST,
            "Invalid Request: JSON-RPC batches are not supported "
            "(MCP 2025-06-18 removed batching); send one message per POST",
        )
    if (problem := _envelope_problem(obj)) is not None:
        echo = (
            obj.get("id")
            if isinstance(obj, dict) and _valid_id(obj.get("id"))
            else None
        )
        return 400, _error_body(echo, INVALID_REQUEST, f"Invalid Request: {problem}")
    request_id: str | int | None = obj.get("id") if "method" in obj else None
    method: str | None = obj.get("method")

    supported = supported_protocol_versions()
    if method == "initialize" and request_id is not None:
        requested = (obj.get("params") or {}).get("protocolVersion")
        version = requested if requested in supported else supported[-1]
    elif protocol_version is None:
        version = DEFAULT_NEGOTIATED_VERSION
    elif protocol_version in supported:
        version = protocol_version
    else:
        return 400, _error_body(
            request_id,
            INVALID_REQUEST,
            f"Bad Request: unsupported MCP-Protocol-Version {protocol_version!r}",
            {"supported": list(supported), "requested": protocol_version},
        )

    if method is None or request_id is None:
        return 202, None

    try:
        message = _MESSAGE_ADAPTER.validate_python(obj)
        server = server_factory()
        served = _serves(server, method)
    except Exception as err:
        _LOGGER.exception("Could not start the MCP server")
        return 200, _error_body(
            request_id,
            INTERNAL_ERROR,
            f"Internal error: could not start the MCP server: {type(err).__name__}: {err}",
        )
    if not served:
        return 200, _error_body(
            request_id, METHOD_NOT_FOUND, "Method not found", method
        )
    if (problem := _params_problem(method, obj)) is not None:
        return 200, _error_body(
            request_id, INVALID_PARAMS, f"Invalid params for {method}: {problem}"
        )

    handlers = _HANDLERS.get(server)
    # mcp 2.x shapes every result per protocol version (``resultType``, the
    # serverInfo stamp of 2026-era versions) inside its session: there, every
    # request goes through the session.
    if method == "tools/call" and handlers is not None and not _SDK2:
        return 200, await _call_tool_directly(handlers, obj, request_id, timeout)
    return 200, await _exchange(server, message, request_id, version, timeout)


async def _call_tool_directly(
    handlers: _Handlers, obj: Mapping[str, Any], request_id: str | int, timeout: float
) -> dict[str, Any]:
    """Answer a ``tools/call`` without running the SDK session for it.

    The request is parsed into the SDK's own ``CallToolRequest`` and the result
    is the SDK's ``CallToolResult`` from the same handler the server uses, so
    the response is the one :func:`_exchange` returns on mcp 1.x, whose session
    sends ``result.model_dump(by_alias=True, mode="json", exclude_none=True)``
    (``tests_engine`` compares them). What is skipped is the per-request session (memory
    streams, task group, receive loop, initialization state), which a
    stateless endpoint does not need and which costs more than the tool:
    about 1.9 ms of 5.6 ms per ``mqtt_publish`` through a real Home Assistant
    (``bench/tools.py``).
    """
    request: Any = _request_types()["tools/call"].model_validate(obj)
    params = request.params
    result: types.CallToolResult | types.ErrorData | None = None
    with anyio.move_on_after(timeout):
        result = await handlers.call_tool(params.name, params.arguments)
    if result is None:
        _LOGGER.warning("MCP request %r timed out after %s s", request_id, timeout)
        return _error_body(
            request_id,
            REQUEST_TIMEOUT,
            f"Request timed out after {timeout:g} s",
            {"timeout": timeout},
        )
    if isinstance(result, types.ErrorData):
        return _error_body(request_id, result.code, result.message, result.data)
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "result": result.model_dump(by_alias=True, mode="json", exclude_none=True),
    }


def _signature_check() -> None:  # pragma: no cover - import-time guard
    """Fail loudly at import if a 1.x SDK lacks ``Server.run(stateless=...)``."""
    if not _SDK2 and "stateless" not in inspect.signature(Server.run).parameters:
        raise ImportError("mcp >= 1.12 is required (Server.run(stateless=...))")


_signature_check()

# Resolve the SDK-specific modules now, at import, never in a request: Home
# Assistant imports integrations off its event loop and reports an import made
# inside the loop as a blocking call (the first POST used to do it).
supported_protocol_versions()
if _SDK2:  # pragma: no cover - mcp 2.x
    _v2_stateless_api()
