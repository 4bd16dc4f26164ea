"""Base entity of the MQTT Bridge integration.

Entities are push-only: they never poll and write their state only when the
runtime sends its rate-limited ``signal_update`` (at most one per
``UPDATE_THROTTLE`` seconds, and at once when the node comes or goes), so the
recorder never stores one row per mesh message.
"""

from __future__ import annotations

from homeassistant.helpers import device_registry as dr
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.entity import Entity, EntityDescription

from .const import MANUFACTURER
from .runtime import MeshtasticRuntime


def _device_exists(runtime: MeshtasticRuntime) -> bool:
    """Whether the entry's node device is already in the device registry."""
    registry = dr.async_get(runtime.hass)
    return any(
        runtime.device_identifier in device.identifiers
        for device in dr.async_entries_for_config_entry(
            registry, runtime.entry.entry_id
        )
    )


class MqttBridgeEntity(Entity):
    """An entity of the Meshtastic node behind one config entry."""

    _attr_has_entity_name = True
    _attr_should_poll = False

    def __init__(
        self, runtime: MeshtasticRuntime, description: EntityDescription
    ) -> None:
        """Bind the entity to the entry's runtime and its node device."""
        self.runtime = runtime
        self.entity_description = description
        entry = runtime.entry
        self._attr_unique_id = f"{entry.unique_id or entry.entry_id}_{description.key}"
        snapshot = runtime.snapshot
        if snapshot is not None:
            info = DeviceInfo(
                identifiers={runtime.device_identifier},
                manufacturer=MANUFACTURER,
                name=snapshot.long_name,
            )
            if snapshot.hw_model:
                info["model"] = snapshot.hw_model
            if snapshot.firmware_version:
                info["sw_version"] = snapshot.firmware_version
        elif _device_exists(runtime):
            # Before the first handshake of a reload: link to the device and
            # leave the name/model the runtime took from the node alone.
            info = DeviceInfo(identifiers={runtime.device_identifier})
        else:
            info = DeviceInfo(
                identifiers={runtime.device_identifier},
                manufacturer=MANUFACTURER,
                name=entry.title,
            )
        self._attr_device_info = info

    @property
    def available(self) -> bool:
        """Whether the node link is live, or the description says ``always_available``.

        Status entities (node connection, proxy status) stay available so they
        can report the outage itself.
        """
        return self.runtime.available or getattr(
            self.entity_description, "always_available", False
        )

    async def async_added_to_hass(self) -> None:
        """Write the state whenever the runtime says something changed."""
        await super().async_added_to_hass()
        self.async_on_remove(
            async_dispatcher_connect(
                self.hass, self.runtime.signal_update, self.async_write_ha_state
            )
        )
