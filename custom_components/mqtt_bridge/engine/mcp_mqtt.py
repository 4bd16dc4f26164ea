"""MCP over MQTT (the EMQX / mqtt-ai specification layout), server and client side.

Both sides plug into the ``mcp`` SDK's stream interface: anyio memory streams
of :class:`~mcp.shared.message.SessionMessage`, the same on ``mcp`` 1.12 and
2.x. Spec references below are to the MCP-over-MQTT specification
(``shared/reference/mcp-over-mqtt.md`` §1): identifiers §1.2, topics §1.3,
MQTT 5 requirements §1.4, lifecycle §1.5.

* :class:`McpMqttServer` serves one server-name on an :class:`MqttClient`
  whose client id is the server-id: one MCP session (one ``handler`` task) per
  MCP client (mcp-client-id), retained presence with an empty retained will.
* :class:`McpMqttClientTransport` is an async context manager yielding
  ``(read_stream, write_stream)`` for a stock ``mcp.ClientSession``.
* :func:`discover` lists the servers announced by retained presence.

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
SERVER_COMPONENT: Final = "mcp-server"
CLIENT_COMPONENT: Final = "mcp-client"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
SESSION_LIMIT: Final = -32000

DISCONNECTED: Final = "notifications/disconnected"
ONLINE: Final = "notifications/server/online"
# Messages buffered per direction of a session before new ones are dropped.
BUFFER: Final = 1024
# Seconds a session handler gets to finish after its input is closed (a hosted
# stdio server stops its child process) before its task is cancelled.
SESSION_CLOSE_GRACE: Final = 5.0

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
    message → invalid request -32600 (JSON-RPC 2.0 §5.1).
    """
    try:
        obj = json.loads(payload)
    except ValueError as err:
        return None, _error_payload(None, PARSE_ERROR, f"Parse error: {err}")
    try:
        return _MESSAGE_ADAPTER.validate_python(obj), None
    except ValidationError:
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

        def on_state(state: ClientState) -> None:
            if state is ClientState.CONNECTED:
                self._publish_presence()

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


class McpMqttClientTransport:
    """Client side: an async context manager yielding (read_stream, write_stream) for mcp.ClientSession.

    Connected to one server-name: discovers it by retained presence, picks a
    server-id at random (spec §1.5 "Load balancing"), subscribes its RPC (No
    Local) and capability topics, sends the first message (``initialize``)
    to the control topic and later ones to the RPC topic (spec §1.5
    "Initialization"). The MqttClient's id is the mcp-client-id, which must
    change on every new initialization (spec §1.2): use one MqttClient per
    session, created with ``will=McpMqttClientTransport.client_will(id)``
    (the client presence will, spec §1.3).
    """

    def __init__(
        self,
        client: MqttClient,
        server_name: str,
        *,
        timeout: float = 10.0,
        qos: int = 1,
    ) -> None:
        """Prepare the transport; ``server_name`` is validated (spec §1.2)."""
        self.client = client
        self.client_id = client.client_id
        self.server_name = validate_server_name(server_name)
        self.timeout = timeout
        self.qos = qos
        self.server_id: str | None = None
        self._props = _properties(CLIENT_COMPONENT, self.client_id)
        self._subscriptions: list[Subscription] = []
        self._pump: asyncio.Task[None] | None = None
        self._streams: list[Any] = []

    @staticmethod
    def client_will(client_id: str) -> Will:
        """The client presence will ``notifications/disconnected`` (spec §1.3, §1.5 "Shutdown")."""
        return Will(
            client_presence_topic(client_id),
            _DISCONNECTED_PAYLOAD,
            qos=1,
            properties=_properties(CLIENT_COMPONENT, client_id),
        )

    async def _find_server(self) -> str:
        found: dict[str, bool] = {}
        event = asyncio.Event()

        def on_presence(message: Message) -> None:
            server_id = message.topic.split("/")[2]
            found[server_id] = bool(message.payload)
            if message.payload:
                event.set()

        subscription = self.client.subscribe(
            f"$mcp-server/presence/+/{self.server_name}",
            on_presence,
            SubscribeOptions(qos=1),
        )
        try:
            async with asyncio.timeout(self.timeout):
                await subscription.wait_granted()
                await event.wait()
        except TimeoutError:
            raise LookupError(
                f"server-name {self.server_name!r} not found within {self.timeout:g} s"
            ) from None
        finally:
            subscription.cancel()
        return random.choice([sid for sid, online in found.items() if online])

    async def __aenter__(self) -> tuple[ReadStream, WriteStream]:
        """Discover, subscribe, and return the streams for ``mcp.ClientSession``.

        Raises:
            LookupError: no server announces the server-name within ``timeout``.

        """
        server_id = self.server_id = await self._find_server()
        to_session, read = anyio.create_memory_object_stream[
            SessionMessage | Exception
        ](BUFFER)
        write, from_session = anyio.create_memory_object_stream[SessionMessage](BUFFER)
        self._streams = [to_session, read, write, from_session]

        def on_message(message: Message) -> None:
            parsed, _error = _parse(message.payload)
            if parsed is None:
                _LOGGER.debug("malformed message from %s dropped", server_id)
                return
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                to_session.send_nowait(SessionMessage(parsed))

        options = SubscribeOptions(qos=self.qos, no_local=True)
        rpc = rpc_topic(self.client_id, server_id, self.server_name)
        self._subscriptions = [
            self.client.subscribe(rpc, on_message, options),
            self.client.subscribe(
                capability_topic(server_id, self.server_name), on_message, options
            ),
        ]
        async with asyncio.timeout(self.timeout):
            await asyncio.gather(*(s.wait_granted() for s in self._subscriptions))

        async def pump() -> None:
            topic = control_topic(server_id, self.server_name)
            async for out in from_session:
                try:
                    self.client.publish(
                        topic, _dump(out.message), qos=self.qos, properties=self._props
                    )
                except MqttError as err:
                    _LOGGER.debug("MCP-over-MQTT publish failed: %s", err)
                topic = rpc

        self._pump = asyncio.get_running_loop().create_task(pump())
        return read, write

    async def __aexit__(self, *_exc: object) -> None:
        """Say ``notifications/disconnected`` on the client presence topic and unsubscribe (spec §1.5 "Shutdown")."""
        with contextlib.suppress(MqttError):
            self.client.publish(
                client_presence_topic(self.client_id),
                _DISCONNECTED_PAYLOAD,
                qos=self.qos,
                properties=self._props,
            )
        for subscription in self._subscriptions:
            subscription.cancel()
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait({self._pump})
        for stream in self._streams:
            stream.close()
