"""Sensors per entry type: :data:`SENSORS` of a Meshtastic node, :data:`BROKER_SENSORS`.

A node entry has proxy counters, activity, node metrics and the proxy status;
a broker entry has its tool call counters (all calls, denied calls), the
messages the tools published and handed to agents, and the topics known to
``mqtt_topics``; each stdio MCP server it hosts (a subentry, on its own device)
has :data:`HOSTED_SENSORS`: active sessions, requests, errors and child
process restarts (:class:`~.hosted_servers.HostedCounters`). States are written only on the runtime's rate-limited update
signal (see :mod:`.entity`), never once per mesh message or tool call.

Decisions:

* ``battery_level``: the firmware reports 101 while the node runs on external
  power (``Power::getBatteryPercent``, "powered"); the sensor then shows 100 %
  and the attribute ``external_power`` is true (false otherwise), so the state
  stays a valid percentage and automations can still tell the cases apart.
* ``channel_utilization`` is enabled by default (the main mesh health figure,
  updated only with device telemetry); ``air_util_tx`` is disabled by default.
* ``proxy_status`` shows ``waiting_for_node`` while the node is disconnected
  even if the broker session is still running, and stays available then.
* :data:`SHARING_SENSORS` (clients of the shared node, packets they sent)
  exist only while "Share this node" is on; with it off their registry entries
  are removed when the entry is set up, so no stale entities remain. They stay
  available while the node is away (its clients stay connected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from homeassistant.components.sensor import (
    SensorDeviceClass,
    SensorEntity,
    SensorEntityDescription,
    SensorStateClass,
)
from homeassistant.const import PERCENTAGE, EntityCategory, UnitOfElectricPotential
from homeassistant.core import HomeAssistant
from homeassistant.helpers import entity_registry as er
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback
from homeassistant.helpers.typing import StateType
from homeassistant.util import dt as dt_util
from meshtastic.protobuf import telemetry_pb2

from .broker_runtime import BrokerRuntime
from .const import DOMAIN
from .engine.proxy import ProxyStatus
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

UNIT_MESSAGES = "messages"
UNIT_CALLS = "calls"
UNIT_TOPICS = "topics"
UNIT_SESSIONS = "sessions"
UNIT_REQUESTS = "requests"
UNIT_ERRORS = "errors"
UNIT_RESTARTS = "restarts"
UNIT_CLIENTS = "clients"
UNIT_PACKETS = "packets"
# Attribute of the shared node clients sensor: ["address:port", ...], oldest first.
ATTR_CLIENTS = "clients"
# DeviceMetrics.battery_level above 100 means "on external power".
BATTERY_POWERED = 100
ATTR_EXTERNAL_POWER = "external_power"


def _no_attributes(_runtime: NodeRuntime) -> None:
    return None


@dataclass(frozen=True, kw_only=True)
class MqttBridgeSensorDescription(SensorEntityDescription):
    """A sensor and how to read it from the runtime."""

    value_fn: Callable[[NodeRuntime], StateType | datetime]
    attributes_fn: Callable[[NodeRuntime], dict[str, Any] | None] = _no_attributes
    # Stays available while the node is disconnected.
    always_available: bool = False


def _timestamp(value: float | None) -> datetime | None:
    return dt_util.utc_from_timestamp(value) if value is not None else None


def _metric(name: str) -> Callable[[NodeRuntime], float | None]:
    """Return a reader of one optional ``DeviceMetrics`` field."""

    def read(runtime: NodeRuntime) -> float | None:
        metrics = runtime.link.metrics
        if metrics is None or not metrics.HasField(name):  # type: ignore[arg-type]
            return None
        return round(float(getattr(metrics, name)), 3)

    return read


def _battery(runtime: NodeRuntime) -> int | None:
    metrics = runtime.link.metrics
    if metrics is None or not metrics.HasField("battery_level"):
        return None
    return min(int(metrics.battery_level), BATTERY_POWERED)


def _battery_attributes(runtime: NodeRuntime) -> dict[str, Any] | None:
    metrics: telemetry_pb2.DeviceMetrics | None = runtime.link.metrics
    if metrics is None or not metrics.HasField("battery_level"):
        return None
    return {ATTR_EXTERNAL_POWER: metrics.battery_level > BATTERY_POWERED}


def _dropped_by_reason(runtime: NodeRuntime) -> dict[str, Any]:
    """Non-zero drop counts keyed ``uplink_<reason>`` / ``downlink_<reason>``."""
    dropped = runtime.proxy.stats.dropped
    return {reason: count for reason, count in sorted(dropped.items()) if count}


def _proxy_status(runtime: NodeRuntime) -> str:
    status = runtime.proxy.status
    if status is ProxyStatus.RUNNING and not runtime.available:
        return ProxyStatus.WAITING_FOR_NODE.value
    return status.value


SENSORS: tuple[MqttBridgeSensorDescription, ...] = (
    MqttBridgeSensorDescription(
        key="uplink_messages",
        translation_key="uplink_messages",
        native_unit_of_measurement=UNIT_MESSAGES,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.proxy.stats.uplink_messages,
    ),
    MqttBridgeSensorDescription(
        key="downlink_messages",
        translation_key="downlink_messages",
        native_unit_of_measurement=UNIT_MESSAGES,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.proxy.stats.downlink_messages,
    ),
    MqttBridgeSensorDescription(
        key="dropped_messages",
        translation_key="dropped_messages",
        native_unit_of_measurement=UNIT_MESSAGES,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.proxy.stats.dropped_total,
        attributes_fn=_dropped_by_reason,
    ),
    MqttBridgeSensorDescription(
        key="uplink_queue",
        translation_key="uplink_queue",
        native_unit_of_measurement=UNIT_MESSAGES,
        state_class=SensorStateClass.MEASUREMENT,
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=lambda runtime: runtime.proxy.uplink_queue_depth,
    ),
    MqttBridgeSensorDescription(
        key="last_uplink",
        translation_key="last_uplink",
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_registry_enabled_default=False,
        value_fn=lambda runtime: _timestamp(runtime.proxy.stats.last_uplink),
    ),
    MqttBridgeSensorDescription(
        key="last_downlink",
        translation_key="last_downlink",
        device_class=SensorDeviceClass.TIMESTAMP,
        entity_registry_enabled_default=False,
        value_fn=lambda runtime: _timestamp(runtime.proxy.stats.last_downlink),
    ),
    MqttBridgeSensorDescription(
        key="battery_level",
        translation_key="battery_level",
        device_class=SensorDeviceClass.BATTERY,
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=_battery,
        attributes_fn=_battery_attributes,
    ),
    MqttBridgeSensorDescription(
        key="voltage",
        translation_key="voltage",
        device_class=SensorDeviceClass.VOLTAGE,
        native_unit_of_measurement=UnitOfElectricPotential.VOLT,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=2,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=_metric("voltage"),
    ),
    MqttBridgeSensorDescription(
        key="channel_utilization",
        translation_key="channel_utilization",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=_metric("channel_utilization"),
    ),
    MqttBridgeSensorDescription(
        key="air_util_tx",
        translation_key="air_util_tx",
        native_unit_of_measurement=PERCENTAGE,
        state_class=SensorStateClass.MEASUREMENT,
        suggested_display_precision=1,
        entity_category=EntityCategory.DIAGNOSTIC,
        entity_registry_enabled_default=False,
        value_fn=_metric("air_util_tx"),
    ),
    MqttBridgeSensorDescription(
        key="proxy_status",
        translation_key="proxy_status",
        device_class=SensorDeviceClass.ENUM,
        options=[status.value for status in ProxyStatus],
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=_proxy_status,
        always_available=True,
    ),
)


def _shared_clients(runtime: NodeRuntime) -> dict[str, Any]:
    return {ATTR_CLIENTS: runtime.sharing.client_addresses}


# The shared node (node_sharing.py); added only while sharing is on.
SHARING_SENSORS: tuple[MqttBridgeSensorDescription, ...] = (
    MqttBridgeSensorDescription(
        key="shared_node_clients",
        translation_key="shared_node_clients",
        native_unit_of_measurement=UNIT_CLIENTS,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda runtime: len(runtime.sharing.clients),
        attributes_fn=_shared_clients,
        always_available=True,
    ),
    MqttBridgeSensorDescription(
        key="shared_node_packets",
        translation_key="shared_node_packets",
        native_unit_of_measurement=UNIT_PACKETS,
        state_class=SensorStateClass.TOTAL_INCREASING,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda runtime: runtime.sharing.packets_from_clients,
        always_available=True,
    ),
)


@dataclass(frozen=True, kw_only=True)
class BrokerSensorDescription(SensorEntityDescription):
    """A sensor of a broker entry and how to read it from the runtime."""

    value_fn: Callable[[BrokerRuntime], StateType]


BROKER_SENSORS: tuple[BrokerSensorDescription, ...] = (
    BrokerSensorDescription(
        key="tool_calls",
        translation_key="tool_calls",
        native_unit_of_measurement=UNIT_CALLS,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.stats.calls,
    ),
    BrokerSensorDescription(
        key="denied_tool_calls",
        translation_key="denied_tool_calls",
        native_unit_of_measurement=UNIT_CALLS,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.stats.denied,
    ),
    BrokerSensorDescription(
        key="messages_published",
        translation_key="messages_published",
        native_unit_of_measurement=UNIT_MESSAGES,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.tools.stats.published,
    ),
    BrokerSensorDescription(
        key="messages_received",
        translation_key="messages_received",
        native_unit_of_measurement=UNIT_MESSAGES,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda runtime: runtime.tools.stats.received,
    ),
    BrokerSensorDescription(
        key="topics_known",
        translation_key="topics_known",
        native_unit_of_measurement=UNIT_TOPICS,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda runtime: runtime.tools.topics_known,
    ),
)


@dataclass(frozen=True, kw_only=True)
class HostedSensorDescription(SensorEntityDescription):
    """A sensor of a hosted stdio MCP server and how to read it."""

    value_fn: Callable[[HostedServer], StateType]


HOSTED_SENSORS: tuple[HostedSensorDescription, ...] = (
    HostedSensorDescription(
        key="active_sessions",
        translation_key="active_sessions",
        native_unit_of_measurement=UNIT_SESSIONS,
        state_class=SensorStateClass.MEASUREMENT,
        value_fn=lambda server: server.active_sessions,
    ),
    HostedSensorDescription(
        key="requests",
        translation_key="requests",
        native_unit_of_measurement=UNIT_REQUESTS,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda server: server.counters().requests,
    ),
    HostedSensorDescription(
        key="errors",
        translation_key="errors",
        native_unit_of_measurement=UNIT_ERRORS,
        state_class=SensorStateClass.TOTAL_INCREASING,
        value_fn=lambda server: server.counters().errors,
    ),
    HostedSensorDescription(
        key="restarts",
        translation_key="restarts",
        native_unit_of_measurement=UNIT_RESTARTS,
        state_class=SensorStateClass.TOTAL_INCREASING,
        entity_category=EntityCategory.DIAGNOSTIC,
        value_fn=lambda server: server.counters().restarts,
    ),
)


async def async_setup_entry(
    hass: HomeAssistant,
    entry: MqttBridgeConfigEntry,
    async_add_entities: AddConfigEntryEntitiesCallback,
) -> None:
    """Add the sensors of the entry's type (node and proxy, or broker and hosted servers)."""
    if (node := node_runtime(entry)) is not None:
        async_add_entities(
            MqttBridgeSensor(node, description) for description in SENSORS
        )
        if node.sharing.enabled:
            async_add_entities(
                MqttBridgeSensor(node, description) for description in SHARING_SENSORS
            )
        else:
            _remove_sharing_sensors(hass, node)
    elif (broker := broker_runtime(entry)) is not None:
        async_add_entities(
            BrokerSensor(broker, description) for description in BROKER_SENSORS
        )
        async_add_hosted_entities(
            hass,
            entry,
            broker,
            async_add_entities,
            lambda server: (
                HostedServerSensor(server, description)
                for description in HOSTED_SENSORS
            ),
        )


