"""A client of one MCP server reached over MQTT: lazy, persistent, with deadlines.

:class:`RemoteMcpServer` is what a consumer (the Home Assistant LLM API of
``remote_llm.py``) uses to list and call the tools of one announced server
(:class:`~.mcp_mqtt.ServerPresence`). Spec references are to the
MCP-over-MQTT specification (``shared/reference/mcp-over-mqtt.md`` §1).

The MCP session is opened on first use and kept:

* its own :class:`~.mqtt_client.MqttClient` with a fresh client id per
  initialization (the mcp-client-id must change on every new initialization,
  §1.2) and the client presence will ``notifications/disconnected``
  (:meth:`~.mcp_mqtt.McpMqttClientTransport.client_will`, §1.3);
* :class:`~.mcp_mqtt.McpMqttClientTransport` + a stock ``mcp.ClientSession``,
  entered and exited by ONE task (anyio cancel scopes must be exited in the
  task that entered them, ``mcp-over-mqtt.md`` §3); callers talk to the
  session from their own tasks, which the SDK allows;
* the transport targets the presence's server-id and ends the session when
  that instance's presence is cleared or it says ``notifications/disconnected``
  (§1.5 "Discovery", "Shutdown"); a relay between the transport and the
  session notices the end of its input, and the next use opens a new
  session. Closing a session ends the relay's output first, so requests in
  flight fail at once ("Connection closed") instead of waiting for their
  deadline.

Opening (broker connection, discovery, ``initialize``) is bounded by
``connect_timeout`` seconds, every request by ``call_timeout`` seconds. A
request that timed out makes the session suspect: the next use pings it
first (the spec's health check, §1.5 "Health", at most
``min(10 s, call_timeout)``) and opens a new one when there is no answer.
Any failure raises :class:`RemoteMcpError` (:class:`RemoteMcpTimeout`, also a
``TimeoutError``, for deadlines) with a message naming the server.

``list_tools`` results are cached until the server sends
``notifications/tools/list_changed`` (which the spec routes over the
server's capability topic, §1.5 "Changes") or a new session is opened.

Targeting: the session is opened with the presence's server-id
(:class:`~.mcp_mqtt.McpMqttClientTransport` ``server_id``), so a server-name
announced by several instances reaches the one this object stands for.

Works on ``mcp`` 1.12 and 2.x (SDK differences handled here: the
``list_tools`` pagination arguments and ``call_tool``'s result union).
This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
import contextlib
from dataclasses import dataclass
import inspect
import logging
import secrets
import ssl
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import ClientSession, types
from mcp.shared.message import SessionMessage

from .mcp_mqtt import (
    BUFFER,
    CLIENT_COMPONENT,
    McpMqttClientTransport,
    ServerPresence,
    connect_user_properties,
)
from .mqtt_client import MqttClient, MqttSettings

_LOGGER = logging.getLogger(__name__)

# mcp 2.x: list_tools(*, params=PaginatedRequestParams(cursor=...)); 1.x: list_tools(cursor).
_PAGINATION_BY_PARAMS: Final = (
    "params" in inspect.signature(ClientSession.list_tools).parameters
)
# Spec §1.5 "Health": ping timeout 10 s.
PING_TIMEOUT: Final = 10.0
# Seconds a session task may take to close before it is cancelled.
CLOSE_TIMEOUT: Final = 5.0
# The steps of opening a session, as error messages name them.
STEP_CONNECT: Final = "connecting to the broker"
STEP_DISCOVER: Final = "finding the server's presence"
STEP_INITIALIZE: Final = "initializing the MCP session"
# Pages of tools/list followed before giving up on a server's cursors.
MAX_TOOL_PAGES: Final = 100

type TaskFactory = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


class RemoteMcpError(Exception):
    """The remote MCP server could not be reached or answered with an error."""


class RemoteMcpTimeout(RemoteMcpError, TimeoutError):
    """The remote MCP server did not answer within the deadline."""


@dataclass(slots=True)
class RemoteStats:
    """Counters of one :class:`RemoteMcpServer`.

    ``sessions``: sessions opened; ``open_failures``: sessions that could not
    be opened; ``calls``: tool calls; ``errors``: failed calls and listings
    (timeouts included); ``timeouts``: requests past their deadline;
    ``tool_lists``: ``tools/list`` round trips; ``list_changed``:
    ``notifications/tools/list_changed`` received; ``disconnects``: sessions
    the server side ended (presence cleared, ``notifications/disconnected``,
    connection lost); ``pings_failed``: suspect sessions that did not answer a
    ping.
    """

    sessions: int = 0
    open_failures: int = 0
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    tool_lists: int = 0
    list_changed: int = 0
    disconnects: int = 0
    pings_failed: int = 0


def _default_task_factory(
    coro: Coroutine[Any, Any, None], name: str
) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro, name=name)


class _Session:
    """One MCP session: its task, its streams, whether it may be used."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.stop = asyncio.Event()
        self.session: ClientSession | None = None
        self.error: RemoteMcpError | None = None
        self.input: MemoryObjectSendStream[SessionMessage | Exception] | None = None
        self.task: asyncio.Task[None] | None = None
        self.ended = False  # the server left or the input ended
        self.suspect = False  # a request timed out: ping before the next use
        self.step = STEP_CONNECT  # what opening the session is doing

    @property
    def usable(self) -> bool:
        return (
            self.session is not None
            and not self.ended
            and not self.stop.is_set()
            and self.task is not None
            and not self.task.done()
        )

    def end_input(self) -> None:
        """End the session's input: requests in flight fail with "Connection closed"."""
        self.ended = True
        if self.input is not None:
            self.input.close()


