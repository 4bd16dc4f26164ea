"""Child processes of ``bench/vnode.py``: a simulated node, or the virtual node engine.

``python bench/_vnode_children.py sim`` serves one
:class:`~devkit.meshsim.SimulatedNode` on TCP (random port on 127.0.0.1);
``python bench/_vnode_children.py vnode --node-port N`` runs one
:class:`NodeLink` to that node and one :class:`VirtualNodeServer` on a random
port of 127.0.0.1, as Home Assistant would (standard asyncio loop), with the
engine loaded without ``custom_components/**/__init__.py`` (Home Assistant is
never imported, reported in the ready line).
``python bench/_vnode_children.py relay --node-port N`` is the floor any
asyncio relay has: bytes from the node are written unchanged to every
connected client and the clients' bytes to the node (no parsing at all).

All are driven by the line protocol of ``bench/_child.py``: commands on
stdin, one JSON object per line on stdout (first ``{"event": "ready", ...}``).

sim commands
    ``lat SEQ``: the node hears a 48-byte text (``VNB <seq> <ns>``, ``ns`` =
    ``time.monotonic_ns()`` taken just before the packet is built) and hands it
    to its client at once (``MeshService::sendToPhone``); no answer.
    ``burst N RATE SEQ0``: ``N`` such texts paced at ``RATE`` per second;
    answer ``{"event": "burst_done", "seconds": ...}``. ``quit``.
vnode commands
    ``cpu``: ``{"cpu": process CPU seconds, "frames_rx": FromRadio frames the
    link read, "clients": connected clients, "forwarded": messages written
    to clients}``; ``stop`` / ``start``: close or open the server's port
    (answer ``{"port": ...}``); ``quit``.
"""

# ruff: noqa: E402  (sys.path is set up before the project imports)

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path
import sys
import time
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _child

_child.load_engine()

from meshtastic.protobuf import mesh_pb2, portnums_pb2

from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.node_link import (
    LinkState,
    NodeLink,
    tcp_connector,
)
from custom_components.mqtt_bridge.engine.virtual_node import VirtualNodeServer
from devkit.meshsim import SimulatedNode, default_profile

#: The simulator's "Alpine Hut" node: the sender of every bench text.
SENDER = 0x433E1F70
BROADCAST = 0xFFFFFFFF
TEXT_LEN = 48  # bytes of the text payload: a short chat message


def hear_text(node: SimulatedNode, seq: int) -> None:
    """The node hears a bench text stamped now and sends it to its client."""
    sent = time.monotonic_ns()
    packet = mesh_pb2.MeshPacket(
        to=BROADCAST,
        id=seq % 0xFFFFFFFE + 1,
        channel=0,
        rx_time=int(time.time()),
        hop_limit=3,
        hop_start=3,
    )
    setattr(packet, "from", SENDER)
    packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
    packet.decoded.payload = (b"VNB %08d %019d " % (seq, sent)).ljust(TEXT_LEN, b".")
    node._to_phone(packet)  # MeshService::sendToPhone, no RF detour


async def _burst(node: SimulatedNode, count: int, rate: float, seq0: int) -> float:
    """Hear ``count`` texts paced at ``rate`` per second; return the seconds taken."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(count):
        due = start + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        hear_text(node, seq0 + i)
    return loop.time() - start


async def run_sim() -> None:
    """Serve the simulated node until ``quit`` or EOF."""
    node = SimulatedNode(default_profile())
    port = await node.start_tcp()
    stdin = await _child.stdin_reader()
    _child.emit({"event": "ready", "port": port})

    async def burst(count: str, rate: str, seq0: str) -> dict[str, Any]:
        seconds = await _burst(node, int(count), float(rate), int(seq0))
        return {"event": "burst_done", "seconds": round(seconds, 4)}

    try:
        await _child.serve_commands(
            stdin, {"lat": lambda seq: hear_text(node, int(seq)), "burst": burst}
        )
    finally:
        await node.stop()


async def run_relay(node_port: int) -> None:
    """Relay bytes between the node and every client until ``quit`` or EOF."""
    loop = asyncio.get_running_loop()
    clients: set[asyncio.Transport] = set()

    class Upstream(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            for client in clients:
                client.write(data)

    upstream, _ = await loop.create_connection(Upstream, "127.0.0.1", node_port)

    class Downstream(asyncio.Protocol):
        transport: asyncio.Transport

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            clients.add(transport)

        def data_received(self, data: bytes) -> None:
            upstream.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            clients.discard(self.transport)

    server = await loop.create_server(Downstream, "127.0.0.1", 0)
    stdin = await _child.stdin_reader()
    _child.emit({"event": "ready", "port": server.sockets[0].getsockname()[1]})
    try:
        await _child.serve_commands(stdin, {})
    finally:
        server.close()
        upstream.close()


async def run_vnode(node_port: int) -> None:
    """Run link + virtual node until ``quit`` or EOF."""
    link = NodeLink(
        tcp_connector("127.0.0.1", node_port),
        name="bench",
        backoff=Backoff(base=0.05, cap=0.5),
    )
    task = asyncio.create_task(link.run(), name="link")
    server = VirtualNodeServer(link, host="127.0.0.1", port=0)
    stdin = await _child.stdin_reader()

    def cpu() -> dict[str, Any]:
        return {
            "cpu": time.process_time(),
            "frames_rx": link.stats.frames_rx,
            "clients": len(server.clients),
            "forwarded": server.stats.messages_to_clients,
            "dropped_slow": server.stats.dropped_slow,
        }

    async def stop() -> dict[str, Any]:
        await server.stop()
        return {"port": None}

    async def start() -> dict[str, Any]:
        await server.start()
        return {"port": server.port}

    try:
        async with asyncio.timeout(20):
            while link.state is not LinkState.READY:  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.01)
        await server.start()
        _child.emit(
            {
                "event": "ready",
                "port": server.port,
                "homeassistant_imported": "homeassistant" in sys.modules,
            }
        )
        await _child.serve_commands(stdin, {"cpu": cpu, "stop": stop, "start": start})
    finally:
        await server.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main() -> None:
    """Parse argv and run the chosen child."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=("sim", "vnode", "relay"))
    parser.add_argument("--node-port", type=int, default=0)
    parser.add_argument(
        "--profile", type=Path, default=None, help="write a cProfile dump (CPU time)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.role == "sim":
        child = run_sim()
    elif args.role == "relay":
        child = run_relay(args.node_port)
    else:
        child = run_vnode(args.node_port)
    _child.run_profiled(child, args.profile)


if __name__ == "__main__":
    main()
