"""Development demo: Mosquitto, a simulated Meshtastic node, a demo MQTT device, Home Assistant.

``scripts/develop`` runs this module (``python -m devkit.demo``). It

1. starts a private Mosquitto on a random 127.0.0.1 port;
2. starts the node simulator (``python -m devkit.meshsim``) on another free
   port, pointed at that broker;
3. prepares ``config/`` at the repository root (``devkit.hass_runner``):
   ``configuration.yaml``, the ``custom_components/mqtt_bridge`` symlink, a
   finished onboarding, the user ``dev`` (password ``dev``) and two config
   entries, rewritten on every start because the ports change: the node
   "Sim Node" and the "MQTT broker" entry "Demo broker" on the same Mosquitto,
   whose topic rules (created once, then yours to edit in the UI) let AI agents
   read and write ``demo/#`` and read ``msh/#``;
4. starts Home Assistant (``hass -c config --skip-pip``);
5. publishes simulated downlink traffic (a text message from the fictional
   remote node ``!cafe0001``) every few seconds and counts the ``msh/#``
   traffic crossing the broker in both directions;
6. runs a small MQTT 5 device on ``demo/...`` (:func:`run_device`): retained
   living-room temperature and humidity, a light switched by
   ``demo/livingroom/light/set``, and a responder on ``demo/device/request``
   for ``mqtt_query`` (Response Topic + Correlation Data);
7. shares the simulated node on port 4404 ("Share this node" in the node
   entry's options), for the Meshtastic apps, ``meshtastic --host
   127.0.0.1:4404`` and MeshMonitor;
8. hosts ``devkit/demo_mcp_server.py`` on the broker as the stdio MCP server
   "Demo tools" (server-name ``demo/tools``, a config subentry of the broker
   entry), which ``mqtt-bridge-mcp`` and Assist agents reach over MQTT;
9. once Home Assistant answers, makes sure ``config/mcp-token.txt`` holds a
   working long-lived access token of ``dev`` (created through the websocket
   API) and prints the MCP endpoint and a ready MCP Inspector command.

Ctrl-C, SIGTERM or SIGHUP stop Home Assistant, the simulator, the MQTT clients
and Mosquitto, in that order; a second Ctrl-C hurries the shutdown along. Every
child runs in a session of its own (so a Ctrl-C at the terminal reaches only
this process, which then stops them in order) and gets SIGTERM should this
process die. When Home Assistant exits to restart (exit code 100, the UI's
"Restart"), it is started again.

``--check`` starts everything, waits until Home Assistant answers HTTP, logs in
as ``dev``, sees both config entries loaded, asks the MCP endpoint for
tools/list with the demo token (and reads the demo device's temperature and
queries its responder through it), finds "Demo tools" with
``mqtt-bridge-mcp list`` and calls one of its tools through
``mqtt-bridge-mcp connect`` with a real MCP client session, runs
``meshtastic --host 127.0.0.1:4404 --info`` against the shared node, reports what it saw, stops everything and
exits 0 (all good) or 1.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
import contextlib
import ctypes
import ctypes.util
from dataclasses import dataclass, field
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

import aiohttp
import aiomqtt

from devkit.hass_runner import (
    DOMAIN,
    FAILED_STATES,
    INTEGRATION_DIR,
    REPO_ROOT,
    RESTART_EXIT_CODE,
    EntrySpec,
    broker_entry,
    child_env,
    create_long_lived_token,
    entry_states,
    get_json,
    hass_command,
    http_answers,
    inspector_command,
    integration_log_lines,
    link_integration,
    login,
    mcp_url,
    token_works,
    upsert_config_entries,
    write_login,
    write_onboarding,
)
from devkit.mosquitto import Mosquitto, free_port

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

#: The "MQTT broker" entry: the MQTT tools for AI agents on the demo broker.
BROKER_TITLE = "Demo broker"
#: Marks the demo's broker entry (its unique id has the broker's port, which
#: changes on every start); also the prefix of its MQTT client ids.
BROKER_CLIENT_ID_PREFIX = "mqtt-bridge-demo"
#: "Share this node": the port Home Assistant serves the simulated node on to
#: the Meshtastic apps, the ``meshtastic`` CLI and MeshMonitor (the default).
SHARE_PORT = 4404
#: The stdio MCP server the demo broker entry hosts on MQTT (a config subentry).
DEMO_SERVER_TITLE = "Demo tools"
DEMO_SERVER_NAME = "demo/tools"
#: The entry's topic rules when it is created (mcpMQTT's ``topics`` format);
#: later edits in the UI (Settings → Devices & services → MQTT Bridge →
#: Demo broker → Configure) are kept.
BROKER_RULES: list[dict[str, Any]] = [
    {
        "pattern": "demo/#",
        "permissions": ["read", "write"],
        "description": (
            "Demo devices: demo/livingroom/temperature and /humidity (retained, "
            "°C and %), demo/livingroom/light/state (retained on/off; publish "
            "on, off or toggle to demo/livingroom/light/set), and a status "
            "service answering mqtt_query requests on demo/device/request"
        ),
    },
    {
        "pattern": "msh/#",
        "permissions": ["read"],
        "description": (
            "Meshtastic MQTT traffic of the simulated mesh "
            "(protobuf ServiceEnvelopes, binary)"
        ),
    },
]

#: The demo device's topics (:func:`run_device`).
DEVICE_TEMPERATURE = "demo/livingroom/temperature"
DEVICE_HUMIDITY = "demo/livingroom/humidity"
DEVICE_LIGHT_STATE = "demo/livingroom/light/state"
DEVICE_LIGHT_SET = "demo/livingroom/light/set"
DEVICE_REQUEST = "demo/device/request"
#: Where the device answers a request without a Response Topic (MQTT 3.1.1).
DEVICE_RESPONSE = "demo/device/response"

USERNAME = "dev"
PASSWORD = "dev"  # the documented demo login
PORT_ENV = "MQTT_BRIDGE_DEMO_HTTP_PORT"
HOST_ENV = "MQTT_BRIDGE_DEMO_HTTP_HOST"
CONFIG_MARKER = "# Managed by devkit/demo.py"
#: The long-lived access token of ``dev`` for MCP clients, in the config dir.
TOKEN_FILE = "mcp-token.txt"
TOKEN_CLIENT_NAME = "MQTT Bridge demo (MCP clients)"

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


# --------------------------------------------------------------------------
# The Home Assistant configuration directory
# --------------------------------------------------------------------------


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


def _is_demo_broker(entry: Mapping[str, Any]) -> bool:
    """Whether a stored config entry is the demo's "MQTT broker" entry."""
    data = entry.get("data", {})
    return bool(
        data.get("entry_type") == "mqtt_broker"
        and data.get("client_id_prefix") == BROKER_CLIENT_ID_PREFIX
    )


