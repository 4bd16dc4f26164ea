"""Host a stdio MCP server behind an MCP session transport: one child process per session.

:meth:`StdioHost.serve_session` has the shape of an ``McpMqttServer`` session
handler ``(client_id, read, write)``: it starts the configured command with
``mcp.client.stdio.stdio_client`` and passes every ``SessionMessage`` through
unchanged in both directions (requests, responses, notifications and
server→client requests). One child per client session keeps the JSON-RPC ids
and the state of two clients apart without rewriting messages.

When the child dies:

* requests in flight get a JSON-RPC error ``-32603 "MCP server process
  exited"`` (JSON-RPC 2.0 §5.1) instead of hanging;
* the child is started again after a :class:`~.backoff.Backoff` delay and
  re-initialized by replaying the client's ``initialize`` request (with a
  private id; its answer is swallowed) and ``notifications/initialized``
  (MCP "Lifecycle" §Initialization); requests that arrive meanwhile wait for it;
* if it cannot be started at all (``OSError``), the waiting requests get the
  same error and the start is retried after the backoff;
* a ``ping`` from the client while no child is up is answered here at once
  (MCP "Ping": the receiver answers promptly), so a transport's health check
  (MCP-over-MQTT spec §1.5 "Health") does not end a session during a restart.

The child's stderr is logged line by line at WARNING on this module's logger,
at most ``stderr_lines_per_minute`` lines per minute and session (the number
of dropped lines is logged when the minute is over or the child stops).

The ``mcp`` SDK's ``stdio_client`` gives the child a minimal environment
(POSIX: ``HOME``, ``LOGNAME``, ``PATH``, ``SHELL``, ``TERM``, ``USER``) plus
the configured variables; ``LANG`` is added here when set. Its context manager
must exit in the task that entered it (python-sdk #79, #577): one task per
session owns it, shielded from cancellation so that the child is always
stopped by the SDK's shutdown sequence (close stdin, wait 2 s, terminate).

Works on ``mcp`` 1.12+ and 2.x. This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
from dataclasses import dataclass, field
import logging
import os
import time
from typing import Any, Final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.message import SessionMessage
from pydantic import TypeAdapter

from .backoff import Backoff

_LOGGER = logging.getLogger(__name__)

#: JSON-RPC 2.0 §5.1 "Internal error": the answer to requests the child never answered.
INTERNAL_ERROR: Final = -32603
#: The error message of those answers.
EXITED_MESSAGE: Final = "MCP server process exited"
#: Seconds a restarted child must run before its backoff starts from ``base`` again.
HEALTHY_AFTER: Final = 30.0
#: Seconds the child has to answer the replayed ``initialize``.
REPLAY_TIMEOUT: Final = 10.0
#: Seconds to read the rest of the child's stderr after it stopped.
_STDERR_DRAIN: Final = 0.5
#: Variables passed from the parent besides the SDK's default set.
_PASSED_VARIABLES: Final = ("LANG",)

_MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)


@dataclass(frozen=True, slots=True)
class StdioServerConfig:
    """How to start a stdio MCP server: ``command`` ``args`` in ``cwd`` with ``env`` added."""

    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass(slots=True)
class StdioHostStats:
    """Counters of one :class:`StdioHost` (shown as entities).

    ``sessions``: sessions being served; ``sessions_started``: since creation;
    ``requests``: client requests passed to a child; ``errors``: JSON-RPC error
    responses sent to clients (from the child or made here) plus child start
    failures; ``restarts``: start attempts after a child died or failed to start;
    ``running``: children alive now.
    """

    sessions: int = 0
    sessions_started: int = 0
    requests: int = 0
    errors: int = 0
    restarts: int = 0
    running: int = 0


async def _send(
    stream: MemoryObjectSendStream[SessionMessage], item: SessionMessage
) -> None:
    """Send ``item`` at once when the buffer has room, else wait for room.

    ``MemoryObjectSendStream.send`` yields to the event loop before it
    delivers (an anyio checkpoint); ``send_nowait`` hands the item over in the
    same loop pass, one pass less per message on the call path.

    Raises:
        anyio.ClosedResourceError, anyio.BrokenResourceError: as ``send``.

    """
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)


def _inner(message: SessionMessage) -> Any:
    """The request/notification/response model (mcp 1.x wraps it in a ``RootModel``)."""
    wrapped = message.message
    return getattr(wrapped, "root", wrapped)


def _error_message(request_id: Any, message: str) -> SessionMessage:
    """A JSON-RPC error response for ``request_id`` (JSON-RPC 2.0 §5)."""
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {"code": INTERNAL_ERROR, "message": message},
    }
    return SessionMessage(_MESSAGE_ADAPTER.validate_python(body))


def _empty_result(request_id: Any) -> SessionMessage:
    """The answer to a ``ping`` request: an empty result (MCP "Ping")."""
    body = {"jsonrpc": "2.0", "id": request_id, "result": {}}
    return SessionMessage(_MESSAGE_ADAPTER.validate_python(body))


def _with_id(message: SessionMessage, request_id: str) -> SessionMessage:
    """A copy of request ``message`` with another JSON-RPC id."""
    body = message.message.model_dump(by_alias=True, mode="json", exclude_none=True)
    body["id"] = request_id
    return SessionMessage(_MESSAGE_ADAPTER.validate_python(body))


class _StderrLog:
    """Logs a child's stderr lines, at most ``per_minute`` per fixed 60 s window."""

    def __init__(self, name: str, client_id: str, per_minute: int) -> None:
        self._prefix = f"{name} [{client_id}]"
        self._per_minute = per_minute
        self._window = time.monotonic()
        self._count = 0
        self.suppressed = 0
        self._partial = b""

    def feed(self, data: bytes) -> None:
        """Log the complete lines of ``data`` (an incomplete tail waits for more)."""
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def close(self) -> None:
        """Log the incomplete tail and the number of suppressed lines."""
        if self._partial:
            self._line(self._partial)
            self._partial = b""
        self._flush_suppressed()

    def _line(self, raw: bytes) -> None:
        now = time.monotonic()
        if now - self._window >= 60.0:
            self._flush_suppressed()
            self._window = now
            self._count = 0
        if self._count >= self._per_minute:
            self.suppressed += 1
            return
        self._count += 1
        text = raw.decode("utf-8", "replace").rstrip("\r")
        _LOGGER.warning("%s stderr: %s", self._prefix, text)

    def _flush_suppressed(self) -> None:
        if self.suppressed:
            _LOGGER.warning(
                "%s stderr: %d lines suppressed (limit %d per minute)",
                self._prefix,
                self.suppressed,
                self._per_minute,
            )
            self.suppressed = 0


