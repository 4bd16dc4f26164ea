"""engine/mcp_server.py on the installed mcp SDK (1.12 in .venv, the newest in .venv-latest).

Three layers, each with real SDK clients where there is one:

* ``build_server`` under a stock ``mcp.ClientSession`` over in-memory streams;
* ``handle_post`` called directly with raw bodies (every JSON-RPC rule it owns);
* a real Streamable HTTP round trip: a tiny aiohttp server on 127.0.0.1 whose
  POST handler is ``handle_post``, driven by the SDK's own Streamable HTTP client
  (``streamablehttp_client`` on 1.x, ``streamable_http_client`` on 2.x) and, on
  2.x, by ``mcp.Client`` whose default ``mode="auto"`` probes ``server/discover``
  first and must fall back to ``initialize``.
"""

# ruff: noqa: PLR0917

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
import json
import logging
from typing import Any

from aiohttp import web
import anyio
import mcp
from mcp import ClientSession
from mcp.shared import exceptions as mcp_exceptions
from mcp.shared.memory import create_client_server_memory_streams
from mqtt_bridge_engine import mcp_server
from mqtt_bridge_engine.mcp_server import build_server, handle_post
import pytest

# mcp 1.x names it McpError, 2.x MCPError; both carry .error (ErrorData).
McpError: type[Exception] = (
    getattr(mcp_exceptions, "MCPError", None) or mcp_exceptions.McpError
)
SDK2 = mcp_server._SDK2
RULES_URI = "mqtt-bridge://acl/rules"
INIT_PARAMS = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "pytest", "version": "0"},
}


# --------------------------------------------------------------------------- #
# A fake tool set with MqttTools' shape
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class FakeAnnotations:
    read_only: bool
    destructive: bool
    open_world: bool = True
    idempotent: bool = False


@dataclass(frozen=True, slots=True)
class FakeSpec:
    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: FakeAnnotations


@dataclass(slots=True)
class FakeResult:
    structured: dict[str, Any]
    text: str
    is_error: bool
    allowed: bool
    topic: str | None


