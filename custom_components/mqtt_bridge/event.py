"""Event entity of MQTT Bridge: text messages the node receives from the mesh."""

from __future__ import annotations

from homeassistant.components.event import EventEntity, EventEntityDescription
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .const import EVENT_TEXT_MESSAGE
from .entity import MqttBridgeEntity
from .runtime import MqttBridgeConfigEntry, TextMessage

# Push entities, nothing to poll or to throttle per platform.
PARALLEL_UPDATES = 0

MESSAGES = EventEntityDescription(
    key="messages",
    translation_key="messages",
    event_types=[EVENT_TEXT_MESSAGE],
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MqttBridgeConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the node's message event entity."""
    async_add_entities([MqttBridgeMessageEvent(entry.runtime_data, MESSAGES)])


class MqttBridgeMessageEvent(MqttBridgeEntity, EventEntity):
    """Fires ``text_message`` for every text message the node receives."""

    _attr_event_types = [EVENT_TEXT_MESSAGE]

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
        self._trigger_event(EVENT_TEXT_MESSAGE, message.as_event_data())
        self.async_write_ha_state()