async def _read_stderr(fd: int, log: _StderrLog, done: anyio.Event) -> None:
    """Log what arrives on the pipe ``fd`` until end of file; closes ``fd``, sets ``done``."""
    try:
        os.set_blocking(fd, False)
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:  # pragma: no cover - spurious wake-up
                continue
            if not data:
                return
            log.feed(data)
    finally:
        os.close(fd)
        log.close()
        done.set()


class _Session:
    """The state of one client session and its current child."""

    def __init__(
        self, client_id: str, write: MemoryObjectSendStream[SessionMessage]
    ) -> None:
        self.client_id = client_id
        self.write = write
        # Client request id -> method, until the child answers.
        self.inflight: dict[Any, str] = {}
        # Ids of server->client requests of the current child.
        self.server_requests: set[Any] = set()
        self.initialize: SessionMessage | None = None
        self.initialized: SessionMessage | None = None
        self.child_write: MemoryObjectSendStream[SessionMessage] | None = None
        self.up = anyio.Event()
        # Set and replaced whenever ``up`` is set or waiting requests were failed.
        self.changed = anyio.Event()
        self.stopping = False
        self.stop_scope: anyio.CancelScope | None = None
        self.generation = 0

    def stopped(self) -> bool:
        """Whether :meth:`stop` was called (a method: the flag changes under awaits)."""
        return self.stopping

    def notify(self) -> None:
        """Wake the client reader waiting for a child."""
        self.changed.set()
        self.changed = anyio.Event()

    def set_up(self) -> None:
        """A child takes messages now (or the session stops)."""
        self.up.set()
        self.notify()

    def stop(self) -> None:
        """Make the child task stop its child and return."""
        self.stopping = True
        self.set_up()  # release a waiting client reader
        if self.stop_scope is not None:
            self.stop_scope.cancel()


