"""Actions of the MQTT Bridge integration: ``mqtt_bridge.send_text``.

Registered once in ``async_setup`` (quality scale: action-setup); the handler
resolves the config entry per call from ``call.data`` and raises translated
``ServiceValidationError`` for bad input and ``HomeAssistantError`` when the
node cannot take the message. No service helper that takes ``hass`` (removed
in 2026.10) is used.
"""

from __future__ import annotations

from homeassistant.config_entries import ConfigEntryState
from homeassistant.core import HomeAssistant, ServiceCall, callback
from homeassistant.exceptions import HomeAssistantError, ServiceValidationError
from homeassistant.helpers import config_validation as cv
import voluptuous as vol

from .const import (
    ATTR_CHANNEL,
    ATTR_CONFIG_ENTRY_ID,
    ATTR_DESTINATION,
    ATTR_TEXT,
    DOMAIN,
    SERVICE_SEND_TEXT,
)
from .engine.node_link import LinkNotReadyError
from .engine.rules import MAX_TEXT_BYTES, node_id, parse_node_id
from .runtime import MeshtasticRuntime, MqttBridgeConfigEntry

MAX_CHANNEL_INDEX = 7

# Types only: ranges are checked in the handler so errors are translated.
SEND_TEXT_SCHEMA = vol.Schema(
    {
        vol.Required(ATTR_CONFIG_ENTRY_ID): cv.string,
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


def _validation_error(key: str, **placeholders: str) -> ServiceValidationError:
    return ServiceValidationError(
        translation_domain=DOMAIN,
        translation_key=key,
        translation_placeholders=placeholders or None,
    )


def _loaded_runtime(hass: HomeAssistant, entry_id: str) -> MeshtasticRuntime:
    """Return the runtime of a loaded entry of this integration."""
    entry: MqttBridgeConfigEntry | None = hass.config_entries.async_get_entry(entry_id)
    if entry is None or entry.domain != DOMAIN:
        raise _validation_error("entry_not_found", entry_id=entry_id)
    if entry.state is not ConfigEntryState.LOADED:
        raise _validation_error("entry_not_loaded", name=entry.title)
    return entry.runtime_data


async def _async_send_text(call: ServiceCall) -> None:
    """Send a text message to the mesh through the entry's node."""
    runtime = _loaded_runtime(call.hass, call.data[ATTR_CONFIG_ENTRY_ID])
    name = runtime.entry.title

    text: str = call.data[ATTR_TEXT]
    size = len(text.encode())
    if not 0 < size <= MAX_TEXT_BYTES:
        raise _validation_error(
            "invalid_text_length", length=str(size), max=str(MAX_TEXT_BYTES)
        )

    channel: int = call.data[ATTR_CHANNEL]
    if not 0 <= channel <= MAX_CHANNEL_INDEX:
        raise _validation_error("invalid_channel", channel=str(channel))
    snapshot = runtime.snapshot
    if snapshot is not None and (
        channel >= len(snapshot.channels) or snapshot.channels[channel].role == 0
    ):
        raise _validation_error("channel_disabled", channel=str(channel), name=name)

    destination: int | None = None
    if (raw := call.data.get(ATTR_DESTINATION)) is not None and raw.strip():
        try:
            destination = parse_node_id(raw)
        except ValueError:
            raise _validation_error("invalid_destination", destination=raw) from None

    if not runtime.available:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="node_not_connected",
            translation_placeholders={"name": name},
        )
    try:
        status = await runtime.async_send_text(
            text, channel=channel, destination=destination
        )
    except LinkNotReadyError as err:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="node_not_connected",
            translation_placeholders={"name": name},
        ) from err
    except ValueError as err:
        raise _validation_error("send_invalid", error=str(err)) from err
    if status is not None and status.res != 0:
        raise HomeAssistantError(
            translation_domain=DOMAIN,
            translation_key="send_rejected",
            translation_placeholders={
                "name": name,
                "result": str(status.res),
                "destination": "^all" if destination is None else node_id(destination),
            },
        )
