"""McpDirectory and RemoteMcpServer against a real Mosquitto, on mcp 1.x and 2.x.

Servers are real: ``McpMqttServer`` + ``StdioHost`` running the stdio child
``stdio_servers/echo.py``, or ``McpMqttServer`` with a scripted JSON-RPC
handler (pagination, silence, error answers) where a behaviour must be forced.
Presence messages that no server would send are published raw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import json
import logging
from typing import Any

from mcp import ClientSession, types
from mcp.shared.message import SessionMessage
from mqtt_bridge_engine import mcp_remote
from mqtt_bridge_engine.backoff import Backoff
from mqtt_bridge_engine.mcp_directory import (
    McpDirectory,
    PresenceError,
    name_matches,
    parse_patterns,
    parse_presence,
    server_key,
)
from mqtt_bridge_engine.mcp_mqtt import McpMqttServer, ServerPresence
from mqtt_bridge_engine.mcp_remote import (
    RemoteMcpError,
    RemoteMcpServer,
    RemoteMcpTimeout,
)
from mqtt_bridge_engine.mqtt_client import MqttClient, MqttSettings
from mqtt_bridge_engine.stdio_host import StdioHost
from mqtt_bridge_engine.subscriptions import Subscription, SubscriptionRefusedError
from pydantic import TypeAdapter
import pytest

from devkit.mosquitto import Mosquitto

from . import common
from .common import (  # noqa: F401 - no_leftovers: autouse fixture
    mqtt_client,
    no_leftovers,
    running,
    uid,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

FAST = Backoff(base=0.05, cap=0.2)
_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)


def echo_host() -> StdioHost:
    return common.echo_host(restart_backoff=FAST)


@asynccontextmanager
async def serving(
    broker: Mosquitto,
    name: str,
    handler: Any = None,
    *,
    server_id: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[McpMqttServer]:
    """An McpMqttServer (default handler: the stdio echo child) until the block ends."""
    sid = server_id or f"srv-{uid()}"
    if handler is None:
        handler = echo_host().serve_session
    async with mqtt_client(broker, sid, will=McpMqttServer.will(sid, name)) as client:
        server = McpMqttServer(
            client,
            name,
            description="echo server",
            meta={"v": 1},
            handler=handler,
            **kwargs,
        )
        async with running(server.run()):
            await wait_for(lambda: len(client.registry.granted) == 1)
            yield server


def presence_of(server: McpMqttServer) -> ServerPresence:
    return ServerPresence(server.server_id, server.server_name, server.description)


@asynccontextmanager
async def remote(
    broker: Mosquitto, presence: ServerPresence, **kwargs: Any
) -> AsyncIterator[RemoteMcpServer]:
    server = RemoteMcpServer(
        MqttSettings("127.0.0.1", broker.port),
        presence,
        client_id_prefix="t-remote",
        **kwargs,
    )
    try:
        yield server
    finally:
        await server.close()


def is_error(result: types.CallToolResult) -> bool:
    """``isError`` on both SDKs (2.x names the attribute ``is_error``)."""
    return bool(result.model_dump(by_alias=True).get("isError"))


def text_of(result: types.CallToolResult) -> str:
    return "".join(getattr(part, "text", "") for part in result.content)


class Events:
    """Records a directory's listener calls."""

    def __init__(self, directory: McpDirectory) -> None:
        self.calls: list[tuple[ServerPresence | None, ServerPresence | None]] = []
        self.remove = directory.add_listener(self._on)

    def _on(self, added: ServerPresence | None, removed: ServerPresence | None) -> None:
        self.calls.append((added, removed))

    def names(self) -> list[tuple[str | None, str | None]]:
        return [
            (a.server_name if a else None, r.server_name if r else None)
            for a, r in self.calls
        ]


@asynccontextmanager
async def directory_on(
    client: MqttClient, patterns: list[str] | None, **kwargs: Any
) -> AsyncIterator[McpDirectory]:
    directory = McpDirectory(client, name_patterns=patterns, **kwargs)
    task = asyncio.create_task(directory.run())
    try:
        await wait_for(lambda: "$mcp-server/presence/+/#" in client.registry.granted)
        yield directory
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert directory.servers() == []


# --------------------------------------------------------------------------- #
# Pure helpers
# --------------------------------------------------------------------------- #


