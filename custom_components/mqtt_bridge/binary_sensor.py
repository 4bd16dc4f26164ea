"""Binary sensors per entry type: connectivity, and hosted servers running.

A node entry: the node link and the proxy's broker session
(:data:`BINARY_SENSORS`); a broker entry: its broker session
(:data:`BROKER_BINARY_SENSORS`) and, per stdio MCP server it hosts (a
subentry, on its own device), whether that server is running
(:data:`HOSTED_BINARY_SENSORS`): announced on the broker, i.e. its MQTT
connection is up and its control topic granted
(:attr:`.hosted_servers.HostedServer.running`). A child process is not
required: children run only while MCP clients have sessions.
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
from .entity import (
    BrokerEntity,
    HostedServerEntity,
    NodeEntity,
    async_add_hosted_entities,
    broker_runtime,
    node_runtime,
)
from .hosted_servers import HostedServer
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


@dataclass(frozen=True, kw_only=True)
class HostedBinarySensorDescription(BinarySensorEntityDescription):
    """A binary sensor of a hosted stdio MCP server and how to read it."""

    is_on_fn: Callable[[HostedServer], bool]


HOSTED_BINARY_SENSORS: tuple[HostedBinarySensorDescription, ...] = (
    HostedBinarySensorDescription(
        key="running",
        translation_key="running",
        device_class=BinarySensorDeviceClass.RUNNING,
        is_on_fn=lambda server: server.running,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MqttBridgeConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the connectivity sensors of the entry's type (and hosted servers' running)."""
    if (node := node_runtime(entry)) is not None:
        async_add_entities(
            MqttBridgeBinarySensor(node, description) for description in BINARY_SENSORS
        )
    elif (broker := broker_runtime(entry)) is not None:
        async_add_entities(
            BrokerBinarySensor(broker, description)
            for description in BROKER_BINARY_SENSORS
        )
        async_add_hosted_entities(
            hass,
            entry,
            broker,
            async_add_entities,
            lambda server: (
                HostedServerBinarySensor(server, description)
                for description in HOSTED_BINARY_SENSORS
            ),
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


class HostedServerBinarySensor(HostedServerEntity, BinarySensorEntity):
    """Whether a hosted stdio MCP server is running (announced on the broker)."""

    entity_description: HostedBinarySensorDescription

    @property
    def is_on(self) -> bool:
        """Whether the server is announced."""
        return self.entity_description.is_on_fn(self.runtime)
