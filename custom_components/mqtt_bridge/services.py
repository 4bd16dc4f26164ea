"""Actions of the MQTT Bridge integration: ``mqtt_bridge.send_text``.

Registered once in ``async_setup`` (quality scale: action-setup). The handler
finds the target entry per call, by ``config_entry_id`` or by the node's
``device_id`` (exactly one of them), requires a loaded Meshtastic node entry
and hands the message to :meth:`.node_runtime.NodeRuntime.async_send_text`,
the one place that validates and sends it. Bad input raises translated
``ServiceValidationError``s, a node that cannot take the message a translated
``HomeAssistantError``. No service helper that takes ``hass`` (removed in
2026.10) and no deprecated device registry lookup (``async_get_device``,
``DeviceEntry.config_entries``, 2026.8) is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from homeassistant.config_entries import ConfigEntry, ConfigEntryState
from homeassistant.const import ATTR_DEVICE_ID
from homeassistant.core import HomeAssistant, ServiceCall, callback
from homeassistant.helpers import config_validation as cv, device_registry as dr
import voluptuous as vol

from .const import (
    ATTR_CHANNEL,
    ATTR_CONFIG_ENTRY_ID,
    ATTR_DESTINATION,
    ATTR_TEXT,
    DOMAIN,
    SERVICE_SEND_TEXT,
)
from .models import validation_error
from .node_runtime import NodeRuntime

# Types only: targets, lengths and ranges are checked by the handler and the
# runtime so that every error is translated.
SEND_TEXT_SCHEMA = vol.Schema(
    {
        vol.Optional(ATTR_CONFIG_ENTRY_ID): cv.string,
        vol.Optional(ATTR_DEVICE_ID): cv.string,
        vol.Required(ATTR_TEXT): cv.string,
        vol.Optional(ATTR_CHANNEL, default=0): vol.Coerce(int),
        vol.Optional(ATTR_DESTINATION): cv.string,
    }
)


@callback
def async_setup_services(hass: HomeAssistant) -> None:
    """Register the integration's actions."""
    hass.services.async_register(
        DOMAIN, SERVICE_SEND_TEXT, _async_send_text, schema=SEND_TEXT_SCHEMA
    )


def _entry_of_device(hass: HomeAssistant, device_id: str) -> ConfigEntry:
    """Return the entry of this integration that owns device ``device_id``."""
    registry = dr.async_get(hass)
    for entry in hass.config_entries.async_entries(DOMAIN):
        if any(
            device.id == device_id
            for device in dr.async_entries_for_config_entry(registry, entry.entry_id)
        ):
            return entry
    raise validation_error("device_not_found", device_id=device_id)


def _node_runtime(hass: HomeAssistant, data: Mapping[str, Any]) -> NodeRuntime:
    """Return the runtime of the loaded node entry the call targets.

    Raises:
        ServiceValidationError: ``missing_target`` / ``conflicting_target`` (not
            exactly one of ``config_entry_id`` and ``device_id``),
            ``entry_not_found``, ``device_not_found``, ``entry_not_loaded``,
            ``not_a_node`` (an entry of another type).

    """
    entry_id: str | None = data.get(ATTR_CONFIG_ENTRY_ID)
    device_id: str | None = data.get(ATTR_DEVICE_ID)
    if entry_id and device_id:
        raise validation_error("conflicting_target")
    if device_id:
        entry = _entry_of_device(hass, device_id)
    elif entry_id:
        found = hass.config_entries.async_get_entry(entry_id)
        if found is None or found.domain != DOMAIN:
            raise validation_error("entry_not_found", entry_id=entry_id)
        entry = found
    else:
        raise validation_error("missing_target")
    if entry.state is not ConfigEntryState.LOADED:
        raise validation_error("entry_not_loaded", name=entry.title)
    runtime = entry.runtime_data
    if not isinstance(runtime, NodeRuntime):
        raise validation_error("not_a_node", name=entry.title)
    return runtime


async def _async_send_text(call: ServiceCall) -> None:
    """Send a text message to the mesh through the target entry's node."""
    runtime = _node_runtime(call.hass, call.data)
    await runtime.async_send_text(
        call.data[ATTR_TEXT],
        channel=call.data[ATTR_CHANNEL],
        destination=call.data.get(ATTR_DESTINATION),
    )
