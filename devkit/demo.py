"""Development demo: Mosquitto, a simulated Meshtastic node and Home Assistant.

``scripts/develop`` runs this module (``python -m devkit.demo``). It

1. starts a private Mosquitto on a random 127.0.0.1 port;
2. starts the node simulator (``python -m devkit.meshsim``) on another free
   port, pointed at that broker;
3. prepares ``config/`` at the repository root: ``configuration.yaml``, the
   ``custom_components/mqtt_bridge`` symlink, a finished onboarding, the user
   ``dev`` (password ``dev``) and the ``mqtt_bridge`` config entry "Sim Node",
   whose port is rewritten on every start because the simulator's port changes;
4. starts Home Assistant (``hass -c config --skip-pip``);
5. publishes simulated downlink traffic (a text message from the fictional
   remote node ``!cafe0001``) every few seconds and counts the ``msh/#``
   traffic crossing the broker in both directions.

Ctrl-C, SIGTERM or SIGHUP stop Home Assistant, the simulator, the publisher and
Mosquitto, in that order; a second Ctrl-C hurries the shutdown along. Every
child runs in a session of its own (so a Ctrl-C at the terminal reaches only
this process, which then stops them in order) and gets SIGTERM should this
process die. When Home Assistant exits to restart (exit code 100, the UI's
"Restart"), it is started again.

``--check`` starts everything, waits until Home Assistant answers HTTP, logs in
as ``dev`` and sees the config entry loaded (or the timeout passes), reports
what it saw, stops everything and exits 0 (loaded) or 1.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
import contextlib
import ctypes
import ctypes.util
from dataclasses import dataclass, field
from datetime import UTC, datetime
import errno
import json
import os
from pathlib import Path
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any
import uuid

import aiohttp
import aiomqtt

from devkit.mosquitto import Mosquitto, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
DOMAIN = "mqtt_bridge"
INTEGRATION_DIR = REPO_ROOT / "custom_components" / DOMAIN

#: The simulated node: node number 0x1A2B3C4D, i.e. ``!1a2b3c4d``.
SIM_NODE_NUM = 0x1A2B3C4D
ENTRY_TITLE = "Sim Node"
ENTRY_UNIQUE_ID = str(SIM_NODE_NUM)  # "439041101"

#: The fictional remote node whose downlink traffic the demo publishes.
REMOTE_NODE_NUM = 0xCAFE0001
REMOTE_NODE_ID = f"!{REMOTE_NODE_NUM:08x}"
CHANNEL_ID = "LongFast"
DOWNLINK_TOPIC = f"msh/2/e/{CHANNEL_ID}/{REMOTE_NODE_ID}"
BROADCAST_NUM = 0xFFFFFFFF

USERNAME = "dev"
PASSWORD = "dev"  # the documented demo login
RESTART_EXIT_CODE = 100  # homeassistant.const.RESTART_EXIT_CODE
PORT_ENV = "MQTT_BRIDGE_DEMO_HTTP_PORT"
HOST_ENV = "MQTT_BRIDGE_DEMO_HTTP_HOST"
CONFIG_MARKER = "# Managed by devkit/demo.py"

CONFIGURATION_YAML = f"""\
{CONFIG_MARKER}: rewritten on every start while this first line is here.
# Delete this line to keep your own edits. Loaded with `hass --skip-pip`, so
# only integrations whose requirements scripts/setup installed can be added
# (not `default_config:`, which needs bluetooth, go2rtc, cloud, ...).
homeassistant:
  name: MQTT Bridge dev
  unit_system: metric
  time_zone: UTC
  country: NL
  currency: EUR
  latitude: 52.37
  longitude: 4.89
  elevation: 0
  debug: true

http:
  server_host: !env_var {HOST_ENV} 127.0.0.1
  server_port: !env_var {PORT_ENV} 8123

frontend:
config:
history:
logbook:
automation: !include automations.yaml
script: !include scripts.yaml
scene: !include scenes.yaml

logger:
  default: warning
  logs:
    custom_components.{DOMAIN}: debug
