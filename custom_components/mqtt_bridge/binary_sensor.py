"""Binary sensors per entry type: connectivity.

A node entry: the node link and the proxy's broker session
(:data:`BINARY_SENSORS`); a broker entry: its broker session
(:data:`BROKER_BINARY_SENSORS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from homeassistant.components.binary_sensor import (
    BinarySensorDeviceClass,
    BinarySensorEntity,
    BinarySensorEntityDescription,
)
from homeassistant.const import EntityCategory
from homeassistant.core import HomeAssistant
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .broker_runtime import BrokerRuntime
from .entity import BrokerEntity, NodeEntity, broker_runtime, node_runtime
from .models import MqttBridgeConfigEntry
from .node_runtime import NodeRuntime

# Push entities, nothing to poll or to throttle per platform.
PARALLEL_UPDATES = 0


@dataclass(frozen=True, kw_only=True)
class MqttBridgeBinarySensorDescription(BinarySensorEntityDescription):
    """A binary sensor and how to read it from the runtime."""

    is_on_fn: Callable[[NodeRuntime], bool]
    # The node connection sensor reports the availability itself, so it must
    # never be unavailable.
    always_available: bool = False


BINARY_SENSORS: tuple[MqttBridgeBinarySensorDescription, ...] = (
    MqttBridgeBinarySensorDescription(
        key="node_connected",
        translation_key="node_connected",
        device_class=BinarySensorDeviceClass.CONNECTIVITY,
        entity_category=EntityCategory.DIAGNOSTIC,
        is_on_fn=lambda runtime: runtime.available,
        always_available=True,
    ),
    MqttBridgeBinarySensorDescription(
        key="broker_connected",
        translation_key="broker_connected",
        device_class=BinarySensorDeviceClass.CONNECTIVITY,
        entity_category=EntityCategory.DIAGNOSTIC,
        is_on_fn=lambda runtime: runtime.proxy.broker_connected,
    ),
)


@dataclass(frozen=True, kw_only=True)
class BrokerBinarySensorDescription(BinarySensorEntityDescription):
    """A binary sensor of a broker entry and how to read it from the runtime."""

    is_on_fn: Callable[[BrokerRuntime], bool]


BROKER_BINARY_SENSORS: tuple[BrokerBinarySensorDescription, ...] = (
    BrokerBinarySensorDescription(
        key="broker_connected",
        translation_key="broker_connected",
        device_class=BinarySensorDeviceClass.CONNECTIVITY,
        entity_category=EntityCategory.DIAGNOSTIC,
        is_on_fn=lambda runtime: runtime.connected,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MqttBridgeConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the connectivity sensors of the entry's type."""
    if (node := node_runtime(entry)) is not None:
        async_add_entities(
            MqttBridgeBinarySensor(node, description) for description in BINARY_SENSORS
        )
    elif (broker := broker_runtime(entry)) is not None:
        async_add_entities(
            BrokerBinarySensor(broker, description)
            for description in BROKER_BINARY_SENSORS
        )


class MqttBridgeBinarySensor(NodeEntity, BinarySensorEntity):
    """A connectivity sensor of the node or of the proxy's broker session."""

    entity_description: MqttBridgeBinarySensorDescription

    @property
    def is_on(self) -> bool:
        """Whether the connection is up."""
        return self.entity_description.is_on_fn(self.runtime)


class BrokerBinarySensor(BrokerEntity, BinarySensorEntity):
    """The connectivity sensor of a broker entry's session."""

    entity_description: BrokerBinarySensorDescription

    @property
    def is_on(self) -> bool:
        """Whether the broker session is up."""
        return self.entity_description.is_on_fn(self.runtime)