def _remove_sharing_sensors(hass: HomeAssistant, node: NodeRuntime) -> None:
    """Remove the sharing sensors' registry entries (sharing is off)."""
    registry = er.async_get(hass)
    for description in SHARING_SENSORS:
        entity_id = registry.async_get_entity_id(
            "sensor", DOMAIN, node.unique_id(description.key)
        )
        if entity_id is not None:
            registry.async_remove(entity_id)


class MqttBridgeSensor(NodeEntity, SensorEntity):
    """A sensor computed from the runtime when the update signal arrives."""

    entity_description: MqttBridgeSensorDescription

    @property
    def native_value(self) -> StateType | datetime:
        """The current value."""
        return self.entity_description.value_fn(self.runtime)

    @property
    def extra_state_attributes(self) -> dict[str, Any] | None:
        """Extra attributes (drop reasons, external power)."""
        return self.entity_description.attributes_fn(self.runtime)


class BrokerSensor(BrokerEntity, SensorEntity):
    """A counter of a broker entry, computed when the update signal arrives."""

    entity_description: BrokerSensorDescription

    @property
    def native_value(self) -> StateType:
        """The current value."""
        return self.entity_description.value_fn(self.runtime)


class HostedServerSensor(HostedServerEntity, SensorEntity):
    """A value of a hosted stdio MCP server, computed when its update signal arrives."""

    entity_description: HostedSensorDescription

    @property
    def native_value(self) -> StateType:
        """The current value."""
        return self.entity_description.value_fn(self.runtime)
