"""A private RabbitMQ node with the MQTT plugin: a real MQTT-3.1.1-only broker.

Debian 12's ``rabbitmq-server`` is 3.10, whose ``rabbitmq_mqtt`` plugin speaks
MQTT 3.1 and 3.1.1 only: an MQTT 5 CONNECT is refused. The tests use it to
exercise the client's MQTT 5 -> 3.1.1 fallback against a real broker.

Each :class:`RabbitMQ` runs ``/usr/lib/rabbitmq/bin/rabbitmq-server`` (the
script behind Debian's ``/usr/sbin`` wrapper, which would ``su`` to the
``rabbitmq`` user) as the current user, with everything in a temporary
directory of its own: configuration, enabled plugins, Erlang cookie (``HOME``),
Mnesia database and logs. It listens on 127.0.0.1 only: MQTT, AMQP and Erlang
distribution on free ports, and an ``epmd`` of its own on a free port too
(``ERL_EPMD_PORT``), so nothing is shared with the system's or another test
session's nodes, and :meth:`RabbitMQ.stop` leaves no process behind.

The first start of a node takes about 10 s (the MQTT plugin waits 3-6 s for
cluster peers before it forms its client-id tracking Raft cluster); a restart
on the same directory is faster. Start one per test session at most.
"""

from __future__ import annotations

import atexit
from collections.abc import Iterator
import contextlib
import os
from pathlib import Path
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

from devkit.mosquitto import free_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQ_LIB = Path("/usr/lib/rabbitmq/lib")

_NOT_INSTALLED = (
    "RabbitMQ with the rabbitmq_mqtt plugin is not installed; run scripts/setup "
    "(apt-get install --no-install-recommends rabbitmq-server)"
)

_CONF = """\
# Written by devkit/rabbitmq.py for a private test node.
listeners.tcp.1 = 127.0.0.1:{amqp_port}
mqtt.listeners.tcp.1 = 127.0.0.1:{port}
mqtt.listeners.ssl = none
mqtt.allow_anonymous = true
mqtt.default_user = guest
mqtt.default_pass = guest
mqtt.vhost = /
mqtt.exchange = amq.topic
loopback_users = none
log.console = false
log.file.level = info
{extra}
"""


def find_rabbitmq() -> str | None:
    """Return the path of ``rabbitmq-server`` if it and ``rabbitmq_mqtt`` are installed.

    This is the script under ``/usr/lib/rabbitmq/bin``, not Debian's
    ``/usr/sbin`` wrapper (which switches to the ``rabbitmq`` user).
    """
    if not os.access(RABBITMQ_SERVER, os.X_OK):
        return None
    if not any(RABBITMQ_LIB.glob("rabbitmq_server-*/plugins/rabbitmq_mqtt-*")):
        return None
    return RABBITMQ_SERVER


def find_epmd() -> str:
    """Return the path of Erlang's ``epmd`` (installed with ``rabbitmq-server``)."""
    for candidate in (
        shutil.which("epmd"),
        "/usr/bin/epmd",
        "/usr/lib/erlang/bin/epmd",
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"epmd not found; {_NOT_INSTALLED}")


def _true_socket() -> type[socket.socket]:
    """The real socket class, also while pytest-socket has replaced ``socket.socket``."""
    try:
        import pytest_socket

        return pytest_socket._true_socket
    except ImportError:
        return socket.socket


def mqtt311_connect_packet(client_id: str, keepalive: int = 10) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, no credentials) for ``client_id``."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02" + keepalive.to_bytes(2, "big")
    payload = len(cid).to_bytes(2, "big") + cid
    remaining = len(variable) + len(payload)
    if remaining > 127:
        raise ValueError("client id too long for this probe")
    return bytes([0x10, remaining]) + variable + payload


