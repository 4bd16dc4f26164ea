"""Constants of the MQTT Bridge integration, grouped by entry type.

Config keys Home Assistant already defines (``host``, ``port``, ``device``,
``device_id``, ``entity_id``) are imported from :mod:`homeassistant.const`
where the stored key is the same string. Default ports are not repeated here:
the node's TCP API port is :data:`.engine.node_link.DEFAULT_TCP_PORT` (4403),
the broker ports are :data:`.engine.rules.PORT_PLAIN` (1883) and
:data:`.engine.rules.PORT_TLS` (8883).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

DOMAIN: Final = "mqtt_bridge"
MANUFACTURER: Final = "Meshtastic"

# -- every entry ---------------------------------------------------------------

# entry.data[CONF_ENTRY_TYPE] says what an entry is (config entry 1.2 on;
# async_migrate_entry adds it to 1.1 entries, which were all Meshtastic nodes).
CONF_ENTRY_TYPE: Final = "entry_type"


class EntryType(StrEnum):
    """What a config entry of this integration is (``entry.data["entry_type"]``)."""

    # A Meshtastic node whose MQTT client proxy traffic Home Assistant forwards.
    MESHTASTIC_NODE = "meshtastic_node"
    # An MQTT broker whose topics AI agents reach through the MQTT tools.
    MQTT_BROKER = "mqtt_broker"


# -- Meshtastic node: entry.data (how Home Assistant reaches the node) ----------
# With CONF_CONNECTION == CONNECTION_TCP the data holds homeassistant.const
# CONF_HOST and CONF_PORT; with CONNECTION_SERIAL it holds CONF_DEVICE (a path).

CONF_CONNECTION: Final = "connection"
CONNECTION_TCP: Final = "tcp"
CONNECTION_SERIAL: Final = "serial"

# -- Meshtastic node: entry.options (the proxy) -----------------------------------
# The broker keys keep their "broker_" prefix: they are the stored keys of
# existing entries and name the proxy's broker, not the entry's own peer.

CONF_BROKER_MODE: Final = "broker_mode"
BROKER_MODE_NODE: Final = "node"  # the broker in the node's MQTT settings
BROKER_MODE_CUSTOM: Final = "custom"  # the broker in the options below
CONF_BROKER_HOST: Final = "broker_host"
CONF_BROKER_PORT: Final = "broker_port"
CONF_BROKER_TLS: Final = "broker_tls"
CONF_BROKER_USERNAME: Final = "broker_username"
CONF_BROKER_PASSWORD: Final = "broker_password"
CONF_ALLOW_SELF_SIGNED: Final = "allow_self_signed"
CONF_FORWARD_RETAINED: Final = "forward_retained"
CONF_FORWARD_OWN_ECHOES: Final = "forward_own_echoes"
CONF_UPLINK_QUEUE_SIZE: Final = "uplink_queue_size"
DEFAULT_UPLINK_QUEUE_SIZE: Final = 1000  # messages

# -- Meshtastic node: entry.options (sharing the node, node_sharing.py) ----------
# Home Assistant serves the node's stream API to other clients (phone apps, the
# CLI, MeshMonitor) as a virtual node. The default port is
# engine.virtual_node.DEFAULT_PORT (4404, MeshMonitor's Virtual Node port).

CONF_SHARE_NODE: Final = "share_node"  # bool, default False
CONF_SHARE_PORT: Final = "share_port"  # int, 1..65535
CONF_SHARE_HOST: Final = "share_host"  # str, the IP address to listen on
DEFAULT_SHARE_HOST: Final = "0.0.0.0"  # every IPv4 interface
# list[str] of CIDRs clients may connect from; [] = the local networks
# (engine.virtual_node.LOCAL_NETWORKS: loopback, RFC 1918, link-local, ULA).
CONF_SHARE_NETWORKS: Final = "share_networks"

# -- Meshtastic node: entities, events, repairs -----------------------------------

# Seconds between two state writes of counters and last-activity entities, so the
# recorder never stores one row per mesh message (the broker entry's counters too).
UPDATE_THROTTLE: Final = 2.0

# Entity description key of the node's "Messages" event entity.
KEY_MESSAGES: Final = "messages"
# Event type the "Messages" event entity fires for each received text message.
EVENT_TYPE_TEXT_MESSAGE: Final = "text_message"
# Bus event fired for each received text message (described by logbook.py).
EVENT_TEXT_MESSAGE: Final = f"{DOMAIN}_text_message"

# Text message attributes (event entity) and bus event data keys; the bus event
# also carries ATTR_CONFIG_ENTRY_ID and homeassistant.const ATTR_DEVICE_ID and
# ATTR_ENTITY_ID.
ATTR_SENDER_ID: Final = "sender_id"  # "!xxxxxxxx"
ATTR_SENDER_NAME: Final = "sender_name"  # long name, None if unknown
ATTR_CHANNEL: Final = "channel"  # channel index 0..7
ATTR_CHANNEL_NAME: Final = "channel_name"  # None if the index is unknown
ATTR_DESTINATION: Final = "destination"  # "^all" or "!xxxxxxxx"
ATTR_TEXT: Final = "text"
ATTR_RX_TIME: Final = "rx_time"  # POSIX seconds
ATTR_SNR: Final = "snr"  # dB
ATTR_RSSI: Final = "rssi"  # dBm
ATTR_VIA_MQTT: Final = "via_mqtt"
ATTR_PACKET_ID: Final = "packet_id"
DESTINATION_BROADCAST: Final = "^all"

# Repair issue translation keys; issue ids are "<key>_<entry id>".
ISSUE_MQTT_DISABLED: Final = "node_mqtt_disabled"
ISSUE_PROXY_TO_CLIENT_DISABLED: Final = "node_proxy_to_client_disabled"
ISSUE_BROKER_AUTH: Final = "broker_auth_failed"
ISSUE_BROKER_ADDRESS: Final = "invalid_broker_address"
# The shared node's port cannot be bound (placeholders: name, port, error).
ISSUE_VIRTUAL_NODE_PORT: Final = "virtual_node_port_in_use"

# -- MQTT broker: entry.data (how Home Assistant reaches the broker) -------------
# homeassistant.const CONF_HOST, CONF_PORT, CONF_USERNAME, CONF_PASSWORD plus:

CONF_TLS: Final = "tls"  # connect with TLS (mqtts)
# CONF_ALLOW_SELF_SIGNED (above): TLS without certificate or host name check;
# certificate verification is on unless this is true.
CONF_CA_FILE: Final = "ca_file"  # path of a PEM file of extra trusted CAs, or ""
CONF_CLIENT_ID_PREFIX: Final = "client_id_prefix"  # client id: "<prefix>-<random>"
DEFAULT_CLIENT_ID_PREFIX: Final = "ha-mqtt-bridge"

# -- MQTT broker: entry.options (applied live, no reload) --------------------------

# The topic ACL: a list of {"pattern", "permissions": ["read", "write"],
# "description"} dicts (engine.acl.rules_to_options / rules_from_options).
# No rules: every tool call is denied.
CONF_RULES: Final = "rules"
# The HTTP (MCP) endpoint accepts only administrators' tokens.
CONF_REQUIRE_ADMIN: Final = "require_admin"
DEFAULT_REQUIRE_ADMIN: Final = False
# The entry's LLM API also offers the tools of Home Assistant's Assist API.
CONF_INCLUDE_ASSIST: Final = "include_assist_tools"
DEFAULT_INCLUDE_ASSIST: Final = False

# -- MQTT broker: tool calls -------------------------------------------------------

# Bus event fired for every tool call, allowed or denied (described by logbook.py).
EVENT_TOOL_CALL: Final = f"{DOMAIN}_tool_call"
# Its data keys:
ATTR_ENTRY_ID: Final = "entry_id"
ATTR_TOOL: Final = "tool"
ATTR_TOPIC: Final = "topic"
ATTR_ALLOWED: Final = "allowed"
ATTR_SOURCE: Final = "source"  # SOURCE_MCP or SOURCE_ASSIST
ATTR_USER_ID: Final = "user_id"
ATTR_DURATION_MS: Final = "duration_ms"
ATTR_IS_ERROR: Final = "is_error"
SOURCE_MCP: Final = "mcp"
SOURCE_ASSIST: Final = "assist"

# -- actions ---------------------------------------------------------------------

SERVICE_SEND_TEXT: Final = "send_text"
# send_text targets an entry either by ATTR_CONFIG_ENTRY_ID or by
# homeassistant.const ATTR_DEVICE_ID (exactly one of them); it also takes
# ATTR_TEXT, ATTR_CHANNEL and ATTR_DESTINATION (a node id, omitted = broadcast).
ATTR_CONFIG_ENTRY_ID: Final = "config_entry_id"

# -- MQTT broker: config subentries (stdio MCP servers hosted on MQTT) ------------

# Subentry type of a stdio MCP server hosted on the broker (flow_stdio.py,
# hosted_servers.py). Its title is the server's name; its unique id is the
# server-name. Its data: homeassistant.const CONF_COMMAND (str) and
# CONF_DESCRIPTION (str, "" when none) plus the keys below.
SUBENTRY_STDIO_SERVER: Final = "stdio_server"
CONF_ARGS: Final = "args"  # list[str], the command's arguments
CONF_ENV: Final = "env"  # dict[str, str], variables added to the minimal environment
CONF_CWD: Final = "cwd"  # absolute path of the working directory, or None
CONF_SERVER_NAME: Final = "server_name"  # the MCP-over-MQTT server-name (spec §1.2)
# The request topic of the simple-device layout (engine/mcp_mqtt_simple.py), or
# None (absent in older subentries) when the server is not offered that way.
CONF_REQUEST_TOPIC: Final = "request_topic"

# -- MQTT broker: MCP servers on the broker as LLM APIs (remote_llm.py) -----------

# entry.options: which announced MCP-over-MQTT servers become LLM APIs: a list of
# fnmatch-style server-name patterns (["*"] = all, [] = none). Applied live.
CONF_MCP_SERVERS: Final = "mcp_servers"
DEFAULT_MCP_SERVERS: Final = ("*",)