class FakeTools:
    """Two tools; ``mqtt_publish`` may write under ``a/`` only."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.writable = ["a/#"]
        self.delay = 0.0
        self.raise_in_call = False
        self.raise_in_specs = False
        self.cancelled = 0
        self.spec_reads = 0

    def specs(self) -> list[FakeSpec]:
        self.spec_reads += 1
        if self.raise_in_specs:
            raise RuntimeError("specs broke")
        return [
            FakeSpec(
                "mqtt_publish",
                f"Publish a message. Writable: {', '.join(self.writable)}",
                {
                    "type": "object",
                    "properties": {
                        "topic": {"type": "string"},
                        "payload": {"type": "string"},
                    },
                    "required": ["topic", "payload"],
                },
                FakeAnnotations(read_only=False, destructive=True),
            ),
            FakeSpec(
                "mqtt_read",
                "Read a topic.",
                # no "type": build_server adds "type": "object"
                {"properties": {"topic": {"type": "string"}}, "required": ["topic"]},
                FakeAnnotations(
                    read_only=True, destructive=False, open_world=False, idempotent=True
                ),
            ),
        ]

    async def call(self, name: str, arguments: Mapping[str, Any]) -> FakeResult:
        self.calls.append((name, dict(arguments)))
        if self.raise_in_call:
            raise RuntimeError("boom")
        if self.delay:
            try:
                await asyncio.sleep(self.delay)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        topic = arguments.get("topic")
        if not isinstance(topic, str):
            return FakeResult(
                {"error": "invalid_arguments", "missing": ["topic"]},
                "argument 'topic' is required",
                True,
                True,
                None,
            )
        if name == "mqtt_publish" and not topic.startswith("a/"):
            return FakeResult(
                {"error": "denied", "permission": "write", "allowed": self.writable},
                f"no rule grants write on '{topic}'; writable: a/#",
                True,
                False,
                topic,
            )
        if name == "mqtt_publish":
            return FakeResult(
                {"published": True, "topic": topic, "retained": None},
                f"published to {topic}",
                False,
                True,
                topic,
            )
        return FakeResult({"messages": []}, "no message", False, True, topic)


def rules_resource() -> dict[str, str]:
    return {RULES_URI: json.dumps([{"pattern": "a/#", "permissions": ["write"]}])}


def make_server(tools: FakeTools, **kwargs: Any) -> Any:
    kwargs.setdefault("resources", rules_resource)
    return build_server(
        tools,
        "mqtt-bridge-test",
        instructions="Use the tools.",
        version="9.9.9",
        **kwargs,
    )


def dump(model: Any) -> dict[str, Any]:
    """Wire form of an SDK model (attribute names differ between 1.x and 2.x)."""
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


@pytest.fixture
def tools() -> FakeTools:
    return FakeTools()


# --------------------------------------------------------------------------- #
# build_server under a real ClientSession (in memory)
# --------------------------------------------------------------------------- #


@asynccontextmanager
async def connected(server: Any) -> AsyncIterator[tuple[ClientSession, dict[str, Any]]]:
    """A stock ClientSession on ``server`` (the helpers both SDKs have)."""
    async with (
        create_client_server_memory_streams() as (client_side, server_side),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(
            partial(
                server.run,
                server_side[0],
                server_side[1],
                server.create_initialization_options(),
            )
        )
        async with ClientSession(client_side[0], client_side[1]) as session:
            init = dump(await session.initialize())
            yield session, init
        tg.cancel_scope.cancel()


async def test_session_initialize(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (_session, init):
        assert init["serverInfo"]["name"] == "mqtt-bridge-test"
        assert init["serverInfo"]["version"] == "9.9.9"
        assert init["instructions"] == "Use the tools."
        assert "tools" in init["capabilities"]
        assert "resources" in init["capabilities"]
        assert "prompts" not in init["capabilities"]


async def test_session_lists_tools_with_schema_and_annotations(
    tools: FakeTools,
) -> None:
    async with connected(make_server(tools)) as (session, _):
        listed = {
            tool["name"]: tool for tool in dump(await session.list_tools())["tools"]
        }
    assert set(listed) == {"mqtt_publish", "mqtt_read"}
    publish = listed["mqtt_publish"]
    assert publish["description"] == "Publish a message. Writable: a/#"
    assert publish["inputSchema"]["required"] == ["topic", "payload"]
    assert publish["annotations"] == {
        "readOnlyHint": False,
        "destructiveHint": True,
        "idempotentHint": False,
        "openWorldHint": True,
    }
    read = listed["mqtt_read"]
    assert read["inputSchema"] == {
        "type": "object",
        "properties": {"topic": {"type": "string"}},
        "required": ["topic"],
    }
    assert read["annotations"] == {
        "readOnlyHint": True,
        "destructiveHint": False,
        "idempotentHint": True,
        "openWorldHint": False,
    }
    assert "outputSchema" not in publish


async def test_session_descriptions_follow_rule_changes(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (session, _):
        first = dump(await session.list_tools())["tools"][0]["description"]
        tools.writable = ["a/#", "b/+"]
        second = dump(await session.list_tools())["tools"][0]["description"]
    assert first.endswith("a/#")
    assert second.endswith("a/#, b/+")


async def test_session_call_tool_result(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (session, _):
        result = dump(
            await session.call_tool("mqtt_publish", {"topic": "a/1", "payload": "on"})
        )
    assert result["content"] == [{"type": "text", "text": "published to a/1"}]
    # None inside structuredContent survives (exclude_none applies to models only)
    assert result["structuredContent"] == {
        "published": True,
        "topic": "a/1",
        "retained": None,
    }
    assert result["isError"] is False
    assert tools.calls == [("mqtt_publish", {"topic": "a/1", "payload": "on"})]


async def test_session_denied_call_is_an_error_result(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (session, _):
        result = dump(
            await session.call_tool("mqtt_publish", {"topic": "b/1", "payload": "x"})
        )
    assert result["isError"] is True
    assert result["structuredContent"]["error"] == "denied"
    assert "writable: a/#" in result["content"][0]["text"]


async def test_session_sdk_does_not_validate_arguments(tools: FakeTools) -> None:
    """Missing required arguments reach the tool, which answers isError itself."""
    async with connected(make_server(tools)) as (session, _):
        result = dump(await session.call_tool("mqtt_publish", {"payload": 5}))
        no_args = dump(await session.call_tool("mqtt_read"))
    assert result["isError"] is True
    assert result["content"][0]["text"] == "argument 'topic' is required"
    assert no_args["isError"] is True
    assert tools.calls == [("mqtt_publish", {"payload": 5}), ("mqtt_read", {})]


async def test_session_unknown_tool_is_invalid_params(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (session, _):
        with pytest.raises(McpError) as caught:
            await session.call_tool("mqtt_delete_everything", {})
    error = caught.value.error  # type: ignore[attr-defined]
    assert error.code == -32602
    assert error.message == "Unknown tool: mqtt_delete_everything"
    assert error.data["available"] == ["mqtt_publish", "mqtt_read"]
    assert tools.calls == []


async def test_session_tool_exception_is_internal_error(
    tools: FakeTools, caplog: pytest.LogCaptureFixture
) -> None:
    tools.raise_in_call = True
    async with connected(make_server(tools)) as (session, _):
        with pytest.raises(McpError) as caught:
            await session.call_tool("mqtt_read", {"topic": "a"})
    error = caught.value.error  # type: ignore[attr-defined]
    assert error.code == -32603
    assert (
        error.message == "Internal error in tools/call 'mqtt_read': RuntimeError: boom"
    )
    assert "MCP tools/call 'mqtt_read' failed" in caplog.text


async def test_session_specs_exception_is_internal_error(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (session, _):
        tools.raise_in_specs = True
        with pytest.raises(McpError) as caught:
            await session.list_tools()
    error = caught.value.error  # type: ignore[attr-defined]
    assert error.code == -32603
    assert "RuntimeError: specs broke" in error.message


async def test_session_resources(tools: FakeTools) -> None:
    async with connected(make_server(tools)) as (session, _):
        listed = dump(await session.list_resources())
        templates = dump(await session.list_resource_templates())
        read = dump(await session.read_resource(RULES_URI))  # type: ignore[arg-type]
        with pytest.raises(McpError) as caught:
            await session.read_resource("mqtt-bridge://acl/nothing")  # type: ignore[arg-type]
    assert listed["resources"] == [
        {"uri": RULES_URI, "name": "acl/rules", "mimeType": "application/json"}
    ]
    assert templates["resourceTemplates"] == []
    assert read["contents"] == [
        {
            "uri": RULES_URI,
            "mimeType": "application/json",
            "text": rules_resource()[RULES_URI],
        }
    ]
    error = caught.value.error  # type: ignore[attr-defined]
    assert (error.code, error.message) == (-32002, "Resource not found")
    assert error.data == {"uri": "mqtt-bridge://acl/nothing"}


async def test_session_resource_source_exception(tools: FakeTools) -> None:
    def broken() -> dict[str, str]:
        raise OSError("rules unavailable")

    async with connected(make_server(tools, resources=broken)) as (session, _):
        for call in (
            session.list_resources,
            partial(session.read_resource, RULES_URI),
        ):
            with pytest.raises(McpError) as caught:
                await call()
            error = caught.value.error  # type: ignore[attr-defined]
            assert error.code == -32603
            assert "OSError: rules unavailable" in error.message


async def test_session_without_resources(tools: FakeTools) -> None:
    async with connected(make_server(tools, resources=None)) as (session, init):
        assert "resources" not in init["capabilities"]
        with pytest.raises(McpError) as caught:
            await session.list_resources()
    assert caught.value.error.code == -32601  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- #
# handle_post: the JSON-RPC rules
# --------------------------------------------------------------------------- #


class Factory:
    """Counts the servers handle_post builds."""

    def __init__(self, tools: FakeTools, **kwargs: Any) -> None:
        self.tools = tools
        self.kwargs = kwargs
        self.built = 0

    def __call__(self) -> Any:
        self.built += 1
        return make_server(self.tools, **self.kwargs)


@pytest.fixture
def factory(tools: FakeTools) -> Factory:
    return Factory(tools)


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def request(method: str, params: dict[str, Any] | None = None, rid: Any = 1) -> bytes:
    obj: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
    if params is not None:
        obj["params"] = params
    return body(obj)


async def test_post_initialize(factory: Factory) -> None:
    status, answer = await handle_post(request("initialize", INIT_PARAMS), factory)
    assert status == 200
    assert answer is not None
    assert answer["id"] == 1
    result = answer["result"]
    assert result["protocolVersion"] == "2025-06-18"
    assert result["serverInfo"] == {"name": "mqtt-bridge-test", "version": "9.9.9"}
    assert result["instructions"] == "Use the tools."
    assert {"tools", "resources"} <= set(result["capabilities"])


@pytest.mark.parametrize("version", mcp_server.supported_protocol_versions())
async def test_post_initialize_echoes_supported_versions(
    factory: Factory, version: str
) -> None:
    params = {**INIT_PARAMS, "protocolVersion": version}
    # A stale or odd MCP-Protocol-Version header does not matter for initialize.
    _, answer = await handle_post(
        request("initialize", params), factory, protocol_version="1999-01-01"
    )
    assert answer is not None
    assert answer["result"]["protocolVersion"] == version


async def test_post_initialize_unknown_version_gets_a_supported_one(
    factory: Factory,
) -> None:
    params = {**INIT_PARAMS, "protocolVersion": "2099-12-31"}
    _, answer = await handle_post(request("initialize", params), factory)
    assert answer is not None
    assert (
        answer["result"]["protocolVersion"] in mcp_server.supported_protocol_versions()
    )


def test_supported_versions_include_2025_06_18() -> None:
    versions = mcp_server.supported_protocol_versions()
    assert {"2024-11-05", "2025-03-26", "2025-06-18"} <= set(versions)
    assert "2026-07-28" not in versions  # the modern era has no initialize


@pytest.mark.parametrize("header", [None, "2025-06-18", "2025-03-26"])
async def test_post_tools_list_and_call_without_initialize(
    factory: Factory, tools: FakeTools, header: str | None
) -> None:
    status, listed = await handle_post(
        request("tools/list", rid="list-1"), factory, protocol_version=header
    )
    assert status == 200
    assert listed is not None
    assert listed["id"] == "list-1"
    assert [tool["name"] for tool in listed["result"]["tools"]] == [
        "mqtt_publish",
        "mqtt_read",
    ]
    status, called = await handle_post(
        request(
            "tools/call",
            {"name": "mqtt_publish", "arguments": {"topic": "a/b", "payload": "1"}},
            rid=7,
        ),
        factory,
        protocol_version=header,
    )
    assert status == 200
    assert called == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {
            "content": [{"type": "text", "text": "published to a/b"}],
            "structuredContent": {"published": True, "topic": "a/b", "retained": None},
            "isError": False,
        },
    }
    assert tools.calls == [("mqtt_publish", {"topic": "a/b", "payload": "1"})]


async def test_post_tool_error_result(factory: Factory) -> None:
    _, answer = await handle_post(
        request("tools/call", {"name": "mqtt_publish", "arguments": {"topic": "z"}}),
        factory,
    )
    assert answer is not None
    assert answer["result"]["isError"] is True
    assert answer["result"]["structuredContent"]["error"] == "denied"


async def test_post_unknown_tool(factory: Factory) -> None:
    status, answer = await handle_post(request("tools/call", {"name": "nope"}), factory)
    assert status == 200
    assert answer is not None
    assert answer["error"]["code"] == -32602
    assert answer["error"]["message"] == "Unknown tool: nope"


async def test_post_resources(factory: Factory) -> None:
    _, listed = await handle_post(request("resources/list"), factory)
    _, read = await handle_post(request("resources/read", {"uri": RULES_URI}), factory)
    _, missing = await handle_post(
        request("resources/read", {"uri": "mqtt-bridge://nope"}), factory
    )
    assert listed is not None
    assert read is not None
    assert missing is not None
    assert listed["result"]["resources"][0]["uri"] == RULES_URI
    assert read["result"]["contents"][0]["text"] == rules_resource()[RULES_URI]
    assert missing["error"]["code"] == -32002


async def test_post_ping(factory: Factory) -> None:
    assert await handle_post(request("ping", rid=0), factory) == (
        200,
        {"jsonrpc": "2.0", "id": 0, "result": {}},
    )


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": 3},
        },
        {"jsonrpc": "2.0", "method": "notifications/whatever"},
        {"jsonrpc": "2.0", "id": 5, "result": {}},
        {"jsonrpc": "2.0", "id": 5, "error": {"code": -1, "message": "no"}},
    ],
    ids=["initialized", "cancelled", "unknown-notification", "response", "error"],
)
async def test_post_notifications_and_responses_are_accepted(
    factory: Factory, message: dict[str, Any]
) -> None:
    assert await handle_post(body(message), factory) == (202, None)
    assert factory.built == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"",
        b"not json",
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping"',
        b"\xff\xfe\x00",
        b"NaN",
    ],
    ids=["truncated", "empty", "text", "unclosed", "not-utf8", "nan"],
)
async def test_post_parse_error(factory: Factory, raw: bytes) -> None:
    status, answer = await handle_post(raw, factory)
    assert status == 400
    assert answer is not None
    assert answer["id"] is None
    assert answer["error"]["code"] == -32700
    assert answer["error"]["message"].startswith("Parse error")
    assert factory.built == 0


@pytest.mark.parametrize(
    "batch",
    [
        [],
        [{"jsonrpc": "2.0", "id": 1, "method": "ping"}],
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
        ],
    ],
    ids=["empty", "one", "two"],
)
async def test_post_batch_is_rejected(factory: Factory, batch: list[Any]) -> None:
    status, answer = await handle_post(body(batch), factory)
    assert status == 400
    assert answer is not None
    assert answer["id"] is None
    assert answer["error"]["code"] == -32600
    assert "batch" in answer["error"]["message"]
    assert factory.built == 0


@pytest.mark.parametrize(
    ("message", "echo", "problem"),
    [
        (42, None, "JSON object"),
        ("ping", None, "JSON object"),
        (None, None, "JSON object"),
        ({"id": 1, "method": "ping"}, 1, '"jsonrpc"'),
        ({"jsonrpc": "1.0", "id": 1, "method": "ping"}, 1, '"jsonrpc"'),
        ({"jsonrpc": "2.0", "id": None, "method": "ping"}, None, '"id"'),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, None, '"id"'),
        ({"jsonrpc": "2.0", "id": True, "method": "ping"}, None, '"id"'),
        ({"jsonrpc": "2.0", "id": [1], "method": "ping"}, None, '"id"'),
        ({"jsonrpc": "2.0", "id": 2, "method": 7}, 2, '"method"'),
        (
            {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": [1]},
            3,
            '"params"',
        ),
        (
            {"jsonrpc": "2.0", "id": "x", "method": "ping", "params": "p"},
            "x",
            '"params"',
        ),
        ({"jsonrpc": "2.0"}, None, '"method"'),
        ({"jsonrpc": "2.0", "id": 4}, 4, "exactly one"),
        ({"jsonrpc": "2.0", "id": 4, "result": {}, "error": {}}, 4, "exactly one"),
        ({"jsonrpc": "2.0", "id": 4, "error": "bad"}, 4, '"error"'),
    ],
)
async def test_post_invalid_request(
    factory: Factory, message: Any, echo: Any, problem: str
) -> None:
    status, answer = await handle_post(body(message), factory)
    assert status == 400
    assert answer is not None
    assert answer["id"] == echo
    assert answer["error"]["code"] == -32600
    assert problem in answer["error"]["message"]
    assert factory.built == 0


@pytest.mark.parametrize(
    "method",
    [
        "foo/bar",
        "prompts/list",
        "tools/delete",
        "server/discover",
        "subscriptions/listen",
    ],
)
async def test_post_unknown_method(
    factory: Factory, tools: FakeTools, method: str
) -> None:
    status, answer = await handle_post(request(method, {}, rid="m"), factory)
    assert status == 200
    assert answer == {
        "jsonrpc": "2.0",
        "id": "m",
        "error": {"code": -32601, "message": "Method not found", "data": method},
    }
    assert tools.spec_reads == 0  # the server was not run


async def test_post_resources_not_served_without_source(tools: FakeTools) -> None:
    _, answer = await handle_post(
        request("resources/list"), Factory(tools, resources=None)
    )
    assert answer is not None
    assert answer["error"]["code"] == -32601


@pytest.mark.parametrize(
    ("method", "params", "detail"),
    [
        ("tools/call", {"arguments": {}}, "params.name: Field required"),
        ("tools/call", None, "params: Field required"),
        ("tools/call", {"name": "mqtt_read", "arguments": [1]}, "params.arguments"),
        ("tools/call", {"name": 5}, "params.name"),
        ("resources/read", {}, "params.uri: Field required"),
        ("initialize", {"protocolVersion": "2025-06-18"}, "params.capabilities"),
    ],
)
async def test_post_invalid_params(
    factory: Factory,
    tools: FakeTools,
    method: str,
    params: dict[str, Any] | None,
    detail: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        status, answer = await handle_post(request(method, params, rid=11), factory)
    assert status == 200
    assert answer is not None
    assert answer["id"] == 11
    assert answer["error"]["code"] == -32602
    assert answer["error"]["message"].startswith(f"Invalid params for {method}: ")
    assert detail in answer["error"]["message"]
    assert tools.calls == []
    # mcp 1.x would log every ClientRequest union member's errors at WARNING.
    assert "Failed to validate request" not in caplog.text


async def test_post_unsupported_protocol_header(factory: Factory) -> None:
    status, answer = await handle_post(
        request("tools/list", rid=9), factory, protocol_version="2026-07-28"
    )
    assert status == 400
    assert answer is not None
    assert answer["id"] == 9
    assert answer["error"]["code"] == -32600
    assert "2026-07-28" in answer["error"]["message"]
    assert answer["error"]["data"]["requested"] == "2026-07-28"
    assert "2025-06-18" in answer["error"]["data"]["supported"]
    # notifications are checked too
    status, answer = await handle_post(
        body({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        factory,
        protocol_version="garbage",
    )
    assert status == 400
    assert answer is not None
    assert answer["id"] is None
    assert factory.built == 0


async def test_post_timeout(factory: Factory, tools: FakeTools) -> None:
    tools.delay = 30
    started = anyio.current_time()
    status, answer = await handle_post(
        request(
            "tools/call", {"name": "mqtt_read", "arguments": {"topic": "a"}}, rid=4
        ),
        factory,
        timeout=0.2,
    )
    assert anyio.current_time() - started < 5
    assert status == 200
    assert answer == {
        "jsonrpc": "2.0",
        "id": 4,
        "error": {
            "code": -32001,
            "message": "Request timed out after 0.2 s",
            "data": {"timeout": 0.2},
        },
    }
    assert tools.cancelled == 1  # the tool call was cancelled, not left running


async def test_post_factory_exception(tools: FakeTools) -> None:
    def factory() -> Any:
        raise ValueError("no runtime")

    status, answer = await handle_post(request("tools/list", rid=2), factory)
    assert status == 200
    assert answer is not None
    assert answer["id"] == 2
    assert answer["error"]["code"] == -32603
    assert answer["error"]["message"] == (
        "Internal error: could not start the MCP server: ValueError: no runtime"
    )


async def test_post_server_crash(
    tools: FakeTools, caplog: pytest.LogCaptureFixture
) -> None:
    @asynccontextmanager
    async def failing_lifespan(_server: Any) -> AsyncIterator[None]:
        raise RuntimeError("lifespan exploded")
        yield  # pragma: no cover

    def factory() -> Any:
        server = make_server(tools)
        server.lifespan = failing_lifespan
        return server

    status, answer = await handle_post(request("tools/list", rid=3), factory)
    assert status == 200
    assert answer is not None
    assert answer["id"] == 3
    assert answer["error"]["code"] == -32603
    assert answer["error"]["message"] == (
        "Internal error: the MCP server ended without a response "
        "(RuntimeError: lifespan exploded)"
    )
    assert "MCP server failed while handling a request" in caplog.text


async def test_post_concurrent_calls(factory: Factory, tools: FakeTools) -> None:
    async def one(index: int) -> dict[str, Any] | None:
        status, answer = await handle_post(
            request(
                "tools/call",
                {
                    "name": "mqtt_publish",
                    "arguments": {"topic": f"a/{index}", "payload": ""},
                },
                rid=index,
            ),
            factory,
        )
        assert status == 200
        return answer

    answers = await asyncio.gather(*(one(index) for index in range(100)))
    assert [answer["id"] for answer in answers if answer] == list(range(100))
    assert all(answer and answer["result"]["isError"] is False for answer in answers)
    assert len(tools.calls) == 100
    assert factory.built == 100


# --------------------------------------------------------------------------- #
# A real Streamable HTTP client against an aiohttp front for handle_post
# --------------------------------------------------------------------------- #


@dataclass
class Endpoint:
    url: str
    #: (HTTP method, JSON-RPC method, MCP-Protocol-Version header) per request
    seen: list[tuple[str, str | None, str | None]]
    #: (HTTP status, JSON-RPC error code or None) per answered POST
    answers: list[tuple[int, int | None]]


@pytest.fixture
async def endpoint(factory: Factory) -> AsyncIterator[Endpoint]:
    """POST /mcp -> handle_post (JSON responses), GET -> 405, as the HA view does."""
    seen: list[tuple[str, str | None, str | None]] = []
    answers: list[tuple[int, int | None]] = []

    async def post(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        version = request.headers.get("MCP-Protocol-Version")
        try:
            rpc_method = json.loads(raw).get("method")
        except (ValueError, AttributeError):
            rpc_method = None
        seen.append(("POST", rpc_method, version))
        status, answer = await handle_post(raw, factory, protocol_version=version)
        answers.append((status, (answer or {}).get("error", {}).get("code")))
        if answer is None:
            return web.Response(status=status)
        return web.json_response(answer, status=status)

    async def other(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, None, None))
        return web.Response(status=405, headers={"Allow": "POST"})

    app = web.Application()
    app.router.add_post("/mcp", post)
    app.router.add_route("GET", "/mcp", other)
    app.router.add_route("DELETE", "/mcp", other)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield Endpoint(f"http://{host}:{port}/mcp", seen, answers)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def http_session(url: str) -> AsyncIterator[ClientSession]:
    """ClientSession over the SDK's own Streamable HTTP client (1.x or 2.x spelling)."""
    from mcp.client import streamable_http

    if hasattr(streamable_http, "streamable_http_client"):  # mcp 2.x (and late 1.x)
        transport = streamable_http.streamable_http_client(url)
    else:  # mcp 1.12: yields (read, write, get_session_id)
        transport = streamable_http.streamablehttp_client(url)
    async with transport as streams, ClientSession(streams[0], streams[1]) as session:
        yield session


