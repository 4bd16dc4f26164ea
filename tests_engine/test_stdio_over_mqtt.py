"""A stdio MCP server hosted on MQTT: ClientSession → MQTT → McpMqttServer → StdioHost → child.

The two engine pieces of the stdio ⇄ MQTT bridge together, against a real
Mosquitto and a real stdio MCP server child process (``stdio_servers/echo.py``):
a stock ``mcp.ClientSession`` on the MCP-over-MQTT client transport lists and
calls the child's tools, two clients get two children, and a child killed in the
middle of a request turns into an error answer followed by a working call.
"""

from __future__ import annotations

from typing import Any

from mqtt_bridge_engine.mcp_mqtt import McpMqttServer

from devkit.mosquitto import Mosquitto

from .test_mcp_mqtt import hosted, session
from .test_stdio_host import _host, _text


async def test_stdio_server_reached_over_mqtt(mosquitto: Mosquitto) -> None:
    host = _host()
    async with hosted(
        mosquitto, "test/stdio-echo", handler=host.serve_session
    ) as server:
        assert isinstance(server, McpMqttServer)
        async with session(mosquitto, "test/stdio-echo") as (first, _t1):
            tools = await first.list_tools()
            assert "echo" in [tool.name for tool in tools.tools]
            result = await first.call_tool("echo", {"text": "over mqtt"})
            assert "over mqtt" in _text(result)
            async with session(mosquitto, "test/stdio-echo") as (second, _t2):
                other = await second.call_tool("echo", {"text": "second"})
                assert "second" in _text(other)
                assert host.stats.sessions == 2  # one child per MQTT client
                assert host.stats.running == 2
            again = await first.call_tool("echo", {"text": "still here"})
            assert "still here" in _text(again)
    assert host.stats.running == 0


async def test_child_death_over_mqtt_is_an_error_then_recovers(
    mosquitto: Mosquitto,
) -> None:
    host = _host()
    async with (
        hosted(mosquitto, "test/stdio-die", handler=host.serve_session),
        session(mosquitto, "test/stdio-die") as (client, _t),
    ):
        failed: Any = None
        try:
            await client.call_tool("die", {})
        except Exception as err:  # the SDK raises McpError for error answers
            failed = err
        assert failed is not None
        assert "exited" in str(failed)
        result = await client.call_tool("echo", {"text": "after restart"})
        assert "after restart" in _text(result)
        assert host.stats.restarts >= 1
