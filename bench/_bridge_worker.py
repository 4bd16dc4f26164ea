"""Child process of ``bench/bridge.py``: the bridge's server side, alone in its process.

Started as ``python bench/_bridge_worker.py --port P --server SCRIPT
--name N0 --name N1 --floor TOPIC [--profile FILE]``. For the i-th ``--name``
it runs, as the integration does for one hosted stdio server, one
:class:`MqttClient` (its own client id = server-id, with the server presence
will), one :class:`McpMqttServer` at QoS i (0, then 1) and one
:class:`StdioHost` starting ``python SCRIPT`` (one child per MCP session).
All on one standard asyncio event loop, as in Home Assistant. The first
server's MqttClient also echoes every message on ``TOPIC/request`` to
``TOPIC/response`` (QoS 0, the server's user properties): the MQTT round trip
alone, without MCP. Control is line-based:

* stdout: one JSON object per line: ``{"event": "ready", ...}`` once every
  subscription is granted (the presence is published then), then one answer
  per command;
* stdin: ``stats`` (answer: per server, the host's and the server's counters
  and this process's task count), ``quit`` (or EOF): stop the servers (their
  children are stopped), write the profile if asked, exit 0.

``--profile FILE`` writes a cProfile dump timed with ``time.process_time``
(CPU time of this process only: the children are other processes).
"""

# ruff: noqa: E402  (the engine loader runs before the engine imports)

from __future__ import annotations

import argparse
import asyncio
from dataclasses import asdict
import logging
from pathlib import Path
import sys
import time
from typing import Any
import uuid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _child

_child.load_engine()

from custom_components.mqtt_bridge.engine.mcp_mqtt import (
    CLIENT_ID,
    COMPONENT_TYPE,
    SERVER_COMPONENT,
    McpMqttServer,
)
from custom_components.mqtt_bridge.engine.mqtt_client import (
    Message,
    MqttClient,
    MqttSettings,
    PublishProperties,
)
from custom_components.mqtt_bridge.engine.stdio_host import (
    StdioHost,
    StdioServerConfig,
)
from custom_components.mqtt_bridge.engine.subscriptions import SubscribeOptions


class Hosted:
    """One hosted stdio server: its MqttClient, McpMqttServer and StdioHost."""

    def __init__(self, port: int, name: str, qos: int, script: str) -> None:
        """Prepare (not start) the three pieces."""
        self.name = name
        self.qos = qos
        server_id = f"bench-srv-q{qos}-{uuid.uuid4().hex[:8]}"
        self.client = MqttClient(
            MqttSettings("127.0.0.1", port),
            client_id=server_id,
            will=McpMqttServer.will(server_id, name),
        )
        self.host = StdioHost(
            StdioServerConfig(sys.executable, (script,)), name=f"echo-q{qos}"
        )
        self.server = McpMqttServer(
            self.client,
            name,
            handler=self.host.serve_session,
            qos=qos,
            max_sessions=64,
        )

    def echo_floor(self, floor: str) -> None:
        """Echo ``floor/request`` to ``floor/response`` (QoS 0, as a server publishes)."""
        client = self.client
        props = PublishProperties(
            user_properties=(
                (COMPONENT_TYPE, SERVER_COMPONENT),
                (CLIENT_ID, client.client_id),
            )
        )
        response = f"{floor}/response"

        def echo(message: Message) -> None:
            client.publish(response, message.payload, qos=0, properties=props)

        client.subscribe(f"{floor}/request", echo, SubscribeOptions(qos=0))

    def stats(self) -> dict[str, Any]:
        """Counters of the host, the server and the client."""
        return {
            "name": self.name,
            "qos": self.qos,
            "host": asdict(self.host.stats),
            "server": asdict(self.server.stats),
            "sessions": len(self.server.sessions),
            "published": self.client.stats.published,
            "received": self.client.stats.received,
        }


async def main(port: int, script: str, names: list[str], floor: str) -> None:
    """Serve every name until ``quit`` or EOF on stdin."""
    hosted = [Hosted(port, name, qos, script) for qos, name in enumerate(names)]
    hosted[0].echo_floor(floor)
    clients = {asyncio.create_task(h.client.run()) for h in hosted}
    servers: set[asyncio.Task[None]] = set()
    stdin = await _child.stdin_reader()
    try:
        started = time.monotonic()
        async with asyncio.timeout(20):
            for h in hosted:
                await h.client.wait_connected()
            servers = {asyncio.create_task(h.server.run()) for h in hosted}
            while not all(h.client.registry.granted for h in hosted):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        _child.emit(
            {
                "event": "ready",
                "seconds": round(time.monotonic() - started, 3),
                "servers": [
                    {"name": h.name, "qos": h.qos, "server_id": h.server.server_id}
                    for h in hosted
                ],
                "homeassistant_imported": "homeassistant" in sys.modules,
            }
        )
        await _child.serve_commands(
            stdin,
            {
                "stats": lambda: {
                    "event": "stats",
                    "tasks": len(asyncio.all_tasks()),
                    "servers": [h.stats() for h in hosted],
                }
            },
        )
    finally:
        # Servers first (each session's child is stopped), then the MQTT clients.
        for task in servers:
            task.cancel()
        if servers:
            await asyncio.wait(servers)
        for task in clients:
            task.cancel()
        await asyncio.wait(clients)


def run() -> None:
    """Parse argv and run; ``--profile`` writes a cProfile dump at exit."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", required=True, help="stdio MCP server script")
    parser.add_argument("--name", action="append", required=True)
    parser.add_argument("--floor", required=True, help="topic prefix of the echo")
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _child.run_profiled(
        main(args.port, args.server, args.name, args.floor), args.profile
    )


if __name__ == "__main__":
    run()