"""


def log(message: str) -> None:
    """Print one line of the demo's own output."""
    print(f"demo: {message}", flush=True)


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_libc_name, use_errno=True) if _libc_name else None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the demo dies, even by SIGKILL (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """A subprocess in a session (process group) of its own."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: Path | None = None

    @property
    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.proc.returncode is None

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout: float, hurry: asyncio.Event) -> int | None:
        """SIGTERM the process group, wait up to ``timeout``, then SIGKILL.

        A set ``hurry`` event (a second Ctrl-C) cuts the wait short.
        """
        if self.running:
            log(f"stopping {self.name} (pid {self.proc.pid})")
            self._signal_group(signal.SIGTERM)
            waiter = asyncio.ensure_future(self.proc.wait())
            hurried = asyncio.ensure_future(hurry.wait())
            await asyncio.wait(
                {waiter, hurried}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            hurried.cancel()
            if not waiter.done():
                log(
                    f"killing {self.name}"
                    if hurry.is_set()
                    else f"{self.name} did not stop in {timeout:g} s; killing it"
                )
                self._signal_group(signal.SIGKILL)
            await waiter
        # Anything the child left in its group goes too.
        self._signal_group(signal.SIGKILL)
        return self.proc.returncode

    def log_tail(self, lines: int = 15) -> str:
        """Return the last lines of the child's log file, if it has one."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


async def spawn(
    name: str,
    argv: Sequence[str],
    *,
    env: dict[str, str],
    log_path: Path | None,
) -> Child:
    """Start ``argv`` in its own session; output to ``log_path`` or inherited."""
    if log_path is None:
        stdout: int | None = None
        log_file = None
    else:
        log_file = log_path.open("wb")
        stdout = log_file.fileno()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT if log_file else None,
            start_new_session=True,
            # preexec_fn is only safe while this process has a single thread.
            preexec_fn=_die_with_parent if threading.active_count() == 1 else None,
        )
    finally:
        if log_file is not None:
            log_file.close()
    return Child(name, proc, log_path)


def start_broker(workdir: Path) -> Mosquitto:
    """Start a private Mosquitto whose process has a session of its own.

    The broker gets ``start_new_session`` and the parent-death signal, so a
    Ctrl-C at the terminal does not stop it before Home Assistant.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "mosquitto.log").unlink(missing_ok=True)
    broker = Mosquitto(
        workdir=workdir,
        popen_kwargs={"start_new_session": True, "preexec_fn": _die_with_parent},
    )
    broker.start()
    return broker


def child_env(**extra: str) -> dict[str, str]:
    """Return the environment for children: the repo root on PYTHONPATH."""
    env = dict(os.environ)
    paths = [str(REPO_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.update(extra)
    return env


def hass_command() -> list[str]:
    """Return the command that runs Home Assistant from this interpreter's venv."""
    hass = Path(sys.executable).parent / "hass"
    if hass.exists():
        # The console script keeps a restart (exec of sys.argv) working.
        return [str(hass)]
    return [sys.executable, "-m", "homeassistant"]


# --------------------------------------------------------------------------
# The Home Assistant configuration directory
# --------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    """Write ``data`` as HA's storage helper does: indented, atomically, 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.demo-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)


def _flow_versions() -> tuple[int, int]:
    """Return (VERSION, MINOR_VERSION) of the integration's config flow, or (1, 1).

    Read with ``ast`` rather than imported: importing would pull in HA here.
    """
    version, minor = 1, 1
    source = INTEGRATION_DIR / "config_flow.py"
    if not source.is_file():
        return version, minor
    with contextlib.suppress(SyntaxError, OSError):
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            if not any(kw.arg == "domain" for kw in node.keywords):
                continue
            for stmt in node.body:
                if (
                    isinstance(stmt, ast.Assign)
                    and len(stmt.targets) == 1
                    and isinstance(stmt.targets[0], ast.Name)
                    and isinstance(stmt.value, ast.Constant)
                    and isinstance(stmt.value.value, int)
                ):
                    if stmt.targets[0].id == "VERSION":
                        version = stmt.value.value
                    elif stmt.targets[0].id == "MINOR_VERSION":
                        minor = stmt.value.value
    return version, minor


def write_configuration(config_dir: Path) -> None:
    """Write ``configuration.yaml`` unless the user took it over."""
    path = config_dir / "configuration.yaml"
    if path.exists() and not path.read_text().startswith(CONFIG_MARKER):
        log(f"keeping {path} (no '{CONFIG_MARKER}' first line)")
        return
    path.write_text(CONFIGURATION_YAML)
    # The files the UI editors save to, as HA's default configuration has them.
    for name, empty in (
        ("automations.yaml", "[]"),
        ("scripts.yaml", ""),
        ("scenes.yaml", ""),
    ):
        if not (config_dir / name).exists():
            (config_dir / name).write_text(empty)


