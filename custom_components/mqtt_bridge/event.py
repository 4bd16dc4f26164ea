"""Event entity of a Meshtastic node entry: text messages the node receives.

The runtime also fires the bus event ``mqtt_bridge_text_message`` for each
message, which :mod:`.logbook` describes under this entity.
"""

from __future__ import annotations

from homeassistant.components.event import EventEntity, EventEntityDescription
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .const import EVENT_TYPE_TEXT_MESSAGE, KEY_MESSAGES
from .entity import NodeEntity, node_runtime
from .models import MqttBridgeConfigEntry
from .node_runtime import TextMessage

# Push entities, nothing to poll or to throttle per platform.
PARALLEL_UPDATES = 0

MESSAGES = EventEntityDescription(
    key=KEY_MESSAGES,
    translation_key=KEY_MESSAGES,
    event_types=[EVENT_TYPE_TEXT_MESSAGE],
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MqttBridgeConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the message event entity of a node entry's node."""
    if (runtime := node_runtime(entry)) is None:
        return
    async_add_entities([MqttBridgeMessageEvent(runtime, MESSAGES)])


class MqttBridgeMessageEvent(NodeEntity, EventEntity):
    """Fires ``text_message`` for every text message the node receives."""

    _attr_event_types = [EVENT_TYPE_TEXT_MESSAGE]

    async def async_added_to_hass(self) -> None:
        """Listen to the runtime's text messages (sent at once, not throttled)."""
        await super().async_added_to_hass()
        self.async_on_remove(
            async_dispatcher_connect(
                self.hass, self.runtime.signal_text, self._async_text_received
            )
        )

    @callback
    def _async_text_received(self, message: TextMessage) -> None:
        self._trigger_event(EVENT_TYPE_TEXT_MESSAGE, message.as_event_data())
        self.async_write_ha_state()
