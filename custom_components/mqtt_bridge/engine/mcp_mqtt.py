"""MCP over MQTT (the EMQX / mqtt-ai specification layout), server and client side.

Both sides plug into the ``mcp`` SDK's stream interface: anyio memory streams
of :class:`~mcp.shared.message.SessionMessage`, the same on ``mcp`` 1.12 and
2.x. Spec references below are to the MCP-over-MQTT specification
(``shared/reference/mcp-over-mqtt.md`` §1): identifiers §1.2, topics §1.3,
MQTT 5 requirements §1.4, lifecycle §1.5.

* :class:`McpMqttServer` serves one server-name on an :class:`MqttClient`
  whose client id is the server-id: one MCP session (one ``handler`` task) per
  MCP client (mcp-client-id), retained presence with an empty retained will,
  re-published after a reconnect once its topics are subscribed again.
* :class:`McpMqttClientTransport` is an async context manager yielding
  ``(read_stream, write_stream)`` for a stock ``mcp.ClientSession``; it ends
  the session when the server goes away (presence cleared,
  ``notifications/disconnected``, optional ping health check) and answers
  requests that can no longer be answered with an error instead of hanging.

* :func:`discover` lists the servers announced by retained presence.
* :func:`connect_user_properties` are the CONNECT user properties
  ``MCP-COMPONENT-TYPE`` and ``MCP-META`` (§1.4) to give the
  :class:`MqttClient` of either side.

Not implemented: a server-name assigned by the broker in CONNACK
(``MCP-SERVER-NAME``, spec §1.2): the presence will, set at CONNECT, names the
server-name before the broker could assign one. A server whose broker assigns
another name logs a warning and keeps its configured name (Mosquitto never
assigns one; EMQX's MCP gateway can).

Every PUBLISH carries the ``MCP-COMPONENT-TYPE`` and ``MCP-MQTT-CLIENT-ID``
user properties (§1.4). Routing is by topic only; no Response Topic or
Correlation Data (§1.4). JSON-RPC payloads are parsed once to build the
``SessionMessage`` the SDK needs (and to route by method name); outgoing
messages are serialised once.

The second "simple devices" layout of issue 7 is not implemented here.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
import contextlib
from dataclasses import dataclass, field
import json
import logging
import random
import time
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.shared.message import SessionMessage
from pydantic import TypeAdapter, ValidationError

from .mqtt_client import (
    ClientState,
    Message,
    MqttClient,
    MqttError,
    PublishProperties,
    Will,
)
from .subscriptions import SubscribeOptions, Subscription

_LOGGER = logging.getLogger(__name__)

COMPONENT_TYPE: Final = "MCP-COMPONENT-TYPE"
CLIENT_ID: Final = "MCP-MQTT-CLIENT-ID"
META: Final = "MCP-META"
ASSIGNED_SERVER_NAME: Final = "MCP-SERVER-NAME"
IMPLEMENTATION: Final = "mqtt-bridge"
SERVER_COMPONENT: Final = "mcp-server"
CLIENT_COMPONENT: Final = "mcp-client"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
SESSION_LIMIT: Final = -32000
#: Error code of the answers :class:`McpMqttClientTransport` makes itself when
#: a request cannot reach the server or its answer can no longer arrive (the
#: ``mcp`` SDK's ``CONNECTION_CLOSED``, a JSON-RPC 2.0 §5.1 server error code).
CONNECTION_CLOSED: Final = -32000

DISCONNECTED: Final = "notifications/disconnected"
ONLINE: Final = "notifications/server/online"
# Messages buffered per direction of a session before new ones are dropped.
BUFFER: Final = 1024
# Seconds a session handler gets to finish after its input is closed (a hosted
# stdio server stops its child process) before its task is cancelled.
SESSION_CLOSE_GRACE: Final = 5.0
# Seconds the client transport waits for a ping answer (spec §1.5 "Health"
# recommends 10 s for ping).
PING_TIMEOUT: Final = 10.0
# Seconds a server waits for its subscriptions to be granted again after a
# reconnect before it re-publishes its presence anyway.
ANNOUNCE_TIMEOUT: Final = 10.0
# Prefix of the JSON-RPC ids of the client transport's own pings.
PING_ID_PREFIX: Final = "mqtt-bridge-ping-"

_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)
_DISCONNECTED_PAYLOAD: Final = json.dumps(
    {"jsonrpc": "2.0", "method": DISCONNECTED}
).encode()

type ReadStream = MemoryObjectReceiveStream[SessionMessage | Exception]
type WriteStream = MemoryObjectSendStream[SessionMessage]
type SessionHandler = Callable[[str, ReadStream, WriteStream], Awaitable[None]]


# --------------------------------------------------------------------------- #
# Identifiers and topics (spec §1.2, §1.3)
# --------------------------------------------------------------------------- #


def connect_user_properties(
    component: str, meta: Mapping[str, Any] | None = None
) -> tuple[tuple[str, str], ...]:
    """The CONNECT user properties of an MCP-over-MQTT component (spec §1.4).

    ``component`` is :data:`SERVER_COMPONENT` or :data:`CLIENT_COMPONENT`;
    ``MCP-META`` is ``meta`` as JSON (default ``{"implementation": "mqtt-bridge"}``).
    Returns ``((MCP-COMPONENT-TYPE, component), (MCP-META, json))`` for
    ``MqttClient(connect_user_properties=...)``.
    """
    payload = dict(meta) if meta is not None else {"implementation": IMPLEMENTATION}
    return (
        (COMPONENT_TYPE, component),
        (META, json.dumps(payload, separators=(",", ":"))),
    )


def validate_server_name(name: str) -> str:
    """Return ``name`` if it is a valid server-name (spec §1.2), else raise ``ValueError``.

    A server-name is a ``/``-separated hierarchy without ``+`` or ``#``, with
    no empty level, not starting with ``$`` (a topic level of ``$mcp-…``
    topics; MQTT reserves ``$`` at the start of topics).
    """
    if not name:
        raise ValueError("server-name is empty")
    if "+" in name or "#" in name:
        raise ValueError(f"server-name {name!r} contains a wildcard (+ or #)")
    if name.startswith("$"):
        raise ValueError(f"server-name {name!r} starts with $")
    if any(not level for level in name.split("/")):
        raise ValueError(f"server-name {name!r} has an empty level")
    if any(ord(char) < 0x20 or char == "\x7f" for char in name):
        raise ValueError(f"server-name {name!r} contains a control character")
    return name


def control_topic(server_id: str, server_name: str) -> str:
    """Server control topic ``$mcp-server/{server-id}/{server-name}`` (spec §1.3)."""
    return f"$mcp-server/{server_id}/{server_name}"


def presence_topic(server_id: str, server_name: str) -> str:
    """Server presence topic ``$mcp-server/presence/{server-id}/{server-name}`` (spec §1.3)."""
    return f"$mcp-server/presence/{server_id}/{server_name}"


def capability_topic(server_id: str, server_name: str) -> str:
    """Server capability topic ``$mcp-server/capability/{server-id}/{server-name}`` (spec §1.3)."""
    return f"$mcp-server/capability/{server_id}/{server_name}"


def rpc_topic(client_id: str, server_id: str, server_name: str) -> str:
    """RPC topic ``$mcp-rpc/{mcp-client-id}/{server-id}/{server-name}`` (spec §1.3)."""
    return f"$mcp-rpc/{client_id}/{server_id}/{server_name}"


def client_presence_topic(client_id: str) -> str:
    """Client presence topic ``$mcp-client/presence/{mcp-client-id}`` (spec §1.3)."""
    return f"$mcp-client/presence/{client_id}"


def client_capability_topic(client_id: str) -> str:
    """Client capability topic ``$mcp-client/capability/{mcp-client-id}`` (spec §1.3)."""
    return f"$mcp-client/capability/{client_id}"


def _properties(component: str, client_id: str) -> PublishProperties:
    """The user properties every PUBLISH carries (spec §1.4)."""
    return PublishProperties(
        user_properties=((COMPONENT_TYPE, component), (CLIENT_ID, client_id))
    )


def _user_property(message: Message, key: str) -> str | None:
    props = message.properties
    if props is None:
        return None
    for name, value in props.user_properties:
        if name == key:
            return value
    return None


def _error_payload(request_id: Any, code: int, text: str) -> bytes:
    """A JSON-RPC 2.0 error response (JSON-RPC 2.0 §5.1)."""
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": text}}
    ).encode()


def _parse(payload: bytes) -> tuple[Any, bytes | None]:
    """Return ``(message, None)`` or ``(None, error_payload)`` for a bad payload.

    Not JSON → parse error -32700 with id null; JSON but not a JSON-RPC
    message → invalid request -32600 (JSON-RPC 2.0 §5.1). A valid message is
    parsed and validated in one step (pydantic-core reads the JSON itself, as
    the SDK's own transports do); only a bad one is parsed again to find out why.
    """
    try:
        return _MESSAGE_ADAPTER.validate_json(payload), None
    except ValidationError:
        pass
    try:
        obj = json.loads(payload)
    except ValueError as err:
        return None, _error_payload(None, PARSE_ERROR, f"Parse error: {err}")
    request_id = obj.get("id") if isinstance(obj, dict) else None
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        request_id = None
    return None, _error_payload(
        request_id, INVALID_REQUEST, "Invalid Request: not a JSON-RPC message"
    )


def _root(message: Any) -> Any:
    """The concrete JSON-RPC model (mcp 1.x wraps it in a ``RootModel``)."""
    return getattr(message, "root", message)


def _method(message: Any) -> str | None:
    method = getattr(_root(message), "method", None)
    return method if isinstance(method, str) else None


def _dump(message: Any) -> bytes:
    text: str = _root(message).model_dump_json(by_alias=True, exclude_none=True)
    return text.encode()


def _is_capability_change(method: str | None) -> bool:
    """list_changed and resources/updated go to the capability topic (spec §1.5 "Changes")."""
    return method is not None and (
        method == "notifications/resources/updated"
        or (method.startswith("notifications/") and method.endswith("/list_changed"))
    )


# --------------------------------------------------------------------------- #
# Server side
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class ServerPresence:
    """One server instance announced on ``$mcp-server/presence/…`` (spec §1.5 "Discovery")."""

    server_id: str
    server_name: str
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SessionInfo:
    """One MCP client's session on a :class:`McpMqttServer`."""

    client_id: str
    started: float
    last_activity: float
    requests: int = 0


@dataclass
class McpMqttStats:
    """Counters of one :class:`McpMqttServer`."""

    sessions_started: int = 0
    requests: int = 0
    errors: int = 0
    parse_errors: int = 0
    rejected_sessions: int = 0


class _Session:
    """Internal state of one session: streams, subscriptions, task."""

    def __init__(self, info: SessionInfo) -> None:
        self.info = info
        self.to_handler, self.read = anyio.create_memory_object_stream[
            SessionMessage | Exception
        ](BUFFER)
        self.write, self.from_handler = anyio.create_memory_object_stream[
            SessionMessage
        ](BUFFER)
        self.subscriptions: list[Subscription] = []
        self.task: asyncio.Task[None] | None = None

    def close(self) -> None:
        for stream in (self.to_handler, self.read, self.write, self.from_handler):
            stream.close()


class McpMqttServer:
    """Serves one server-name on an MqttClient (its client id = server-id).

    One MCP session per MQTT client (mcp-client-id), each run by ``handler``
    in its own task (spec §1.5 "Load balancing": clients stay pinned, so the
    server may keep per-client state). Run :meth:`run` as a task; cancel it
    to stop.
    """

    def __init__(
        self,
        client: MqttClient,
        server_name: str,
        *,
        description: str = "",
        meta: Mapping[str, Any] | None = None,
        handler: SessionHandler,
        max_sessions: int = 16,
        idle_timeout: float = 600.0,
        qos: int = 1,
        close_grace: float = SESSION_CLOSE_GRACE,
    ) -> None:
        """Prepare the server; ``server_name`` is validated (spec §1.2).

        ``close_grace`` is how many seconds an ended session's handler may take
        to finish after its input closed before it is cancelled.
        """
        self.client = client
        self.server_id = client.client_id
        self.server_name = validate_server_name(server_name)
        self.description = description
        self.meta = dict(meta or {})
        self.handler = handler
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.qos = qos
        self.close_grace = close_grace
        self.sessions: dict[str, SessionInfo] = {}
        self.stats = McpMqttStats()
        self._sessions: dict[str, _Session] = {}
        self._props = _properties(SERVER_COMPONENT, self.server_id)
        self._starting: set[asyncio.Task[None]] = set()
        self._closing: set[asyncio.Task[None]] = set()

    @staticmethod
    def will(client_id: str, server_name: str) -> Will:
        """The server's will: an empty retained presence (spec §1.3, §1.5 "Discovery").

        Pass it to ``MqttClient(client_id=server_id, will=...)``.
        """
        return Will(
            presence_topic(client_id, server_name),
            b"",
            qos=1,
            retain=True,
            properties=_properties(SERVER_COMPONENT, client_id),
        )

    def presence_payload(self) -> bytes:
        """The retained ``notifications/server/online`` (spec §1.5 "Discovery")."""
        return json.dumps(
            {
                "jsonrpc": "2.0",
                "method": ONLINE,
                "params": {
                    "server_name": self.server_name,
                    "description": self.description,
                    "meta": self.meta,
                },
            }
        ).encode()

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        try:
            self.client.publish(
                topic, payload, qos=self.qos, retain=retain, properties=self._props
            )
        except MqttError as err:
            self.stats.errors += 1
            _LOGGER.debug("MCP-over-MQTT publish on %s failed: %s", topic, err)

    def _publish_presence(self) -> None:
        self._publish(
            presence_topic(self.server_id, self.server_name),
            self.presence_payload(),
            retain=True,
        )

    def _check_assigned_name(self) -> None:
        """Warn when the broker assigned another server-name (spec §1.2; see the module doc)."""
        assigned = dict(self.client.connack_user_properties).get(ASSIGNED_SERVER_NAME)
        if assigned and assigned != self.server_name:
            _LOGGER.warning(
                "The broker assigned the server-name %r; this server keeps %r",
                assigned,
                self.server_name,
            )

    async def run(self) -> None:
        """Serve until cancelled (spec §1.5).

        Subscribes the control topic, publishes the retained presence (again
        after each reconnect), serves sessions and ends idle ones. On cancel:
        ``notifications/disconnected`` to every session (spec §1.5
        "Shutdown"), presence cleared with an empty retained message before
        the client disconnects (spec §1.5 "Discovery"), control unsubscribed.
        """
        control = self.client.subscribe(
            control_topic(self.server_id, self.server_name),
            self._on_control,
            SubscribeOptions(qos=self.qos),
        )

        announcing: asyncio.Task[None] | None = None

        def on_state(state: ClientState) -> None:
            nonlocal announcing
            if state is ClientState.CONNECTED:
                self._check_assigned_name()
            if state is ClientState.CONNECTED and (
                announcing is None or announcing.done()
            ):
                announcing = asyncio.get_running_loop().create_task(
                    self._announce(control),
                    name=f"mcp-mqtt announce {self.server_name}",
                )

        remove = self.client.add_state_listener(on_state)
        try:
            await control.wait_granted()
            self._publish_presence()
            interval = max(0.05, min(self.idle_timeout / 2, 5.0))
            while True:
                await asyncio.sleep(interval)
                self._expire_idle()
        finally:
            remove()
            if announcing is not None:
                announcing.cancel()
                await asyncio.wait({announcing})
            control.cancel()
            for task in self._starting:
                task.cancel()
            for client_id in list(self._sessions):
                self._publish(
                    rpc_topic(client_id, self.server_id, self.server_name),
                    _DISCONNECTED_PAYLOAD,
                )
                self._end(client_id)
            tasks = self._closing | self._starting
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=self.close_grace)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=self.close_grace)
            await self._clear_presence()

    async def _announce(self, control: Subscription) -> None:
        """Re-publish the presence once the broker serves this server again.

        After a reconnect (e.g. a broker restart: a session expiry of 0 loses
        every subscription, spec §1.4) the presence is published only when the
        control topic and every session's topics are subscribed again, so a
        client that sees the presence can be answered (spec §1.5
        "Discovery"). After ``ANNOUNCE_TIMEOUT`` seconds it is published anyway.
        """
        subscriptions = [control]
        for session in self._sessions.values():
            subscriptions.extend(session.subscriptions)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                # A refused or cancelled subscription raises: nothing to wait for.
                await asyncio.gather(
                    *(s.wait_granted() for s in subscriptions), return_exceptions=True
                )
        self._publish_presence()

    async def _clear_presence(self) -> None:
        done = asyncio.Event()
        try:
            self.client.publish(
                presence_topic(self.server_id, self.server_name),
                b"",
                qos=1,
                retain=True,
                properties=self._props,
                on_done=lambda _err: done.set(),
            )
        except MqttError as err:
            _LOGGER.debug("could not clear the presence: %s", err)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await done.wait()

    def _expire_idle(self) -> None:
        """End sessions idle longer than ``idle_timeout`` (issue 7: an idle timeout)."""
        now = time.monotonic()
        for client_id, session in list(self._sessions.items()):
            if now - session.info.last_activity > self.idle_timeout:
                _LOGGER.debug("MCP session of %s idle: ending it", client_id)
                self._publish(
                    rpc_topic(client_id, self.server_id, self.server_name),
                    _DISCONNECTED_PAYLOAD,
                )
                self._end(client_id)

    # -- control topic -----------------------------------------------------------

    def _on_control(self, message: Message) -> None:
        """A message on the control topic: ``initialize`` (spec §1.5 "Initialization").

        The sender is named by the ``MCP-MQTT-CLIENT-ID`` user property (spec
        §1.4); without it there is no topic to answer on, so it is dropped.
        """
        client_id = _user_property(message, CLIENT_ID)
        if not client_id or any(c in client_id for c in "/+#"):
            self.stats.errors += 1
            _LOGGER.debug("control message without a valid %s dropped", CLIENT_ID)
            return
        reply = rpc_topic(client_id, self.server_id, self.server_name)
        parsed, error = _parse(message.payload)
        if error is not None:
            self.stats.parse_errors += 1
            self._publish(reply, error)
            return
        root = _root(parsed)
        if getattr(root, "method", None) != "initialize" or not hasattr(root, "id"):
            self.stats.errors += 1
            if hasattr(root, "id") and hasattr(root, "method"):
                self._publish(
                    reply,
                    _error_payload(
                        root.id, INVALID_REQUEST, "only initialize on the control topic"
                    ),
                )
            return
        if client_id in self._sessions:
            self._end(client_id)  # a new initialization replaces the old session
        if len(self._sessions) >= self.max_sessions:
            self.stats.rejected_sessions += 1
            self._publish(
                reply,
                _error_payload(
                    root.id,
                    SESSION_LIMIT,
                    f"session limit reached ({self.max_sessions} sessions)",
                ),
            )
            return
        task = asyncio.get_running_loop().create_task(
            self._start_session(client_id, parsed)
        )
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _start_session(self, client_id: str, initialize: Any) -> None:
        """Subscribe the client's topics, then start the handler (spec §1.3, §1.5).

        RPC (No Local), presence and capability are subscribed BEFORE the
        ``initialize`` is handed to the handler, so its answer cannot be lost.
        """
        now = time.monotonic()
        session = _Session(SessionInfo(client_id, now, now, requests=1))
        self._sessions[client_id] = session
        self.sessions[client_id] = session.info
        self.stats.sessions_started += 1
        self.stats.requests += 1

        def on_rpc(message: Message) -> None:
            self._on_rpc(session, message)

        def on_presence(message: Message) -> None:
            parsed, _error = _parse(message.payload)
            if parsed is not None and _method(parsed) == DISCONNECTED:
                self._end(client_id)

        options = SubscribeOptions(qos=self.qos, no_local=True)
        topics = (
            (rpc_topic(client_id, self.server_id, self.server_name), on_rpc),
            (client_presence_topic(client_id), on_presence),
            (client_capability_topic(client_id), on_rpc),
        )
        try:
            for topic, callback in topics:
                session.subscriptions.append(
                    self.client.subscribe(topic, callback, options)
                )
            await asyncio.gather(*(s.wait_granted() for s in session.subscriptions))
        except Exception as err:  # refused subscriptions
            if self._sessions.get(client_id) is session:
                _LOGGER.warning("MCP session of %s not started: %s", client_id, err)
                self.stats.errors += 1
                self._end(client_id)
            return  # else ended while subscribing (its subscriptions cancelled)
        if self._sessions.get(client_id) is not session:
            return  # ended while subscribing
        session.to_handler.send_nowait(SessionMessage(initialize))
        session.task = asyncio.get_running_loop().create_task(
            self._serve(session), name=f"mcp-mqtt session {client_id}"
        )

    async def _serve(self, session: _Session) -> None:
        """Run the handler and publish what it writes (spec §1.5)."""
        client_id = session.info.client_id
        reply = rpc_topic(client_id, self.server_id, self.server_name)
        capability = capability_topic(self.server_id, self.server_name)

        async def pump() -> None:
            async for out in session.from_handler:
                method = _method(out.message)
                self._publish(
                    capability if _is_capability_change(method) else reply,
                    _dump(out.message),
                )

        pumping = asyncio.ensure_future(pump())
        try:
            await self.handler(client_id, session.read, session.write)
        except Exception:
            self.stats.errors += 1
            _LOGGER.exception("MCP session handler of %s failed", client_id)
        except asyncio.CancelledError:
            pumping.cancel()
            raise
        finally:
            session.write.close()
            await asyncio.wait({pumping})
            session.close()
            if self._sessions.get(client_id) is session:
                self._end(client_id)

    def _on_rpc(self, session: _Session, message: Message) -> None:
        """A client message on its RPC (or capability) topic → the handler.

        Malformed JSON gets a JSON-RPC parse error back on the RPC topic and
        the server keeps serving; ``notifications/disconnected`` ends the
        session (spec §1.5 "Shutdown").
        """
        client_id = session.info.client_id
        session.info.last_activity = time.monotonic()
        parsed, error = _parse(message.payload)
        if error is not None:
            self.stats.parse_errors += 1
            self._publish(rpc_topic(client_id, self.server_id, self.server_name), error)
            return
        method = _method(parsed)
        if method == DISCONNECTED:
            self._end(client_id)
            return
        if method is not None and hasattr(_root(parsed), "id"):
            self.stats.requests += 1
            session.info.requests += 1
        try:
            session.to_handler.send_nowait(SessionMessage(parsed))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.stats.errors += 1
            _LOGGER.warning("MCP session of %s: message dropped", client_id)

    def _end(self, client_id: str) -> None:
        """Forget a session: unsubscribe its topics, close its streams, cancel its task."""
        session = self._sessions.pop(client_id, None)
        self.sessions.pop(client_id, None)
        if session is None:
            return
        for subscription in session.subscriptions:
            subscription.cancel()
        # The handler sees its input end and finishes (a hosted stdio server
        # stops its child); it is cancelled only if it overstays the grace time.
        session.to_handler.close()
        task = session.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
            timer = asyncio.get_running_loop().call_later(self.close_grace, task.cancel)
            task.add_done_callback(lambda _task: timer.cancel())
        else:
            session.close()