def link_integration(config_dir: Path) -> None:
    """Symlink ``config/custom_components/mqtt_bridge`` to the repository's code."""
    link = config_dir / "custom_components" / DOMAIN
    link.parent.mkdir(parents=True, exist_ok=True)
    target = Path(os.path.relpath(INTEGRATION_DIR, link.parent))
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return
        link.unlink()
    elif link.exists():
        log(f"{link} is not a symlink; leaving it (it shadows {INTEGRATION_DIR})")
        return
    link.symlink_to(target, target_is_directory=True)


def write_onboarding(storage: Path) -> None:
    """Mark every onboarding step done, so HA shows its login page."""
    from homeassistant.components.onboarding import (
        STORAGE_KEY,
        STORAGE_VERSION,
    )
    from homeassistant.components.onboarding.const import STEPS

    path = storage / STORAGE_KEY
    if path.exists():
        return
    _write_json(
        path,
        {
            "version": STORAGE_VERSION,
            "minor_version": 1,
            "key": STORAGE_KEY,
            "data": {"done": list(STEPS)},
        },
    )


def upsert_config_entry(storage: Path, sim_port: int) -> str:
    """Create the "Sim Node" config entry, or point the existing one at ``sim_port``.

    Returns the entry id. The file follows HA 2025.4.4's
    ``ConfigEntryStore`` (``homeassistant/config_entries.py``).
    """
    from homeassistant.config_entries import (
        STORAGE_KEY,
        STORAGE_VERSION,
        STORAGE_VERSION_MINOR,
    )

    path = storage / STORAGE_KEY
    now = datetime.now(UTC).isoformat()
    if path.exists():
        document = json.loads(path.read_text())
    else:
        document = {
            "version": STORAGE_VERSION,
            "minor_version": STORAGE_VERSION_MINOR,
            "key": STORAGE_KEY,
            "data": {"entries": []},
        }
    entries: list[dict[str, Any]] = document["data"]["entries"]
    data = {
        "entry_type": "meshtastic_node",
        "connection": "tcp",
        "host": "127.0.0.1",
        "port": sim_port,
    }
    for entry in entries:
        if entry.get("domain") == DOMAIN and entry.get("unique_id") == ENTRY_UNIQUE_ID:
            entry["data"] = {**entry.get("data", {}), **data}
            entry["modified_at"] = now
            break
    else:
        version, minor = _flow_versions()
        entry = {
            "created_at": now,
            "data": data,
            "discovery_keys": {},
            "disabled_by": None,
            "domain": DOMAIN,
            "entry_id": uuid.uuid4().hex,
            "minor_version": minor,
            "modified_at": now,
            "options": {},
            "pref_disable_new_entities": False,
            "pref_disable_polling": False,
            "source": "user",
            "subentries": [],
            "title": ENTRY_TITLE,
            "unique_id": ENTRY_UNIQUE_ID,
            "version": version,
        }
        entries.append(entry)
    _write_json(path, document)
    return str(entry["entry_id"])


async def ensure_user(config_dir: Path, env: dict[str, str]) -> None:
    """Create the login ``dev``/``dev`` with ``hass --script auth`` if missing."""
    path = config_dir / ".storage" / "auth_provider.homeassistant"
    if path.exists():
        users = json.loads(path.read_text()).get("data", {}).get("users", [])
        if any(user.get("username") == USERNAME for user in users):
            return
    proc = await asyncio.create_subprocess_exec(
        *hass_command(),
        "--script",
        "auth",
        "-c",
        str(config_dir),
        "add",
        USERNAME,
        PASSWORD,
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(
            f"hass --script auth add failed ({proc.returncode}):\n{output.decode()}"
        )


def prepare_config(config_dir: Path, sim_port: int) -> str:
    """Write everything HA needs in ``config_dir``; return the entry id."""
    config_dir.mkdir(parents=True, exist_ok=True)
    write_configuration(config_dir)
    link_integration(config_dir)
    storage = config_dir / ".storage"
    storage.mkdir(exist_ok=True)
    write_onboarding(storage)
    return upsert_config_entry(storage, sim_port)


# --------------------------------------------------------------------------
# Broker traffic: simulated downlink publisher and msh/# counter
# --------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the demo's MQTT client saw on ``msh/#``."""

    published: int = 0
    downlink: int = 0
    uplink: int = 0
    uplink_topics: Counter[str] = field(default_factory=Counter)
    uplink_seen: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, topic: str) -> None:
        """Count one message, by direction."""
        if topic.endswith(f"/{REMOTE_NODE_ID}"):
            self.downlink += 1
        else:
            self.uplink += 1
            self.uplink_topics[topic] += 1
            self.uplink_seen.set()

    def summary(self) -> str:
        """Return a one-line summary."""
        topics = ", ".join(t for t, _ in self.uplink_topics.most_common(3))
        return (
            f"published {self.published} downlink; broker carried {self.downlink} "
            f"downlink and {self.uplink} uplink messages"
            + (f" (uplink topics: {topics})" if topics else "")
        )


