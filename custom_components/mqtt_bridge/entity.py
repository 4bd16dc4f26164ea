"""Base entities of the entry types: a Meshtastic node's and an MQTT broker's.

Entities are push-only: they never poll and write their state only when the
runtime sends its rate-limited update signal (at most one per
``UPDATE_THROTTLE`` seconds, and at once when the node or broker comes or
goes), so the recorder never stores one row per mesh message or tool call.
They read engine state only through the engines' public attributes
(``proxy.status``, ``proxy.stats``, ``link.metrics``, ``tools.stats``, ...).

Each platform adds, per entry type, the entities of that type's description
tuple; :func:`node_runtime` and :func:`broker_runtime` pick the entry's runtime.
"""

from __future__ import annotations

from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.entity import Entity, EntityDescription

from .broker_runtime import BrokerRuntime
from .models import MqttBridgeConfigEntry
from .node_runtime import NodeRuntime


def node_runtime(entry: MqttBridgeConfigEntry) -> NodeRuntime | None:
    """Return the entry's node runtime, or ``None`` for entries of other types."""
    runtime = entry.runtime_data
    return runtime if isinstance(runtime, NodeRuntime) else None


def broker_runtime(entry: MqttBridgeConfigEntry) -> BrokerRuntime | None:
    """Return the entry's broker runtime, or ``None`` for entries of other types."""
    runtime = entry.runtime_data
    return runtime if isinstance(runtime, BrokerRuntime) else None


class MqttBridgeEntity[RuntimeT: (NodeRuntime, BrokerRuntime)](Entity):
    """An entity of one config entry, on the entry's device, push-updated."""

    _attr_has_entity_name = True
    _attr_should_poll = False

    def __init__(self, runtime: RuntimeT, description: EntityDescription) -> None:
        """Bind the entity to the entry's runtime and link it to the entry's device.

        The runtime registered the device (and keeps it current); the entity
        only links to it.
        """
        self.runtime: RuntimeT = runtime
        self.entity_description = description
        self._attr_unique_id = runtime.unique_id(description.key)
        self._attr_device_info = DeviceInfo(identifiers={runtime.device_identifier})

    async def async_added_to_hass(self) -> None:
        """Write the state whenever the runtime says something changed."""
        await super().async_added_to_hass()
        self.async_on_remove(
            async_dispatcher_connect(
                self.hass, self.runtime.signal_update, self.async_write_ha_state
            )
        )


class NodeEntity(MqttBridgeEntity[NodeRuntime]):
    """An entity of the Meshtastic node behind one config entry."""

    @property
    def available(self) -> bool:
        """Whether the node link is live, or the description says ``always_available``.

        Status entities (node connection, proxy status) stay available so they
        can report the outage itself.
        """
        return self.runtime.available or getattr(
            self.entity_description, "always_available", False
        )


class BrokerEntity(MqttBridgeEntity[BrokerRuntime]):
    """An entity of the MQTT broker behind one config entry.

    Always available: the connection sensor reports the outage itself, and the
    counters count tool calls whether the broker is reachable or not.
    """