class StdioHost:
    """Serves MCP sessions, each with its own child process of one stdio MCP server."""

    def __init__(
        self,
        config: StdioServerConfig,
        *,
        name: str,
        restart_backoff: Backoff | None = None,
        stderr_lines_per_minute: int = 60,
    ) -> None:
        """Host ``config``; ``name`` prefixes log lines.

        ``restart_backoff`` is a template (``base``, ``cap``, ``rng``): each
        session gets its own :class:`Backoff` with those values (default
        ``Backoff(base=1.0, cap=60.0)``).
        """
        self.config = config
        self.name = name
        self._backoff = restart_backoff or Backoff(base=1.0, cap=60.0)
        self._stderr_lines_per_minute = stderr_lines_per_minute
        self.stats = StdioHostStats()

    def _parameters(self) -> StdioServerParameters:
        env = {k: os.environ[k] for k in _PASSED_VARIABLES if k in os.environ}
        env.update(self.config.env)
        return StdioServerParameters(
            command=self.config.command,
            args=list(self.config.args),
            env=env,
            cwd=self.config.cwd,
        )

    async def serve_session(
        self,
        client_id: str,
        read: MemoryObjectReceiveStream[SessionMessage | Exception],
        write: MemoryObjectSendStream[SessionMessage],
    ) -> None:
        """Serve one client session until ``read`` ends or this task is cancelled.

        ``read`` carries the client's messages (``Exception`` items are logged
        and skipped), ``write`` receives the child's messages and this host's
        error answers; both are closed on return. The child is stopped before
        this returns, also when cancelled.
        """
        session = _Session(client_id, write)
        self.stats.sessions += 1
        self.stats.sessions_started += 1
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._run_children, session, tg.cancel_scope)
                try:
                    await self._pump_client(session, read)
                finally:
                    session.stop()
        finally:
            self.stats.sessions -= 1
            read.close()
            write.close()

    # -- client -> child ---------------------------------------------------

    async def _pump_client(
        self,
        session: _Session,
        read: MemoryObjectReceiveStream[SessionMessage | Exception],
    ) -> None:
        async for item in read:
            if isinstance(item, Exception):
                _LOGGER.debug(
                    "%s [%s]: transport error %r", self.name, session.client_id, item
                )
                continue
            if not await self._forward_to_child(session, item):
                return  # pragma: no cover - the session stopped while it waited

    async def _forward_to_child(self, session: _Session, item: SessionMessage) -> bool:
        """Pass one client message to the child; False when the session is over."""
        inner = _inner(item)
        method = getattr(inner, "method", None)
        request_id = getattr(inner, "id", None)
        is_request = method is not None and request_id is not None
        if is_request and method == "ping" and not session.up.is_set():
            self.stats.requests += 1
            try:
                await _send(session.write, _empty_result(request_id))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                return False
            return True
        if is_request:
            session.inflight[request_id] = str(method)
            self.stats.requests += 1
            if method == "initialize":
                session.initialize = item
        elif method == "notifications/initialized":
            session.initialized = item
        elif method == "notifications/cancelled":
            params = getattr(inner, "params", None)
            cancelled = getattr(params, "requestId", None)
            if cancelled is None and isinstance(params, Mapping):  # pragma: no cover
                cancelled = params.get("requestId")
            session.inflight.pop(cancelled, None)
        elif method is None:  # the client answers a server->client request
            if request_id not in session.server_requests:
                return True  # asked by a child that died since
            session.server_requests.discard(request_id)
        while not session.up.is_set():
            if not is_request:
                return True  # no child to tell; a restarted one gets the replay
            if request_id not in session.inflight:
                return True  # answered with an error: the child could not start
            await session.changed.wait()
        if session.stopped():  # pragma: no cover - stopped while waiting
            return False
        child_write = session.child_write
        if child_write is not None:
            with contextlib.suppress(
                anyio.ClosedResourceError, anyio.BrokenResourceError
            ):
                await _send(child_write, item)
                return True
        # The child died under the send (its in-flight requests may be failed already).
        if (  # pragma: no cover - a race with the child's death
            is_request and session.inflight.pop(request_id, None) is not None
        ):
            return await self._answer_error(session, request_id)
        return True  # pragma: no cover - a race with the child's death

    async def _answer_error(self, session: _Session, request_id: Any) -> bool:
        self.stats.errors += 1
        try:
            await _send(session.write, _error_message(request_id, EXITED_MESSAGE))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    async def _fail_inflight(self, session: _Session) -> None:
        pending = list(session.inflight)
        session.inflight.clear()
        for request_id in pending:
            if not await self._answer_error(session, request_id):
                session.stop()
                return
        session.notify()

    # -- child lifetime ----------------------------------------------------

    async def _run_children(
        self, session: _Session, session_scope: anyio.CancelScope
    ) -> None:
        """Start, pump, restart the session's child until the session stops.

        Shielded: only :meth:`_Session.stop` ends it, so the ``stdio_client``
        context is always left normally in this task. Then ``session_scope``
        is cancelled: the session is over also when the client stopped reading.
        """
        backoff = Backoff(
            base=self._backoff.base, cap=self._backoff.cap, rng=self._backoff.rng
        )
        with anyio.CancelScope(shield=True):
            while not session.stopped():
                started = time.monotonic()
                await self._run_child(session)
                session.child_write = None
                if session.up.is_set():
                    session.up = anyio.Event()
                session.server_requests.clear()
                if session.stopped():
                    break
                with anyio.CancelScope() as scope:
                    session.stop_scope = scope
                    await self._fail_inflight(session)
                if session.stopped():  # the client stopped reading
                    break
                if time.monotonic() - started > HEALTHY_AFTER:
                    backoff.reset()
                delay = backoff.next_delay()
                _LOGGER.warning(
                    "%s [%s]: MCP server process exited; restarting in %.1f s",
                    self.name,
                    session.client_id,
                    delay,
                )
                with anyio.CancelScope() as scope:
                    session.stop_scope = scope
                    if not session.stopped():
                        await anyio.sleep(delay)
                session.stop_scope = None
                if not session.stopped():
                    self.stats.restarts += 1
            session.set_up()
        session_scope.cancel()

    async def _run_child(self, session: _Session) -> None:
        """One child process, from start to exit (or to the session's stop)."""
        session.generation += 1
        stderr_log = _StderrLog(
            self.name, session.client_id, self._stderr_lines_per_minute
        )
        read_fd, write_fd = os.pipe()
        stderr_done = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_stderr, read_fd, stderr_log, stderr_done)
            try:
                await self._child_session(session, write_fd)
            finally:
                # The reader ends at end of file; a grandchild may hold the pipe.
                with anyio.move_on_after(_STDERR_DRAIN):
                    await stderr_done.wait()
                tg.cancel_scope.cancel()

    async def _child_session(self, session: _Session, write_fd: int) -> None:
        errlog = os.fdopen(write_fd, "w")
        running = False
        try:
            async with stdio_client(self._parameters(), errlog=errlog) as (
                child_read,
                child_write,
            ):
                errlog.close()  # the child holds its own copy
                self.stats.running += 1
                running = True
                with anyio.CancelScope() as scope:
                    session.stop_scope = scope
                    if session.stopped():
                        scope.cancel()
                    if session.initialize is not None:
                        await self._replay(session, child_read, child_write)
                    session.child_write = child_write
                    session.set_up()
                    await self._pump_child(session, child_read)
                session.stop_scope = None
                session.child_write = None
        except Exception as err:  # any failure means: the child is gone
            self.stats.errors += not running
            _LOGGER.warning(
                "%s [%s]: MCP server process %s: %r",
                self.name,
                session.client_id,
                "failed" if running else "could not be started",
                err,
            )
        finally:
            errlog.close()
            if running:
                self.stats.running -= 1

    async def _replay(
        self,
        session: _Session,
        child_read: MemoryObjectReceiveStream[SessionMessage | Exception],
        child_write: MemoryObjectSendStream[SessionMessage],
    ) -> None:
        """Initialize a restarted child as the client initialized the first one."""
        assert session.initialize is not None
        replay_id = f"mqtt-bridge-replay-{session.generation}"
        await child_write.send(_with_id(session.initialize, replay_id))
        with anyio.fail_after(REPLAY_TIMEOUT):
            async for item in child_read:
                if (
                    isinstance(item, SessionMessage)
                    and getattr(_inner(item), "id", None) == replay_id
                ):
                    break
            else:
                raise EOFError("MCP server process exited during initialize")
        if session.initialized is not None:
            await child_write.send(session.initialized)

    async def _pump_child(
        self,
        session: _Session,
        child_read: MemoryObjectReceiveStream[SessionMessage | Exception],
    ) -> None:
        async for item in child_read:
            if isinstance(item, Exception):
                _LOGGER.debug(
                    "%s [%s]: bad output %r", self.name, session.client_id, item
                )
                continue
            inner = _inner(item)
            method = getattr(inner, "method", None)
            request_id = getattr(inner, "id", None)
            if method is None:
                if session.inflight.pop(request_id, None) is None:
                    continue  # cancelled, or not ours
                if getattr(inner, "error", None) is not None:
                    self.stats.errors += 1
            elif request_id is not None:
                session.server_requests.add(request_id)
            try:
                await _send(session.write, item)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                session.stop()
                return