def downlink_envelope(counter: int) -> bytes:
    """Return a serialized ServiceEnvelope with a decoded text message."""
    from meshtastic.protobuf import mesh_pb2, mqtt_pb2, portnums_pb2

    packet = mesh_pb2.MeshPacket()
    setattr(packet, "from", REMOTE_NODE_NUM)  # "from" is a Python keyword
    packet.to = BROADCAST_NUM
    packet.id = random.getrandbits(32) or 1
    packet.rx_time = int(time.time())
    packet.hop_limit = 3
    packet.hop_start = 3
    packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
    packet.decoded.payload = f"Hello from {REMOTE_NODE_ID} #{counter}".encode()
    envelope = mqtt_pb2.ServiceEnvelope(
        packet=packet, channel_id=CHANNEL_ID, gateway_id=REMOTE_NODE_ID
    )
    return envelope.SerializeToString()


async def run_mqtt(port: int, interval: float, traffic: Traffic) -> None:
    """Publish downlink traffic every ``interval`` s and count ``msh/#``.

    Reconnects if the broker goes away; runs until cancelled.
    """
    counter = 0

    async def publish_loop(client: aiomqtt.Client) -> None:
        nonlocal counter
        while True:
            counter += 1
            await client.publish(DOWNLINK_TOPIC, downlink_envelope(counter), qos=0)
            traffic.published += 1
            await asyncio.sleep(interval)

    while True:
        try:
            async with aiomqtt.Client(
                "127.0.0.1", port, identifier="mqtt-bridge-demo"
            ) as client:
                await client.subscribe("msh/#")
                publisher = asyncio.create_task(publish_loop(client))
                try:
                    async for message in client.messages:
                        traffic.record(str(message.topic))
                finally:
                    publisher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await publisher
        except aiomqtt.MqttError as err:
            log(f"demo MQTT client: {err}; reconnecting in 2 s")
            await asyncio.sleep(2)


# --------------------------------------------------------------------------
# Checks against the running Home Assistant
# --------------------------------------------------------------------------


async def http_answers(session: aiohttp.ClientSession, base: str) -> bool:
    """Return whether HA's HTTP server answers (any status) on ``base``.

    Asks for ``/manifest.json``, which needs no login: probing ``/api/`` would
    log an "invalid authentication" warning.
    """
    try:
        async with session.get(
            f"{base}/manifest.json", timeout=aiohttp.ClientTimeout(3)
        ):
            return True
    except (aiohttp.ClientError, TimeoutError):
        return False


async def login(session: aiohttp.ClientSession, base: str) -> str:
    """Log in as ``dev`` through HA's login flow; return an access token.

    The first login creates the (admin) user for the credentials that
    ``hass --script auth`` made.
    """
    client_id = f"{base}/"
    async with session.post(
        f"{base}/auth/login_flow",
        json={
            "client_id": client_id,
            "handler": ["homeassistant", None],
            "redirect_uri": f"{base}/?auth_callback=1",
        },
    ) as resp:
        resp.raise_for_status()
        flow = await resp.json()
    async with session.post(
        f"{base}/auth/login_flow/{flow['flow_id']}",
        json={"client_id": client_id, "username": USERNAME, "password": PASSWORD},
    ) as resp:
        resp.raise_for_status()
        result = await resp.json()
    if result.get("type") != "create_entry":
        raise RuntimeError(f"login as {USERNAME} failed: {result}")
    async with session.post(
        f"{base}/auth/token",
        data={
            "grant_type": "authorization_code",
            "code": result["result"],
            "client_id": client_id,
        },
    ) as resp:
        resp.raise_for_status()
        token = await resp.json()
    return str(token["access_token"])


