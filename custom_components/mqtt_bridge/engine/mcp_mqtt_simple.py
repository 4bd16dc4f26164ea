"""MCP over MQTT for simple devices: one request topic, MQTT 5 Response Topic and Correlation Data.

The second transport layout of issue 7 ("for simple devices"), next to the
specification layout of :mod:`.mcp_mqtt`. A device that can publish and
subscribe but cannot run the MCP lifecycle (no ``initialize``, no presence, no
per-client topics) sends plain JSON-RPC requests and gets the answers back.

Topics (``request_topic`` is configured, e.g. ``mcp/simple/time/request``):

* ``{request_topic}``: devices publish JSON-RPC requests and notifications
  here, each request with the MQTT 5 **Response Topic** property (MQTT 5
  §4.10 "Request / Response") and optionally **Correlation Data**. The bridge
  subscribes this topic only (without No Local, so a client sharing the
  bridge's MQTT connection works too).
* the Response Topic of the request: the JSON-RPC response, with the device's
  original id and its Correlation Data echoed; also the
  ``notifications/progress`` of the device's requests (without Correlation
  Data). :class:`SimpleMcpMqttClient` uses ``{request_topic}/response/{client-id}``.
* ``{request_topic}/notifications``: every other server notification
  (``notifications/message`` logging, ``notifications/*/list_changed``,
  ``notifications/resources/updated``, …), for any device that subscribes it.

Every PUBLISH of the bridge carries the user properties ``MCP-COMPONENT-TYPE:
mcp-server`` and ``MCP-MQTT-CLIENT-ID: {the bridge's MQTT client id}`` (as in
the specification layout, ``mcp-over-mqtt.md`` §1.4); QoS is ``qos`` for the
subscription and every publish.

One shared upstream MCP session serves all devices: the ``handler`` (the same
:data:`~.mcp_mqtt.SessionHandler` as :class:`~.mcp_mqtt.McpMqttServer`'s, e.g.
``StdioHost.serve_session``, so one child process) runs in one task. The
bridge initializes it itself (MCP "Lifecycle": ``initialize`` with
``client_info`` and no client capabilities, then ``notifications/initialized``)
and keeps the answer; a device's own ``initialize`` is answered locally from
that cached result and its ``notifications/initialized`` is dropped.

Id namespacing (JSON-RPC 2.0 §4: ids are only unique per client): every
device request gets a fresh bridge id ``"sd-{n}"`` (a counter); a map from it
back to (Response Topic, Correlation Data, original id) restores the id on the
answer, so two devices that both use id 1 never collide. A progress token in
``params._meta.progressToken`` is replaced by the same bridge id (MCP
"Progress": tokens must be unique across active requests), and a device's
``notifications/cancelled`` has its ``requestId`` mapped the same way (looked
up by its Response Topic and the original id; the request is then forgotten
without an answer, MCP "Cancellation").

Errors (JSON-RPC 2.0 §5.1 codes) published to the device:

* not JSON → ``-32700`` with id null; JSON but not a JSON-RPC 2.0 request or
  notification (a batch, a bad id, bad params) → ``-32600``; counted in
  ``stats.parse_errors``, on the message's Response Topic if it has one;
* no Response Topic (or one that is not a valid topic name, or the request
  topic itself) on a request, or on a ``notifications/cancelled`` (the
  cancelled request is looked up by it) → dropped with a warning, counted in
  ``stats.no_response_topic``: there is nowhere to answer; other
  notifications do not need one;
* no answer within ``request_timeout`` seconds → ``-32001 "request timed
  out"``; the map entry is freed and the upstream server gets a
  ``notifications/cancelled`` for it;
* more than ``max_clients`` response topics with requests in flight, or more
  than ``max_pending`` requests in flight → ``-32000``;
* the upstream session ended (the handler returned or raised, e.g. its child
  died for good) → ``-32603`` for the requests it had; the handler is started
  again after a :class:`~.backoff.Backoff` delay and re-initialized; requests
  that arrive meanwhile wait for it (or time out). ``StdioHost`` restarts a
  dead child itself and answers its in-flight requests with ``-32603``;
* the bridge stops (:meth:`SimpleMcpMqttServer.run` cancelled) → ``-32603
  "MCP bridge stopped"`` for every request still waiting.

Server→client requests (sampling, elicitation, roots) cannot be answered by a
simple device: the bridge answers them upstream with ``-32601`` (counted in
``stats.server_requests``); a server ``ping`` is answered with an empty result.
Device responses are dropped (there is nothing they could answer).

Payloads: the handler interface carries ``SessionMessage`` objects, so each
device payload is parsed once (``json.loads``, ids rewritten in the dict, one
pydantic validation) and each upstream message is serialised once (a response
with ``model_copy`` of the id only); nothing else is rewritten.

:class:`SimpleMcpMqttClient` is a small request/response client for tests and
scripts. This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
import contextlib
from dataclasses import dataclass
import itertools
import json
import logging
import time
from typing import Any, Final, Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.shared.message import SessionMessage
from pydantic import TypeAdapter, ValidationError

from .backoff import Backoff
from .mcp_mqtt import (
    BUFFER,
    CLIENT_COMPONENT,
    CLIENT_ID,
    COMPONENT_TYPE,
    INVALID_REQUEST,
    PARSE_ERROR,
    SERVER_COMPONENT,
    SESSION_CLOSE_GRACE,
    SESSION_LIMIT,
    SessionHandler,
)
from .mqtt_client import Message, MqttClient, MqttError, PublishProperties
from .subscriptions import SubscribeOptions, Subscription
from .topics import topic_name_problem, validate_topic_name

_LOGGER = logging.getLogger(__name__)

#: JSON-RPC 2.0 §5.1 "Method not found": the answer to server→client requests.
METHOD_NOT_FOUND: Final = -32601
#: JSON-RPC 2.0 §5.1 "Internal error": the upstream session ended.
INTERNAL_ERROR: Final = -32603
#: A server error code (JSON-RPC 2.0 §5.1 reserves -32000..-32099): no answer in time.
REQUEST_TIMEOUT: Final = -32001
#: Prefix of the bridge's namespaced JSON-RPC ids and progress tokens.
ID_PREFIX: Final = "sd-"
#: Sub-topic of ``request_topic`` for server notifications not tied to a request.
NOTIFICATIONS_SUFFIX: Final = "/notifications"
#: The protocol version the bridge asks for (supported by mcp 1.12 and 2.x servers).
DEFAULT_PROTOCOL_VERSION: Final = "2025-06-18"
DEFAULT_CLIENT_INFO: Final[Mapping[str, str]] = {
    "name": "mqtt-bridge-simple",
    "version": "1.0",
}
#: Seconds an upstream session must have run before the restart backoff starts over.
HEALTHY_AFTER: Final = 30.0

_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)

type RequestId = str | int


def notifications_topic(request_topic: str) -> str:
    """The topic of server notifications not tied to one request: ``{request_topic}/notifications``."""
    return request_topic + NOTIFICATIONS_SUFFIX


def request_topic_problem(topic: str) -> str | None:
    """Why ``topic`` cannot be a simple-device request topic, or ``None``.

    It must be a topic name (no ``+`` or ``#``, MQTT 5 §4.7.1) with room for
    its ``/notifications`` sub-topic, and not start with ``$`` (MQTT 5 §4.7.2
    reserves those for the broker: ``$SYS/`` is the broker's and ``$share/``
    would be subscribed as a shared subscription). The reason is a short
    English phrase, e.g. ``"wildcard"`` or ``"it starts with $"``; the Home
    Assistant form and ``mqtt-bridge-mcp serve --request-topic`` use it.
    """
    if topic.startswith("$"):
        return "it starts with $"
    problem = topic_name_problem(topic) or topic_name_problem(
        notifications_topic(topic)
    )
    return None if problem is None else problem.value.replace("_", " ")


def _error_payload(request_id: RequestId | None, code: int, text: str) -> bytes:
    """A JSON-RPC 2.0 error response (JSON-RPC 2.0 §5.1)."""
    return json.dumps(
        {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": text}}
    ).encode()


def _is_id(value: Any) -> bool:
    """Whether ``value`` is a valid JSON-RPC request id for MCP (a string or an integer)."""
    return isinstance(value, str | int) and not isinstance(value, bool)


def _root(message: Any) -> Any:
    """The concrete JSON-RPC model (mcp 1.x wraps it in a ``RootModel``)."""
    return getattr(message, "root", message)


def _session_message(body: dict[str, Any]) -> SessionMessage:
    """Validate a JSON-RPC dict into a ``SessionMessage`` (raises ``ValidationError``)."""
    return SessionMessage(_MESSAGE_ADAPTER.validate_python(body))


@dataclass
class SimpleMcpMqttStats:
    """Counters of one :class:`SimpleMcpMqttServer`.

    ``requests``: valid device requests (also those answered locally);
    ``responses``: answers published to devices (results and errors);
    ``errors``: error answers among them; ``notifications``: device
    notifications passed upstream; ``server_notifications``: server
    notifications published; ``parse_errors``: device payloads that are not
    JSON or not JSON-RPC; ``no_response_topic``: requests without a usable
    Response Topic; ``unknown_responses``: upstream answers to no pending
    request (late after a timeout, or cancelled); ``timeouts``; ``rejected``:
    requests refused by ``max_clients`` / ``max_pending`` or a full buffer;
    ``server_requests``: server→client requests answered with -32601;
    ``dropped``: device responses, cancellations of unknown requests and
    progress for unknown tokens; ``publish_errors``: publishes that failed;
    ``sessions_started``: upstream handler starts; ``restarts``: starts after
    the first; ``handler_failures``: handler runs that raised or did not
    initialize.
    """

    requests: int = 0
    responses: int = 0
    errors: int = 0
    notifications: int = 0
    server_notifications: int = 0
    parse_errors: int = 0
    no_response_topic: int = 0
    unknown_responses: int = 0
    timeouts: int = 0
    rejected: int = 0
    server_requests: int = 0
    dropped: int = 0
    publish_errors: int = 0
    sessions_started: int = 0
    restarts: int = 0
    handler_failures: int = 0


@dataclass(slots=True)
class _Pending:
    """A device request waiting for its answer, keyed by its bridge id."""

    response_topic: str
    correlation_data: bytes | None
    request_id: RequestId
    origin: tuple[str, str]
    progress_token: RequestId | None
    timer: asyncio.TimerHandle | None = None
    sent: bool = False  # given to the current upstream session
    local_initialize: bool = False  # answered from the cached initialize result


class SimpleMcpMqttServer:
    """Serves one upstream MCP session to simple devices on one request topic.

    Run :meth:`run` as a task; cancel it to stop (requests in flight then get
    ``-32603``). See the module docstring for topics, id namespacing and errors.
    """

    def __init__(
        self,
        client: MqttClient,
        request_topic: str,
        *,
        handler: SessionHandler,
        qos: int = 1,
        request_timeout: float = 60.0,
        max_clients: int = 256,
        max_pending: int = BUFFER,
        client_info: Mapping[str, Any] | None = None,
        protocol_version: str = DEFAULT_PROTOCOL_VERSION,
        init_timeout: float = 30.0,
        restart_backoff: Backoff | None = None,
        close_grace: float = SESSION_CLOSE_GRACE,
        session_id: str | None = None,
    ) -> None:
        """Prepare the bridge.

        ``request_topic`` must be a valid topic name (``TopicError``, a
        ``ValueError``, otherwise). Times are in seconds: ``request_timeout``
        per device request, ``init_timeout`` for the upstream ``initialize``,
        ``close_grace`` for an ended handler to stop before it is cancelled.
        ``client_info`` is the MCP ``Implementation`` (``name``, ``version``)
        the bridge initializes with; ``restart_backoff`` is a template for
        the restart delays (default ``Backoff(base=1.0, cap=60.0)``);
        ``session_id`` is the client id passed to the handler (default
        ``simple:{request_topic}``).
        """
        self.client = client
        self.request_topic = validate_topic_name(request_topic)
        self.notifications_topic = notifications_topic(request_topic)
        self.handler = handler
        self.qos = qos
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.client_info = dict(client_info or DEFAULT_CLIENT_INFO)
        self.protocol_version = protocol_version
        self.init_timeout = init_timeout
        self.close_grace = close_grace
        self.session_id = session_id or f"simple:{request_topic}"
        self.stats = SimpleMcpMqttStats()
        self._backoff = restart_backoff or Backoff(base=1.0, cap=60.0)
        self._user_properties = (
            (COMPONENT_TYPE, SERVER_COMPONENT),
            (CLIENT_ID, client.client_id),
        )
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._by_origin: dict[tuple[str, str], str] = {}
        self._clients: dict[str, int] = {}
        self._backlog: list[tuple[str | None, SessionMessage]] = []
        self._to_handler: MemoryObjectSendStream[SessionMessage | Exception] | None = (
            None
        )
        self._init_result: dict[str, Any] | None = None
        self._init_id: str | None = None
        self._init_future: asyncio.Future[Any] | None = None
        self._ready = asyncio.Event()

    # -- public state --------------------------------------------------------------

    @property
    def initialize_result(self) -> dict[str, Any] | None:
        """The upstream server's ``InitializeResult`` (a JSON dict), once initialized."""
        return self._init_result

    @property
    def pending_requests(self) -> int:
        """Device requests waiting for an answer now."""
        return len(self._pending)

    @property
    def ready(self) -> bool:
        """Whether an initialized upstream session takes requests now."""
        return self._ready.is_set()

    async def wait_ready(self) -> None:
        """Wait until the request topic is subscribed and the upstream session initialized."""
        await self._ready.wait()

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until cancelled: subscribe the request topic, run and restart the upstream session."""
        subscription: Subscription = self.client.subscribe(
            self.request_topic, self._on_message, SubscribeOptions(qos=self.qos)
        )
        backoff = Backoff(
            base=self._backoff.base, cap=self._backoff.cap, rng=self._backoff.rng
        )
        try:
            await subscription.wait_granted()
            while True:
                started = time.monotonic()
                initialized = await self._run_session()
                if initialized and time.monotonic() - started >= HEALTHY_AFTER:
                    backoff.reset()
                delay = backoff.next_delay()
                _LOGGER.warning(
                    "simple MCP bridge %s: upstream session ended; restarting in %.1f s",
                    self.request_topic,
                    delay,
                )
                await asyncio.sleep(delay)
                self.stats.restarts += 1
        finally:
            subscription.cancel()
            for bridge_id in list(self._pending):
                self._answer_error(bridge_id, INTERNAL_ERROR, "MCP bridge stopped")
            self._backlog.clear()

    async def _run_session(self) -> bool:
        """One run of the handler: start, initialize, serve until it ends; True if it initialized."""
        to_handler, read = anyio.create_memory_object_stream[
            SessionMessage | Exception
        ](BUFFER)
        write, from_handler = anyio.create_memory_object_stream[SessionMessage](BUFFER)
        self.stats.sessions_started += 1
        loop = asyncio.get_running_loop()
        handler_task = loop.create_task(
            self._call_handler(read, write), name=f"simple MCP {self.request_topic}"
        )
        pump_task = loop.create_task(self._pump(from_handler))
        initialized = False
        try:
            initialized = await self._initialize(to_handler, handler_task)
            if initialized:
                self._to_handler = to_handler
                self._ready.set()
                self._flush_backlog()
                await asyncio.wait({handler_task})
            else:
                self.stats.handler_failures += 1
        finally:
            self._to_handler = None
            self._ready.clear()
            self._init_future = None
            to_handler.close()  # the handler sees its input end and stops
            if not handler_task.done():
                _done, running = await asyncio.wait(
                    {handler_task}, timeout=self.close_grace
                )
                if running:
                    handler_task.cancel()
                    await asyncio.wait({handler_task})
            write.close()
            await asyncio.wait({pump_task})
            read.close()
            from_handler.close()
            task = asyncio.current_task()
            stopping = task is not None and task.cancelling() > 0
            reason = "MCP bridge stopped" if stopping else "MCP server session ended"
            for bridge_id, entry in list(self._pending.items()):
                if entry.sent:
                    self._answer_error(bridge_id, INTERNAL_ERROR, reason)
        return initialized

    async def _call_handler(
        self,
        read: MemoryObjectReceiveStream[SessionMessage | Exception],
        write: MemoryObjectSendStream[SessionMessage],
    ) -> None:
        try:
            await self.handler(self.session_id, read, write)
        except Exception:
            self.stats.handler_failures += 1
            _LOGGER.exception(
                "simple MCP bridge %s: session handler failed", self.request_topic
            )
        finally:
            write.close()

    async def _initialize(
        self,
        to_handler: MemoryObjectSendStream[SessionMessage | Exception],
        handler_task: asyncio.Task[None],
    ) -> bool:
        """Initialize the upstream session (MCP "Lifecycle"); keep its result."""
        init_id = self._init_id = f"{ID_PREFIX}init-{self.stats.sessions_started}"
        future = self._init_future = asyncio.get_running_loop().create_future()
        to_handler.send_nowait(
            _session_message(
                {
                    "jsonrpc": "2.0",
                    "id": init_id,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": self.protocol_version,
                        "capabilities": {},
                        "clientInfo": self.client_info,
                    },
                }
            )
        )
        await asyncio.wait(
            {future, handler_task},
            timeout=self.init_timeout,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if not future.done():
            future.cancel()
            _LOGGER.warning(
                "simple MCP bridge %s: upstream session did not initialize",
                self.request_topic,
            )
            return False
        answer = future.result()
        result = getattr(answer, "result", None)
        if not isinstance(result, dict):
            _LOGGER.warning(
                "simple MCP bridge %s: initialize failed: %s",
                self.request_topic,
                getattr(answer, "error", answer),
            )
            return False
        self._init_result = result
        to_handler.send_nowait(
            _session_message({"jsonrpc": "2.0", "method": "notifications/initialized"})
        )
        return True

    def _flush_backlog(self) -> None:
        """Answer waiting device ``initialize`` requests, then forward what waited for the session."""
        for bridge_id, entry in list(self._pending.items()):
            if entry.local_initialize:
                self._answer_initialize(bridge_id)
        backlog, self._backlog = self._backlog, []
        for waiting_id, message in backlog:
            if waiting_id is None or waiting_id in self._pending:
                self._forward(waiting_id, message)

    # -- devices → upstream ----------------------------------------------------------

    def _on_message(self, message: Message) -> None:
        """A device message on the request topic (see the module docstring for the rules)."""
        props = message.properties
        response_topic = props.response_topic if props is not None else None
        correlation = props.correlation_data if props is not None else None
        if response_topic is not None and (
            topic_name_problem(response_topic) is not None
            or response_topic == self.request_topic
        ):
            _LOGGER.warning(
                "simple MCP bridge %s: unusable Response Topic %r",
                self.request_topic,
                response_topic,
            )
            response_topic = None
        try:
            body = json.loads(message.payload)
        except ValueError as err:
            self._invalid(
                response_topic, correlation, None, PARSE_ERROR, f"Parse error: {err}"
            )
            return
        if not isinstance(body, dict) or body.get("jsonrpc") != "2.0":
            self._invalid(
                response_topic,
                correlation,
                None,
                INVALID_REQUEST,
                "Invalid Request: not a JSON-RPC 2.0 object",
            )
            return
        method = body.get("method")
        if method is None and ("result" in body or "error" in body):
            self.stats.dropped += 1
            _LOGGER.debug("simple MCP bridge: a device response was dropped")
            return
        if not isinstance(method, str):
            request_id = body.get("id")
            self._invalid(
                response_topic,
                correlation,
                request_id if _is_id(request_id) else None,
                INVALID_REQUEST,
                "Invalid Request: no method",
            )
            return
        if "id" not in body:
            self._on_notification(response_topic, correlation, method, body)
            return
        if response_topic is None:
            self.stats.no_response_topic += 1
            _LOGGER.warning(
                "simple MCP bridge %s: request %r without a Response Topic dropped "
                "(nowhere to answer)",
                self.request_topic,
                method,
            )
            return
        request_id = body["id"]
        if not _is_id(request_id):
            self._invalid(
                response_topic,
                correlation,
                None,
                INVALID_REQUEST,
                "Invalid Request: the id must be a string or an integer",
            )
            return
        self._on_request(response_topic, correlation, request_id, method, body)

    def _invalid(
        self,
        response_topic: str | None,
        correlation: bytes | None,
        request_id: RequestId | None,
        code: int,
        text: str,
    ) -> None:
        self.stats.parse_errors += 1
        if response_topic is None:
            _LOGGER.warning(
                "simple MCP bridge %s: %s (no Response Topic to answer on)",
                self.request_topic,
                text,
            )
            return
        self._reply(
            response_topic, correlation, _error_payload(request_id, code, text), True
        )

    def _on_request(
        self,
        response_topic: str,
        correlation: bytes | None,
        request_id: RequestId,
        method: str,
        body: dict[str, Any],
    ) -> None:
        self.stats.requests += 1
        if method == "initialize" and self._init_result is not None:
            self._reply(
                response_topic,
                correlation,
                json.dumps(
                    {"jsonrpc": "2.0", "id": request_id, "result": self._init_result}
                ).encode(),
                False,
            )
            return
        refusal = None
        if len(self._pending) >= self.max_pending:
            refusal = f"too many requests in flight ({self.max_pending})"
        elif (
            response_topic not in self._clients
            and len(self._clients) >= self.max_clients
        ):
            refusal = f"too many clients with requests in flight ({self.max_clients})"
        if refusal is not None:
            self.stats.rejected += 1
            self._reply(
                response_topic,
                correlation,
                _error_payload(request_id, SESSION_LIMIT, refusal),
                True,
            )
            return
        bridge_id = f"{ID_PREFIX}{next(self._ids)}"
        token: RequestId | None = None
        params = body.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and _is_id(meta.get("progressToken")):
            token = meta["progressToken"]
            meta["progressToken"] = bridge_id
        body["id"] = bridge_id
        try:
            message = _session_message(body)
        except ValidationError:
            self._invalid(
                response_topic,
                correlation,
                request_id,
                INVALID_REQUEST,
                "Invalid Request: not a JSON-RPC request",
            )
            return
        origin = (response_topic, json.dumps(request_id))
        entry = _Pending(response_topic, correlation, request_id, origin, token)
        entry.timer = asyncio.get_running_loop().call_later(
            self.request_timeout, self._expire, bridge_id
        )
        self._pending[bridge_id] = entry
        self._by_origin[origin] = bridge_id
        self._clients[response_topic] = self._clients.get(response_topic, 0) + 1
        if method == "initialize":  # no cached result yet: answered once initialized
            entry.local_initialize = True
            return
        self._forward(bridge_id, message)

    def _on_notification(
        self,
        response_topic: str | None,
        correlation: bytes | None,
        method: str,
        body: dict[str, Any],
    ) -> None:
        if method == "notifications/initialized":
            return  # the bridge initialized the upstream session itself
        bridge_id: str | None = None
        if method == "notifications/cancelled":
            params = body.get("params")
            cancelled = params.get("requestId") if isinstance(params, dict) else None
            if response_topic is None:
                self.stats.no_response_topic += 1
                _LOGGER.warning(
                    "simple MCP bridge %s: notifications/cancelled without a "
                    "Response Topic dropped (it names the request)",
                    self.request_topic,
                )
                return
            bridge_id = self._by_origin.get((response_topic, json.dumps(cancelled)))
            if bridge_id is None or not isinstance(params, dict):
                self.stats.dropped += 1
                return
            entry = self._free(bridge_id)
            if entry is None or not entry.sent:
                return  # never reached the server: forgetting it is enough
            params["requestId"] = bridge_id
            bridge_id = None
        try:
            message = _session_message(body)
        except ValidationError:
            self._invalid(
                response_topic,
                correlation,
                None,
                INVALID_REQUEST,
                "Invalid Request: not a JSON-RPC notification",
            )
            return
        self.stats.notifications += 1
        self._forward(bridge_id, message)

    def _forward(self, bridge_id: str | None, message: SessionMessage) -> None:
        """Give a message to the upstream session, or keep it until one is initialized."""
        stream = self._to_handler
        if stream is None:
            if len(self._backlog) < self.max_pending:
                self._backlog.append((bridge_id, message))
                return
        else:
            try:
                stream.send_nowait(message)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                # the session is ending: the next one gets it
                self._backlog.append((bridge_id, message))
                return
            except anyio.WouldBlock:
                pass
            else:
                if bridge_id is not None:
                    self._pending[bridge_id].sent = True
                return
        self.stats.rejected += 1
        if bridge_id is None:
            self.stats.dropped += 1
            return
        self._answer_error(bridge_id, SESSION_LIMIT, "MCP bridge busy")

    def _send_upstream(self, body: dict[str, Any]) -> None:
        """Send a bridge-made message (answer, cancellation) to the current session."""
        stream = self._to_handler
        if stream is None:
            return
        with contextlib.suppress(
            anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError
        ):
            stream.send_nowait(_session_message(body))

    # -- pending requests ------------------------------------------------------------

    def _free(self, bridge_id: str) -> _Pending | None:
        """Forget a pending request (timer, origin map, client count); return it."""
        entry = self._pending.pop(bridge_id, None)
        if entry is None:
            return None
        if entry.timer is not None:
            entry.timer.cancel()
        if self._by_origin.get(entry.origin) == bridge_id:
            del self._by_origin[entry.origin]
        count = self._clients[entry.response_topic] - 1
        if count:
            self._clients[entry.response_topic] = count
        else:
            del self._clients[entry.response_topic]
        return entry

    def _answer_error(self, bridge_id: str, code: int, text: str) -> None:
        entry = self._free(bridge_id)
        if entry is not None:
            self._reply(
                entry.response_topic,
                entry.correlation_data,
                _error_payload(entry.request_id, code, text),
                True,
            )

    def _answer_initialize(self, bridge_id: str) -> None:
        entry = self._free(bridge_id)
        if entry is not None:
            self._reply(
                entry.response_topic,
                entry.correlation_data,
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": entry.request_id,
                        "result": self._init_result,
                    }
                ).encode(),
                False,
            )

    def _expire(self, bridge_id: str) -> None:
        """``request_timeout`` passed: answer -32001, tell the server the request is cancelled."""
        entry = self._pending.get(bridge_id)
        if entry is None:  # pragma: no cover - the timer is cancelled when freed
            return
        entry.timer = None
        self.stats.timeouts += 1
        self._answer_error(bridge_id, REQUEST_TIMEOUT, "request timed out")
        if entry.sent:
            self._send_upstream(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": bridge_id, "reason": "request timed out"},
                }
            )

    # -- upstream → devices ----------------------------------------------------------

    async def _pump(
        self, from_handler: MemoryObjectReceiveStream[SessionMessage]
    ) -> None:
        async for item in from_handler:
            try:
                self._on_upstream(item)
            except Exception:  # pragma: no cover - a bug must not stop the session
                _LOGGER.exception("simple MCP bridge: upstream message failed")

    def _on_upstream(self, item: SessionMessage) -> None:
        root = _root(item.message)
        method = getattr(root, "method", None)
        upstream_id = getattr(root, "id", None)
        if method is None:
            self._on_response(root, upstream_id)
        elif upstream_id is not None:
            self._on_server_request(method, upstream_id)
        elif method == "notifications/progress":
            self._on_progress(root)
        elif method == "notifications/cancelled":
            pass  # of a server->client request, answered already
        else:
            self.stats.server_notifications += 1
            self._publish(self.notifications_topic, self._dump(root), None)

    def _on_response(self, root: Any, upstream_id: Any) -> None:
        if upstream_id is not None and upstream_id == self._init_id:
            future = self._init_future
            if future is not None and not future.done():
                future.set_result(root)
            return
        entry = self._free(upstream_id) if isinstance(upstream_id, str) else None
        if entry is None:
            self.stats.unknown_responses += 1
            _LOGGER.debug("simple MCP bridge: answer to unknown id %r", upstream_id)
            return
        self._reply(
            entry.response_topic,
            entry.correlation_data,
            self._dump(root.model_copy(update={"id": entry.request_id})),
            getattr(root, "error", None) is not None,
        )

    def _on_server_request(self, method: str, upstream_id: RequestId) -> None:
        if method == "ping":
            self._send_upstream({"jsonrpc": "2.0", "id": upstream_id, "result": {}})
            return
        self.stats.server_requests += 1
        _LOGGER.debug("simple MCP bridge: server request %s refused", method)
        self._send_upstream(
            {
                "jsonrpc": "2.0",
                "id": upstream_id,
                "error": {
                    "code": METHOD_NOT_FOUND,
                    "message": f"{method} is not available: a simple MQTT device "
                    "cannot answer server requests",
                },
            }
        )

    def _on_progress(self, root: Any) -> None:
        body = root.model_dump(by_alias=True, mode="json", exclude_none=True)
        params = body.get("params") or {}
        token = params.get("progressToken")
        entry = self._pending.get(token) if isinstance(token, str) else None
        if entry is None or entry.progress_token is None:
            self.stats.dropped += 1
            return
        params["progressToken"] = entry.progress_token
        self.stats.server_notifications += 1
        self._publish(entry.response_topic, json.dumps(body).encode(), None)

    @staticmethod
    def _dump(root: Any) -> bytes:
        text: str = root.model_dump_json(by_alias=True, exclude_none=True)
        return text.encode()

    def _reply(
        self, topic: str, correlation: bytes | None, payload: bytes, error: bool
    ) -> None:
        self.stats.responses += 1
        self.stats.errors += error
        self._publish(topic, payload, correlation)

    def _publish(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        try:
            self.client.publish(
                topic,
                payload,
                qos=self.qos,
                properties=PublishProperties(
                    user_properties=self._user_properties,
                    correlation_data=correlation,
                ),
            )
        except MqttError as err:
            self.stats.publish_errors += 1
            _LOGGER.debug("simple MCP bridge: publish on %s failed: %s", topic, err)


# --------------------------------------------------------------------------- #
# Client side
# --------------------------------------------------------------------------- #


class SimpleMcpMqttClient:
    """A tiny request/response client of :class:`SimpleMcpMqttServer` (tests, scripts).

    Use as an async context manager (subscribes its response topic
    ``{request_topic}/response/{client_id}``). Requests carry that Response
    Topic and a fresh Correlation Data; an answer is matched by its
    Correlation Data. Messages on the response topic without known
    Correlation Data (progress notifications) and, with
    ``server_notifications=True``, those on ``{request_topic}/notifications``
    go to ``on_notification`` as JSON dicts.
    """

    def __init__(
        self,
        client: MqttClient,
        request_topic: str,
        *,
        client_id: str | None = None,
        qos: int = 1,
        on_notification: Callable[[dict[str, Any]], None] | None = None,
        server_notifications: bool = False,
    ) -> None:
        """Prepare the client; ``client_id`` (default: the MqttClient's id) names the response topic."""
        self.client = client
        self.request_topic = validate_topic_name(request_topic)
        self.client_id = client_id or client.client_id
        self.response_topic = validate_topic_name(
            f"{request_topic}/response/{self.client_id}"
        )
        self.qos = qos
        self.on_notification = on_notification
        self.server_notifications = server_notifications
        self._ids = itertools.count(1)
        self._correlations = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._subscriptions: list[Subscription] = []
        self._props = ((COMPONENT_TYPE, CLIENT_COMPONENT), (CLIENT_ID, self.client_id))

    async def __aenter__(self) -> Self:
        """Subscribe the response (and notifications) topic and wait for the SUBACK."""
        options = SubscribeOptions(qos=self.qos)
        self._subscriptions = [
            self.client.subscribe(self.response_topic, self._on_message, options)
        ]
        if self.server_notifications:
            self._subscriptions.append(
                self.client.subscribe(
                    notifications_topic(self.request_topic), self._on_message, options
                )
            )
        await asyncio.gather(*(s.wait_granted() for s in self._subscriptions))
        return self

    async def __aexit__(self, *_exc: object) -> None:
        """Unsubscribe; requests still waiting raise ``ConnectionError``."""
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions = []
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("client closed"))
        self._waiting.clear()

    def _on_message(self, message: Message) -> None:
        try:
            body = json.loads(message.payload)
        except ValueError:
            _LOGGER.debug("simple MCP client: malformed answer dropped")
            return
        if not isinstance(body, dict):
            return
        props = message.properties
        correlation = props.correlation_data if props is not None else None
        future = self._waiting.pop(correlation, None) if correlation else None
        if future is not None:
            if not future.done():
                future.set_result(body)
        elif self.on_notification is not None:
            self.on_notification(body)

    def _publish(self, body: dict[str, Any], correlation: bytes | None) -> None:
        self.client.publish(
            self.request_topic,
            json.dumps(body).encode(),
            qos=self.qos,
            properties=PublishProperties(
                user_properties=self._props,
                response_topic=self.response_topic,
                correlation_data=correlation,
            ),
        )

    async def request(
        self,
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        timeout: float = 30.0,
        request_id: RequestId | None = None,
    ) -> dict[str, Any]:
        """Send a request and return the JSON-RPC response dict (``result`` or ``error``).

        ``request_id`` defaults to a counter from 1 per client. Raises
        ``TimeoutError`` after ``timeout`` seconds, ``MqttError`` if it cannot
        be published.
        """
        correlation = str(next(self._correlations)).encode()
        body: dict[str, Any] = {
            "jsonrpc": "2.0",
            "id": next(self._ids) if request_id is None else request_id,
            "method": method,
        }
        if params is not None:
            body["params"] = dict(params)
        future: asyncio.Future[dict[str, Any]] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiting[correlation] = future
        try:
            self._publish(body, correlation)
            async with asyncio.timeout(timeout):
                return await future
        finally:
            self._waiting.pop(correlation, None)

    def notify(self, method: str, params: Mapping[str, Any] | None = None) -> None:
        """Send a notification (e.g. ``notifications/cancelled`` with the original ``requestId``)."""
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            body["params"] = dict(params)
        self._publish(body, None)
