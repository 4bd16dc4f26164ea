"""Helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from homeassistant.core import HomeAssistant
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge.const import CONF_ENTRY_TYPE, DOMAIN, EntryType


async def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``cond`` every 10 ms; raise ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


NODE_NUM = 0x1A2B3C4D  # devkit.meshsim.default_profile's node


# The current config entry version (MqttBridgeConfigFlow.VERSION, MINOR_VERSION).
VERSION = 1
MINOR_VERSION = 2


def node_data(**data: Any) -> dict[str, Any]:
    """Return node entry data of the current version: its type plus ``data``."""
    return {CONF_ENTRY_TYPE: EntryType.MESHTASTIC_NODE, **data}


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
