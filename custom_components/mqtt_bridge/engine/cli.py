"""``mqtt-bridge-mcp``: MCP over MQTT from the command line, without Home Assistant.

Three commands (issue 7, "Command-line bridge"):

* ``connect SERVER_NAME``: stdio on one side (Claude Desktop, Cursor, the MCP
  Inspector start it as a stdio MCP server), the MCP-over-MQTT server named
  ``SERVER_NAME`` on the other. One :class:`~.mqtt_client.MqttClient` per run
  with a fresh client id (the mcp-client-id must change on every
  initialization, spec §1.2) and the client presence will (spec §1.3); JSON-RPC
  messages pass through unchanged in both directions; health pings every
  ``--ping-interval`` seconds (spec §1.5 "Health"). While ``connect`` runs,
  nothing but JSON-RPC is written to stdout; everything else goes to stderr.
  A broker outage does not end it (requests in flight get JSON-RPC errors
  from the transport; the session carries on after the reconnect); the
  server ending the session, going offline or not answering a ping does.
* ``serve --server-name NAME -- COMMAND ARGS...``: hosts a stdio MCP server on
  MQTT (:class:`~.hosted_stdio.HostedStdioServer`, as Home Assistant does:
  one child process per client session) until SIGINT or SIGTERM, then clears
  the retained presence and stops the children. With ``--request-topic
  TOPIC`` it also serves simple devices on that topic (on the same MQTT
  connection: JSON-RPC requests with the MQTT 5 Response Topic and
  Correlation Data properties, no ``initialize`` needed, one shared child
  process started at once, ``--qos`` for its messages too).
* ``list``: the servers announced by retained presence (spec §1.5
  "Discovery"), as a table or JSON.

Broker options come from flags, else from environment variables, else from
defaults (``MQTT_HOST`` localhost, ``MQTT_PORT`` 1883 or 8883 with TLS,
``MQTT_USERNAME``, ``MQTT_PASSWORD``, ``MQTT_TLS``, ``MQTT_CA_FILE``,
``MQTT_INSECURE``, ``MQTT_QOS`` 1, ``MQTT_CLIENT_ID_PREFIX``, ``MQTT_TIMEOUT``
5 s). The password is never printed.

Exit codes: :data:`EXIT_OK` 0; :data:`EXIT_FAILURE` 1 (``connect``: the server
ended the session, went offline or stopped answering pings); :data:`EXIT_USAGE`
2 (bad arguments, broker unreachable, credentials or TLS refused, MQTT 5 not
supported, a subscription refused); :data:`EXIT_NOT_FOUND` 3 (``connect``: no
server announces the server-name within ``--timeout``); 130 after Ctrl-C
where no signal handler can be installed.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
import contextlib
from dataclasses import dataclass, replace
from io import TextIOWrapper
import json
import logging
import os
from pathlib import Path
import secrets
import shutil
import signal
import sys
import threading
from typing import IO, Any, Final, NoReturn, TextIO, cast

import anyio
from mcp.server.stdio import stdio_server

from .hosted_stdio import HostedStdioConfig, HostedStdioServer
from .mcp_mqtt import (
    CLIENT_COMPONENT,
    McpMqttClientTransport,
    ReadStream,
    WriteStream,
    connect_user_properties,
    discover,
    validate_server_name,
)
from .mcp_mqtt_simple import request_topic_problem
from .mqtt_client import (
    PORT_PLAIN,
    PORT_TLS,
    ClientState,
    MqttAuthError,
    MqttClient,
    MqttError,
    MqttSettings,
    ProtocolVersion,
    Will,
    check_connection,
)
from .subscriptions import SubscriptionRefusedError
from .topics import TopicError

_LOGGER = logging.getLogger(__name__)

PROG: Final = "mqtt-bridge-mcp"

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_NOT_FOUND: Final = 3
EXIT_INTERRUPTED: Final = 130

DEFAULT_HOST: Final = "localhost"
DEFAULT_QOS: Final = 1
DEFAULT_TIMEOUT: Final = 5.0
DEFAULT_PREFIX: Final = PROG
DEFAULT_LIST_WAIT: Final = 1.0
# Seconds between health pings of ``connect`` (spec §1.5 "Health"); well below
# the default idle timeout of a hosted server (600 s), which pings also reset.
DEFAULT_PING_INTERVAL: Final = 30.0
# Seconds the SDK's stdio tasks get to write what is left when ``connect`` ends.
STDIO_CLOSE_GRACE: Final = 2.0

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"", "0", "false", "no", "off"})


class CliError(Exception):
    """A failure reported as one ``mqtt-bridge-mcp: error: …`` line and exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        """Keep the exit ``code`` (one of the ``EXIT_*`` constants)."""
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class BrokerOptions:
    """Broker options shared by every command.

    ``qos`` (0 or 1) is used for every MCP publish and subscription;
    ``timeout`` (seconds) bounds the broker connection and, for ``connect``,
    the server discovery; client ids are ``{client_id_prefix}-{12 hex digits}``.
    """

    settings: MqttSettings
    qos: int = DEFAULT_QOS
    client_id_prefix: str = DEFAULT_PREFIX
    timeout: float = DEFAULT_TIMEOUT

    def new_client_id(self) -> str:
        """A fresh MQTT client id (random, so two runs never take over each other's session)."""
        return f"{self.client_id_prefix}-{secrets.token_hex(6)}"