def mqtt311_probe(host: str, port: int, timeout: float = 2.0) -> int | None:
    """Send an MQTT 3.1.1 CONNECT; return the CONNACK return code (0 = accepted).

    Returns ``None`` when nothing listens, the connection closes or no CONNACK
    arrives within ``timeout``. Uses the real socket class and a literal IP
    address, so it works inside pytest-homeassistant-custom-component's socket
    guard (connect only to 127.0.0.1).
    """
    sock = _true_socket()(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(mqtt311_connect_packet(f"mqttbridge-probe-{secrets.token_hex(4)}"))
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return None
            data += chunk
        if data[0] != 0x20 or data[1] != 0x02:
            return None
        if data[3] == 0:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT
        return data[3]
    except OSError:
        return None
    finally:
        sock.close()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid``, parents before children."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


def _start_time(pid: int) -> str | None:
    """The kernel's start time of a live ``pid`` (to tell a reused pid apart).

    ``None`` when the process is gone or a zombie.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RabbitMQ:
    """One private RabbitMQ node with MQTT on ``port``; ``start()``, ``stop()``, ``kill()``.

    Ports and the node name are chosen once and kept across restarts, so a
    restart reuses the node's database and clients can reconnect to ``port``.
    Anonymous MQTT connections are accepted (as RabbitMQ's ``guest`` user, vhost
    ``/``, topics on ``amq.topic``).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        workdir: Path | None = None,
        extra_config: str = "",
        popen_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Prepare (not start) a node; ``extra_config`` is appended to rabbitmq.conf.

        ``popen_kwargs`` are passed to :class:`subprocess.Popen` for the server
        script (it always gets a session of its own, so that :meth:`stop` can
        signal its whole process group).
        """
        self.server = find_rabbitmq()
        self._popen_kwargs = popen_kwargs or {}
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"mqttbridge-{secrets.token_hex(4)}@localhost"
        self._extra = extra_config
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="rabbitmq-"))
        self.log_path = self.workdir / "rabbitmq-server.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        self._tracked: dict[int, str | None] = {}
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # --- files ---------------------------------------------------------------

    @property
    def node_log_path(self) -> Path:
        """RabbitMQ's own log file of this node."""
        return self.workdir / "log" / f"{self.nodename}.log"

    def _prepare(self) -> dict[str, str]:
        """Write the node's files; return the server's environment."""
        work = self.workdir
        home = work / "home"
        for sub in (home, work / "mnesia", work / "log"):
            sub.mkdir(parents=True, exist_ok=True)
        # The directory is only used by the current user (the server runs as
        # it, root included); keep it private like RabbitMQ's own dirs.
        work.chmod(0o700)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20))
            cookie.chmod(0o400)
        (work / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (work / "rabbitmq-env.conf").write_text("")
        (work / "rabbitmq.conf").write_text(
            _CONF.format(amqp_port=self.amqp_port, port=self.port, extra=self._extra)
        )
        env = {
            key: value
            for key, value in os.environ.items()
            # Nothing of a caller's own RabbitMQ/Erlang setup leaks in.
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=str(home),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_USE_LONGNAME="false",
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(work / "mnesia"),
            RABBITMQ_LOG_BASE=str(work / "log"),
            RABBITMQ_CONFIG_FILE=str(work / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(work / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(work / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(work / "enabled_plugins"),
            # Our own epmd (started below) only; distribution on loopback.
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                "-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}"
            ),
        )
        return env

    # --- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the node and wait until MQTT accepts a 3.1.1 CONNECT.

        Raises:
            FileNotFoundError: RabbitMQ or its MQTT plugin is not installed.
            RuntimeError: the node exited or was not ready within ``timeout``.

        """
        if self.server is None:
            raise FileNotFoundError(_NOT_INSTALLED)
        if self.proc is not None and self.proc.poll() is None:
            return
        began = time.monotonic()
        env = self._prepare()
        log = self.log_path.open("ab")
        try:
            if self.epmd is None or self.epmd.poll() is not None:
                self.epmd = subprocess.Popen(
                    [
                        find_epmd(),
                        "-port",
                        str(self.epmd_port),
                        "-address",
                        "127.0.0.1",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=env,
                    start_new_session=True,
                )
                try:
                    self._wait_for_epmd(began + 5.0)
                except RuntimeError:
                    self.stop()
                    raise
            self.proc = subprocess.Popen(
                [self.server],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                **{**self._popen_kwargs, "start_new_session": True},
            )
        finally:
            log.close()
        atexit.register(self.stop)
        deadline = began + timeout
        while time.monotonic() < deadline:
            self._track()
            if self.proc.poll() is not None:
                break
            if mqtt311_probe(self.host, self.port, timeout=2.0) == 0:
                self._track()
                self.start_seconds = time.monotonic() - began
                return
            time.sleep(0.1)
        status = (
            f"exited with {self.proc.returncode}"
            if self.proc.poll() is not None
            else f"not ready within {timeout:.0f} s"
        )
        details = self.log_tail()
        self.stop()
        raise RuntimeError(f"RabbitMQ node {self.nodename} {status}:\n{details}")

    def _wait_for_epmd(self, deadline: float) -> None:
        """Wait until the private epmd listens (the node registers at boot)."""
        assert self.epmd is not None
        while time.monotonic() < deadline and self.epmd.poll() is None:
            sock = _true_socket()(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.settimeout(1.0)
                sock.connect((self.host, self.epmd_port))
                return
            except OSError:
                time.sleep(0.01)
            finally:
                sock.close()
        raise RuntimeError(f"epmd did not listen on port {self.epmd_port}")

    def _track(self) -> None:
        """Remember the server's descendants (beam.smp, erl_child_setup, ...)."""
        if self.proc is None:
            return
        for pid in _descendants(self.proc.pid):
            self._tracked.setdefault(pid, _start_time(pid))

    def _tracked_alive(self) -> list[int]:
        return [
            pid
            for pid, started in self._tracked.items()
            if started is not None and _start_time(pid) == started
        ]

    def _reap_tracked(self, timeout: float) -> None:
        """Wait for tracked descendants to exit; SIGKILL those that do not."""
        deadline = time.monotonic() + timeout
        while self._tracked_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in self._tracked_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while self._tracked_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._tracked.clear()

    def stop(self, timeout: float = 15.0) -> None:
        """Shut the node down (gracefully, SIGKILL after ``timeout``) and its epmd.

        Idempotent. Leaves no process of this node behind: the server script,
        ``beam.smp``, its port programs and the private ``epmd``.
        """
        began = time.monotonic()
        if self.proc is not None:
            self._track()
            if self.proc.poll() is None:
                # The script's TERM trap stops beam.smp and waits for it.
                with contextlib.suppress(ProcessLookupError):
                    self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            self._reap_tracked(5.0)
            self.proc = None
            self.stop_seconds = time.monotonic() - began
        if self.epmd is not None:
            with contextlib.suppress(ProcessLookupError):
                self.epmd.kill()
            self.epmd.wait()
            self.epmd = None
        atexit.unregister(self.stop)

    def kill(self) -> None:
        """Kill the node abruptly (SIGKILL to beam.smp), as a crash would."""
        if self.proc is None:
            return
        self._track()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._reap_tracked(5.0)
        self.proc = None

    def restart(self) -> None:
        """Start again (same ports, name and database) after stop or kill."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the node and remove its work directory if it created one."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- introspection -------------------------------------------------------

    def pids(self) -> list[int]:
        """The running processes of this node (server script and descendants)."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        return [self.proc.pid, *_descendants(self.proc.pid)]

    def rss_kib(self) -> int:
        """Resident memory of the node's processes and its epmd, in KiB."""
        pids = self.pids()
        if self.epmd is not None and self.epmd.poll() is None:
            pids.append(self.epmd.pid)
        return sum(_rss_kib(pid) for pid in pids)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output and of the node's log."""
        parts = []
        for path in (self.log_path, self.node_log_path):
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(parts) or "(no output)"

    def __enter__(self) -> RabbitMQ:
        """Start on entry."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Clean up on exit."""
        self.cleanup()


def rabbitmq_broker(**kwargs: Any) -> Iterator[RabbitMQ]:
    """Body of a pytest fixture: start a node, yield it, clean it up.

    Fails the requesting test (``pytest.fail``, not a skip) with a clear
    message when RabbitMQ is not installed: ``scripts/setup`` installs it.
    Usage in a conftest::

        @pytest.fixture(scope="session")
        def rabbitmq_session() -> Iterator[RabbitMQ]:
            yield from rabbitmq_broker()
    """
    import pytest

    if find_rabbitmq() is None:
        pytest.fail(_NOT_INSTALLED, pytrace=False)
    broker = RabbitMQ(**kwargs)
    try:
        broker.start()
    except RuntimeError as err:
        broker.cleanup()
        pytest.fail(str(err), pytrace=False)
    try:
        yield broker
    finally:
        broker.cleanup()
