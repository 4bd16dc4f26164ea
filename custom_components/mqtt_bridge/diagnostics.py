"""Diagnostics of MQTT Bridge: entry, node snapshot, link and proxy state, redacted."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from homeassistant.core import HomeAssistant
from homeassistant.helpers.redact import async_redact_data

from .const import CONF_BROKER_PASSWORD, CONF_BROKER_USERNAME
from .runtime import MqttBridgeConfigEntry

TO_REDACT = {
    # credentials
    "password",
    "username",
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
    """Return a protobuf message as a dict with its proto field names (snake_case)."""
    if message is None:
        return None
    try:
        return MessageToDict(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    except TypeError:  # protobuf < 5.26 names the option differently
        return MessageToDict(message, preserving_proto_field_name=True)


async def async_get_config_entry_diagnostics(
    hass: HomeAssistant, entry: MqttBridgeConfigEntry
) -> dict[str, Any]:
    """Return the diagnostics of one config entry."""
    runtime = entry.runtime_data
    link, proxy = runtime.link, runtime.proxy
    snapshot = runtime.snapshot

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

    broker = proxy.broker
    broker_settings = proxy.broker_settings
    data = {
        "entry": {
            "title": entry.title,
            "data": dict(entry.data),
            "options": dict(entry.options),
        },
        "node": node,
        "metrics": _message(link.metrics),
        "link": {
            "state": link.state.value,
            "connection": runtime.connection,
            "stats": asdict(link.stats),
        },
        "proxy": {
            "status": proxy.status.value,
            "error": proxy.error,
            "missing_settings": [str(item) for item in proxy.missing_settings],
            "gateway_id": proxy.gateway_id,
            "broker_connected": proxy.broker_connected,
            "broker": asdict(broker_settings) if broker_settings else None,
            "broker_state": broker.state.value if broker is not None else None,
            "broker_stats": asdict(broker.stats) if broker is not None else None,
            "subscriptions": sorted(proxy.subscriptions),
            "uplink_queue_depth": proxy.uplink_queue_depth,
            "downlink_queue_depth": proxy.downlink_queue_depth,
            "stats": {
                "uplink_messages": proxy.stats.uplink_messages,
                "downlink_messages": proxy.stats.downlink_messages,
                "dropped_total": proxy.stats.dropped_total,
                "dropped": dict(proxy.stats.dropped),
                "last_uplink": proxy.stats.last_uplink,
                "last_downlink": proxy.stats.last_downlink,
            },
        },
    }
    return async_redact_data(data, TO_REDACT)