async def get_json(session: aiohttp.ClientSession, url: str, token: str) -> Any:
    """GET ``url`` with a bearer token and return the JSON body."""
    async with session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        resp.raise_for_status()
        return await resp.json()


def integration_log_lines(log_path: Path, limit: int = 40) -> list[str]:
    """Return HA log records about this integration or at ERROR, newest last.

    A record's continuation lines (a traceback) are kept with it.
    """
    if not log_path.exists():
        return []
    lines: list[str] = []
    keep = False
    for line in log_path.read_text(errors="replace").splitlines():
        if line[:2].isdigit():  # "2026-11-21 06:27:32.094 LEVEL ..." starts a record
            keep = DOMAIN in line or " ERROR " in line or " CRITICAL " in line
        if keep:
            lines.append(line)
    return lines[-limit:]


#: Config entry states that will not turn into "loaded" by waiting.
_FAILED_STATES = {"setup_error", "migration_error", "not_loaded", "failed_unload"}


async def check(
    base: str,
    entry_id: str,
    hass: Child,
    *,
    timeout: float,
    uplink_wait: float,
    traffic: Traffic,
) -> bool:
    """Wait for HA's HTTP server, log in and wait for the entry to be loaded."""
    started = time.monotonic()
    deadline = started + timeout
    token: str | None = None
    answered = False
    state = "unknown"
    reason: str | None = None
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if not hass.running:
                log(f"check: Home Assistant exited with code {hass.proc.returncode}")
                return False
            if not answered:
                answered = await http_answers(session, base)
                if answered:
                    log(
                        f"check: Home Assistant answers on {base} after "
                        f"{time.monotonic() - started:.1f} s"
                    )
            if answered and token is None:
                with contextlib.suppress(aiohttp.ClientError, RuntimeError):
                    token = await login(session, base)
                    log(f"check: logged in as {USERNAME}/{PASSWORD}")
            if token is not None:
                try:
                    core = await get_json(session, f"{base}/api/config", token)
                    entries = await get_json(
                        session,
                        f"{base}/api/config/config_entries/entry?domain={DOMAIN}",
                        token,
                    )
                except aiohttp.ClientError:
                    entries, core = [], {}
                entry = next((e for e in entries if e["entry_id"] == entry_id), None)
                if entry is not None:
                    state, reason = entry["state"], entry.get("reason")
                if state == "loaded":
                    log(
                        f"check: config entry '{ENTRY_TITLE}' ({DOMAIN}) loaded after "
                        f"{time.monotonic() - started:.1f} s"
                    )
                    break
                if core.get("state") == "RUNNING" and state in _FAILED_STATES:
                    # Startup is over and nothing will retry this entry.
                    break
            await asyncio.sleep(1)
        if state != "loaded":
            if not answered:
                log(
                    f"check: Home Assistant did not answer on {base} in {timeout:.0f} s"
                )
            elif token is None:
                log(f"check: could not log in as {USERNAME}/{PASSWORD}")
            log(
                f"check: config entry '{ENTRY_TITLE}' ({DOMAIN}) state: {state}"
                + (f" ({reason})" if reason else "")
            )
            return False
    # Give the node's uplink a chance to cross the broker before reporting.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(traffic.uplink_seen.wait(), uplink_wait)
    return True


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def ensure_port_free(host: str, port: int) -> None:
    """Exit with a clear message if ``host:port`` cannot be bound."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise SystemExit(
                    f"demo: port {port} is in use (another Home Assistant?); "
                    "stop it or pass --port"
                ) from err
            raise


async def wait_for_tcp(
    port: int, child: Child, timeout: float, stop: asyncio.Event
) -> bool:
    """Wait until ``127.0.0.1:port`` accepts connections.

    Gives up when ``child`` exits, ``stop`` is set or ``timeout`` passes.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.running and not stop.is_set():
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
    return False


async def _watch_child(child: Child, on_exit: Callable[[], None]) -> None:
    """Report when ``child`` exits on its own."""
    await child.proc.wait()
    on_exit()