def demo_entries(sim_port: int, broker_port: int) -> list[EntrySpec]:
    """The node entry "Sim Node" and the MQTT broker entry "Demo broker".

    Both exist once: an existing one is pointed at the new ports; its options
    (proxy settings, topic rules) stay as the user left them.
    """
    node = EntrySpec(
        title=ENTRY_TITLE,
        unique_id=ENTRY_UNIQUE_ID,
        data={
            "entry_type": "meshtastic_node",
            "connection": "tcp",
            "host": "127.0.0.1",
            "port": sim_port,
        },
        option_defaults={
            "share_node": True,
            "share_port": SHARE_PORT,
            "share_host": "0.0.0.0",
            "share_networks": [],
        },
    )
    broker = broker_entry(
        "127.0.0.1",
        broker_port,
        BROKER_RULES,
        title=BROKER_TITLE,
        client_id_prefix=BROKER_CLIENT_ID_PREFIX,
        replace_options=False,
        match=_is_demo_broker,
    )
    broker.subentries.append(demo_stdio_server())
    return [node, broker]


def demo_stdio_server() -> dict[str, Any]:
    """The config subentry "Demo tools": ``devkit/demo_mcp_server.py`` on MQTT.

    Hosted by the demo broker entry under the server-name
    :data:`DEMO_SERVER_NAME`; run with this interpreter (the project's venv).
    """
    return {
        "subentry_type": "stdio_server",
        "title": DEMO_SERVER_TITLE,
        "unique_id": DEMO_SERVER_NAME,
        "data": {
            "command": sys.executable,
            "args": [str(REPO_ROOT / "devkit" / "demo_mcp_server.py")],
            "env": "",
            "cwd": "",
            "server_name": DEMO_SERVER_NAME,
            "description": "Dice, time and word count: the demo's stdio MCP server",
        },
    }


