"""A minimal FastMCP server with one tool, ``echo``: the floor any MCP server pays.

Run by ``bench/tools.py``: over stdio (``mcp.client.stdio.stdio_client``), or
with ``--http PORT`` as a stateless Streamable HTTP server answering JSON
(``stateless_http=True, json_response=True``, path ``/mcp``, uvicorn), the
same kind of endpoint as the integration's. Logs at WARNING only (FastMCP logs
one INFO line per request otherwise, ``shared/reference/mcp-over-mqtt.md`` §5).
"""

# No ``from __future__ import annotations``: FastMCP (mcp 1.12) inspects the
# tool's annotations as classes.
import sys

from mcp.server.fastmcp import FastMCP


def main() -> None:
    """Serve ``echo`` over stdio, or over HTTP with ``--http PORT``."""
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server = FastMCP(
            "echo",
            log_level="WARNING",
            host="127.0.0.1",
            port=int(sys.argv[2]),
            stateless_http=True,
            json_response=True,
        )
        transport = "streamable-http"
    else:
        server = FastMCP("echo", log_level="WARNING")
        transport = "stdio"

    @server.tool()
    def echo(text: str) -> str:
        """Return ``text`` unchanged."""
        return text

    server.run(transport=transport)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
