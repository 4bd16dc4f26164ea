"""Logbook platform: mesh text messages and the MQTT tool calls of AI agents.

The node runtime fires ``mqtt_bridge_text_message`` for every text message
the node receives (:meth:`.node_runtime.NodeRuntime.on_packet`); its data are
the "Messages" event entity's attributes plus ``config_entry_id``,
``device_id`` and ``entity_id``. Those last two make the recorder's logbook
queries list the entry under the node's device and under the event entity
(``homeassistant/components/logbook/queries``, matched on the event data). The
entry reads e.g. ``Sim Node  Alice (!cafe0001) on LongFast: “hello”``; a
direct message ``… Alice (!cafe0001) to !1a2b3c4d: “hi”``. Logbook messages
are plain strings in Home Assistant (no translation support), as in core.

A broker runtime fires ``mqtt_bridge_tool_call`` for every tool call
(:meth:`.broker_runtime.BrokerRuntime.async_call_tool`), allowed or denied;
the entry reads e.g. ``Agent (mcp) called mqtt_publish on 'a/b': allowed``,
under the broker's device (``device_id``) and named after it.
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
    ATTR_ALLOWED,
    ATTR_CHANNEL,
    ATTR_CHANNEL_NAME,
    ATTR_CONFIG_ENTRY_ID,
    ATTR_DESTINATION,
    ATTR_ENTRY_ID,
    ATTR_IS_ERROR,
    ATTR_SENDER_ID,
    ATTR_SENDER_NAME,
    ATTR_SOURCE,
    ATTR_TEXT,
    ATTR_TOOL,
    ATTR_TOPIC,
    DESTINATION_BROADCAST,
    DOMAIN,
    EVENT_TEXT_MESSAGE,
    EVENT_TOOL_CALL,
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


def describe_tool_call(data: Mapping[str, Any]) -> str:
    """Return ``Agent (mcp) called mqtt_publish on 'a/b': allowed`` for a tool call.

    ``denied`` when the ACL refused it; ``failed`` when it was allowed but
    its result is an error (bad arguments, timeout, broker trouble); a call
    without a topic leaves out ``on …``.
    """
    topic = data.get(ATTR_TOPIC)
    where = f" on {topic!r}" if topic is not None else ""
    if not data.get(ATTR_ALLOWED, True):
        outcome = "denied"
    elif data.get(ATTR_IS_ERROR):
        outcome = "failed"
    else:
        outcome = "allowed"
    return (
        f"Agent ({data.get(ATTR_SOURCE)}) called {data.get(ATTR_TOOL)}{where}: "
        f"{outcome}"
    )


def _device_or_entry_name(
    hass: HomeAssistant, device_id: str | None, entry_id: str | None
) -> str | None:
    """Return the device's name (as the user renamed it), else the entry title."""
    device = dr.async_get(hass).async_get(device_id) if device_id else None
    if device is not None and (name := device.name_by_user or device.name):
        return name
    if entry_id and (entry := hass.config_entries.async_get_entry(entry_id)):
        return entry.title
    return None


@callback
def async_describe_events(
    hass: HomeAssistant,
    async_describe_event: Callable[[str, str, Callable[[Event], dict[str, str]]], None],
) -> None:
    """Describe ``mqtt_bridge_text_message`` and ``mqtt_bridge_tool_call`` events."""

    @callback
    def async_describe_text_message(event: Event) -> dict[str, str]:
        data = event.data
        described = {LOGBOOK_ENTRY_MESSAGE: describe_text_message(data)}
        if name := _device_or_entry_name(
            hass, data.get(ATTR_DEVICE_ID), data.get(ATTR_CONFIG_ENTRY_ID)
        ):
            described[LOGBOOK_ENTRY_NAME] = name
        if entity_id := data.get(ATTR_ENTITY_ID):
            described[LOGBOOK_ENTRY_ENTITY_ID] = entity_id
        return described

    @callback
    def async_describe_tool_call(event: Event) -> dict[str, str]:
        data = event.data
        described = {LOGBOOK_ENTRY_MESSAGE: describe_tool_call(data)}
        if name := _device_or_entry_name(
            hass, data.get(ATTR_DEVICE_ID), data.get(ATTR_ENTRY_ID)
        ):
            described[LOGBOOK_ENTRY_NAME] = name
        return described

    async_describe_event(DOMAIN, EVENT_TEXT_MESSAGE, async_describe_text_message)
    async_describe_event(DOMAIN, EVENT_TOOL_CALL, async_describe_tool_call)