def prepare_config(config_dir: Path, sim_port: int, broker_port: int) -> list[str]:
    """Write everything HA needs in ``config_dir``; return the entry ids (node, broker)."""
    config_dir.mkdir(parents=True, exist_ok=True)
    write_configuration(config_dir)
    warning = link_integration(config_dir)
    if warning:
        log(warning)
    storage = config_dir / ".storage"
    storage.mkdir(exist_ok=True)
    write_onboarding(storage)
    write_login(config_dir, USERNAME, PASSWORD)
    return upsert_config_entries(storage, demo_entries(sim_port, broker_port))


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
# The demo MQTT device (what the MQTT tools for AI agents can play with)
# --------------------------------------------------------------------------

#: Seconds between two readings of the demo device's sensors.
DEVICE_INTERVAL = 10.0


@dataclass
class DeviceState:
    """What the demo device reports."""

    temperature: float = 21.0
    humidity: float = 48.0
    light: str = "off"
    requests: int = 0
    started: float = field(default_factory=time.monotonic)

    def step(self) -> None:
        """Let the readings wander a little."""
        self.temperature = round(
            min(26.0, max(17.0, self.temperature + random.uniform(-0.3, 0.3))), 1
        )
        self.humidity = round(
            min(70.0, max(30.0, self.humidity + random.uniform(-1.0, 1.0)))
        )

    def status(self, request: str) -> dict[str, Any]:
        """The answer to a request on ``demo/device/request``."""
        return {
            "device": "demo living room",
            "temperature_c": self.temperature,
            "humidity_pct": self.humidity,
            "light": self.light,
            "uptime_s": round(time.monotonic() - self.started),
            "requests": self.requests,
            "request": request,
        }


def _text(payload: Any) -> str:
    """An aiomqtt payload as text."""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload).decode(errors="replace")
    return "" if payload is None else str(payload)


async def _device_message(
    client: aiomqtt.Client, message: aiomqtt.Message, state: DeviceState
) -> None:
    """Switch the light, or answer a request (MQTT 5 Response Topic, else 3.1.1)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topic = message.topic.value
    if topic == DEVICE_LIGHT_SET:
        command = _text(message.payload).strip().lower()
        if command == "toggle":
            command = "off" if state.light == "on" else "on"
        if command in ("on", "off"):
            state.light = command
            await client.publish(DEVICE_LIGHT_STATE, command, qos=1, retain=True)
        return
    if topic != DEVICE_REQUEST:
        return
    state.requests += 1
    props = message.properties
    response_topic = getattr(props, "ResponseTopic", None) or DEVICE_RESPONSE
    answer = Properties(PacketTypes.PUBLISH)
    correlation = getattr(props, "CorrelationData", None)
    if correlation is not None:
        answer.CorrelationData = correlation
    body = json.dumps(state.status(_text(message.payload)))
    await client.publish(response_topic, body, qos=1, properties=answer)


async def run_device(port: int, interval: float = DEVICE_INTERVAL) -> None:
    """Run the demo device on ``demo/...``; reconnects; runs until cancelled.

    Retained ``demo/livingroom/temperature`` and ``/humidity`` every
    ``interval`` s; ``demo/livingroom/light/set`` (``on``, ``off``, ``toggle``)
    switches the retained ``demo/livingroom/light/state``; a request on
    ``demo/device/request`` is answered with the device's status as JSON on its
    Response Topic with its Correlation Data (``mqtt_query``), or on
    ``demo/device/response`` when it has none.
    """
    state = DeviceState()

    async def sensor_loop(client: aiomqtt.Client) -> None:
        while True:
            await client.publish(
                DEVICE_TEMPERATURE, f"{state.temperature:.1f}", qos=1, retain=True
            )
            await client.publish(
                DEVICE_HUMIDITY, f"{state.humidity:.0f}", qos=1, retain=True
            )
            await asyncio.sleep(interval)
            state.step()

    while True:
        try:
            async with aiomqtt.Client(
                "127.0.0.1",
                port,
                identifier="mqtt-bridge-demo-device",
                protocol=aiomqtt.ProtocolVersion.V5,
            ) as client:
                await client.publish(
                    DEVICE_LIGHT_STATE, state.light, qos=1, retain=True
                )
                await client.subscribe(DEVICE_LIGHT_SET, qos=1)
                await client.subscribe(DEVICE_REQUEST, qos=1)
                sensors = asyncio.create_task(sensor_loop(client))
                try:
                    async for message in client.messages:
                        await _device_message(client, message, state)
                finally:
                    sensors.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sensors
        except aiomqtt.MqttError as err:
            log(f"demo device: {err}; reconnecting in 2 s")
            await asyncio.sleep(2)


# --------------------------------------------------------------------------
# The demo's access token and the MCP endpoint
# --------------------------------------------------------------------------


async def ensure_token(
    session: aiohttp.ClientSession, base: str, config_dir: Path
) -> tuple[str, bool]:
    """Return a working long-lived access token of ``dev`` and whether it is new.

    Kept in ``config/mcp-token.txt`` (mode 0600) across starts; a token that
    no longer works (e.g. deleted in the UI) is replaced by a new one, created
    through the websocket API (``auth/long_lived_access_token``).
    """
    path = config_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token and await token_works(session, base, token):
            return token, False
    access = await login(session, base, USERNAME, PASSWORD)
    token = await create_long_lived_token(
        session, base, access, client_name=TOKEN_CLIENT_NAME
    )
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, True


def _shown(path: Path) -> str:
    """``path`` relative to the current directory when it is below it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def mcp_lines(base: str, broker_entry_id: str, config_dir: Path) -> list[str]:
    """The banner lines about the MCP endpoint of the demo broker entry."""
    url = mcp_url(base, broker_entry_id)
    token_path = _shown(config_dir / TOKEN_FILE)
    token = f"$(cat {token_path})"
    call = inspector_command(
        url,
        token,
        "--method tools/call --tool-name mqtt_read",
        f"--tool-arg topic={DEVICE_TEMPERATURE}",
    )
    return [
        f"  MCP endpoint     {url}",
        f"     entry:        '{BROKER_TITLE}': read+write demo/#, read msh/# "
        "(edit the rules: Settings → Devices & services → MQTT Bridge → Configure)",
        f"     token:        {token_path} (a long-lived token of {USERNAME}, written "
        "once Home Assistant is up;",
        "                   make your own: your profile → Security → Long-lived "
        "access tokens)",
        f"     list tools:   {inspector_command(url, token)}",
        f"     call one:     {call}",
        f"  Demo device      {DEVICE_TEMPERATURE}, {DEVICE_HUMIDITY}, "
        f"{DEVICE_LIGHT_STATE} (retained);",
        f"                   publish on|off|toggle to {DEVICE_LIGHT_SET}; "
        f"mqtt_query {DEVICE_REQUEST}",
    ]