def test_server_key_and_presence_parsing() -> None:
    assert server_key("$mcp-server/presence/sid-1/home/lights") == (
        "sid-1",
        "home/lights",
    )
    for bad in (
        "other/presence/sid/name",
        "$mcp-server/presence//name",
        "$mcp-server/presence/sid",
        "$mcp-server/presence/sid/a//b",
        "$mcp-server/presence/sid/$x",
    ):
        with pytest.raises(PresenceError):
            server_key(bad)
    online = {"jsonrpc": "2.0", "method": "notifications/server/online"}
    presence = parse_presence("s", "a/b", json.dumps(online).encode())
    assert presence == ServerPresence("s", "a/b", "", {})
    full = {**online, "params": {"description": "d", "meta": {"k": 1}}}
    assert parse_presence("s", "a/b", json.dumps(full).encode()).meta == {"k": 1}
    for bad_body in (
        b"not json",
        b"\xff\xfe",
        b"[1]",
        json.dumps({"method": "other"}).encode(),
        json.dumps({**online, "params": []}).encode(),
        json.dumps({**online, "params": {"description": 5}}).encode(),
        json.dumps({**online, "params": {"meta": [1]}}).encode(),
    ):
        with pytest.raises(PresenceError):
            parse_presence("s", "a/b", bad_body)


def test_patterns() -> None:
    assert parse_patterns("") == []
    assert parse_patterns(" home/* ,\n\n lab/?x, home/* ") == ["home/*", "lab/?x"]
    assert parse_patterns(["a/*", " ", "b"]) == ["a/*", "b"]
    with pytest.raises(ValueError, match="MQTT wildcard"):
        parse_patterns("home/#")
    with pytest.raises(ValueError, match="MQTT wildcard"):
        parse_patterns(["home/+/x"])
    with pytest.raises(ValueError, match="control character"):
        parse_patterns("a\tb")
    assert name_matches("home/lights", None)
    assert name_matches("home/lights", ())
    assert name_matches("home/lights/x", ["home/*"])  # * also crosses /
    assert not name_matches("Home/lights", ["home/*"])  # case-sensitive
    assert name_matches("lab/ab", ["x", "lab/[a-c]b"])


# --------------------------------------------------------------------------- #
# McpDirectory
# --------------------------------------------------------------------------- #


async def test_directory_follows_servers_and_patterns(mosquitto: Mosquitto) -> None:
    tag = uid()
    first, second = f"dir-{tag}/one", f"other-{tag}/two"
    async with (
        mqtt_client(mosquitto) as client,
        serving(mosquitto, first) as one,
        directory_on(client, [f"dir-{tag}/*"]) as directory,
    ):
        events = Events(directory)
        await wait_for(lambda: [p.server_name for p in directory.servers()] == [first])
        (found,) = directory.servers()
        assert found == ServerPresence(one.server_id, first, "echo server", {"v": 1})
        async with serving(mosquitto, second) as two:
            await wait_for(lambda: directory.stats.added >= 2)
            assert directory.servers() == [found]  # filtered out
            directory.set_patterns([f"other-{tag}/*"])
            assert events.names() == [(None, first), (second, None)]
            assert [p.server_id for p in directory.servers()] == [two.server_id]
            directory.set_patterns(None)
            assert {p.server_name for p in directory.servers()} >= {first, second}
            assert events.names()[-1] == (first, None)
            directory.set_patterns([f"*-{tag}/*"])  # no change, no event
            assert len(events.calls) == 3
        # the server stopped: its presence was cleared
        await wait_for(lambda: len(events.calls) == 4)
        assert events.calls[-1][0] is None
        assert events.calls[-1][1] is not None
        assert events.calls[-1][1].server_name == second
        events.remove()
        events.remove()  # twice is harmless
    assert directory.stats.malformed == 0