@dataclass(slots=True)
class BridgeStats:
    """Counters of one ``connect`` run (logged at exit with ``-v``).

    ``to_server``/``to_client``: JSON-RPC messages passed each way;
    ``invalid_lines``: stdin lines that were not JSON-RPC (dropped, logged).
    """

    to_server: int = 0
    to_client: int = 0
    invalid_lines: int = 0


# --------------------------------------------------------------------------- #
# Arguments
# --------------------------------------------------------------------------- #


def _add_broker_arguments(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Broker flags, accepted before and after the command.

    On the sub-command parsers the defaults are ``SUPPRESS`` so that a flag
    given before the command is not overwritten (an argparse quirk).
    """

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("broker (flags override environment variables)")
    group.add_argument(
        "--host", default=default(None), help="broker host [MQTT_HOST, localhost]"
    )
    group.add_argument(
        "--port",
        default=default(None),
        help="broker TCP port [MQTT_PORT, 1883, 8883 with TLS]",
    )
    group.add_argument(
        "--username", default=default(None), help="user name [MQTT_USERNAME]"
    )
    group.add_argument(
        "--password",
        default=default(None),
        help="password [MQTT_PASSWORD; prefer the variable: flags show in ps]",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect with TLS [MQTT_TLS=1]",
    )
    group.add_argument(
        "--ca-file",
        default=default(None),
        help="PEM file of CA certificates to trust; implies --tls [MQTT_CA_FILE]",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=default(False),
        help="TLS without certificate or host name checks; implies --tls "
        "[MQTT_INSECURE=1]",
    )
    group.add_argument(
        "--qos",
        default=default(None),
        help="QoS of MCP messages, 0 or 1 [MQTT_QOS, 1]",
    )
    group.add_argument(
        "--client-id-prefix",
        default=default(None),
        help=f"MQTT client id prefix [MQTT_CLIENT_ID_PREFIX, {DEFAULT_PREFIX}]",
    )
    group.add_argument(
        "--timeout",
        default=default(None),
        help="seconds for the broker connection and server discovery [MQTT_TIMEOUT, 5]",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log to stderr: -v info, -vv debug",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``mqtt-bridge-mcp`` (exit 2 on usage errors)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="MCP over MQTT from the command line: reach MCP servers on an "
        "MQTT broker over stdio, host a stdio MCP server on the broker, list the "
        "servers announced there.",
    )
    _add_broker_arguments(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    connect_parser = commands.add_parser(
        "connect",
        help="bridge stdio to the MCP server SERVER_NAME on the broker",
        description="Bridge stdio (for Claude Desktop, Cursor, the MCP Inspector) "
        "to the MCP-over-MQTT server SERVER_NAME.",
    )
    connect_parser.add_argument("server_name", metavar="SERVER_NAME")
    connect_parser.add_argument(
        "--ping-interval",
        type=float,
        default=DEFAULT_PING_INTERVAL,
        help="seconds between health pings to the server, 0 = off [30]",
    )
    _add_broker_arguments(connect_parser, top=False)

    serve_parser = commands.add_parser(
        "serve",
        help="host a stdio MCP server on the broker",
        description="Host the stdio MCP server COMMAND ARGS... on the broker as "
        "--server-name (one child process per client session) until SIGINT or "
        "SIGTERM.",
        usage=f"{PROG} serve --server-name NAME [options] -- COMMAND [ARGS...]",
    )
    serve_parser.add_argument(
        "--server-name", required=True, help="server-name on MQTT, e.g. home/time"
    )
    serve_parser.add_argument(
        "--description", default="", help="description in the presence message"
    )
    serve_parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the child (repeatable)",
    )
    serve_parser.add_argument("--cwd", help="working directory of the child")
    serve_parser.add_argument(
        "--max-sessions",
        type=int,
        default=16,
        help="concurrent client sessions (one child each) [16]",
    )
    serve_parser.add_argument(
        "--idle-timeout",
        type=float,
        default=600.0,
        help="seconds after which an idle session ends [600]",
    )
    serve_parser.add_argument(
        "--request-topic",
        metavar="TOPIC",
        help="also serve simple devices: JSON-RPC requests published to TOPIC "
        "with the MQTT 5 Response Topic (and Correlation Data) property, "
        "without initialize; server notifications go to TOPIC/notifications",
    )
    serve_parser.add_argument(
        "command_line",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ARGS",
        help="the stdio MCP server to run, e.g. -- uvx mcp-server-time",
    )
    _add_broker_arguments(serve_parser, top=False)

    list_parser = commands.add_parser(
        "list",
        help="list the MCP servers announced on the broker",
        description="List the MCP servers announced on the broker (retained presence).",
    )
    list_parser.add_argument(
        "--filter",
        default="#",
        metavar="NAME_FILTER",
        help="MQTT topic filter over server-names, e.g. home/# [#]",
    )
    list_parser.add_argument("--json", action="store_true", help="print JSON")
    list_parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_LIST_WAIT,
        help="seconds to collect presence messages [1]",
    )
    _add_broker_arguments(list_parser, top=False)
    return parser


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CliError(f"{name}={environ[name]!r} is not a boolean (use 1 or 0)")


def _number[T: (int, float)](
    text: str, kind: Callable[[str], T], what: str, low: T, high: T
) -> T:
    try:
        value = kind(text)
    except ValueError:
        raise CliError(f"{what} {text!r} is not a number") from None
    if not low <= value <= high:
        raise CliError(f"{what} {text!r} is out of range ({low:g} to {high:g})")
    return value


def broker_options(
    options: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> BrokerOptions:
    """Broker options from parsed flags, then ``environ`` (default ``os.environ``), then defaults.

    Raises:
        CliError: a value is invalid (exit 2), e.g. ``--port 0`` or ``--qos 2``.

    """
    env = os.environ if environ is None else environ

    def pick(flag: str, variable: str) -> str | None:
        value = getattr(options, flag)
        if value is None:
            value = env.get(variable) or None
        return cast("str | None", value)

    ca_file = pick("ca_file", "MQTT_CA_FILE")
    insecure = bool(options.insecure) or _env_flag(env, "MQTT_INSECURE")
    tls = bool(options.tls) or _env_flag(env, "MQTT_TLS") or insecure or bool(ca_file)
    port_text = pick("port", "MQTT_PORT")
    port = (
        _number(port_text, int, "port", 1, 65535)
        if port_text
        else (PORT_TLS if tls else PORT_PLAIN)
    )
    if ca_file and not Path(ca_file).is_file():
        raise CliError(f"CA file {ca_file!r} does not exist")
    prefix = pick("client_id_prefix", "MQTT_CLIENT_ID_PREFIX") or DEFAULT_PREFIX
    if any(char in prefix for char in "/+#") or any(ord(c) < 0x20 for c in prefix):
        raise CliError(
            f"client id prefix {prefix!r} contains '/', '+', '#' or a control "
            "character (a server-id cannot, MCP over MQTT §1.2)"
        )
    qos_text = pick("qos", "MQTT_QOS")
    timeout_text = pick("timeout", "MQTT_TIMEOUT")
    return BrokerOptions(
        settings=MqttSettings(
            host=pick("host", "MQTT_HOST") or DEFAULT_HOST,
            port=port,
            tls=tls,
            verify_tls=not insecure,
            username=pick("username", "MQTT_USERNAME"),
            password=pick("password", "MQTT_PASSWORD"),
            ca_file=ca_file,
        ),
        qos=_number(qos_text, int, "QoS", 0, 1) if qos_text else DEFAULT_QOS,
        client_id_prefix=prefix,
        timeout=(
            _number(timeout_text, float, "timeout", 0.1, 3600.0)
            if timeout_text
            else DEFAULT_TIMEOUT
        ),
    )


def serve_options(options: argparse.Namespace) -> HostedStdioConfig:
    """What the ``serve`` command hosts, from parsed flags (QoS: :func:`serve` adds it).

    Raises:
        CliError: invalid server-name (spec §1.2) or request topic
            (:func:`request_topic_problem`), missing command, a ``--env``
            without ``=``, a ``--cwd`` that is not a directory, or a command
            that cannot be found (exit 2).

    """
    try:
        name = validate_server_name(options.server_name)
    except ValueError as err:
        raise CliError(f"invalid --server-name: {err}") from None
    request_topic = options.request_topic
    if request_topic is not None and (problem := request_topic_problem(request_topic)):
        raise CliError(f"invalid --request-topic {request_topic!r}: {problem}")
    command_line = list(options.command_line)
    if command_line and command_line[0] == "--":
        command_line.pop(0)
    if not command_line:
        raise CliError("serve needs a command: serve --server-name NAME -- COMMAND")
    env: dict[str, str] = {}
    for item in options.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    cwd = options.cwd
    if cwd is not None and not Path(cwd).is_dir():
        raise CliError(f"--cwd {cwd!r} is not a directory")
    command = command_line[0]
    if os.sep in command or (os.altsep and os.altsep in command):
        found = Path(cwd or ".", command).is_file()
    else:
        found = shutil.which(command, path=env.get("PATH")) is not None
    if not found:
        raise CliError(f"command {command!r} not found")
    if options.max_sessions < 1 or options.idle_timeout <= 0:
        raise CliError("--max-sessions and --idle-timeout must be positive")
    return HostedStdioConfig(
        server_name=name,
        command=command,
        args=tuple(command_line[1:]),
        env=env,
        cwd=cwd,
        description=options.description,
        max_sessions=options.max_sessions,
        idle_timeout=options.idle_timeout,
        request_topic=request_topic,
    )


# --------------------------------------------------------------------------- #
# Broker connection
# --------------------------------------------------------------------------- #


@contextlib.asynccontextmanager
async def broker_client(
    broker: BrokerOptions, client_id: str, will: Will | None = None
) -> AsyncIterator[MqttClient]:
    """A connected MCP client's :class:`MqttClient` (its ``run`` task is stopped on exit).

    Its CONNECT carries the ``mcp-client`` user properties (spec §1.4,
    :func:`~.mcp_mqtt.connect_user_properties`); ``serve`` builds its server's
    client in :class:`~.hosted_stdio.HostedStdioServer`.

    Checks the broker once first (:func:`~.mqtt_client.check_connection`) so
    that an unreachable broker or refused credentials fail at once instead of
    being retried with backoff.

    Raises:
        CliError: broker unreachable, credentials or TLS refused, no MQTT 5
            (MCP over MQTT requires it, spec §1.4), all exit 2.

    """
    client = MqttClient(
        broker.settings,
        client_id=client_id,
        will=will,
        connect_user_properties=connect_user_properties(CLIENT_COMPONENT),
    )
    async with _running(broker, client, client.run):
        yield client


@contextlib.asynccontextmanager
async def _running(
    broker: BrokerOptions,
    client: MqttClient,
    run: Callable[[], Coroutine[Any, Any, None]],
) -> AsyncIterator[asyncio.Task[None]]:
    """``run()`` as a task (cancelled and awaited on exit) once ``client`` is connected.

    ``run`` runs ``client`` (``client.run`` or a
    :meth:`~.hosted_stdio.HostedStdioServer.run` that owns it). The broker is
    checked once first (:func:`~.mqtt_client.check_connection`) so that an
    unreachable broker or refused credentials fail at once instead of being
    retried with backoff.

    Raises:
        CliError: see :func:`broker_client`.

    """
    where = broker.settings.describe()
    try:
        await check_connection(broker.settings, timeout=broker.timeout)
    except MqttAuthError as err:
        raise CliError(
            f"the MQTT broker {where} refused the credentials: {err}"
        ) from None
    except MqttError as err:
        raise CliError(f"cannot connect to the MQTT broker {where}: {err}") from None
    task = asyncio.create_task(run(), name=f"{PROG} mqtt {client.client_id}")
    try:
        connected = asyncio.ensure_future(client.wait_connected())
        try:
            await asyncio.wait(
                {connected, task},
                timeout=broker.timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            connected.cancel()
        if task.done():  # e.g. a server's subscription refused
            _raise_failure(task)
        if not connected.done() or connected.cancelled():
            raise CliError(
                f"no connection to the MQTT broker {where} within "
                f"{broker.timeout:g} s: {client.stats.last_error or 'no answer'}"
            ) from None
        if client.protocol is not ProtocolVersion.V5:
            raise CliError(
                f"the MQTT broker {where} does not accept MQTT 5, which MCP over "
                "MQTT requires"
            )
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task})


def _raise_failure(task: asyncio.Task[None]) -> None:
    """Raise what ended ``task``, a refused subscription as a :class:`CliError`.

    Nothing when it was cancelled; a task that returned (none of the runs
    does) is a ``RuntimeError``.
    """
    if task.cancelled():
        return
    if isinstance(err := task.exception(), SubscriptionRefusedError):
        raise _refused(err)
    raise err or RuntimeError(f"{task.get_name()} stopped")  # pragma: no cover


def _refused(err: SubscriptionRefusedError) -> CliError:
    return CliError(
        f"{err} (the broker's ACL must allow $mcp-server/#, $mcp-client/# and "
        "$mcp-rpc/#)"
    )


# --------------------------------------------------------------------------- #
# connect
# --------------------------------------------------------------------------- #


class _LineReader:
    """The lines of a file descriptor as an async iterator of ``str`` (UTF-8, bad bytes replaced).

    A daemon thread reads the descriptor with :func:`os.read`; waiting for a
    line can be cancelled. The SDK's default stdin reader (``anyio.wrap_file``)
    blocks in a worker thread that cannot be, so ``connect`` could not end
    before stdin does when the server goes away; and a thread blocked in
    ``sys.stdin.buffer.readline()`` holds the buffer's lock, which aborts
    the interpreter at exit ("could not acquire lock … at interpreter
    shutdown"). The thread ends at end of stream, on a read error, or, if the
    event loop is gone by then, at the next line.
    """

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.thread = threading.Thread(
            target=self._read, args=(fd,), name=f"{PROG} stdin", daemon=True
        )
        self.thread.start()

    def _read(self, fd: int) -> None:
        pending = b""
        try:
            while chunk := os.read(fd, 65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not self._put(line.decode("utf-8", errors="replace") + "\n"):
                        return
        except OSError as err:
            _LOGGER.debug("stdin: %s", err)
        if pending:
            self._put(pending.decode("utf-8", errors="replace"))
        self._put(None)

    def _put(self, line: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        except RuntimeError:  # the event loop is closed
            return False
        return True

    def close(self) -> None:
        """End the iteration now (the thread keeps reading until end of stream)."""
        self._queue.put_nowait(None)

    def __aiter__(self) -> _LineReader:
        return self

    async def __anext__(self) -> str:
        line = await self._queue.get()
        if line is None:
            raise StopAsyncIteration
        return line


class _UnownedTextWrapper(TextIOWrapper):
    """A text layer that leaves the binary stream open when it is closed or collected."""

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self.detach()


async def _stdin_to_server(
    stdio_read: Any, server_write: WriteStream, stats: BridgeStats
) -> None:
    """Pass the MCP client's messages to the server until stdin ends."""
    async for item in stdio_read:
        if isinstance(item, Exception):
            stats.invalid_lines += 1
            _LOGGER.warning("stdin: dropped a line that is not JSON-RPC: %s", item)
            continue
        stats.to_server += 1
        await server_write.send(item)


async def _server_to_stdout(
    server_read: ReadStream, stdio_write: Any, stats: BridgeStats
) -> None:
    """Pass the server's messages to stdout until the transport ends the session.

    The transport answers the requests still waiting with JSON-RPC errors,
    then puts a ``ConnectionError`` naming the reason, then closes the stream.
    """
    async for item in server_read:
        if isinstance(item, Exception):
            _LOGGER.debug("session: %s", item)
            continue
        stats.to_client += 1
        await stdio_write.send(item)


async def connect(
    broker: BrokerOptions,
    server_name: str,
    *,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
) -> int:
    """Bridge stdio to the MCP-over-MQTT server ``server_name``; return the exit code.

    ``stdin``/``stdout`` default to the process's (tests pass pipes);
    ``ping_interval`` (seconds, ``None`` = off) pings the server (spec §1.5
    "Health"), which also keeps the session from the server's idle timeout.
    Ends with :data:`EXIT_OK` when stdin ends, :data:`EXIT_FAILURE` when the
    transport ends the session: the server said ``notifications/disconnected``,
    cleared its presence (went offline) or did not answer a ping. A lost
    broker connection alone does not end it: the transport answers the
    requests in flight with errors and carries on after the reconnect.

    Raises:
        CliError: invalid server-name or broker failure (exit 2), server-name
            not announced within ``broker.timeout`` (exit 3).

    """
    try:
        validate_server_name(server_name)
    except ValueError as err:
        raise CliError(f"invalid SERVER_NAME: {err}") from None
    client_id = broker.new_client_id()
    will = McpMqttClientTransport.client_will(client_id)
    async with (
        broker_client(broker, client_id, will) as client,
        contextlib.AsyncExitStack() as stack,
    ):
        transport = McpMqttClientTransport(
            client,
            server_name,
            timeout=broker.timeout,
            qos=broker.qos,
            ping_interval=ping_interval,
        )
        try:
            server_read, server_write = await stack.enter_async_context(transport)
        except LookupError:
            settings = broker.settings
            raise CliError(
                f"MCP server {server_name!r} not found on broker "
                f"{settings.host}:{settings.port} within {broker.timeout:g} s",
                EXIT_NOT_FOUND,
            ) from None
        except SubscriptionRefusedError as err:
            raise _refused(err) from None
        except TimeoutError:
            raise CliError(
                f"the MQTT broker {broker.settings.describe()} did not confirm the "
                f"subscriptions within {broker.timeout:g} s"
            ) from None
        _LOGGER.info(
            "connected to %r (server-id %s) as %s",
            server_name,
            transport.server_id,
            client_id,
        )
        return await _bridge(
            client, transport, server_read, server_write, stdin=stdin, stdout=stdout
        )


async def _bridge(
    client: MqttClient,
    transport: McpMqttClientTransport,
    server_read: ReadStream,
    server_write: WriteStream,
    *,
    stdin: IO[bytes] | None,
    stdout: IO[bytes] | None,
) -> int:
    """Pump stdio ⇄ server until stdin ends or the session ends; log broker outages."""
    stats = BridgeStats()
    where = client.settings.describe()
    connected = [True]

    def on_state(state: ClientState) -> None:
        if state is ClientState.CONNECTED:
            connected[0] = True
            _LOGGER.warning("reconnected to the MQTT broker %s", where)
        elif connected[0]:
            connected[0] = False
            _LOGGER.warning(
                "lost the connection to the MQTT broker %s; reconnecting", where
            )

    remove = client.add_state_listener(on_state)
    try:
        server_ended = await _pump(
            server_read, server_write, stats, stdin=stdin, stdout=stdout
        )
    finally:
        remove()
        _LOGGER.info(
            "%d messages to the server, %d to the client, %d invalid stdin lines",
            stats.to_server,
            stats.to_client,
            stats.invalid_lines,
        )
    if not server_ended:
        _LOGGER.info("stdin closed")
        return EXIT_OK
    _error(
        transport.closed_reason
        or f"the session with MCP server {transport.server_name!r} ended"
    )
    return EXIT_FAILURE


async def _pump(
    server_read: ReadStream,
    server_write: WriteStream,
    stats: BridgeStats,
    *,
    stdin: IO[bytes] | None,
    stdout: IO[bytes] | None,
) -> bool:
    """Run the SDK's stdio transport and both pumps until one side ends.

    Returns whether the server side ended (else stdin did). Everything the
    server sent is written to stdout before this returns (at most
    :data:`STDIO_CLOSE_GRACE` seconds are given to that).
    """
    lines = _LineReader((stdin if stdin is not None else sys.stdin).fileno())
    text_out = (
        None
        if stdout is None
        else anyio.wrap_file(_UnownedTextWrapper(stdout, encoding="utf-8"))
    )
    with anyio.CancelScope() as scope:
        async with stdio_server(cast(Any, lines), text_out) as (
            stdio_read,
            stdio_write,
        ):
            upstream = asyncio.ensure_future(
                _stdin_to_server(stdio_read, server_write, stats)
            )
            downstream = asyncio.ensure_future(
                _server_to_stdout(server_read, stdio_write, stats)
            )
            pumps = {upstream, downstream}
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                server_ended = not upstream.done()
                downstream.cancel()
                # the SDK's stdin task ends, its stdout task writes what it has
                lines.close()
                stdio_write.close()
                scope.deadline = anyio.current_time() + STDIO_CLOSE_GRACE
                await asyncio.wait(pumps)
            finally:
                for task in pumps:
                    task.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait(pumps)
    for task in pumps:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    return server_ended


# --------------------------------------------------------------------------- #
# serve
# --------------------------------------------------------------------------- #


async def serve(
    broker: BrokerOptions, options: HostedStdioConfig, stop: asyncio.Event
) -> int:
    """Host ``options`` on the broker until ``stop`` is set; return the exit code.

    Runs a :class:`~.hosted_stdio.HostedStdioServer` (unsupervised: a failure
    ends the command) with ``broker.qos`` and a fresh client id as server-id;
    the will clears the presence if the process dies (spec §1.3). On stop it
    sends ``notifications/disconnected`` to every session, stops the children
    and clears the retained presence before it disconnects (spec §1.5
    "Shutdown", "Discovery"). With ``options.request_topic``, simple devices
    are served too, from one shared child process (logged as
    ``"{server-name} (simple devices)"``); on stop the device requests still
    waiting get ``-32603``.

    Raises:
        CliError: invalid options, broker failure or a subscription refused
            (exit 2).

    """
    client_id = broker.new_client_id()
    try:
        hosted = HostedStdioServer(
            broker.settings, replace(options, qos=broker.qos), client_id=client_id
        )
    except ValueError as err:
        raise CliError(str(err)) from None
    async with _running(broker, hosted.client, hosted.run) as running:
        where = ""
        if options.request_topic is not None:
            where = f"; simple devices on {options.request_topic!r}"
        stopping = asyncio.ensure_future(stop.wait())
        _error(
            f"serving {options.server_name!r} (server-id {client_id}) on "
            f"{broker.settings.describe()}{where}; stop with Ctrl-C",
            prefix="",
        )
        try:
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            running.cancel()
            await asyncio.wait({running, stopping})
        _raise_failure(running)
    server, simple = hosted.server, hosted.simple
    _LOGGER.info(
        "stopped: %d sessions served, %d requests, %d errors",
        server.stats.sessions_started,
        server.stats.requests,
        server.stats.errors,
    )
    if simple is not None:
        _LOGGER.info(
            "simple devices: %d requests, %d error answers, %d bad messages",
            simple.stats.requests,
            simple.stats.errors,
            simple.stats.parse_errors + simple.stats.no_response_topic,
        )
    return EXIT_OK


async def _serve_until_signal(broker: BrokerOptions, options: HostedStdioConfig) -> int:
    """:func:`serve` until SIGINT or SIGTERM (where the platform allows handlers)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
            pass  # Windows / not the main thread: Ctrl-C raises KeyboardInterrupt
    try:
        return await serve(broker, options, stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# --------------------------------------------------------------------------- #
# list
# --------------------------------------------------------------------------- #


async def list_servers(
    broker: BrokerOptions,
    name_filter: str = "#",
    *,
    wait: float = DEFAULT_LIST_WAIT,
    as_json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Print the servers announced on the broker to ``out`` (default stdout); return 0.

    A table (server-name, server-id, description) or, with ``as_json``, a JSON
    array of ``{"server_name", "server_id", "description", "meta"}``. None
    found is not an error: "no MCP servers announced …" goes to stderr.
    ``wait`` is how many seconds presence messages are collected after the
    subscription is granted.

    Raises:
        CliError: invalid filter, broker failure, subscription refused (exit 2).

    """
    out = out or sys.stdout
    async with broker_client(broker, broker.new_client_id()) as client:
        try:
            servers = await discover(client, name_filter, timeout=wait)
        except TopicError as err:
            raise CliError(f"invalid --filter {name_filter!r}: {err}") from None
        except SubscriptionRefusedError as err:
            raise _refused(err) from None
    if as_json:
        rows = [
            {
                "server_name": s.server_name,
                "server_id": s.server_id,
                "description": s.description,
                "meta": s.meta,
            }
            for s in servers
        ]
        out.write(json.dumps(rows, indent=2) + "\n")
    elif servers:
        table = [("SERVER-NAME", "SERVER-ID", "DESCRIPTION")] + [
            (s.server_name, s.server_id, " ".join(s.description.split()))
            for s in servers
        ]
        widths = [max(len(row[i]) for row in table) for i in range(2)]
        for row in table:
            out.write(
                f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip()
                + "\n"
            )
    if not servers:
        where = broker.settings.describe()
        suffix = "" if name_filter == "#" else f" matching {name_filter!r}"
        _error(f"no MCP servers announced{suffix} on {where}", prefix="")
    out.flush()
    return EXIT_OK


# --------------------------------------------------------------------------- #
# Entry points
# --------------------------------------------------------------------------- #


def _error(message: str, *, prefix: str = "error: ") -> None:
    """One line on stderr (never stdout: it is the MCP stream of ``connect``)."""
    print(f"{PROG}: {prefix}{message}", file=sys.stderr, flush=True)


def _configure_logging(verbose: int) -> None:
    level = (
        logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING
    )
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(__package__ or __name__).setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mqtt-bridge-mcp`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Usage errors print argparse's usage and return 2; ``--help`` returns 0.
    """
    parser = build_parser()
    try:
        options = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        broker = broker_options(options)
        _configure_logging(options.verbose)
        if options.command == "connect":
            ping = options.ping_interval if options.ping_interval > 0 else None
            return asyncio.run(connect(broker, options.server_name, ping_interval=ping))
        if options.command == "serve":
            return asyncio.run(_serve_until_signal(broker, serve_options(options)))
        return asyncio.run(
            list_servers(
                broker,
                options.filter,
                wait=max(0.0, options.wait),
                as_json=options.json,
            )
        )
    except CliError as err:
        _error(str(err))
        return err.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def run() -> NoReturn:
    """Console entry point ``mqtt-bridge-mcp`` (``pyproject.toml`` ``[project.scripts]``)."""
    sys.exit(main())