# --------------------------------------------------------------------------- #
# Client side
# --------------------------------------------------------------------------- #


def _presence_from(message: Message) -> ServerPresence | None:
    """Parse a retained presence message; ``None`` for an empty (offline) one."""
    parts = message.topic.split("/", 3)
    if len(parts) < 4 or not message.payload:
        return None
    try:
        params = json.loads(message.payload).get("params") or {}
        return ServerPresence(
            server_id=parts[2],
            server_name=parts[3],
            description=str(params.get("description", "")),
            meta=dict(params.get("meta") or {}),
        )
    except (ValueError, AttributeError, TypeError):
        return None


async def discover(
    client: MqttClient, name_filter: str = "#", *, timeout: float = 1.0
) -> list[ServerPresence]:
    """Servers announced on ``$mcp-server/presence/+/{name_filter}`` (spec §1.5 "Discovery").

    Collects the retained presence messages for ``timeout`` seconds; an empty
    retained payload means the instance is offline and is left out.
    """
    found: dict[str, ServerPresence] = {}

    def on_presence(message: Message) -> None:
        presence = _presence_from(message)
        key = message.topic
        if presence is None:
            found.pop(key, None)
        else:
            found[key] = presence

    subscription = client.subscribe(
        f"$mcp-server/presence/+/{name_filter}", on_presence, SubscribeOptions(qos=1)
    )
    try:
        await subscription.wait_granted()
        await asyncio.sleep(timeout)
    finally:
        subscription.cancel()
    return sorted(found.values(), key=lambda p: (p.server_name, p.server_id))