async def test_directory_malformed_updates_and_limits(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uid()
    name = f"raw-{tag}/server"
    topic = f"$mcp-server/presence/sid-{tag}/{name}"
    online = {"jsonrpc": "2.0", "method": "notifications/server/online"}

    def body(description: str) -> bytes:
        return json.dumps({**online, "params": {"description": description}}).encode()

    async with (
        mqtt_client(mosquitto) as client,
        directory_on(client, [f"raw-{tag}/*"], max_servers=1) as directory,
    ):
        events = Events(directory)

        def broken(_added: Any, _removed: Any) -> None:
            raise RuntimeError("listener bug")

        directory.add_listener(broken)
        for payload in (b"{", b"[]", json.dumps({"method": "x"}).encode()):
            await client.publish_wait(topic, payload)
        await client.publish_wait(f"$mcp-server/presence/sid-{tag}/raw-{tag}//x", b"{}")
        await wait_for(lambda: directory.stats.malformed == 4)
        assert events.calls == []

        await client.publish_wait(topic, body("first"))
        await wait_for(lambda: len(events.calls) == 1)
        assert directory.stats.listener_errors == 1
        assert "MCP directory listener failed" in caplog.text
        await client.publish_wait(topic, body("first"))  # the same again: no event
        await client.publish_wait(topic, b"not json")  # ignored, the old one stays
        await client.publish_wait(topic, body("second"))
        await wait_for(lambda: len(events.calls) == 2)
        new, old = events.calls[1]
        assert new is not None
        assert new.description == "second"
        assert old is not None
        assert old.description == "first"
        assert directory.stats.malformed == 5

        # max_servers=1: a second instance is ignored and counted
        await client.publish_wait(f"$mcp-server/presence/sid2-{tag}/{name}", body("x"))
        await wait_for(lambda: directory.stats.dropped == 1)
        assert "2 servers" not in caplog.text
        assert "servers are known already" in caplog.text

        await client.publish_wait(topic, b"")
        await wait_for(lambda: len(events.calls) == 3)
        assert events.calls[2] == (None, new)
        await client.publish_wait(topic, b"")  # unknown now: nothing happens
        assert directory.servers() == []
        assert directory.stats.removed == 1


async def test_directory_resync_after_broker_restart() -> None:
    broker = Mosquitto()
    broker.start()
    tag = uid()
    try:
        async with (
            mqtt_client(broker, backoff=FAST) as client,
            serving(broker, f"live-{tag}/server") as live,
            directory_on(client, None, resync_grace=0.3) as directory,
        ):
            live.client.backoff = FAST
            events = Events(directory)
            # An instance that never comes back: its presence only retained.
            online = {"jsonrpc": "2.0", "method": "notifications/server/online"}
            await client.publish_wait(
                f"$mcp-server/presence/ghost-{tag}/ghost-{tag}/server",
                json.dumps(online).encode(),
                retain=True,
            )
            await wait_for(lambda: len(directory.servers()) == 2)
            await asyncio.to_thread(broker.stop)  # retained messages are lost
            await wait_for(lambda: not client.connected)
            await asyncio.to_thread(broker.start)
            await wait_for(lambda: directory.stats.expired == 1, timeout=15)
            assert [p.server_id for p in directory.servers()] == [live.server_id]
            # Mosquitto sends the wills when it stops: the live server may have
            # gone and come back; the ghost went for good.
            removed = {r.server_name for a, r in events.calls if a is None and r}
            assert f"ghost-{tag}/server" in removed
            assert events.calls[-1][1] is not None
            assert events.calls[-1][0] is None
    finally:
        broker.cleanup()


async def test_directory_refused_subscription(
    mosquitto: Mosquitto,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refusing SUBACK is logged and counted, again after each reconnect.

    Mosquitto 2.0 grants every subscription and applies its ACL to delivery
    (``mqtt-broker.md`` §5), so the refusal is simulated.
    """

    async def refused(self: Subscription) -> None:
        raise SubscriptionRefusedError(
            f"broker refused {self.topic_filter!r}: not authorized"
        )

    monkeypatch.setattr(Subscription, "wait_granted", refused)
    async with mqtt_client(mosquitto, backoff=FAST) as client:
        directory = McpDirectory(client, name_patterns=None, resync_grace=0.05)
        task = asyncio.create_task(directory.run())
        try:
            await wait_for(lambda: directory.stats.refused == 1)
            assert "MCP server discovery is off" in caplog.text
            client.reconnect_now()
            await wait_for(lambda: directory.stats.refused == 2, timeout=10)
        finally:
            task.cancel()
            await asyncio.wait({task})


# --------------------------------------------------------------------------- #
# RemoteMcpServer with the stdio echo server
# --------------------------------------------------------------------------- #


async def test_remote_lists_and_calls_tools(mosquitto: Mosquitto) -> None:
    async with (
        serving(mosquitto, f"remote-{uid()}/echo") as server,
        remote(mosquitto, presence_of(server)) as client,
    ):
        assert not client.connected
        tools = await client.list_tools()
        names = {tool.name for tool in tools}
        assert {"echo", "sleep", "changed"} <= names
        assert client.connected
        assert client.stats.sessions == 1
        assert client.stats.tool_lists == 1
        assert await client.list_tools() == tools  # cached
        assert client.stats.tool_lists == 1

        result = await client.call_tool("echo", {"text": "over mqtt"})
        assert not is_error(result)
        assert text_of(result) == "over mqtt"

        # list_changed from the server drops the cache
        await client.call_tool("changed", None)
        await wait_for(lambda: client.stats.list_changed == 1)
        await client.list_tools()
        assert client.stats.tool_lists == 2

        # one session for all of it; concurrent calls share it
        results = await asyncio.gather(
            *(client.call_tool("echo", {"text": str(n)}) for n in range(10))
        )
        assert [text_of(r) for r in results] == [str(n) for n in range(10)]
        assert client.stats.sessions == 1
        assert client.stats.calls == 12
        assert server.stats.sessions_started == 1

        # an error answered by the server (the SDK raises or returns isError)
        failed: Exception | None = None
        try:
            bad = await client.call_tool("no_such_tool", {})
        except RemoteMcpError as err:
            failed = err
        if failed is None:
            assert is_error(bad)
        else:
            assert "no_such_tool" in str(failed)
    await client.close()  # twice is harmless
    with pytest.raises(RemoteMcpError, match="closed"):
        await client.call_tool("echo", {"text": "x"})
    assert not client.connected


async def test_remote_timeout_then_ping_keeps_session(mosquitto: Mosquitto) -> None:
    async with (
        serving(mosquitto, f"remote-{uid()}/slow") as server,
        remote(mosquitto, presence_of(server), call_timeout=1.0) as client,
    ):
        with pytest.raises(RemoteMcpTimeout, match="did not answer within 1 s"):
            await client.call_tool("sleep", {"seconds": 5})
        assert client.stats.timeouts == 1
        result = await client.call_tool("echo", {"text": "still here"})
        assert text_of(result) == "still here"
        assert client.stats.pings_failed == 0
        assert client.stats.sessions == 1


async def test_remote_reopens_after_server_restart(mosquitto: Mosquitto) -> None:
    name = f"remote-{uid()}/restart"
    sid = f"srv-{uid()}"
    presence = ServerPresence(sid, name)
    async with remote(mosquitto, presence) as client:
        async with serving(mosquitto, name, server_id=sid):
            assert text_of(await client.call_tool("echo", {"text": "a"})) == "a"
        # the server stopped (presence cleared): the session ended with it
        await wait_for(lambda: not client.connected)
        assert client.stats.disconnects == 1
        client.connect_timeout = 1.0
        with pytest.raises(RemoteMcpError, match="not announced on the broker"):
            await client.call_tool("echo", {"text": "b"})
        assert client.stats.open_failures == 1
        client.connect_timeout = 10.0  # the stdio child may take a while to start
        async with serving(mosquitto, name, server_id=sid):
            assert text_of(await client.call_tool("echo", {"text": "c"})) == "c"
            assert client.stats.sessions == 2


async def test_remote_call_in_flight_fails_on_close(mosquitto: Mosquitto) -> None:
    async with serving(mosquitto, f"remote-{uid()}/close") as server:
        client = RemoteMcpServer(
            MqttSettings("127.0.0.1", mosquitto.port),
            presence_of(server),
            client_id_prefix="t-remote",
        )
        await client.list_tools()
        call = asyncio.create_task(client.call_tool("sleep", {"seconds": 10}))
        await asyncio.sleep(0.3)
        async with asyncio.timeout(5):
            await client.close()
            with pytest.raises(RemoteMcpError, match="failed"):
                await call


async def test_remote_open_failures(mosquitto: Mosquitto) -> None:
    # no broker on that port
    dead = Mosquitto()
    unreachable = RemoteMcpServer(
        MqttSettings("127.0.0.1", dead.port),
        ServerPresence("nobody", "x/y"),
        client_id_prefix="t-remote",
        connect_timeout=0.5,
    )
    with pytest.raises(RemoteMcpTimeout, match="connecting to the broker mqtt://"):
        await unreachable.list_tools()
    await unreachable.close()
    dead.cleanup()

    # a server that refuses the session (session limit 0)
    async with (
        serving(mosquitto, f"remote-{uid()}/full", max_sessions=0) as server,
        remote(mosquitto, presence_of(server)) as client,
    ):
        with pytest.raises(RemoteMcpError, match="initializing the MCP session failed"):
            await client.call_tool("echo", {"text": "x"})
        assert client.stats.open_failures == 1


async def test_remote_close_while_opening(mosquitto: Mosquitto) -> None:
    client = RemoteMcpServer(
        MqttSettings("127.0.0.1", mosquitto.port),
        ServerPresence(f"nobody-{uid()}", "x/y"),
        client_id_prefix="t-remote",
        connect_timeout=10,
    )
    call = asyncio.create_task(client.call_tool("echo", {}))
    await asyncio.sleep(0.2)
    await client.close()
    with pytest.raises(RemoteMcpError, match="closed while opening"):
        await call

    # closed before its task ever ran
    other = RemoteMcpServer(
        MqttSettings("127.0.0.1", mosquitto.port),
        ServerPresence(f"nobody-{uid()}", "x/y"),
        client_id_prefix="t-remote",
    )
    call = asyncio.create_task(other.list_tools())
    await asyncio.sleep(0)  # the call created the session task, not yet started
    await other.close()
    with pytest.raises(RemoteMcpError, match="closed while opening"):
        await call


# --------------------------------------------------------------------------- #
# RemoteMcpServer with a scripted server (forced behaviours)
# --------------------------------------------------------------------------- #


def _body(item: SessionMessage) -> dict[str, Any]:
    root = getattr(item.message, "root", item.message)
    body: dict[str, Any] = root.model_dump(
        by_alias=True, mode="json", exclude_none=True
    )
    return body


class Scripted:
    """A JSON-RPC server written by hand: paged tools, silence, error answers."""

    def __init__(self, pages: int = 1) -> None:
        self.pages = pages
        self.mute_sessions = 0  # this many sessions stop answering after initialize
        self.sessions = 0
        self.fail_list = False
        self.weird_call = False

    async def __call__(self, _cid: str, read: Any, write: Any) -> None:
        self.sessions += 1
        muted = self.sessions <= self.mute_sessions
        async for item in read:
            body = _body(item)
            method, request_id = body.get("method"), body.get("id")
            if request_id is None:
                continue  # notifications
            result: dict[str, Any] | None = None
            error: dict[str, Any] | None = None
            if method == "initialize":
                result = {
                    "protocolVersion": body["params"]["protocolVersion"],
                    "capabilities": {"tools": {"listChanged": True}},
                    "serverInfo": {"name": "scripted", "version": "1"},
                }
            elif muted:
                continue
            elif method == "ping":
                result = {}
            elif method == "tools/list" and self.fail_list:
                error = {"code": -32603, "message": "listing broke"}
            elif method == "tools/list":
                page = int((body.get("params") or {}).get("cursor") or 0)
                result = {
                    "tools": [{"name": f"t{page}", "inputSchema": {"type": "object"}}]
                }
                if page + 1 < self.pages:
                    result["nextCursor"] = str(page + 1)
            else:
                result = {"content": [{"type": "text", "text": "ok"}]}
            reply = {"jsonrpc": "2.0", "id": request_id}
            reply.update({"error": error} if error else {"result": result})
            await write.send(SessionMessage(_ADAPTER.validate_python(reply)))


async def test_remote_pages_and_listing_errors(
    mosquitto: Mosquitto,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = Scripted(pages=3)
    async with (
        serving(mosquitto, f"remote-{uid()}/paged", script) as server,
        remote(mosquitto, presence_of(server), call_timeout=1.0) as client,
    ):
        tools = await client.list_tools()
        assert [tool.name for tool in tools] == ["t0", "t1", "t2"]
        assert client.stats.tool_lists == 3

        monkeypatch.setattr(mcp_remote, "MAX_TOOL_PAGES", 2)
        await client.call_tool("changed-on-the-server", {})  # "ok"
        client._tools = None
        caplog.set_level(logging.WARNING)
        tools = await client.list_tools()
        assert [tool.name for tool in tools] == ["t0", "t1"]
        assert "more than 2 pages" in caplog.text

        script.fail_list = True
        client._tools = None
        with pytest.raises(RemoteMcpError, match="listing the tools failed"):
            await client.list_tools()


async def test_remote_silent_session_is_replaced(mosquitto: Mosquitto) -> None:
    script = Scripted()
    script.mute_sessions = 1
    async with (
        serving(mosquitto, f"remote-{uid()}/silent", script) as server,
        remote(mosquitto, presence_of(server), call_timeout=0.5) as client,
    ):
        with pytest.raises(TimeoutError, match="tools/list"):  # RemoteMcpTimeout
            await client.list_tools()
        # the ping gets no answer: a new session, which answers
        result = await client.call_tool("x", {})
        assert text_of(result) == "ok"
        assert client.stats.pings_failed == 1
        assert client.stats.sessions == 2
        assert script.sessions == 2


async def test_remote_unsupported_result(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def not_a_tool_result(*_args: Any, **_kwargs: Any) -> types.EmptyResult:
        return types.EmptyResult()

    async with (
        serving(mosquitto, f"remote-{uid()}/odd", Scripted()) as server,
        remote(mosquitto, presence_of(server)) as client,
    ):
        await client.list_tools()
        monkeypatch.setattr(ClientSession, "call_tool", not_a_tool_result)
        with pytest.raises(RemoteMcpError, match="unsupported result"):
            await client.call_tool("x", {})
