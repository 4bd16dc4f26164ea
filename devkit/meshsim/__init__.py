"""Meshtastic node simulator: stream API (TCP/serial) with MQTT client proxy.

An independent model of the 2.7 firmware (``shared/reference/meshtastic-proxy.md``)
for tests, the demo and benchmarks; it shares no code with the integration.

    node = SimulatedNode(default_profile(mqtt_address="127.0.0.1:1883"))
    port = await node.start_tcp()
    ...
    await node.stop()
"""

from __future__ import annotations

from .node import SimulatedNode
from .profile import ChannelSpec, NodeProfile, default_profile, preset_display_name

__all__ = [
    "ChannelSpec",
    "NodeProfile",
    "SimulatedNode",
    "default_profile",
    "preset_display_name",
]
