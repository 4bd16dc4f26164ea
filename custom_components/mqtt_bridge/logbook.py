"""Logbook platform: who said what on which channel, for each mesh text message.

The node runtime fires ``mqtt_bridge_text_message`` for every text message
the node receives (:meth:`.node_runtime.NodeRuntime.on_packet`); its data are
the "Messages" event entity's attributes plus ``config_entry_id``,
``device_id`` and ``entity_id``. Those last two make the recorder's logbook
queries list the entry under the node's device and under the event entity
(``homeassistant/components/logbook/queries``, matched on the event data). The
entry reads e.g. ``Sim Node  Alice (!cafe0001) on LongFast: “hello”``; a
direct message ``… Alice (!cafe0001) to !1a2b3c4d: “hi”``. Logbook messages
are plain strings in Home Assistant (no translation support), as in core.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from homeassistant.components.logbook.const import (
    LOGBOOK_ENTRY_ENTITY_ID,
    LOGBOOK_ENTRY_MESSAGE,
    LOGBOOK_ENTRY_NAME,
)
from homeassistant.const import ATTR_DEVICE_ID, ATTR_ENTITY_ID
from homeassistant.core import Event, HomeAssistant, callback
from homeassistant.helpers import device_registry as dr

from .const import (
    ATTR_CHANNEL,
    ATTR_CHANNEL_NAME,
    ATTR_CONFIG_ENTRY_ID,
    ATTR_DESTINATION,
    ATTR_SENDER_ID,
    ATTR_SENDER_NAME,
    ATTR_TEXT,
    DESTINATION_BROADCAST,
    DOMAIN,
    EVENT_TEXT_MESSAGE,
)


def describe_text_message(data: Mapping[str, Any]) -> str:
    """Return ``Alice (!cafe0001) on LongFast: “hello”`` for a text message event.

    The sender is its id alone when its name is unknown; the channel is its
    index when its name is unknown; a direct message says ``to !xxxxxxxx``
    instead of the channel.
    """
    sender_id = data.get(ATTR_SENDER_ID)
    sender = (
        f"{name} ({sender_id})"
        if (name := data.get(ATTR_SENDER_NAME))
        else str(sender_id)
    )
    destination = data.get(ATTR_DESTINATION)
    if destination in (None, DESTINATION_BROADCAST):
        channel = data.get(ATTR_CHANNEL_NAME) or data.get(ATTR_CHANNEL)
        where = f"on {channel}"
    else:
        where = f"to {destination}"
    return f"{sender} {where}: “{data.get(ATTR_TEXT, '')}”"


@callback
def async_describe_events(
    hass: HomeAssistant,
    async_describe_event: Callable[[str, str, Callable[[Event], dict[str, str]]], None],
) -> None:
    """Describe ``mqtt_bridge_text_message`` events in the logbook."""

    @callback
    def async_describe_text_message(event: Event) -> dict[str, str]:
        data = event.data
        described = {LOGBOOK_ENTRY_MESSAGE: describe_text_message(data)}
        # The node's device name (as the user renamed it), else the entry title.
        name: str | None = None
        if (device_id := data.get(ATTR_DEVICE_ID)) and (
            device := dr.async_get(hass).async_get(device_id)
        ):
            name = device.name_by_user or device.name
        if not name and (entry_id := data.get(ATTR_CONFIG_ENTRY_ID)):
            entry = hass.config_entries.async_get_entry(entry_id)
            name = entry.title if entry is not None else None
        if name:
            described[LOGBOOK_ENTRY_NAME] = name
        if entity_id := data.get(ATTR_ENTITY_ID):
            described[LOGBOOK_ENTRY_ENTITY_ID] = entity_id
        return described

    async_describe_event(DOMAIN, EVENT_TEXT_MESSAGE, async_describe_text_message)