class RemoteMcpServer:
    """The MCP client of one server announced on the broker (see the module text)."""

    def __init__(
        self,
        settings: MqttSettings,
        presence: ServerPresence,
        *,
        client_id_prefix: str,
        call_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        qos: int = 1,
        tls_context: ssl.SSLContext | None = None,
        task_factory: TaskFactory | None = None,
    ) -> None:
        """Prepare the client; nothing connects until the first request.

        ``client_id_prefix``: each session's MQTT client id is
        ``<prefix>-<8 hex digits>``. Timeouts in seconds. ``tls_context``: a
        ready context for TLS settings (else built per session, in an
        executor). ``task_factory(coro, name)`` creates the session tasks
        (default: ``loop.create_task``).
        """
        self.settings = settings
        self.presence = presence
        self.client_id_prefix = client_id_prefix
        self.call_timeout = call_timeout
        self.connect_timeout = connect_timeout
        self.qos = qos
        self.tls_context = tls_context
        self.stats = RemoteStats()
        self._task_factory = task_factory or _default_task_factory
        self._current: _Session | None = None
        self._lock = asyncio.Lock()
        self._tools: list[types.Tool] | None = None
        self._generation = 0  # bumped when the cached tools become stale
        self._closed = False

    @property
    def label(self) -> str:
        """The server in messages: ``server-name (server-id)``."""
        return f"{self.presence.server_name} ({self.presence.server_id})"

    @property
    def connected(self) -> bool:
        """Whether an MCP session is open and usable."""
        return self._current is not None and self._current.usable

    # -- public --------------------------------------------------------------------

    async def list_tools(self) -> list[types.Tool]:
        """The server's tools (all pages), cached until they change.

        Raises:
            RemoteMcpError: the server is unreachable or the listing failed
                (:class:`RemoteMcpTimeout` past ``call_timeout``).

        """
        if self._tools is not None and self.connected:
            return list(self._tools)
        session = await self._session()
        generation = self._generation
        try:
            async with asyncio.timeout(self.call_timeout):
                tools = await self._list_all(session)
        except TimeoutError:
            raise self._timed_out("tools/list") from None
        except Exception as err:
            self.stats.errors += 1
            raise RemoteMcpError(
                f"MCP server {self.label}: listing the tools failed: {err}"
            ) from err
        if generation == self._generation:
            self._tools = tools
        return list(tools)

    async def call_tool(
        self, name: str, arguments: Mapping[str, Any] | None = None
    ) -> types.CallToolResult:
        """Call tool ``name`` with ``arguments``; the result may have ``isError`` set.

        Raises:
            RemoteMcpError: unreachable server, an error answer (e.g. unknown
                tool), a connection closed during the call;
                :class:`RemoteMcpTimeout` past ``call_timeout``.

        """
        self.stats.calls += 1
        session = await self._session()
        try:
            async with asyncio.timeout(self.call_timeout):
                result: Any = await session.call_tool(name, dict(arguments or {}))
        except TimeoutError:
            raise self._timed_out(f"tool {name!r}") from None
        except Exception as err:
            self.stats.errors += 1
            raise RemoteMcpError(
                f"MCP server {self.label}: tool {name!r} failed: {err}"
            ) from err
        if not isinstance(result, types.CallToolResult):
            self.stats.errors += 1
            raise RemoteMcpError(
                f"MCP server {self.label}: tool {name!r} answered with an "
                f"unsupported result ({type(result).__name__})"
            )
        return result

    async def close(self) -> None:
        """End the session (if any); later requests raise :class:`RemoteMcpError`.

        Requests in flight fail ("Connection closed"); a session still opening
        is cancelled.
        """
        self._closed = True
        current, self._current = self._current, None
        await self._drop(current)

    # -- sessions ------------------------------------------------------------------

    def _timed_out(self, what: str) -> RemoteMcpTimeout:
        self.stats.errors += 1
        self.stats.timeouts += 1
        if self._current is not None:
            self._current.suspect = True
        return RemoteMcpTimeout(
            f"MCP server {self.label}: {what} did not answer within "
            f"{self.call_timeout:g} s"
        )

    async def _session(self) -> ClientSession:
        """The open session; opens one (serialised) when there is none usable."""
        if self._closed:
            raise RemoteMcpError(f"MCP server {self.label}: the client is closed")
        async with self._lock:
            current = self._current
            if current is not None and current.usable and current.suspect:
                await self._check(current)
            if current is not None and current.opened.is_set() and not current.usable:
                self._current = None
                await self._drop(current)
                current = None
            if current is None:
                current = self._current = self._open()
            await current.opened.wait()
            if current.error is not None or current.session is None or self._closed:
                if self._current is current:
                    self._current = None
                await self._drop(current)
                raise current.error or RemoteMcpError(
                    f"MCP server {self.label}: the client is closed"
                )
            return current.session

    async def _check(self, current: _Session) -> None:
        """Ping a suspect session (spec §1.5 "Health"); end it without an answer."""
        assert current.session is not None
        try:
            async with asyncio.timeout(min(PING_TIMEOUT, self.call_timeout)):
                await current.session.send_ping()
        except Exception as err:  # TimeoutError, connection closed
            self.stats.pings_failed += 1
            _LOGGER.debug("MCP server %s: no ping answer (%r)", self.label, err)
            current.end_input()
        else:
            current.suspect = False

    def _open(self) -> _Session:
        state = _Session()
        state.task = self._task_factory(
            self._serve(state), f"MCP client of {self.label}"
        )
        return state

    async def _drop(self, state: _Session | None) -> None:
        """Stop a session's task (it exits its contexts itself) and wait for it."""
        if state is None or state.task is None:
            return
        task = state.task
        state.end_input()
        if state.opened.is_set():
            await asyncio.sleep(0)  # let the session fail its requests in flight
            state.stop.set()
        else:
            task.cancel()
        _done, pending = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        if pending:
            task.cancel()
            await asyncio.wait({task})
        if not state.opened.is_set():  # cancelled before it ever ran
            state.error = RemoteMcpError(
                f"MCP server {self.label}: the session was closed while opening"
            )
            state.opened.set()

    async def _serve(self, state: _Session) -> None:
        """The session task: open, serve until stopped, close in this same task."""
        client_id = f"{self.client_id_prefix}-{secrets.token_hex(4)}"
        client = MqttClient(
            self.settings,
            client_id=client_id,
            will=McpMqttClientTransport.client_will(client_id),
            tls_context=self.tls_context,
            connect_user_properties=connect_user_properties(CLIENT_COMPONENT),
        )
        client_task = asyncio.get_running_loop().create_task(
            client.run(), name=f"MQTT client {client_id}"
        )
        try:
            await self._run_session(state, client)
        except Exception as err:
            if not state.opened.is_set():
                self.stats.open_failures += 1
                state.error = self._open_error(err, client, state.step)
            else:
                _LOGGER.debug("MCP session of %s ended: %r", self.label, err)
        finally:
            state.ended = True
            if not state.opened.is_set() and state.error is None:
                state.error = RemoteMcpError(
                    f"MCP server {self.label}: the session was closed while opening"
                )
            state.opened.set()
            client_task.cancel()
            await asyncio.wait({client_task})

    def _open_error(
        self, err: Exception, client: MqttClient, step: str
    ) -> RemoteMcpError:
        """The error of a session that could not be opened, naming the step."""
        if isinstance(err, TimeoutError | LookupError):
            # The transport's own LookupError comes with the same deadline.
            if step == STEP_DISCOVER:
                return RemoteMcpTimeout(
                    f"MCP server {self.label} is not announced on the broker "
                    f"(no presence within {self.connect_timeout:g} s)"
                )
            if step == STEP_CONNECT:
                step = (
                    f"{step} {self.settings.describe()} "
                    f"({client.stats.last_error or 'no answer'})"
                )
            return RemoteMcpTimeout(
                f"MCP server {self.label}: {step} took longer than "
                f"{self.connect_timeout:g} s"
            )
        return RemoteMcpError(f"MCP server {self.label}: {step} failed: {err}")

    async def _run_session(self, state: _Session, client: MqttClient) -> None:
        async with asyncio.timeout(self.connect_timeout) as deadline:
            await client.wait_connected()
            state.step = STEP_DISCOVER
            transport = McpMqttClientTransport(
                client,
                self.presence.server_name,
                timeout=self.connect_timeout,
                qos=self.qos,
                server_id=self.presence.server_id,
            )
            async with contextlib.AsyncExitStack() as stack:
                read, write = await stack.enter_async_context(transport)
                state.step = STEP_INITIALIZE
                to_session, session_read = anyio.create_memory_object_stream[
                    SessionMessage | Exception
                ](BUFFER)
                state.input = to_session
                relay = asyncio.get_running_loop().create_task(
                    self._relay(state, read, to_session)
                )
                stack.push_async_callback(self._stop_task, relay)
                session = await stack.enter_async_context(
                    ClientSession(session_read, write, message_handler=self._on_message)
                )
                await session.initialize()
                deadline.reschedule(None)
                self.stats.sessions += 1
                self._generation += 1
                self._tools = None
                state.session = session
                state.opened.set()
                _LOGGER.debug(
                    "MCP session with %s open (server-id %s, client id %s)",
                    self.label,
                    transport.server_id,
                    client.client_id,
                )
                await state.stop.wait()

    @staticmethod
    async def _stop_task(task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.wait({task})

    async def _relay(
        self,
        state: _Session,
        read: MemoryObjectReceiveStream[SessionMessage | Exception],
        to_session: MemoryObjectSendStream[SessionMessage | Exception],
    ) -> None:
        """Pass the transport's messages to the session; note the end of the input."""
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            async with to_session:
                async for item in read:
                    await to_session.send(item)
        state.ended = True
        _LOGGER.debug("MCP session of %s: input ended", self.label)

    async def _on_message(self, message: Any) -> None:
        """The session's notifications: ``tools/list_changed`` drops the cached tools."""
        root = getattr(message, "root", message)
        if isinstance(root, types.ToolListChangedNotification):
            self.stats.list_changed += 1
            self._generation += 1
            self._tools = None
        elif isinstance(root, Exception):  # e.g. the transport's ConnectionError
            if isinstance(root, ConnectionError):
                self.stats.disconnects += 1
            _LOGGER.debug("MCP session of %s: %r", self.label, root)

    async def _list_all(self, session: ClientSession) -> list[types.Tool]:
        """``tools/list`` following the cursors (at most ``MAX_TOOL_PAGES`` pages)."""
        tools: list[types.Tool] = []
        cursor: str | None = None
        for _page in range(MAX_TOOL_PAGES):
            self.stats.tool_lists += 1
            result: Any
            if _PAGINATION_BY_PARAMS:  # mcp 2.x
                kwargs: dict[str, Any] = {}
                if cursor is not None:
                    kwargs["params"] = types.PaginatedRequestParams(cursor=cursor)
                result = await session.list_tools(**kwargs)
            else:
                result = await session.list_tools(cursor)
            tools.extend(result.tools)
            cursor = getattr(result, "nextCursor", None) or getattr(
                result, "next_cursor", None
            )
            if not cursor:
                return tools
        _LOGGER.warning(
            "MCP server %s: more than %d pages of tools; using the first ones",
            self.label,
            MAX_TOOL_PAGES,
        )
        return tools