async def announce_token(
    base: str, config_dir: Path, hass: Child, stop: asyncio.Event, timeout: float = 300
) -> None:
    """Once Home Assistant answers, make sure the token file works and say so."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline and not stop.is_set():
            if hass.running and await http_answers(session, base):
                try:
                    _, new = await ensure_token(session, base, config_dir)
                except (aiohttp.ClientError, RuntimeError, TimeoutError):
                    pass  # HA is still starting (auth not ready yet)
                else:
                    what = "written to" if new else "still valid in"
                    log(
                        f"MCP access token of {USERNAME} {what} "
                        f"{_shown(config_dir / TOKEN_FILE)}"
                    )
                    return
            await asyncio.sleep(2)
    if not stop.is_set():
        log("WARNING: could not get an access token for MCP clients")


async def check_mcp(url: str, token: str) -> bool:
    """Ask the MCP endpoint for tools/list with ``token``; read and query the device."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamablehttp_client

    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with (
            streamablehttp_client(url, headers=headers) as (read, write, _),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            tools = [tool.name for tool in (await session.list_tools()).tools]
            log(f"check: MCP tools/list with the demo token: {', '.join(tools)}")
            reading = await session.call_tool(
                "mqtt_read", {"topic": DEVICE_TEMPERATURE, "timeout": 5}
            )
            query = await session.call_tool(
                "mqtt_query",
                {"request_topic": DEVICE_REQUEST, "payload": "status", "timeout": 5},
            )
    except Exception as err:  # any failure of the endpoint fails the check
        log(f"check: MCP endpoint {url} failed: {type(err).__name__}: {err}")
        return False
    ok = "mqtt_publish" in tools and len(tools) == 5
    results = {"mqtt_read": reading, "mqtt_query": query}
    for name, result in results.items():
        data = result.structuredContent or {}
        message = data.get("message") or data.get("response") or {}
        if result.isError or not message:
            text = result.content[0].text if result.content else data  # type: ignore[union-attr]
            log(f"check: {name} through MCP failed: {text}")
            ok = False
        else:
            log(
                f"check: {name} through MCP: {message.get('topic')} = {message.get('payload')}"
            )
    return ok


async def check_shared_node(deadline: float) -> bool:
    """``meshtastic --host 127.0.0.1:4404 --info`` through Home Assistant's shared node.

    What a user of the Meshtastic CLI does: the real ``meshtastic`` command line
    (the project's venv) against the virtual node Home Assistant serves for
    "Sim Node", which must show the simulated node.
    """
    command = [
        str(Path(sys.executable).parent / "meshtastic"),
        "--host",
        f"127.0.0.1:{SHARE_PORT}",
        "--info",
    ]
    text = ""
    while time.monotonic() < deadline:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 30)
        except TimeoutError:
            process.kill()
            out, _ = await process.communicate()
        text = out.decode(errors="replace")
        if process.returncode == 0 and f"!{SIM_NODE_NUM:08x}" in text:
            owner = next(
                (line for line in text.splitlines() if line.startswith("Owner:")),
                "",
            )
            log(f"check: meshtastic --host 127.0.0.1:{SHARE_PORT} --info: {owner}")
            return True
        await asyncio.sleep(1)
    log(f"check: the shared node on port {SHARE_PORT} did not answer: {text[-300:]}")
    return False


