"""Child process of ``bench/proxy.py``: runs the proxy engine alone, nothing else.

Started as ``python bench/_worker.py --node-port N [--profile FILE]``. It runs one
:class:`NodeLink` to the simulated node and one :class:`MeshtasticProxy` (the
broker comes from the node's MQTT settings), with the standard asyncio event
loop, as Home Assistant would. Control is line-based:

* stdout: one JSON object per line: ``{"event": "ready", ...}`` once the link
  is live and the broker session is up, then one answer per command;
* stdin: ``stats`` (answer: counters and queue depths), ``debug`` (sizes of
  paho buffers), ``quit`` (or EOF):
  stop the engine, write the profile if asked, exit 0.

``--profile FILE`` writes a cProfile dump timed with ``time.process_time`` (CPU
time, so preemption on a busy machine and idle waits do not count).

The engine package is loaded without executing ``custom_components/__init__``
and ``custom_components/mqtt_bridge/__init__`` (which import Home Assistant), so
the process's CPU time and RSS are the engine's own: ``homeassistant`` is never
imported (reported in the ready line).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
import sys
import time
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import _child

_child.load_engine()

from custom_components.mqtt_bridge.engine.backoff import Backoff  # noqa: E402
from custom_components.mqtt_bridge.engine.node_link import (  # noqa: E402
    LinkState,
    NodeLink,
    tcp_connector,
)
from custom_components.mqtt_bridge.engine.proxy import (  # noqa: E402
    MeshtasticProxy,
    ProxyOptions,
)


def _stats(link: NodeLink, proxy: MeshtasticProxy) -> dict[str, Any]:
    """Counters the bench uses to explain losses."""
    client = proxy.client
    return {
        "event": "stats",
        "link_state": str(link.state),
        "proxy_status": str(proxy.status),
        "uplink_messages": proxy.stats.uplink_messages,
        "downlink_messages": proxy.stats.downlink_messages,
        "dropped": dict(proxy.stats.dropped),
        "uplink_queue": proxy.uplink_queue_depth,
        "downlink_queue": proxy.downlink_queue_depth,
        "broker_published": client.stats.published if client else 0,
        "broker_received": client.stats.received if client else 0,
        "broker_dropped": proxy.stats.dropped.get("uplink_queue_full", 0),
        "frames_rx": link.stats.frames_rx,
        "frames_tx": link.stats.frames_tx,
        "link_failures": link.stats.failures,
        "broker_failures": client.stats.failures if client else 0,
    }


def _debug(proxy: MeshtasticProxy) -> dict[str, Any]:
    """Sizes of the buffers the engine does not bound itself (paho's)."""
    out: dict[str, Any] = {"event": "debug", "tasks": len(asyncio.all_tasks())}
    connection = proxy.client._connection if proxy.client else None
    if connection is not None:
        paho = connection.paho
        out["paho_out_packets"] = len(paho._out_packet)
        out["paho_out_messages"] = len(paho._out_messages)
        out["paho_in_messages"] = len(paho._in_messages)
    return out


async def _wait_ready(link: NodeLink, proxy: MeshtasticProxy, timeout: float) -> None:
    """Wait until the link is live and the broker session is up."""
    async with asyncio.timeout(timeout):
        while not (  # noqa: ASYNC110 - no event covers all three conditions
            link.state is LinkState.READY
            and proxy.broker_connected
            and proxy.subscriptions
        ):
            await asyncio.sleep(0.01)


async def main(node_port: int) -> None:
    """Run the engine until ``quit`` or EOF on stdin."""
    link = NodeLink(
        tcp_connector("127.0.0.1", node_port),
        name="bench",
        backoff=Backoff(base=0.05, cap=0.5),
    )
    proxy = MeshtasticProxy(link, ProxyOptions())
    tasks = {
        asyncio.create_task(link.run(), name="link"),
        asyncio.create_task(proxy.run(), name="proxy"),
    }
    stdin = await _child.stdin_reader()
    try:
        started = time.monotonic()
        await _wait_ready(link, proxy, 20.0)
        _child.emit(
            {
                "event": "ready",
                "seconds": round(time.monotonic() - started, 3),
                "subscriptions": sorted(proxy.subscriptions),
                "homeassistant_imported": "homeassistant" in sys.modules,
            }
        )
        await _child.serve_commands(
            stdin,
            {"stats": lambda: _stats(link, proxy), "debug": lambda: _debug(proxy)},
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)


def run() -> None:
    """Parse argv and run; ``--profile`` writes a cProfile dump at exit."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--node-port", type=int, required=True)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _child.run_profiled(main(args.node_port), args.profile)


if __name__ == "__main__":
    run()