async def _stop_step(what: str, step: Awaitable[Any]) -> None:
    """Run one shutdown step; report errors but always go on to the next."""
    try:
        await step
    except Exception as err:  # shutdown must go on whatever failed
        log(f"error while stopping {what}: {err!r}")


def print_banner(args: argparse.Namespace, broker: Mosquitto, sim_port: int) -> None:
    """Tell a newcomer where to look."""
    base = f"http://{args.http_host}:{args.port}"
    config_dir = args.config_dir
    lines = [
        "",
        "MQTT Bridge demo is running",
        f"  Home Assistant   {base}   (login {USERNAME} / {PASSWORD})",
        f"  Broker           127.0.0.1:{broker.port}",
        f"     watch it:     mosquitto_sub -p {broker.port} -t 'msh/#' -v",
        f"  Simulated node   127.0.0.1:{sim_port} (!{SIM_NODE_NUM:08x})",
        f"  Downlink         {DOWNLINK_TOPIC} every {args.downlink_interval:g} s",
        f"  Logs             {config_dir / 'home-assistant.log'}",
        f"                   {config_dir / 'meshsim.log'}",
        f"                   {broker.log_path}",
        "  Stop             Ctrl-C",
        "",
    ]
    print("\n".join(lines), flush=True)


def preflight(args: argparse.Namespace) -> None:
    """Check what can be checked before anything starts."""
    args.config_dir.mkdir(parents=True, exist_ok=True)
    ensure_port_free(args.http_host, args.port)
    if not (INTEGRATION_DIR / "manifest.json").is_file():
        log(f"WARNING: {INTEGRATION_DIR / 'manifest.json'} does not exist yet")