async def test_streamable_http_client(endpoint: Endpoint, tools: FakeTools) -> None:
    async with http_session(endpoint.url) as session:
        init = dump(await session.initialize())
        listed = dump(await session.list_tools())
        ok = dump(
            await session.call_tool("mqtt_publish", {"topic": "a/x", "payload": "1"})
        )
        denied = dump(
            await session.call_tool("mqtt_publish", {"topic": "x", "payload": "1"})
        )
        resources = dump(await session.list_resources())
        read = dump(await session.read_resource(RULES_URI))  # type: ignore[arg-type]
        with pytest.raises(McpError) as caught:
            await session.call_tool("nope", {})
    assert init["serverInfo"]["name"] == "mqtt-bridge-test"
    negotiated = init["protocolVersion"]
    assert negotiated in mcp_server.supported_protocol_versions()
    assert [tool["name"] for tool in listed["tools"]] == ["mqtt_publish", "mqtt_read"]
    assert ok["isError"] is False
    assert ok["structuredContent"]["topic"] == "a/x"
    assert denied["isError"] is True
    assert resources["resources"][0]["uri"] == RULES_URI
    assert read["contents"][0]["text"] == rules_resource()[RULES_URI]
    assert caught.value.error.code == -32602  # type: ignore[attr-defined]
    assert ("mqtt_publish", {"topic": "a/x", "payload": "1"}) in tools.calls
    posts = [entry for entry in endpoint.seen if entry[0] == "POST"]
    assert posts[0][1] == "initialize"
    assert posts[1][1] == "notifications/initialized"
    # every request after initialize carries the negotiated version (and is served)
    assert all(version == negotiated for _, _, version in posts[1:])
    assert not [entry for entry in endpoint.seen if entry[0] == "GET"]  # no session id