@dataclass
class McpMqttClientStats:
    """Counters of one :class:`McpMqttClientTransport`.

    ``requests``: requests published to the server; ``errors``: error answers
    the transport made itself (request not sent, answer lost, server gone);
    ``malformed``: messages from the server that were not JSON-RPC (dropped);
    ``pings``: health pings sent (``ping_interval``).
    """

    requests: int = 0
    errors: int = 0
    malformed: int = 0
    pings: int = 0


def _validate_id(identifier: str) -> str:
    """Return a server-id / mcp-client-id, or raise ``ValueError`` (spec §1.2: no ``/ + #``)."""
    if not identifier or any(char in identifier for char in "/+#"):
        raise ValueError(f"invalid MQTT client id {identifier!r} (empty, / + or #)")
    return identifier


class McpMqttClientTransport:
    """Client side: an async context manager yielding (read_stream, write_stream) for mcp.ClientSession.

    Connected to one server-name: discovers it by retained presence, picks a
    server-id at random (spec §1.5 "Load balancing") unless ``server_id``
    names one, subscribes its RPC (No Local) and capability topics, sends the
    first message (``initialize``) to the control topic, client capability
    changes (``notifications/roots/list_changed``) to
    ``$mcp-client/capability/{mcp-client-id}`` and everything else to the RPC
    topic (spec §1.5 "Initialization", "Changes"). The MqttClient's id is the
    mcp-client-id, which must change on every new initialization (spec §1.2):
    use one MqttClient per session, created with
    ``will=McpMqttClientTransport.client_will(id)`` (the client presence will,
    spec §1.3).

    The session ends (the read stream is closed after error answers to the
    requests still waiting, then a ``ConnectionError`` item naming the reason;
    :attr:`closed_reason` keeps it) when the chosen server's presence is
    cleared (spec §1.5 "Discovery"), when the server sends
    ``notifications/disconnected`` on the RPC topic (spec §1.5 "Shutdown"), or
    when a health ping (``ping_interval`` seconds apart, off by default) gets
    no answer within ``ping_timeout`` seconds (spec §1.5 "Health"; the client
    then says ``notifications/disconnected`` first).

    Requests never hang on the transport: one that cannot be published, or
    whose answer can no longer arrive because this MQTT connection was lost
    (a session expiry of 0 drops it, spec §1.4), gets a JSON-RPC error
    ``CONNECTION_CLOSED`` (-32000). After a reconnect, requests wait up to
    ``timeout`` seconds for the server's presence (re-published when the
    server is subscribed again) before they are sent, else get that error.
    """

    def __init__(
        self,
        client: MqttClient,
        server_name: str,
        *,
        timeout: float = 10.0,
        qos: int = 1,
        server_id: str | None = None,
        ping_interval: float | None = None,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        """Prepare the transport; ``server_name`` (spec §1.2) and ``server_id`` are validated.

        ``timeout`` (seconds) bounds discovery, the subscriptions and the wait
        for the server after a reconnect. ``server_id`` targets one instance
        (its presence must be online). ``ping_interval`` / ``ping_timeout``
        (seconds) turn on the health check.

        Raises:
            ValueError: invalid server-name or server-id.

        """
        self.client = client
        self.client_id = client.client_id
        self.server_name = validate_server_name(server_name)
        self.timeout = timeout
        self.qos = qos
        self.server_id: str | None = (
            _validate_id(server_id) if server_id is not None else None
        )
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.closed_reason: str | None = None
        self.stats = McpMqttClientStats()
        self._props = _properties(CLIENT_COMPONENT, self.client_id)
        self._subscriptions: list[Subscription] = []
        self._pump: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._streams: list[Any] = []
        self._to_session: MemoryObjectSendStream[SessionMessage | Exception] | None = (
            None
        )
        self._found: dict[str, bool] = {}
        self._discovering = True
        self._discovered = asyncio.Event()
        self._online = asyncio.Event()
        self._answered = asyncio.Event()
        self._pending: set[Any] = set()
        self._pings: dict[str, asyncio.Future[bool]] = {}
        self._remove_listener: Callable[[], None] | None = None

    @staticmethod
    def client_will(client_id: str) -> Will:
        """The client presence will ``notifications/disconnected`` (spec §1.3, §1.5 "Shutdown")."""
        return Will(
            client_presence_topic(client_id),
            _DISCONNECTED_PAYLOAD,
            qos=1,
            properties=_properties(CLIENT_COMPONENT, client_id),
        )

    # -- presence ----------------------------------------------------------------

    def _on_presence(self, message: Message) -> None:
        """Track the instances of the server-name; the chosen one going offline ends the session."""
        server_id = message.topic.split("/")[2]
        online = bool(message.payload)
        self._found[server_id] = online
        if self._discovering:
            if online and self.server_id in (None, server_id):
                self._discovered.set()
            return
        if server_id != self.server_id:
            return
        if online:
            self._online.set()
        else:
            self._gone(
                f"MCP server {self.server_name!r} ({server_id}) went offline "
                "(its presence was cleared)"
            )

    async def _find_server(self) -> str:
        """Wait for an online presence; return the chosen server-id.

        The presence subscription stays for the session (see :meth:`_on_presence`).

        Raises:
            LookupError: no (matching) presence within ``timeout``.

        """
        subscription = self.client.subscribe(
            presence_topic(self.server_id or "+", self.server_name),
            self._on_presence,
            SubscribeOptions(qos=1),
        )
        self._subscriptions.append(subscription)
        try:
            async with asyncio.timeout(self.timeout):
                await subscription.wait_granted()
                await self._discovered.wait()
        except TimeoutError:
            which = f"server {self.server_id!r} of " if self.server_id else ""
            raise LookupError(
                f"{which}server-name {self.server_name!r} not found within "
                f"{self.timeout:g} s"
            ) from None
        if self.server_id is None:
            self.server_id = random.choice(
                [sid for sid, online in self._found.items() if online]
            )
        self._discovering = False
        self._online.set()
        return self.server_id

    # -- lifecycle ---------------------------------------------------------------

    async def __aenter__(self) -> tuple[ReadStream, WriteStream]:
        """Discover, subscribe, and return the streams for ``mcp.ClientSession``.

        Raises:
            LookupError: no server announces the server-name (or ``server_id``)
                within ``timeout``.
            TimeoutError: the broker did not grant the subscriptions in time.
            SubscriptionRefusedError: the broker refused them.

        """
        try:
            return await self._enter()
        except BaseException:
            await self._close()
            raise

    async def _enter(self) -> tuple[ReadStream, WriteStream]:
        server_id = await self._find_server()
        to_session, read = anyio.create_memory_object_stream[
            SessionMessage | Exception
        ](BUFFER)
        write, from_session = anyio.create_memory_object_stream[SessionMessage](BUFFER)
        self._streams = [to_session, read, write, from_session]
        self._to_session = to_session
        options = SubscribeOptions(qos=self.qos, no_local=True)
        rpc = rpc_topic(self.client_id, server_id, self.server_name)
        subscriptions = [
            self.client.subscribe(rpc, self._on_message, options),
            self.client.subscribe(
                capability_topic(server_id, self.server_name), self._on_message, options
            ),
        ]
        self._subscriptions.extend(subscriptions)
        async with asyncio.timeout(self.timeout):
            await asyncio.gather(*(s.wait_granted() for s in subscriptions))
        self._remove_listener = self.client.add_state_listener(self._on_state)
        loop = asyncio.get_running_loop()
        self._pump = loop.create_task(
            self._pump_session(from_session, server_id), name="mcp-mqtt client pump"
        )
        if self.ping_interval is not None:
            self._pinger = loop.create_task(
                self._ping_loop(rpc, self.ping_interval), name="mcp-mqtt client ping"
            )
        return read, write

    async def __aexit__(self, *_exc: object) -> None:
        """Say ``notifications/disconnected`` on the client presence topic and unsubscribe (spec §1.5 "Shutdown")."""
        self._say_disconnected()
        await self._close()

    async def _close(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions = []
        tasks = {t for t in (self._pump, self._pinger) if t is not None}
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for stream in self._streams:
            stream.close()

    def _say_disconnected(self) -> None:
        with contextlib.suppress(MqttError):
            self.client.publish(
                client_presence_topic(self.client_id),
                _DISCONNECTED_PAYLOAD,
                qos=self.qos,
                properties=self._props,
            )

    # -- server -> session ---------------------------------------------------------

    def _deliver(self, item: SessionMessage | Exception) -> None:
        if self._to_session is None:  # pragma: no cover - subscribed after the streams
            return
        with contextlib.suppress(
            anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError
        ):
            self._to_session.send_nowait(item)

    def _on_message(self, message: Message) -> None:
        """A message on the RPC or server capability topic → the session."""
        parsed, _error = _parse(message.payload)
        if parsed is None:
            self.stats.malformed += 1
            _LOGGER.debug("malformed message from %s dropped", self.server_id)
            return
        root = _root(parsed)
        method = getattr(root, "method", None)
        if method is None:  # a response
            request_id = getattr(root, "id", None)
            ping = (
                self._pings.pop(request_id, None)
                if isinstance(request_id, str)
                else None
            )
            if ping is not None:
                if not ping.done():
                    ping.set_result(True)
                return
            self._pending.discard(request_id)
        elif method == DISCONNECTED:
            self._gone(
                f"MCP server {self.server_name!r} ({self.server_id}) ended the "
                "session (notifications/disconnected)"
            )
            return
        self._answered.set()
        self._deliver(SessionMessage(parsed))

    def _answer_error(self, request_id: Any, text: str) -> None:
        """Answer a request of the session with ``CONNECTION_CLOSED`` (JSON-RPC 2.0 §5.1)."""
        self._pending.discard(request_id)
        self.stats.errors += 1
        body = {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {"code": CONNECTION_CLOSED, "message": text},
        }
        self._deliver(SessionMessage(_MESSAGE_ADAPTER.validate_python(body)))

    def _fail_pending(self, text: str) -> None:
        for request_id in list(self._pending):
            self._answer_error(request_id, text)

    def _gone(self, reason: str) -> None:
        """End the session: error answers, a ``ConnectionError`` item, end of the read stream."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        _LOGGER.info("MCP-over-MQTT session %s: %s", self.client_id, reason)
        self._fail_pending(reason)
        self._deliver(ConnectionError(reason))
        if self._to_session is not None:
            self._to_session.close()
        self._online.set()  # wake a pump waiting for the server: it sees the end

    def _on_state(self, state: ClientState) -> None:
        """This MQTT connection went down: answers in flight are lost (session expiry 0)."""
        if state is ClientState.CONNECTED:
            return
        self._online.clear()  # until the presence is seen again on the new session
        for ping in self._pings.values():
            if not ping.done():
                ping.set_result(False)
        self._fail_pending(
            f"the MQTT connection to the broker was lost ({state}); "
            "the answer cannot arrive"
        )

    # -- session -> server ---------------------------------------------------------

    async def _pump_session(
        self, from_session: MemoryObjectReceiveStream[SessionMessage], server_id: str
    ) -> None:
        control = control_topic(server_id, self.server_name)
        rpc = rpc_topic(self.client_id, server_id, self.server_name)
        capability = client_capability_topic(self.client_id)
        first = True
        async for out in from_session:
            root = _root(out.message)
            method = getattr(root, "method", None)
            request_id = getattr(root, "id", None)
            is_request = method is not None and request_id is not None
            if is_request and not self._online.is_set():
                try:
                    async with asyncio.timeout(self.timeout):
                        await self._online.wait()
                except TimeoutError:
                    self._answer_error(
                        request_id,
                        f"MCP server {self.server_name!r} ({server_id}) not "
                        f"reachable: no presence within {self.timeout:g} s",
                    )
                    continue
            if self.closed_reason is not None:
                continue  # the read stream is closed: nobody waits for an answer
            if first:
                topic = control
            elif _is_capability_change(method):
                topic = capability
            else:
                topic = rpc
            try:
                self.client.publish(
                    topic, _dump(out.message), qos=self.qos, properties=self._props
                )
            except MqttError as err:
                _LOGGER.debug("MCP-over-MQTT publish failed: %s", err)
                if is_request:
                    self._answer_error(request_id, f"{method} not sent: {err}")
                continue
            first = False
            if is_request:
                self.stats.requests += 1
                self._pending.add(request_id)

    async def _ping_loop(self, rpc: str, interval: float) -> None:
        """Ping the server every ``interval`` s once the session is answered (spec §1.5 "Health").

        No answer within ``ping_timeout`` → ``notifications/disconnected`` and
        the session ends. A ping whose MQTT connection was lost meanwhile is
        not counted as a failure.
        """
        await self._answered.wait()
        number = 0
        while self.closed_reason is None:
            await asyncio.sleep(interval)
            if not self.client.connected or not self._online.is_set():
                continue
            number += 1
            ping_id = f"{PING_ID_PREFIX}{number}"
            answered = asyncio.get_running_loop().create_future()
            self._pings[ping_id] = answered
            payload = json.dumps({"jsonrpc": "2.0", "id": ping_id, "method": "ping"})
            try:
                self.client.publish(
                    rpc, payload.encode(), qos=self.qos, properties=self._props
                )
                self.stats.pings += 1
                async with asyncio.timeout(self.ping_timeout):
                    await answered
            except MqttError:
                continue
            except TimeoutError:
                self._say_disconnected()
                self._gone(
                    f"MCP server {self.server_name!r} ({self.server_id}) did not "
                    f"answer a ping within {self.ping_timeout:g} s"
                )
            finally:
                self._pings.pop(ping_id, None)