async def run(args: argparse.Namespace) -> int:
    """Start everything, wait for a signal (or the check), stop everything."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log(f"{sig.name} again: hurrying the shutdown")
            hurry.set()
        else:
            log(f"{sig.name}: stopping")
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, on_signal, sig)

    config_dir: Path = args.config_dir
    preflight(args)

    broker: Mosquitto | None = None
    sim: Child | None = None
    hass: Child | None = None
    mqtt_task: asyncio.Task[None] | None = None
    watchers: list[asyncio.Task[None]] = []
    traffic = Traffic()
    result = 1
    env = child_env()
    base = f"http://{args.http_host}:{args.port}"
    hass_argv = [*hass_command(), "-c", str(config_dir), "--skip-pip"]
    if args.check:
        hass_argv.append("--log-no-color")
    hass_log = config_dir / "hass-console.log" if args.check else None
    try:
        broker = start_broker(config_dir / "mosquitto")
        log(f"Mosquitto listening on 127.0.0.1:{broker.port}")

        sim_port = free_port()
        sim = await spawn(
            "simulator",
            [
                sys.executable,
                "-m",
                "devkit.meshsim",
                "--host",
                "127.0.0.1",
                "--port",
                str(sim_port),
                "--broker",
                f"127.0.0.1:{broker.port}",
                "--interval",
                f"{args.interval:g}",
            ],
            env=env,
            log_path=config_dir / "meshsim.log",
        )
        log(f"node simulator starting on 127.0.0.1:{sim_port} (pid {sim.proc.pid})")

        entry_id = prepare_config(config_dir, sim_port)
        await ensure_user(config_dir, env)

        if not await wait_for_tcp(sim_port, sim, 15, stop) and not stop.is_set():
            log(
                f"WARNING: the simulator is not listening on {sim_port} "
                f"(exit code {sim.proc.returncode}); last lines of its log:\n"
                + sim.log_tail()
            )
        sim_ref = sim
        watchers.append(
            asyncio.create_task(
                _watch_child(
                    sim,
                    lambda: log(
                        f"WARNING: simulator exited ({sim_ref.proc.returncode}); "
                        f"see {sim_ref.log_path}"
                    ),
                )
            )
        )

        hass_env = child_env(**{PORT_ENV: str(args.port), HOST_ENV: args.http_host})
        hass = await spawn("Home Assistant", hass_argv, env=hass_env, log_path=hass_log)
        log(f"Home Assistant starting (pid {hass.proc.pid}) on {base}")

        # Threads (aiomqtt's executor) only from here on: no more preexec_fn.
        mqtt_task = asyncio.create_task(
            run_mqtt(broker.port, args.downlink_interval, traffic)
        )

        if args.check:
            check_task = asyncio.create_task(
                check(
                    base,
                    entry_id,
                    hass,
                    timeout=args.timeout,
                    uplink_wait=2 * args.interval + 5,
                    traffic=traffic,
                )
            )
            stop_task = asyncio.create_task(stop.wait())
            await asyncio.wait(
                {check_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
            )
            stop_task.cancel()
            if check_task.done():
                result = 0 if check_task.result() else 1
                if result == 0 and traffic.uplink == 0:
                    log(
                        "check: WARNING: no uplink message from the node crossed "
                        "the broker (is the proxy forwarding?)"
                    )
            else:
                check_task.cancel()
                log("check: interrupted")
        else:
            print_banner(args, broker, sim_port)
            result = await supervise_hass(hass, hass_argv, hass_env, stop)
    finally:
        # Stop in order: Home Assistant, the simulator, the publisher, Mosquitto.
        for task in watchers:
            task.cancel()
        if hass is not None:
            await _stop_step("Home Assistant", hass.stop(90, hurry))
        if sim is not None:
            await _stop_step("the simulator", sim.stop(10, hurry))
        if mqtt_task is not None:
            log("stopping the downlink publisher")
            mqtt_task.cancel()
            await _stop_step("the publisher", _await_cancelled(mqtt_task))
        if broker is not None:
            log("stopping Mosquitto")
            broker.cleanup()
        log(traffic.summary())
    if args.check:
        print_check_report(config_dir, hass_log, sim, result)
    return result


async def _await_cancelled(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled task, swallowing its CancelledError."""
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def supervise_hass(
    hass: Child, argv: list[str], env: dict[str, str], stop: asyncio.Event
) -> int:
    """Wait for a stop signal; restart HA when it exits with code 100.

    Returns the demo's exit code: 0 when stopped by a signal, 1 when Home
    Assistant exited by itself.
    """
    while True:
        stop_task = asyncio.create_task(stop.wait())
        exit_task = asyncio.create_task(hass.proc.wait())
        await asyncio.wait({stop_task, exit_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        exit_task.cancel()
        if stop.is_set():
            return 0
        code = hass.proc.returncode
        if code != RESTART_EXIT_CODE:
            log(f"Home Assistant exited with code {code}")
            return 1
        log("Home Assistant asked for a restart; starting it again")
        new = await spawn("Home Assistant", argv, env=env, log_path=hass.log_path)
        hass.proc = new.proc


def print_check_report(
    config_dir: Path, hass_log: Path | None, sim: Child | None, result: int
) -> None:
    """After ``--check``: show the relevant log lines and the verdict."""
    lines = integration_log_lines(config_dir / "home-assistant.log")
    if lines:
        log("home-assistant.log lines about mqtt_bridge / errors:")
        for line in lines:
            print(f"    {line}")
    if result != 0:
        if hass_log is not None and hass_log.exists():
            tail = hass_log.read_text(errors="replace").splitlines()[-10:]
            log(f"last lines of {hass_log}:")
            for line in tail:
                print(f"    {line}")
        if sim is not None and sim.log_path is not None:
            log(f"last lines of {sim.log_path}:")
            for line in sim.log_tail(10).splitlines():
                print(f"    {line}")
    log("check: OK" if result == 0 else "check: FAILED")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/develop",
        description=__doc__.split("\n\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="start everything, wait until HA answers and the config entry is "
        "loaded (or --timeout passes), stop everything; exit 0 or 1",
    )
    parser.add_argument(
        "--timeout", type=float, default=90.0, help="--check time limit (s)"
    )
    parser.add_argument(
        "--port", type=int, default=8123, help="Home Assistant HTTP port"
    )
    parser.add_argument(
        "--http-host",
        default="127.0.0.1",
        help="address HA listens on (0.0.0.0 to reach it from elsewhere)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="simulator's --interval (s between its own packets)",
    )
    parser.add_argument(
        "--downlink-interval",
        type=float,
        default=5.0,
        help="seconds between simulated downlink messages",
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=REPO_ROOT / "config",
        help="Home Assistant configuration directory",
    )
    args = parser.parse_args(argv)
    args.config_dir = args.config_dir.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return the process exit code."""
    args = parse_args(argv)
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        log("mosquitto is not installed; run scripts/setup")
        return 1
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
