"""A small stdio MCP server for the StdioHost tests (mcp 1.x FastMCP or 2.x MCPServer).

Tools: ``echo(text)``, ``sleep(seconds)``, ``pid()``, ``env(name)`` (the value
of an environment variable or ``"<unset>"``), ``stderr(lines)`` (writes lines
to stderr), ``log(text)`` (a logging notification to the client), ``die()``
(the process exits at once), ``progress(steps)`` (progress + logging
notifications), ``sample(prompt)`` (a ``sampling/createMessage`` request to the
client; returns the client's text), ``ping_client()`` (a ``ping`` request to
the client), ``changed()`` (``notifications/tools/list_changed``).
Resource ``echo://greeting`` (text ``hello from echo``); prompt
``greet(name)`` (one user message ``Say hello to {name}``).
"""

import asyncio
import os
import sys
import warnings

# mcp 2.x: logging is deprecated (SEP-2577); keep stderr for the tests
warnings.simplefilter("ignore")

try:  # mcp 2.x
    from mcp.server.mcpserver import Context, MCPServer as _Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import (  # type: ignore[no-redef]
        Context,
        FastMCP as _Server,
    )

server = _Server("echo", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    """Return ``text``."""
    return text


@server.tool()
async def sleep(seconds: float) -> str:
    """Answer after ``seconds``."""
    await asyncio.sleep(seconds)
    return "slept"


@server.tool()
def pid() -> int:
    """This process's id."""
    return os.getpid()


@server.tool()
def env(name: str) -> str:
    """An environment variable of this process."""
    return os.environ.get(name, "<unset>")


@server.tool()
def stderr(lines: int, tail: str = "") -> str:
    """Write ``lines`` numbered lines to stderr, then ``tail`` without a newline."""
    for number in range(lines):
        print(f"stderr line {number}", file=sys.stderr, flush=True)
    print(tail, end="", file=sys.stderr, flush=True)
    return "written"


@server.tool()
def garbage() -> str:
    """Write a line that is not JSON-RPC to stdout."""
    # On fd 1 itself: mcp 2.x sends sys.stdout to stderr while serving stdio.
    os.write(1, b"this is not JSON-RPC\n")
    return "written"


@server.tool()
async def roots(ctx: Context) -> str:  # type: ignore[type-arg]
    """Ask the client for its roots (a server->client request)."""
    result = await ctx.session.list_roots()
    return ",".join(str(root.uri) for root in result.roots)


@server.tool()
async def log(text: str, ctx: Context) -> str:  # type: ignore[type-arg]
    """Send ``text`` as a logging notification."""
    await ctx.info(text)
    return "logged"


@server.tool()
def die() -> str:
    """Exit the process without answering."""
    os._exit(3)


@server.tool()
async def progress(steps: int, ctx: Context) -> str:  # type: ignore[type-arg]
    """Report ``steps`` progress notifications and log one line per step."""
    for step in range(1, steps + 1):
        await ctx.report_progress(step, steps, f"step {step}")
        await ctx.info(f"step {step} of {steps}")
    return f"{steps} steps"


@server.tool()
async def sample(prompt: str, ctx: Context) -> str:  # type: ignore[type-arg]
    """Ask the client's model (``sampling/createMessage``) and return its text."""
    from mcp import types

    result = await ctx.session.create_message(
        [
            types.SamplingMessage(
                role="user", content=types.TextContent(type="text", text=prompt)
            )
        ],
        max_tokens=50,
    )
    return str(getattr(result.content, "text", result.content))


@server.tool()
async def ping_client(ctx: Context) -> str:  # type: ignore[type-arg]
    """Ping the client (a server->client ``ping`` request)."""
    await ctx.session.send_ping()
    return "pong"


@server.tool()
async def changed(ctx: Context) -> str:  # type: ignore[type-arg]
    """Send ``notifications/tools/list_changed``."""
    await ctx.session.send_tool_list_changed()
    return "sent"


@server.resource("echo://greeting", mime_type="text/plain")
def greeting() -> str:
    """A fixed text resource."""
    return "hello from echo"


@server.prompt()
def greet(name: str) -> str:
    """A prompt asking to greet ``name``."""
    return f"Say hello to {name}"


if __name__ == "__main__":
    server.run()
