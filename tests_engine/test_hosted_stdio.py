"""``HostedStdioServer`` (engine/hosted_stdio.py) against a real Mosquitto and the echo child.

Its normal runs are exercised by ``test_cli.py`` (``serve``, unsupervised) and
``tests/test_stdio_servers.py`` (Home Assistant, supervised); here: the
configuration errors, the stop order when a task ends on its own without
supervision, and a rename.
"""

from __future__ import annotations

import asyncio
import sys

from mqtt_bridge_engine.hosted_stdio import (
    HostedStdioConfig,
    HostedStdioServer,
    simple_host_name,
)
from mqtt_bridge_engine.mqtt_client import ClientState, MqttSettings
import pytest

from devkit.mosquitto import Mosquitto

from .common import ECHO, no_leftovers, uid  # noqa: F401

pytestmark = pytest.mark.timeout(30)


def echo_config(**values: object) -> HostedStdioConfig:
    """The echo server as ``test/{uid}/echo``, with ``values`` replaced."""
    fields: dict[str, object] = {
        "server_name": f"test/{uid()}/echo",
        "command": sys.executable,
        "args": (str(ECHO),),
    }
    fields.update(values)
    return HostedStdioConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"server_name": "a/+"}, "wildcard"),
        ({"request_topic": "$SYS/x"}, r"request topic '\$SYS/x': it starts with \$"),
        ({"request_topic": "a/#"}, "request topic 'a/#': wildcard"),
        ({"command": ""}, "the command is empty"),
        ({"qos": 2}, "QoS 2 is not 0 or 1"),
        ({"max_sessions": 0}, "must be positive"),
        ({"idle_timeout": 0.0}, "must be positive"),
    ],
)
def test_invalid_configuration(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HostedStdioServer(
            MqttSettings("127.0.0.1"), echo_config(**values), client_id="x"
        )


def test_names_and_rename() -> None:
    config = echo_config(env={"A": "1"}, cwd="/")
    assert config.log_name == config.server_name
    assert config.stdio().env == {"A": "1"}
    hosted = HostedStdioServer(MqttSettings("127.0.0.1"), config, client_id="srv-1")
    assert hosted.host.name == config.server_name
    assert hosted.simple is None
    assert hosted.diagnostics()["simple_devices"] is None
    hosted.rename("Echo")
    assert hosted.config.name == "Echo"
    assert hosted.host.name == "Echo"
    with_simple = HostedStdioServer(
        MqttSettings("127.0.0.1"),
        echo_config(request_topic=f"test/{uid()}/req", name="Echo"),
        client_id="srv-2",
    )
    assert with_simple.simple_host is not None
    assert with_simple.simple_host.name == simple_host_name("Echo")
    with_simple.rename("Other")
    assert with_simple.simple_host.name == "Other (simple devices)"


async def test_unsupervised_task_ending_stops_the_servers_first(
    mosquitto: Mosquitto,
) -> None:
    """Without a health, a server that returns ends ``run``: servers stop, then the client."""
    settings = MqttSettings("127.0.0.1", mosquitto.port)
    hosted = HostedStdioServer(
        settings,
        echo_config(request_topic=f"test/{uid()}/req", qos=0),
        client_id=f"srv-{uid()}",
    )
    assert hosted.simple is not None
    connected_at_stop: list[bool] = []
    server_run = hosted.server.run

    async def recording_run() -> None:
        try:
            await server_run()
        finally:
            connected_at_stop.append(hosted.client.connected)

    async def returns_when_announced() -> None:
        while not hosted.announced:
            await asyncio.sleep(0.01)

    hosted.server.run = recording_run  # type: ignore[method-assign]
    hosted.simple.run = returns_when_announced  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="a task stopped unexpectedly"):
        async with asyncio.timeout(15):
            await hosted.run()
    assert connected_at_stop == [True]
    assert hosted.client.state is ClientState.STOPPED
    assert not hosted.announced
    assert hosted.counters().errors == 0
