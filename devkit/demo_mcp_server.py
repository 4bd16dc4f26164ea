"""The demo's stdio MCP server, hosted on MQTT by the "Demo broker" entry.

``scripts/develop`` adds it as the config subentry "Demo tools" (server-name
``demo/tools``) of the demo broker entry: Home Assistant starts it as a child
process per MCP-over-MQTT client session. Any MCP-over-MQTT client finds it on
the broker (``mqtt-bridge-mcp list``), Claude Desktop reaches it through
``mqtt-bridge-mcp connect demo/tools``, and Assist agents get its tools as the
LLM API "demo/tools (MQTT)".

Tools: ``roll_dice(sides, count)``, ``now(utc_offset_hours)``, ``word_count(text)``;
a resource ``demo://about``; a prompt ``greet(name)``. Runs with the stock
``mcp`` SDK (FastMCP on mcp 1.x, MCPServer on 2.x); nothing but JSON-RPC on
stdout.
"""

# No ``from __future__ import annotations``: FastMCP 1.x reads the real
# annotations of the tool functions.
from datetime import UTC, datetime, timedelta, timezone
import random
import warnings

warnings.simplefilter("ignore")

try:  # mcp 2.x
    from mcp.server.mcpserver import MCPServer as _Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as _Server  # type: ignore[no-redef]

server = _Server("demo-tools", log_level="WARNING")


@server.tool()
def roll_dice(sides: int = 6, count: int = 1) -> list[int]:
    """Roll ``count`` dice with ``sides`` sides each (1-100 sides, 1-20 dice)."""
    sides = max(1, min(sides, 100))
    count = max(1, min(count, 20))
    return [random.randint(1, sides) for _ in range(count)]


@server.tool()
def now(utc_offset_hours: float = 0.0) -> str:
    """The current time (ISO 8601) at ``utc_offset_hours`` from UTC."""
    zone = timezone(timedelta(hours=utc_offset_hours))
    return datetime.now(UTC).astimezone(zone).isoformat(timespec="seconds")


@server.tool()
def word_count(text: str) -> int:
    """The number of whitespace-separated words in ``text``."""
    return len(text.split())


@server.resource("demo://about")
def about() -> str:
    """What this server is."""
    return (
        "The MQTT Bridge demo's stdio MCP server, hosted by Home Assistant and "
        "reached over MQTT (MCP over MQTT)."
    )


@server.prompt()
def greet(name: str) -> str:
    """Ask for a friendly greeting for ``name``."""
    return f"Write a one-line friendly greeting for {name}."


if __name__ == "__main__":
    server.run()
