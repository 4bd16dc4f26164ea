"""End to end without Home Assistant: MCP Streamable HTTP -> handle_post -> MqttTools -> Mosquitto.

The real engine pieces (``MqttClient``, ``Acl``, ``MqttTools``) behind
``build_server``/``handle_post`` on an aiohttp front, driven by the SDK's own
Streamable HTTP client; runs on mcp 1.12 (.venv) and on the newest mcp
(.venv-latest). The tools' own behaviour is tested in ``tests/test_mqtt_tools.py``;
this checks that what the broker holds reaches an MCP client intact and that a
denied call is an ``isError`` result whose text names the allowed patterns.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import json
from typing import Any
import uuid

from aiohttp import web
from mcp import ClientSession
from mqtt_bridge_engine.acl import Acl, AclRule, Permission, rules_to_options
from mqtt_bridge_engine.mcp_server import build_server, handle_post
from mqtt_bridge_engine.mqtt_tools import MqttTools
import pytest

from devkit.mosquitto import Mosquitto

from .common import mqtt_client

RULES_URI = "mqtt-bridge://acl/rules"


def dump(model: Any) -> dict[str, Any]:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


@asynccontextmanager
async def endpoint(tools: MqttTools, acl: Acl) -> AsyncIterator[str]:
    """POST /mcp -> handle_post, like the integration's view (minus auth)."""

    def resources() -> dict[str, str]:
        return {RULES_URI: json.dumps(rules_to_options(acl.rules), indent=2)}

    async def post(request: web.Request) -> web.StreamResponse:
        status, answer = await handle_post(
            await request.read(),
            lambda: build_server(tools, "e2e", resources=resources, version="0.1.0"),
            timeout=15,
            protocol_version=request.headers.get("MCP-Protocol-Version"),
        )
        if answer is None:
            return web.Response(status=status)
        return web.json_response(answer, status=status)

    app = web.Application()
    app.router.add_post("/mcp", post)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/mcp"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    from mcp.client import streamable_http

    if hasattr(streamable_http, "streamable_http_client"):
        transport = streamable_http.streamable_http_client(url)
    else:
        transport = streamable_http.streamablehttp_client(url)
    async with transport as streams, ClientSession(streams[0], streams[1]) as session:
        await session.initialize()
        yield session


@pytest.mark.timeout(60)
async def test_mcp_client_publishes_and_reads_through_the_broker(
    mosquitto: Mosquitto,
) -> None:
    prefix = f"e2e/{uuid.uuid4().hex[:8]}"
    acl = Acl(
        [
            AclRule(
                f"{prefix}/+/state",
                frozenset({Permission.READ, Permission.WRITE}),
                "device states",
            )
        ]
    )
    async with mqtt_client(mosquitto) as client:
        tools = MqttTools(client, lambda: acl)
        await tools.start()
        try:
            async with endpoint(tools, acl) as url, http_session(url) as session:
                listed = dump(await session.list_tools())
                published = dump(
                    await session.call_tool(
                        "mqtt_publish",
                        {
                            "topic": f"{prefix}/lamp/state",
                            "payload": "ON",
                            "qos": 1,
                            "retain": True,
                        },
                    )
                )
                read = dump(
                    await session.call_tool(
                        "mqtt_read", {"topic": f"{prefix}/lamp/state", "timeout": 5}
                    )
                )
                denied = dump(
                    await session.call_tool(
                        "mqtt_publish",
                        {"topic": f"{prefix}/lamp/set", "payload": "OFF"},
                    )
                )
                rules = dump(await session.read_resource(RULES_URI))  # type: ignore[arg-type]
        finally:
            await tools.stop()

    by_name = {tool["name"]: tool for tool in listed["tools"]}
    assert {
        "mqtt_publish",
        "mqtt_read",
        "mqtt_subscribe",
        "mqtt_query",
        "mqtt_topics",
    } <= set(by_name)
    # agents read tool text: the allowed pattern and its description are in it
    assert f"{prefix}/+/state" in by_name["mqtt_publish"]["description"]
    assert "device states" in by_name["mqtt_publish"]["description"]
    assert by_name["mqtt_read"]["annotations"]["readOnlyHint"] is True
    assert by_name["mqtt_publish"]["annotations"]["readOnlyHint"] is False

    assert published["isError"] is False, published
    assert read["isError"] is False, read
    assert "ON" in json.dumps(read["structuredContent"])
    assert "ON" in read["content"][0]["text"]

    assert denied["isError"] is True
    assert f"{prefix}/+/state" in denied["content"][0]["text"]

    assert json.loads(rules["contents"][0]["text"]) == rules_to_options(acl.rules)