def cli_command(broker_port: int) -> list[str]:
    """``mqtt-bridge-mcp`` of the project's venv, pointed at the demo broker."""
    return [
        str(Path(sys.executable).parent / "mqtt-bridge-mcp"),
        "--port",
        str(broker_port),
    ]


async def check_mcp_over_mqtt(broker_port: int, deadline: float) -> bool:
    """Find the hosted "Demo tools" with ``mqtt-bridge-mcp list``, call a tool through ``connect``.

    What a desktop MCP client does: a real ``mcp`` ClientSession over stdio
    to ``mqtt-bridge-mcp connect demo/tools``, across the broker to the stdio
    server Home Assistant hosts (the broker entry's config subentry).
    """
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    command = cli_command(broker_port)
    listed: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        process = await asyncio.create_subprocess_exec(
            *command, "list", "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        out, _ = await process.communicate()
        with contextlib.suppress(ValueError):
            listed = json.loads(out or b"[]")
        if any(item.get("server_name") == DEMO_SERVER_NAME for item in listed):
            break
        await asyncio.sleep(1)
    else:
        log(f"check: {DEMO_SERVER_NAME} is not announced on the broker ({listed})")
        return False
    log(f"check: mqtt-bridge-mcp list: {', '.join(i['server_name'] for i in listed)}")
    parameters = StdioServerParameters(
        command=command[0], args=[*command[1:], "connect", DEMO_SERVER_NAME]
    )
    try:
        async with (
            stdio_client(parameters) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            tools = [tool.name for tool in (await session.list_tools()).tools]
            result = await session.call_tool("word_count", {"text": "hello mesh world"})
    except Exception as err:  # any failure of the bridge fails the check
        log(f"check: mqtt-bridge-mcp connect {DEMO_SERVER_NAME} failed: {err!r}")
        return False
    text = result.content[0].text if result.content else ""  # type: ignore[union-attr]
    log(
        f"check: through mqtt-bridge-mcp connect {DEMO_SERVER_NAME}: tools "
        f"{', '.join(tools)}; word_count('hello mesh world') = {text}"
    )
    return not result.isError and text == "3"


async def check(
    base: str,
    entry_ids: Mapping[str, str],
    hass: Child,
    config_dir: Path,
    *,
    broker_port: int,
    timeout: float,
    uplink_wait: float,
    traffic: Traffic,
) -> bool:
    """Wait for HA, log in, wait for the entries ``{title: id}``, check MCP."""
    started = time.monotonic()
    deadline = started + timeout
    token: str | None = None
    answered = False
    states: dict[str, tuple[str, str | None]] = {}
    loaded = False
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
                    token, new = await ensure_token(session, base, config_dir)
                    log(
                        f"check: logged in as {USERNAME}/{PASSWORD}; MCP token "
                        + ("created" if new else "from the token file")
                    )
            if token is not None:
                try:
                    core = await get_json(session, f"{base}/api/config", token)
                    states = await entry_states(session, base, token)
                except aiohttp.ClientError:
                    core = {}
                mine = [states.get(i, ("unknown", None))[0] for i in entry_ids.values()]
                if all(state == "loaded" for state in mine):
                    log(
                        f"check: config entries {', '.join(map(repr, entry_ids))} "
                        f"({DOMAIN}) loaded after {time.monotonic() - started:.1f} s"
                    )
                    loaded = True
                    break
                if core.get("state") == "RUNNING" and any(
                    state in FAILED_STATES for state in mine
                ):
                    # Startup is over and nothing will retry these entries.
                    break
            await asyncio.sleep(1)
        if not loaded:
            if not answered:
                log(
                    f"check: Home Assistant did not answer on {base} in {timeout:.0f} s"
                )
            elif token is None:
                log(f"check: could not log in as {USERNAME}/{PASSWORD}")
            for title, entry_id in entry_ids.items():
                state, reason = states.get(entry_id, ("unknown", None))
                log(
                    f"check: config entry '{title}' ({DOMAIN}) state: {state}"
                    + (f" ({reason})" if reason else "")
                )
            return False
    assert token is not None
    if not await check_mcp(mcp_url(base, entry_ids[BROKER_TITLE]), token):
        return False
    if not await check_mcp_over_mqtt(broker_port, time.monotonic() + 30):
        return False
    if not await check_shared_node(time.monotonic() + 45):
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


def bridge_lines(broker_port: int) -> list[str]:
    """The banner lines about the stdio MCP server hosted on MQTT."""
    cli = " ".join(cli_command(broker_port))
    return [
        f"  MCP over MQTT    '{DEMO_SERVER_TITLE}' ({DEMO_SERVER_NAME}): "
        "devkit/demo_mcp_server.py hosted by 'Demo broker'",
        "                   (add your own: the broker entry → Add stdio MCP server)",
        f"     list:         {cli} list",
        f"     use it:       {cli} connect {DEMO_SERVER_NAME}   (stdio, "
        "for Claude Desktop / the MCP Inspector)",
        f"     Assist:       the LLM API '{DEMO_SERVER_NAME} (MQTT)' in a "
        "conversation agent's options",
    ]


def print_banner(
    args: argparse.Namespace, broker: Mosquitto, sim_port: int, broker_entry_id: str
) -> None:
    """Tell a newcomer where to look."""
    base = f"http://{args.http_host}:{args.port}"
    config_dir = args.config_dir
    lines = [
        "",
        "MQTT Bridge demo is running",
        f"  Home Assistant   {base}   (login {USERNAME} / {PASSWORD})",
        f"  Broker           127.0.0.1:{broker.port}",
        f"     watch it:     mosquitto_sub -p {broker.port} -t 'msh/#' -t 'demo/#' -v",
        f"  Simulated node   127.0.0.1:{sim_port} (!{SIM_NODE_NUM:08x})",
        f"     shared:       port {SHARE_PORT} ('Share this node'): the Meshtastic "
        f"app (Network, this machine's IP, port {SHARE_PORT}) or",
        f"                   {Path(sys.executable).parent / 'meshtastic'} --host "
        f"127.0.0.1:{SHARE_PORT} --info",
        f"  Downlink         {DOWNLINK_TOPIC} every {args.downlink_interval:g} s",
        *mcp_lines(base, broker_entry_id, config_dir),
        *bridge_lines(broker.port),
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
    device_task: asyncio.Task[None] | None = None
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

        node_entry_id, broker_entry_id = prepare_config(
            config_dir, sim_port, broker.port
        )

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
        device_task = asyncio.create_task(run_device(broker.port))

        if args.check:
            check_task = asyncio.create_task(
                check(
                    base,
                    {ENTRY_TITLE: node_entry_id, BROKER_TITLE: broker_entry_id},
                    hass,
                    config_dir,
                    broker_port=broker.port,
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
            print_banner(args, broker, sim_port, broker_entry_id)
            watchers.append(
                asyncio.create_task(announce_token(base, config_dir, hass, stop))
            )
            result = await supervise_hass(hass, hass_argv, hass_env, stop)
    finally:
        # Stop in order: Home Assistant, the simulator, the MQTT clients, Mosquitto.
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
        if device_task is not None:
            log("stopping the demo device")
            device_task.cancel()
            await _stop_step("the demo device", _await_cancelled(device_task))
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
        help="start everything, wait until HA answers and both config entries "
        "are loaded (or --timeout passes), ask the MCP endpoint for tools/list "
        "with the demo token (and read and query the demo device through it), "
        "stop everything; exit 0 or 1",
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
