"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
import json
from pathlib import Path
import re
from typing import Any
import uuid

from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge.const import CONF_ENTRY_TYPE, DOMAIN, EntryType
from custom_components.mqtt_bridge.engine.mqtt_client import (
    MqttClient,
    MqttSettings,
    Will,
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
