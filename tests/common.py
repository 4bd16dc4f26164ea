"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
import json
from pathlib import Path
import re
import threading
import time
from typing import Any
import uuid

from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from meshtastic.protobuf import mesh_pb2
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge.const import (
    BROKER_MODE_NODE,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_MODE,
    CONF_ENTRY_TYPE,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_UPLINK_QUEUE_SIZE,
    DOMAIN,
    EntryType,
)
from custom_components.mqtt_bridge.engine.mqtt_client import (
    MqttClient,
    MqttSettings,
    Will,
)
from custom_components.mqtt_bridge.engine.stream import (
    WAKE_BYTES,
    FrameDecoder,
    encode_frame,
)

# The stdio MCP test server (works on mcp 1.x and 2.x).
ECHO = str(Path(__file__).parent.parent / "tests_engine" / "stdio_servers" / "echo.py")


def uid() -> str:
    """8 random hex characters, for unique names, topics and client ids."""
    return uuid.uuid4().hex[:8]


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` every 10 ms; raise ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def mqtt_client(
    port: int, client_id: str, will: Will | None = None
) -> AsyncIterator[MqttClient]:
    """A MqttClient on ``127.0.0.1:port``, connected within 10 s, stopped on exit."""
    client = MqttClient(MqttSettings("127.0.0.1", port), client_id=client_id, will=will)
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(10):
            await client.wait_connected()
        yield client
    finally:
        task.cancel()
        await asyncio.wait({task})


NODE_NUM = 0x1A2B3C4D  # devkit.meshsim.default_profile's node

#: A node entry's proxy options as the options flow offers them by default.
NODE_PROXY_DEFAULTS: dict[str, Any] = {
    CONF_BROKER_MODE: BROKER_MODE_NODE,
    CONF_ALLOW_SELF_SIGNED: False,
    CONF_FORWARD_RETAINED: False,
    CONF_FORWARD_OWN_ECHOES: False,
    CONF_UPLINK_QUEUE_SIZE: 1000,
}


# The current config entry version (MqttBridgeConfigFlow.VERSION, MINOR_VERSION).
VERSION = 1
MINOR_VERSION = 2


def node_data(**data: Any) -> dict[str, Any]:
    """Return node entry data of the current version: its type plus ``data``."""
    return {CONF_ENTRY_TYPE: EntryType.MESHTASTIC_NODE, **data}


def broker_data(port: int, **data: Any) -> dict[str, Any]:
    """Return MQTT broker entry data for Mosquitto on 127.0.0.1:``port``, plus ``data``."""
    return {
        CONF_ENTRY_TYPE: EntryType.MQTT_BROKER.value,
        "host": "127.0.0.1",
        "port": port,
        "username": "",
        "password": "",
        "tls": False,
        "allow_self_signed": False,
        "ca_file": "",
        "client_id_prefix": "test-bridge",
        **data,
    }


def add_broker_entry(
    hass: HomeAssistant,
    port: int,
    *,
    title: str = "Test Broker",
    rules: list[dict[str, Any]] | None = None,
    options: dict[str, Any] | None = None,
    **data: Any,
) -> MockConfigEntry:
    """Add (not set up) an MQTT broker entry for Mosquitto on 127.0.0.1:``port``.

    ``rules`` are option rule dicts (``{"pattern", "permissions", "description"}``);
    ``options`` are further options; ``data`` overrides entry data keys.
    """
    full = broker_data(port, **data)
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=f"{full['host']}:{full['port']}:{full['username']}",
        title=title,
        version=VERSION,
        minor_version=MINOR_VERSION,
        data=full,
        options={
            "rules": rules or [],
            "require_admin": False,
            "include_assist_tools": False,
            **(options or {}),
        },
    )
    entry.add_to_hass(hass)
    return entry


def add_node_entry(
    hass: HomeAssistant,
    port: int,
    *,
    title: str = "Sim Node",
    options: dict[str, Any] | None = None,
) -> MockConfigEntry:
    """Add (not set up) the config entry of the simulated node on TCP ``port``."""
    entry = MockConfigEntry(
        domain=DOMAIN,
        unique_id=str(NODE_NUM),
        title=title,
        version=VERSION,
        minor_version=MINOR_VERSION,
        data=node_data(connection="tcp", host="127.0.0.1", port=port),
        options=options or {},
    )
    entry.add_to_hass(hass)
    return entry


TRANSLATIONS: dict[str, Any] = json.loads(
    (
        Path(__file__).parent.parent
        / "custom_components"
        / DOMAIN
        / "translations"
        / "en.json"
    ).read_text(encoding="utf-8")
)


def _placeholders(text: str) -> set[str]:
    return set(re.findall(r"\{(\w+)\}", text))


def check_translated(result: Any, section: str) -> None:
    """Fail when a flow result's step, field, error or abort has no English text.

    Also fails when a text uses a placeholder the result does not give.
    ``section`` is ``config`` or ``options``.
    """
    strings = TRANSLATIONS[section]
    kind = result["type"]
    given = set(result.get("description_placeholders") or {})
    if kind in (FlowResultType.FORM, FlowResultType.MENU):
        step = strings["step"][result["step_id"]]
        assert step["title"]
        assert _placeholders(step["title"] + step.get("description", "")) <= given
    if kind is FlowResultType.MENU:
        for option in result["menu_options"]:
            assert step["menu_options"][option]
    if kind is FlowResultType.FORM:
        for key in result["data_schema"].schema if result["data_schema"] else ():
            assert step["data"][str(key)]
            assert step["data_description"][str(key)]
        for error in (result["errors"] or {}).values():
            assert strings["error"][error]
            assert _placeholders(strings["error"][error]) <= given, error
    if kind is FlowResultType.ABORT:
        assert _placeholders(strings["abort"][result["reason"]]) <= given


def check_flow_translations(hass: HomeAssistant) -> None:
    """Check every config and options flow result of the test (``check_translated``)."""
    for manager, section in (
        (hass.config_entries.flow, "config"),
        (hass.config_entries.options, "options"),
    ):
        for name in ("async_init", "async_configure"):
            original = getattr(manager, name)

            async def checked(
                *args: Any,
                _original: Any = original,
                _section: str = section,
                **kw: Any,
            ) -> Any:
                result = await _original(*args, **kw)
                check_translated(result, _section)
                return result

            setattr(manager, name, checked)


# -- stream-API peers (raw client, scripted node) and thread checks ------------------

#: Thread names of the loop's default executor, which the harness shuts down.
EXECUTOR_THREAD_PREFIXES = ("asyncio_", "ThreadPoolExecutor", "SyncWorker")


def join_new_threads(before: set[threading.Thread], timeout: float = 5.0) -> None:
    """Join (within ``timeout`` s in all) the threads started since ``before``.

    Heartbeat ``threading.Timer`` s are cancelled first; executor threads are
    left to the harness. ``AssertionError`` names a thread still alive.
    """
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread in before or thread is threading.current_thread():
            continue
        if isinstance(thread, threading.Timer):
            thread.cancel()
        if thread.name.startswith(EXECUTOR_THREAD_PREFIXES):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), f"thread left behind: {thread}"


class RawClient:
    """A stream-API client on asyncio streams that records every ``FromRadio``."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Start reading ``reader`` into :attr:`received` (:attr:`eof` at its end)."""
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.received: list[mesh_pb2.FromRadio] = []
        self.eof = False
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port: int, *, read: bool = True) -> RawClient:
        """Connect to 127.0.0.1:``port``; ``read=False``: never read (a stuck client)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if not read:
            client._task.cancel()
        return client

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            if not data:
                self.eof = True
                self._changed.set()
                return
            for payload in self.decoder.feed(data):
                message = mesh_pb2.FromRadio()
                message.ParseFromString(payload)
                self.received.append(message)
            self._changed.set()

    def send(self, message: mesh_pb2.ToRadio, *, wake: bool = False) -> None:
        """Write one ``ToRadio`` frame (``wake``: the wake bytes first)."""
        data = encode_frame(message.SerializeToString())
        self.writer.write(WAKE_BYTES + data if wake else data)

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds after a read; ``TimeoutError`` after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def of_kind(self, name: str) -> list[mesh_pb2.FromRadio]:
        """The received messages whose ``payload_variant`` is ``name``."""
        return [m for m in self.received if m.WhichOneof("payload_variant") == name]

    async def handshake(self, nonce: int) -> list[mesh_pb2.FromRadio]:
        """Send ``want_config_id`` and return the items up to ``config_complete_id``."""
        start = len(self.received)
        self.send(mesh_pb2.ToRadio(want_config_id=nonce), wake=True)

        def complete() -> bool:
            return any(m.config_complete_id == nonce for m in self.received[start:])

        await self.wait(complete)
        items = self.received[start:]
        end = next(i for i, m in enumerate(items) if m.config_complete_id == nonce)
        return items[: end + 1]

    async def close(self) -> None:
        """Stop reading and close the connection."""
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with suppress(OSError):
            await self.writer.wait_closed()


@asynccontextmanager
async def raw_client(port: int) -> AsyncIterator[RawClient]:
    """A :class:`RawClient` of 127.0.0.1:``port``, closed on exit."""
    client = await RawClient.connect(port)
    try:
        yield client
    finally:
        await client.close()


#: A node's answer to ``want_config_id`` (the nonce): messages or raw frame payloads.
type Script = Callable[[int], list[mesh_pb2.FromRadio | bytes]]


class ScriptedNode:
    """A stream-API node: the n-th ``want_config_id`` is answered with ``scripts[n]``.

    After the last script, that one answers every further request; the
    answer goes to the asking connection. :meth:`send` writes a live frame
    to every open connection; :attr:`handshakes` counts the requests.
    """

    def __init__(self, *scripts: Script) -> None:
        """Answer with ``scripts`` in turn (at least one)."""
        self.scripts = scripts
        self.writers: list[asyncio.StreamWriter] = []
        self.handshakes = 0

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection (``asyncio.start_server`` callback)."""
        self.writers.append(writer)
        decoder = FrameDecoder()
        with suppress(ConnectionError):
            while data := await reader.read(4096):
                for payload in decoder.feed(data):
                    message = mesh_pb2.ToRadio()
                    message.ParseFromString(payload)
                    if message.WhichOneof("payload_variant") != "want_config_id":
                        continue
                    script = self.scripts[min(self.handshakes, len(self.scripts) - 1)]
                    self.handshakes += 1
                    for item in script(message.want_config_id):
                        writer.write(encode_frame(_raw(item)))
        writer.close()

    def send(self, item: mesh_pb2.FromRadio | bytes) -> None:
        """Write one live frame to every open connection."""
        for writer in self.writers:
            if not writer.is_closing():
                writer.write(encode_frame(_raw(item)))


def _raw(item: mesh_pb2.FromRadio | bytes) -> bytes:
    return item if isinstance(item, bytes) else item.SerializeToString()


@asynccontextmanager
async def scripted(*scripts: Script) -> AsyncIterator[tuple[ScriptedNode, int]]:
    """A :class:`ScriptedNode` of ``scripts`` on 127.0.0.1 and its port; closed on exit."""
    node = ScriptedNode(*scripts)
    server = await asyncio.start_server(node.serve, "127.0.0.1", 0)
    try:
        yield node, server.sockets[0].getsockname()[1]
    finally:
        for writer in node.writers:
            writer.close()
        server.close()
        await server.wait_closed()
