"""Demo runner: ``python -m devkit.meshsim --port 4403 --broker 127.0.0.1:1883``.

Serves a :class:`~devkit.meshsim.SimulatedNode` on TCP whose MQTT module points
at ``--broker`` with ``proxy_to_client_enabled`` on, and every ``--interval``
seconds simulates mesh life: a text message from another node, RF traffic from
other nodes (position, telemetry or nodeinfo), and the node's own telemetry
with slowly drifting battery, voltage and channel utilisation.  One log line
per simulated event; SIGINT/SIGTERM stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import signal
import sys

from .node import SimulatedNode
from .profile import ChannelSpec, default_profile

SENTENCES = (
    "Good morning from the hut!",
    "Anyone copy? Testing the new antenna.",
    "Trail is clear up to the ridge.",
    "Battery swap done, back on the air.",
    "Heading down to the valley, ETA 30 min.",
    "Weather turning, wind picking up.",
    "Relay check: you are coming in 5 by 5.",
    "Coffee at the lodge at noon?",
    "Solar panel says 98%, nice day.",
    "Signing off for tonight, 73!",
)

#: Rough positions for the default other nodes (degrees, metres).
_PLACES = ((47.2692, 11.4041, 574), (47.2850, 11.3900, 1905), (47.2600, 11.4300, 620))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.meshsim", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    parser.add_argument("--port", type=int, default=4403, help="TCP port (4403)")
    parser.add_argument(
        "--broker", default="127.0.0.1:1883", help="mqtt.address reported to clients"
    )
    parser.add_argument("--username", default="", help="mqtt.username")
    parser.add_argument("--password", default="", help="mqtt.password")
    parser.add_argument("--root", default="msh", help="mqtt.root")
    parser.add_argument(
        "--preset", default="LONG_FAST", help="LoRa modem preset (LONG_FAST, ...)"
    )
    parser.add_argument(
        "--interval", type=float, default=5.0, help="seconds between mesh events"
    )
    parser.add_argument(
        "--no-encryption",
        action="store_true",
        help="mqtt.encryption_enabled false (decoded envelopes)",
    )
    return parser.parse_args(argv)


def _log(message: str) -> None:
    print(f"[meshsim] {message}", flush=True)


async def _run(args: argparse.Namespace) -> None:
    profile = default_profile(
        mqtt_address=args.broker,
        mqtt_username=args.username,
        mqtt_password=args.password,
        mqtt_root=args.root,
        modem_preset=args.preset,
        proxy_to_client_enabled=True,
        mqtt_encryption_enabled=not args.no_encryption,
        channels=[ChannelSpec(), ChannelSpec(name="Home", psk=bytes(range(16)))],
        position=(47.2654, 11.3928, 580),
    )
    node = SimulatedNode(profile)
    port = await node.start_tcp(args.host, args.port)
    _log(
        f"node {node.node_id} '{profile.long_name}' on {args.host}:{port}, "
        f"mqtt {args.broker} root {profile.topic_root()}, "
        f"uplink topic {node.topic_for(0)}"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    sentences = itertools.cycle(SENTENCES)
    others = profile.other_nodes
    seen = (0, 0, 0)
    try:
        for tick in itertools.count():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.interval)
            if stop.is_set():
                break
            state = (node.connections, node.handshakes, len(node.downlinks))
            if state != seen:
                _log(
                    f"clients: connections={state[0]} handshakes={state[1]} "
                    f"downlinks={state[2]} live={node.config_complete}"
                )
                seen = state
            num, long_name, short_name = random.choice(others)
            text = next(sentences)
            channel = 1 if tick % 4 == 3 else 0
            node.receive_text(num, text, channel_index=channel)
            _log(
                f"text from !{num:08x} ({short_name}) on "
                f"{node.channel_name(channel)}: {text!r}"
            )
            num, long_name, short_name = random.choice(others)
            kind = tick % 3
            if kind == 0:
                lat, lon, alt = _PLACES[others.index((num, long_name, short_name)) % 3]
                lat += random.uniform(-0.001, 0.001)
                lon += random.uniform(-0.001, 0.001)
                node.receive_position(num, lat, lon, alt)
                _log(f"position from !{num:08x}: {lat:.5f},{lon:.5f} {alt} m")
            elif kind == 1:
                battery = random.randint(40, 100)
                node.receive_telemetry(num, battery_level=battery)
                _log(f"telemetry from !{num:08x}: battery {battery}%")
            else:
                node.receive_nodeinfo(num, long_name, short_name)
                _log(f"nodeinfo from !{num:08x}: {long_name} ({short_name})")
            node.profile.battery_level = max(
                5, min(100, node.profile.battery_level + random.choice((-1, 0, 0, 1)))
            )
            node.profile.voltage = round(
                3.3
                + 0.9 * node.profile.battery_level / 100
                + random.uniform(-0.02, 0.02),
                3,
            )
            node.profile.channel_utilization = round(
                max(0.0, node.profile.channel_utilization + random.uniform(-1.5, 1.5)),
                2,
            )
            node.profile.air_util_tx = round(
                max(0.0, node.profile.air_util_tx + random.uniform(-0.3, 0.3)), 2
            )
            node.send_telemetry()
            _log(
                f"own telemetry: battery {node.profile.battery_level}% "
                f"{node.profile.voltage} V, ch util {node.profile.channel_utilization}%"
            )
    finally:
        await node.stop()
        _log("stopped")


def main(argv: list[str] | None = None) -> int:
    """Run the demo node until SIGINT/SIGTERM; return the exit status."""
    args = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