@pytest.mark.skipif(not hasattr(mcp, "Client"), reason="mcp.Client is mcp 2.x")
async def test_mcp2_client_auto_mode_falls_back_to_initialize(
    endpoint: Endpoint, tools: FakeTools
) -> None:
    async with mcp.Client(endpoint.url) as client:  # type: ignore[attr-defined]
        listed = dump(await client.list_tools())
        called = dump(await client.call_tool("mqtt_read", {"topic": "a/1"}))
    assert [tool["name"] for tool in listed["tools"]] == ["mqtt_publish", "mqtt_read"]
    assert called["isError"] is False
    posts = [entry for entry in endpoint.seen if entry[0] == "POST"]
    # The 2026-07-28 probe: its MCP-Protocol-Version is not a handshake version,
    # so it is refused with 400 / -32600, and the client falls back.
    assert posts[0] == ("POST", "server/discover", "2026-07-28")
    assert endpoint.answers[0] == (400, -32600)
    assert posts[1][1] == "initialize"
    assert all(code is None for _, code in endpoint.answers[1:])


@pytest.mark.parametrize(
    ("params", "setup"),
    [
        ({"name": "mqtt_publish", "arguments": {"topic": "a/1", "payload": "x"}}, None),
        ({"name": "mqtt_publish", "arguments": {"topic": "b/1", "payload": "x"}}, None),
        ({"name": "mqtt_read", "arguments": {}}, None),
        ({"name": "mqtt_read"}, None),
        ({"name": "nope", "arguments": {}}, None),
        ({"name": "mqtt_read", "arguments": {"topic": "a"}}, "raise_in_call"),
        ({"name": "mqtt_read", "arguments": {"topic": "a"}}, "raise_in_specs"),
        ({"name": "mqtt_read", "arguments": {"topic": "a"}}, "delay"),
    ],
)
async def test_direct_tools_call_answers_like_the_sdk_session(
    tools: FakeTools, params: dict[str, Any], setup: str | None
) -> None:
    """handle_post answers tools/call without the SDK session: same bytes as with it."""
    if setup == "delay":
        tools.delay = 30
    elif setup is not None:
        setattr(tools, setup, True)
    obj = {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": params}
    status, direct = await handle_post(
        body(obj), lambda: make_server(tools), timeout=0.2
    )
    assert status == 200
    message = mcp_server._MESSAGE_ADAPTER.validate_python(obj)
    via_session = await mcp_server._exchange(
        make_server(tools), message, 9, "2025-06-18", 0.2
    )
    assert direct == via_session
