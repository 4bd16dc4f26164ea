"""Diagnostics of MQTT Bridge entries, by entry type, redacted.

Every entry reports its title, type, version, data and options; a loaded entry
adds what its runtime's function (:data:`RUNTIME_DIAGNOSTICS`) reads from it. A node entry reports the node's handshake data, the device metrics,
the link state and the proxy, read only through the engines' public
attributes and the proxy's own JSON-serialisable dump
(:meth:`.engine.proxy.MeshtasticProxy.diagnostics`: broker settings without
password, client state and stats, subscriptions, skipped channel filters, task
failures), and the shared node (:meth:`.node_sharing.NodeSharing.diagnostics`:
settings, bind errors, the virtual node's counters and its clients with their
addresses; the stream API carries no credentials). A broker entry reports its session (settings without credentials,
client state and stats, subscriptions), the topic rules in use (and those that
grant nothing), the tool calls and its hosted stdio MCP servers (subentries:
command, arguments, working directory, the names of the environment
variables but never their values, counters, sessions)
(:meth:`.broker_runtime.BrokerRuntime.diagnostics`). Credentials, channel and
PKI keys, positions and hardware identifiers are redacted wherever they appear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Final

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from homeassistant.config_entries import ConfigEntryState
from homeassistant.const import CONF_PASSWORD, CONF_USERNAME
from homeassistant.core import HomeAssistant
from homeassistant.helpers.redact import async_redact_data

from .broker_runtime import BrokerRuntime
from .const import CONF_BROKER_PASSWORD, CONF_BROKER_USERNAME
from .engine.proxy import MeshtasticProxy
from .models import EntryRuntime, MqttBridgeConfigEntry, entry_type_of
from .node_runtime import NodeRuntime

TO_REDACT: Final = {
    # credentials
    CONF_PASSWORD,
    CONF_USERNAME,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_USERNAME,
    # channel keys and PKI keys
    "psk",
    "public_key",
    "private_key",
    "admin_key",
    # positions
    "latitude_i",
    "longitude_i",
    "altitude",
    "latitude",
    "longitude",
    # hardware identifiers
    "macaddr",
    "device_id",
}


def _message(message: Message | None) -> dict[str, Any] | None:
    """Return a protobuf message as a dict with its proto field names (snake_case).

    Fields without presence are included with their defaults, so a setting that
    is off shows as ``false`` instead of being absent.
    """
    if message is None:
        return None
    return MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
    )


def _proxy_diagnostics(proxy: MeshtasticProxy) -> dict[str, Any]:
    """Return the engine's own dump of the proxy, plus the entities' broker state."""
    return {"broker_connected": proxy.broker_connected, **proxy.diagnostics()}


def _node_diagnostics(runtime: NodeRuntime) -> dict[str, Any]:
    """Return a node entry's node snapshot, metrics, link, proxy and sharing state."""
    link, snapshot = runtime.link, runtime.snapshot
    node: dict[str, Any] | None = None
    if snapshot is not None:
        node = {
            "node_id": snapshot.node_id,
            "long_name": snapshot.long_name,
            "hw_model": snapshot.hw_model,
            "firmware_version": snapshot.firmware_version,
            "known_nodes": len(snapshot.nodes),
            "user": _message(snapshot.user),
            "my_info": _message(snapshot.my_info),
            "metadata": _message(snapshot.metadata),
            "channels": [_message(channel) for channel in snapshot.channels],
            "lora": _message(snapshot.lora),
            "mqtt": _message(snapshot.mqtt),
        }
    return {
        "node": node,
        "metrics": _message(link.metrics),
        "link": {
            "state": link.state.value,
            "connection": runtime.connection,
            "stats": asdict(link.stats),
        },
        "proxy": _proxy_diagnostics(runtime.proxy),
        "sharing": runtime.sharing.diagnostics(),
    }


def _broker_diagnostics(runtime: BrokerRuntime) -> dict[str, Any]:
    """Return a broker entry's session, rules and tool call state."""
    return runtime.diagnostics()


# What a loaded entry adds, by the class of its runtime_data (the runtime
# __init__.RUNTIMES maps the entry's type to).
RUNTIME_DIAGNOSTICS: Final[
    dict[type[EntryRuntime], Callable[[Any], dict[str, Any]]]
] = {
    NodeRuntime: _node_diagnostics,
    BrokerRuntime: _broker_diagnostics,
}


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant, entry: MqttBridgeConfigEntry
) -> dict[str, Any]:
    """Return the diagnostics of one config entry (loaded or not)."""
    entry_type = entry_type_of(entry)
    data: dict[str, Any] = {
        "entry": {
            "title": entry.title,
            "entry_type": entry_type.value if entry_type is not None else None,
            "version": f"{entry.version}.{entry.minor_version}",
            "state": entry.state.value,
            "data": dict(entry.data),
            "options": dict(entry.options),
        },
    }
    if entry.state is ConfigEntryState.LOADED:
        build = RUNTIME_DIAGNOSTICS.get(type(entry.runtime_data))
        if build is not None:
            data |= build(entry.runtime_data)
    return async_redact_data(data, TO_REDACT)
