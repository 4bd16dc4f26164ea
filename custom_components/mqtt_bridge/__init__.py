"""MQTT Bridge: a Meshtastic MQTT client proxy for Home Assistant.

Home Assistant holds the connection to a Meshtastic node (TCP or serial),
reads the node's MQTT settings and forwards its ``mqttClientProxyMessage``
traffic to and from the broker, as the phone apps do with "Proxy to client".
The work is done by the HA-independent engines in :mod:`.engine`; this module
only wires a config entry to them (HA docs: "Config entries", "Runtime data").
"""

from __future__ import annotations

from homeassistant.const import Platform
from homeassistant.core import HomeAssistant
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.typing import ConfigType

from .const import DOMAIN
from .runtime import MeshtasticRuntime, MqttBridgeConfigEntry
from .services import async_setup_services

PLATFORMS: list[Platform] = [Platform.BINARY_SENSOR, Platform.EVENT, Platform.SENSOR]

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Register the integration's actions once (quality scale: action-setup)."""
    async_setup_services(hass)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: MqttBridgeConfigEntry) -> bool:
    """Start the node link and the proxy; the node may still be unreachable."""
    runtime = MeshtasticRuntime(hass, entry)
    entry.runtime_data = runtime
    await hass.config_entries.async_forward_entry_setups(entry, PLATFORMS)
    runtime.start()
    entry.async_on_unload(entry.add_update_listener(_async_update_listener))
    return True


async def async_unload_entry(hass: HomeAssistant, entry: MqttBridgeConfigEntry) -> bool:
    """Unload platforms; the entry's background tasks are cancelled by HA."""
    return await hass.config_entries.async_unload_platforms(entry, PLATFORMS)


async def _async_update_listener(
    hass: HomeAssistant, entry: MqttBridgeConfigEntry
) -> None:
    """Reload the entry when its options or data change."""
    hass.config_entries.async_schedule_reload(entry.entry_id)
