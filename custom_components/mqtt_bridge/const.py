"""Constants of the MQTT Bridge integration."""

from __future__ import annotations

from typing import Final

DOMAIN: Final = "mqtt_bridge"
MANUFACTURER: Final = "Meshtastic"

# Config entry data (the node connection).
CONF_CONNECTION: Final = "connection"
CONNECTION_TCP: Final = "tcp"
CONNECTION_SERIAL: Final = "serial"
CONF_HOST: Final = "host"
CONF_PORT: Final = "port"
CONF_DEVICE: Final = "device"
DEFAULT_TCP_PORT: Final = 4403

# Options (the proxy).
CONF_BROKER_MODE: Final = "broker_mode"
BROKER_MODE_NODE: Final = "node"
BROKER_MODE_CUSTOM: Final = "custom"
CONF_BROKER_HOST: Final = "broker_host"
CONF_BROKER_PORT: Final = "broker_port"
CONF_BROKER_TLS: Final = "broker_tls"
CONF_BROKER_USERNAME: Final = "broker_username"
CONF_BROKER_PASSWORD: Final = "broker_password"
CONF_ALLOW_SELF_SIGNED: Final = "allow_self_signed"
CONF_FORWARD_RETAINED: Final = "forward_retained"
CONF_FORWARD_OWN_ECHOES: Final = "forward_own_echoes"
CONF_UPLINK_QUEUE_SIZE: Final = "uplink_queue_size"
DEFAULT_UPLINK_QUEUE_SIZE: Final = 1000

# Seconds between two state writes of counters and last-activity entities, so the
# recorder never stores one row per mesh message.
UPDATE_THROTTLE: Final = 2.0

EVENT_TEXT_MESSAGE: Final = "text_message"

# Repair issue ids (suffixed with the entry id).
ISSUE_NODE_SETTINGS: Final = "node_settings_missing"
ISSUE_BROKER_AUTH: Final = "broker_auth_failed"
ISSUE_BROKER_ADDRESS: Final = "invalid_broker_address"

SERVICE_SEND_TEXT: Final = "send_text"
ATTR_CONFIG_ENTRY_ID: Final = "config_entry_id"
ATTR_TEXT: Final = "text"
ATTR_CHANNEL: Final = "channel"
ATTR_DESTINATION: Final = "destination"
