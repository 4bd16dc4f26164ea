"""Base entities: a Meshtastic node's, an MQTT broker's and a hosted stdio MCP server's.

Entities are push-only: they never poll and write their state only when the
runtime sends its rate-limited update signal (at most one per
``UPDATE_THROTTLE`` seconds, and at once when the node or broker comes or
goes), so the recorder never stores one row per mesh message or tool call.
They read engine state only through the engines' public attributes
(``proxy.status``, ``proxy.stats``, ``link.metrics``, ``tools.stats``, ...).

Each platform adds, per entry type, the entities of that type's description
tuple; :func:`node_runtime` and :func:`broker_runtime` pick the entry's runtime.
A broker entry's hosted stdio MCP servers (its ``stdio_server`` subentries,
:mod:`.hosted_servers`) each have their own device and entities, added with
the subentry's ``config_subentry_id``, also when a subentry is added later
(:func:`async_add_hosted_entities`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers.device_registry import DeviceInfo
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.helpers.entity import Entity, EntityDescription
from homeassistant.helpers.entity_platform import AddConfigEntryEntitiesCallback

from .broker_runtime import BrokerRuntime
from .hosted_servers import HostedServer
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


@callback
def async_add_hosted_entities(
    hass: HomeAssistant,
    entry: MqttBridgeConfigEntry,
    broker: BrokerRuntime,
    async_add_entities: AddConfigEntryEntitiesCallback,
    entities: Callable[[HostedServer], Iterable[Entity]],
) -> None:
    """Add ``entities(server)`` for every hosted server, now and when one is added.

    Each server's entities belong to its subentry (``config_subentry_id``).
    """

    @callback
    def add(server: HostedServer) -> None:
        async_add_entities(entities(server), config_subentry_id=server.subentry_id)

    for server in broker.hosted.servers.values():
        add(server)
    entry.async_on_unload(
        async_dispatcher_connect(hass, broker.hosted.signal_added, add)
    )


class MqttBridgeEntity[RuntimeT: (NodeRuntime, BrokerRuntime, HostedServer)](Entity):
    """An entity of one config entry (or subentry), on its device, push-updated."""

    _attr_has_entity_name = True
    _attr_should_poll = False

    def __init__(self, runtime: RuntimeT, description: EntityDescription) -> None:
        """Bind the entity to the runtime and link it to the runtime's device.

        The runtime (an entry's, or a hosted server of a subentry) registered
        the device and keeps it current; the entity only links to it.
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


class HostedServerEntity(MqttBridgeEntity[HostedServer]):
    """An entity of a stdio MCP server hosted by a broker entry (one subentry).

    Always available: the ``running`` sensor reports whether the server is
    announced, and the counters count whether it is or not.
    """
