"""MQTT Bridge: Meshtastic on MQTT, and MQTT tools for AI agents.

Each config entry has a type (``entry.data["entry_type"]``,
:class:`~.const.EntryType`). The Meshtastic node: Home Assistant holds the
connection to the node (TCP or serial), reads its MQTT settings and forwards
its ``mqttClientProxyMessage`` traffic to and from the broker, as the phone
apps do with "Proxy to client". The MQTT broker: one broker session whose
topics AI agents use through the MQTT tools, within the entry's topic rules
(:mod:`.broker_runtime`). The work is done by the
HA-independent engines in :mod:`.engine`; this module only maps an entry's type
to its runtime (:data:`RUNTIMES`), sets it up, unloads it, migrates old entries
and reloads an entry when what its runtime was built from changed (HA docs:
"Config entries", "Runtime data").
"""

from __future__ import annotations

import logging
from typing import Final

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import ConfigEntryError
from homeassistant.helpers import config_validation as cv
from homeassistant.helpers.typing import ConfigType

from . import http
from .broker_runtime import BrokerRuntime
from .const import CONF_ENTRY_TYPE, DOMAIN, EntryType
from .models import EntryRuntime, MqttBridgeConfigEntry, entry_type_of
from .node_runtime import NodeRuntime
from .services import async_setup_services

_LOGGER = logging.getLogger(__name__)

CONFIG_SCHEMA = cv.config_entry_only_config_schema(DOMAIN)

# The runtime of each entry type; a type missing here cannot be set up.
RUNTIMES: Final[dict[EntryType, type[EntryRuntime]]] = {
    EntryType.MESHTASTIC_NODE: NodeRuntime,
    EntryType.MQTT_BROKER: BrokerRuntime,
}


async def async_setup(hass: HomeAssistant, config: ConfigType) -> bool:
    """Register the integration's actions once (quality scale: action-setup)."""
    async_setup_services(hass)
    http.async_register(hass)
    return True


async def async_migrate_entry(hass: HomeAssistant, entry: ConfigEntry) -> bool:
    """Bring an entry to the current config entry version (1.2).

    1.1 → 1.2: every 1.1 entry is a Meshtastic node; ``entry_type`` is added.
    A later minor version of major 1 is kept as it is (minor versions only add
    keys); a later major version cannot be read by this version and is refused.
    """
    if entry.version > 1:
        _LOGGER.error(
            "Cannot read config entry %s of version %s.%s, written by a newer "
            "version of the integration",
            entry.title,
            entry.version,
            entry.minor_version,
        )
        return False
    if entry.minor_version < 2:
        hass.config_entries.async_update_entry(
            entry,
            data={**entry.data, CONF_ENTRY_TYPE: EntryType.MESHTASTIC_NODE.value},
            minor_version=2,
        )
        _LOGGER.debug("Migrated config entry %s to version 1.2", entry.title)
    return True


async def async_setup_entry(hass: HomeAssistant, entry: MqttBridgeConfigEntry) -> bool:
    """Build and start the runtime of the entry's type.

    A node entry starts even when the node is unreachable (its entities are then
    unavailable). An entry of a type this version does not know fails with a
    translated :class:`ConfigEntryError` (HA logs it; state ``setup_error``).
    """
    entry_type = entry_type_of(entry)
    runtime_class = RUNTIMES.get(entry_type) if entry_type is not None else None
    if runtime_class is None:
        raise ConfigEntryError(
            translation_domain=DOMAIN,
            translation_key="unknown_entry_type",
            translation_placeholders={
                "entry_type": str(entry.data.get(CONF_ENTRY_TYPE))
            },
        )
    runtime = runtime_class(hass, entry)
    entry.runtime_data = runtime
    await hass.config_entries.async_forward_entry_setups(entry, runtime.platforms)
    runtime.start()
    entry.async_on_unload(entry.add_update_listener(_async_update_listener))
    return True


async def async_unload_entry(hass: HomeAssistant, entry: MqttBridgeConfigEntry) -> bool:
    """Unload the runtime's platforms; its background tasks are cancelled by HA."""
    return await hass.config_entries.async_unload_platforms(
        entry, entry.runtime_data.platforms
    )


async def _async_update_listener(
    hass: HomeAssistant, entry: MqttBridgeConfigEntry
) -> None:
    """Reload the entry when its runtime says so (:meth:`EntryRuntime.needs_reload`).

    By default that is when its data or options differ from the runtime's; a
    broker entry applies option changes (topic rules) and changes of its config
    subentries (hosted stdio MCP servers: started, restarted or stopped one by
    one) live and reloads only for data changes. Flows only update the entry
    (no ``async_update_reload_and_abort``, an error with an update listener
    from HA 2026.12); this listener does the reload. Changes of the title or
    of config subentries do not reload (HA 2025.4.4 calls this listener for
    subentry changes too).
    """
    if entry.runtime_data.needs_reload():
        hass.config_entries.async_schedule_reload(entry.entry_id)
