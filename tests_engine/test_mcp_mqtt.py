"""MCP over MQTT (spec layout) against the real Mosquitto fixture, on mcp 1.x and 2.x.

A ``build_server`` lowlevel server (FakeTools) behind :class:`McpMqttServer`,
reached by a stock ``mcp.ClientSession`` over :class:`McpMqttClientTransport`,
and by a client written from the spec text alone (raw publishes with user
properties on ``$mcp-server/…`` / ``$mcp-rpc/…``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import json
from typing import Any

from mcp import ClientSession
from mqtt_bridge_engine import mcp_mqtt
from mqtt_bridge_engine.mcp_mqtt import (
    CLIENT_ID,
    COMPONENT_TYPE,
    McpMqttClientTransport,
    McpMqttServer,
    discover,
    validate_server_name,
)
from mqtt_bridge_engine.mqtt_client import (
    Message,
    MqttClient,
    MqttSettings,
    PublishProperties,
)
from mqtt_bridge_engine.subscriptions import SubscribeOptions
import pytest

from devkit.mosquitto import Mosquitto

from .common import (  # noqa: F401 - no_leftovers: autouse fixture
    mqtt_client,
    no_leftovers,
    running,
    uid,
    wait_for,
)
from .test_mcp_server import FakeTools, dump, make_server

pytestmark = pytest.mark.timeout(30)


async def serve_session(tools: FakeTools, _cid: str, read: Any, write: Any) -> None:
    server = make_server(tools)
    await server.run(read, write, server.create_initialization_options())


@asynccontextmanager
async def hosted(
    broker: Mosquitto, name: str, tools: FakeTools | None = None, **kwargs: Any
) -> AsyncIterator[McpMqttServer]:
    tools = tools or FakeTools()
    sid = f"srv-{uid()}"
    async with mqtt_client(broker, sid, McpMqttServer.will(sid, name)) as client:

        async def handler(cid: str, read: Any, write: Any) -> None:
            await serve_session(tools, cid, read, write)

        kwargs.setdefault("handler", handler)
        server = McpMqttServer(
            client, name, description="test server", meta={"v": 1}, **kwargs
        )
        async with running(server.run()):
            await wait_for(lambda: client.registry.granted)
            yield server


@asynccontextmanager
async def session(
    broker: Mosquitto, name: str
) -> AsyncIterator[tuple[ClientSession, McpMqttClientTransport]]:
    cid = f"cli-{uid()}"
    async with mqtt_client(broker, cid, McpMqttClientTransport.client_will(cid)) as c:
        transport = McpMqttClientTransport(c, name, timeout=5)
        async with transport as (read, write), ClientSession(read, write) as s:
            await s.initialize()
            yield s, transport


class Recorder:
    """Collects messages of one filter."""

    def __init__(self, client: MqttClient, topic_filter: str) -> None:
        self.messages: list[Message] = []
        self.event = asyncio.Event()
        self.sub = client.subscribe(
            topic_filter, self._on, SubscribeOptions(qos=1, no_local=True)
        )

    def _on(self, message: Message) -> None:
        self.messages.append(message)
        self.event.set()

    async def next(self, timeout: float = 5) -> Message:
        async with asyncio.timeout(timeout):
            while not self.messages:
                self.event.clear()
                await self.event.wait()
        return self.messages.pop(0)


def props(message: Message) -> dict[str, str]:
    assert message.properties is not None
    return dict(message.properties.user_properties)


# --------------------------------------------------------------------------- #


def test_validate_server_name() -> None:
    assert validate_server_name("home/tools/time") == "home/tools/time"
    for bad in ("", "a/+/b", "a/#", "$sys/x", "a//b", "/a", "a/", "a\x01b"):
        with pytest.raises(ValueError):
            validate_server_name(bad)


def test_capability_routing() -> None:
    assert mcp_mqtt._is_capability_change("notifications/tools/list_changed")
    assert mcp_mqtt._is_capability_change("notifications/resources/updated")
    assert not mcp_mqtt._is_capability_change("notifications/progress")
    assert not mcp_mqtt._is_capability_change(None)


async def test_session_initialize_list_call_and_presence(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/tools"
    tools = FakeTools()
    async with mqtt_client(mosquitto) as observer:
        everything = Recorder(observer, "$mcp-rpc/#")
        async with hosted(mosquitto, name, tools) as server:
            presence = Recorder(observer, f"$mcp-server/presence/+/{name}")
            online = await presence.next()
            assert online.retain
            assert online.topic == f"$mcp-server/presence/{server.server_id}/{name}"
            body = json.loads(online.payload)
            assert body["method"] == "notifications/server/online"
            assert body["params"] == {
                "server_name": name,
                "description": "test server",
                "meta": {"v": 1},
            }
            assert props(online) == {
                COMPONENT_TYPE: "mcp-server",
                CLIENT_ID: server.server_id,
            }
            async with session(mosquitto, name) as (s, transport):
                assert transport.server_id == server.server_id
                listed = dump(await s.list_tools())
                assert {t["name"] for t in listed["tools"]} == {
                    "mqtt_publish",
                    "mqtt_read",
                }
                result = dump(await s.call_tool("mqtt_read", {"topic": "a/b"}))
                assert "content" in result
                assert tools.calls == [("mqtt_read", {"topic": "a/b"})]
                assert list(server.sessions) == [transport.client_id]
            async with asyncio.timeout(5):
                while server.sessions:  # client presence "disconnected"
                    await asyncio.sleep(0.01)
            assert server.stats.sessions_started == 1
            assert server.stats.requests >= 3
        cleared = await presence.next()
        assert cleared.retain is False or cleared.payload == b""
        assert cleared.payload == b""
        # every PUBLISH on the RPC topic carried both user properties
        assert everything.messages
        for message in everything.messages:
            p = props(message)
            assert p[COMPONENT_TYPE] in {"mcp-server", "mcp-client"}
            assert p[CLIENT_ID]
        # nothing retained any more
        assert await discover(observer, name, timeout=0.2) == []


async def test_two_clients_interleaved(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}"
    tools = FakeTools()
    async with (
        hosted(mosquitto, name, tools) as server,
        session(mosquitto, name) as (one, _),
        session(mosquitto, name) as (two, _),
    ):
        assert len(server.sessions) == 2
        tools.delay = 0.01  # calls overlap in both sessions
        calls = [
            (s, f"a/{tag}/{i}")
            for i in range(10)
            for s, tag in ((one, "one"), (two, "two"))
        ]
        results = await asyncio.gather(
            *(
                s.call_tool("mqtt_publish", {"topic": topic, "payload": "x"})
                for s, topic in calls
            )
        )
        for (_s, topic), result in zip(calls, results, strict=True):
            body = dump(result)
            assert not body.get("isError")
            assert body["content"][0]["text"] == f"published to {topic}"
        assert len(tools.calls) == 20


async def test_discover_and_not_found(mosquitto: Mosquitto) -> None:
    base = f"test/{uid()}"
    async with (
        hosted(mosquitto, f"{base}/a") as a,
        hosted(mosquitto, f"{base}/b"),
        mqtt_client(mosquitto) as c,
    ):
        found = await discover(c, f"{base}/#", timeout=0.3)
        assert [p.server_name for p in found] == [f"{base}/a", f"{base}/b"]
        assert found[0].server_id == a.server_id
        assert found[0].description == "test server"
        assert found[0].meta == {"v": 1}
        transport = McpMqttClientTransport(c, f"{base}/none", timeout=0.3)
        with pytest.raises(LookupError, match=r"not found within 0\.3 s"):
            await transport.__aenter__()


async def raw_client(
    c: MqttClient, sid: str, name: str, cid: str
) -> tuple[Recorder, PublishProperties]:
    rpc = Recorder(c, f"$mcp-rpc/{cid}/{sid}/{name}")
    await rpc.sub.wait_granted()
    return rpc, PublishProperties(
        user_properties=((COMPONENT_TYPE, "mcp-client"), (CLIENT_ID, cid))
    )


INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"},
    },
}


async def test_spec_only_raw_client_and_parse_errors(mosquitto: Mosquitto) -> None:
    """A client from the spec text: initialize on control, answers on RPC."""
    name = f"test/{uid()}/raw"
    cid = f"raw-{uid()}"
    async with hosted(mosquitto, name) as server, mqtt_client(mosquitto, cid) as c:
        sid = server.server_id
        rpc, p = await raw_client(c, sid, name, cid)
        rpc_topic = f"$mcp-rpc/{cid}/{sid}/{name}"
        await c.publish_wait(
            f"$mcp-server/{sid}/{name}", json.dumps(INIT).encode(), properties=p
        )
        answer = await rpc.next()
        assert props(answer) == {COMPONENT_TYPE: "mcp-server", CLIENT_ID: sid}
        body = json.loads(answer.payload)
        assert body["id"] == 1
        assert body["result"]["serverInfo"]["name"] == "mqtt-bridge-test"
        await c.publish_wait(
            rpc_topic,
            b'{"jsonrpc":"2.0","method":"notifications/initialized"}',
            properties=p,
        )
        await c.publish_wait(rpc_topic, b"{not json", properties=p)
        error = json.loads((await rpc.next()).payload)
        assert error["id"] is None
        assert error["error"]["code"] == -32700
        await c.publish_wait(rpc_topic, b'{"id": 5, "foo": 1}', properties=p)
        error = json.loads((await rpc.next()).payload)
        assert (error["id"], error["error"]["code"]) == (5, -32600)
        await c.publish_wait(
            rpc_topic,
            b'{"jsonrpc":"2.0","id":2,"method":"tools/list"}',
            properties=p,
        )
        listed = json.loads((await rpc.next()).payload)
        assert listed["id"] == 2
        assert len(listed["result"]["tools"]) == 2
        assert server.stats.parse_errors == 2
        # malformed JSON on the control topic: parse error on the RPC topic
        await c.publish_wait(f"$mcp-server/{sid}/{name}", b"[", properties=p)
        error = json.loads((await rpc.next()).payload)
        assert error["error"]["code"] == -32700
        # a non-initialize request on the control topic is refused
        await c.publish_wait(
            f"$mcp-server/{sid}/{name}",
            b'{"jsonrpc":"2.0","id":9,"method":"tools/list"}',
            properties=p,
        )
        error = json.loads((await rpc.next()).payload)
        assert (error["id"], error["error"]["code"]) == (9, -32600)
        # a control message without MCP-MQTT-CLIENT-ID is dropped
        errors = server.stats.errors
        await c.publish_wait(f"$mcp-server/{sid}/{name}", json.dumps(INIT).encode())
        async with asyncio.timeout(5):
            while server.stats.errors == errors:
                await asyncio.sleep(0.01)
        # the session ends with notifications/disconnected on the RPC topic
        await c.publish_wait(
            rpc_topic,
            b'{"jsonrpc":"2.0","method":"notifications/disconnected"}',
            properties=p,
        )
        async with asyncio.timeout(5):
            while server.sessions:
                await asyncio.sleep(0.01)


async def test_session_limit_reinitialize_idle_and_stop(
    mosquitto: Mosquitto,
) -> None:
    name = f"test/{uid()}/limit"
    ca, cb = f"a-{uid()}", f"b-{uid()}"
    async with mqtt_client(mosquitto, ca) as a, mqtt_client(mosquitto, cb) as b:
        async with hosted(mosquitto, name, max_sessions=1, idle_timeout=0.3) as server:
            sid = server.server_id
            rpc_a, pa = await raw_client(a, sid, name, ca)
            rpc_b, pb = await raw_client(b, sid, name, cb)
            control = f"$mcp-server/{sid}/{name}"
            await a.publish_wait(control, json.dumps(INIT).encode(), properties=pa)
            assert "result" in json.loads((await rpc_a.next()).payload)
            # a second initialize from the same client replaces its session
            await a.publish_wait(control, json.dumps(INIT).encode(), properties=pa)
            assert "result" in json.loads((await rpc_a.next()).payload)
            assert list(server.sessions) == [ca]
            await b.publish_wait(control, json.dumps(INIT).encode(), properties=pb)
            refused = json.loads((await rpc_b.next()).payload)
            assert refused["id"] == 1
            assert refused["error"]["code"] == -32000
            assert server.stats.rejected_sessions == 1
            # idle: the session ends and the client is told
            bye = json.loads((await rpc_a.next(timeout=5)).payload)
            assert bye["method"] == "notifications/disconnected"
            assert server.sessions == {}
            # server stop says disconnected to live sessions
            await b.publish_wait(control, json.dumps(INIT).encode(), properties=pb)
            assert "result" in json.loads((await rpc_b.next()).payload)
            server.idle_timeout = 60
        bye = json.loads((await rpc_b.next()).payload)
        assert bye["method"] == "notifications/disconnected"


async def test_failing_handler_and_capability_topic(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/cap"

    async def handler(_cid: str, read: Any, write: Any) -> None:
        from mcp.shared.message import SessionMessage

        async with write:
            first = await read.receive()
            request_id = mcp_mqtt._root(first.message).id
            for payload in (
                {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"},
                {"jsonrpc": "2.0", "id": request_id, "result": {}},
            ):
                await write.send(
                    SessionMessage(mcp_mqtt._MESSAGE_ADAPTER.validate_python(payload))
                )
        raise RuntimeError("handler broke")

    cid = f"c-{uid()}"
    async with (
        hosted(mosquitto, name, handler=handler) as server,
        mqtt_client(mosquitto, cid) as c,
    ):
        sid = server.server_id
        rpc, p = await raw_client(c, sid, name, cid)
        cap = Recorder(c, f"$mcp-server/capability/{sid}/{name}")
        await cap.sub.wait_granted()
        await c.publish_wait(
            f"$mcp-server/{sid}/{name}", json.dumps(INIT).encode(), properties=p
        )
        changed = await cap.next()
        assert json.loads(changed.payload)["method"] == (
            "notifications/tools/list_changed"
        )
        assert json.loads((await rpc.next()).payload) == {
            "jsonrpc": "2.0",
            "id": 1,
            "result": {},
        }
        async with asyncio.timeout(5):
            while server.sessions:
                await asyncio.sleep(0.01)
        assert server.stats.errors == 1


async def test_client_presence_will_ends_session(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/will"
    async with hosted(mosquitto, name) as server:
        cid = f"w-{uid()}"
        will = McpMqttClientTransport.client_will(cid)
        assert will.topic == f"$mcp-client/presence/{cid}"
        async with mqtt_client(mosquitto, cid, will) as c:
            rpc, p = await raw_client(c, server.server_id, name, cid)
            await c.publish_wait(
                f"$mcp-server/{server.server_id}/{name}",
                json.dumps(INIT).encode(),
                properties=p,
            )
            await rpc.next()
            assert list(server.sessions) == [cid]
            # a presence message that is not "disconnected" changes nothing
            await c.publish_wait(f"$mcp-client/presence/{cid}", b"{}", properties=p)
            await c.publish_wait(will.topic, will.payload, properties=p)
            async with asyncio.timeout(5):
                while server.sessions:
                    await asyncio.sleep(0.01)


async def test_presence_republished_after_reconnect(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/again"
    async with mqtt_client(mosquitto) as observer, hosted(mosquitto, name) as server:
        presence = Recorder(observer, f"$mcp-server/presence/+/{name}")
        assert json.loads((await presence.next()).payload)["params"]["server_name"]
        server.client.reconnect_now()
        again = await presence.next()
        assert not again.retain  # live delivery of the re-published presence
        assert json.loads(again.payload)["method"] == "notifications/server/online"


async def test_publish_failures_are_counted() -> None:
    """A server or transport whose MqttClient is down logs and counts, never raises."""
    client = MqttClient(MqttSettings("127.0.0.1", 1), client_id="down")

    async def handler(_cid: str, _read: Any, _write: Any) -> None:
        return None

    server = McpMqttServer(client, "x/y", handler=handler)
    server._publish("x/y", b"{}")
    assert server.stats.errors == 1
    await server._clear_presence()  # not connected: nothing to clear
    server._end("nobody")  # unknown sessions are ignored


def test_presence_parsing() -> None:
    def msg(topic: str, payload: bytes) -> Message:
        return Message(topic, payload)

    assert mcp_mqtt._presence_from(msg("$mcp-server/presence/s", b"{}")) is None
    assert mcp_mqtt._presence_from(msg("$mcp-server/presence/s/a/b", b"")) is None
    assert mcp_mqtt._presence_from(msg("$mcp-server/presence/s/a/b", b"[")) is None
    assert mcp_mqtt._presence_from(
        msg("$mcp-server/presence/s/a/b", b'{"params": {}}')
    ) == mcp_mqtt.ServerPresence("s", "a/b")
    only_type = Message(
        "t",
        b"",
        properties=PublishProperties(user_properties=((COMPONENT_TYPE, "x"),)),
    )
    assert mcp_mqtt._user_property(only_type, CLIENT_ID) is None


async def test_discover_forgets_a_server_going_offline(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/gone"
    async with mqtt_client(mosquitto) as c:
        found = asyncio.create_task(discover(c, name, timeout=0.5))
        async with asyncio.timeout(5):
            while not c.registry.granted:
                await asyncio.sleep(0.01)
        topic = f"$mcp-server/presence/ghost/{name}"
        online = {"jsonrpc": "2.0", "method": "notifications/server/online"}
        await c.publish_wait(topic, json.dumps(online).encode())
        await c.publish_wait(topic, b"")
        assert await found == []


async def test_refused_or_abandoned_session_start(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused client subscription, or a session ended while subscribing, starts nothing."""
    from mqtt_bridge_engine.subscriptions import SubscriptionRefusedError

    name = f"test/{uid()}/refused"
    cid = f"r-{uid()}"
    async with hosted(mosquitto, name) as server, mqtt_client(mosquitto, cid) as c:
        rpc, p = await raw_client(c, server.server_id, name, cid)
        subscribe = server.client.subscribe
        refuse = True

        class Wrapped:
            def __init__(self, subscription: Any) -> None:
                self.subscription = subscription

            async def wait_granted(self) -> None:
                if refuse:
                    raise SubscriptionRefusedError("no")
                await self.subscription.wait_granted()  # all three granted
                server._end(cid)  # the client went away meanwhile

            def cancel(self) -> None:
                self.subscription.cancel()

        def patched(topic_filter: str, callback: Any, options: Any = None) -> Any:
            subscription = subscribe(topic_filter, callback, options)
            if topic_filter.startswith("$mcp-client/capability/"):
                return Wrapped(subscription)
            return subscription

        monkeypatch.setattr(server.client, "subscribe", patched)
        control = f"$mcp-server/{server.server_id}/{name}"
        for started in (1, 2):
            await c.publish_wait(control, json.dumps(INIT).encode(), properties=p)
            async with asyncio.timeout(5):
                while server.stats.sessions_started < started or server._starting:
                    await asyncio.sleep(0.01)
            assert server.stats.errors == 1
            assert server.sessions == {}
            refuse = False
        assert rpc.messages == []


async def test_dropped_and_malformed_messages(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/drop"
    cid = f"d-{uid()}"
    blocked = asyncio.Event()

    async def handler(_cid: str, _read: Any, _write: Any) -> None:
        blocked.set()
        await asyncio.Event().wait()

    async with (
        # The handler ignores its input: it is cancelled after the grace time.
        hosted(mosquitto, name, handler=handler, close_grace=0.1) as server,
        mqtt_client(mosquitto, cid) as c,
    ):
        _rpc, p = await raw_client(c, server.server_id, name, cid)
        await c.publish_wait(
            f"$mcp-server/{server.server_id}/{name}",
            json.dumps(INIT).encode(),
            properties=p,
        )
        async with asyncio.timeout(5):
            await blocked.wait()
        session = server._sessions[cid]
        session.to_handler.close()
        server._on_rpc(
            session, Message("t", b'{"jsonrpc":"2.0","id":3,"method":"ping"}')
        )
        assert server.stats.errors == 1


async def test_client_transport_drops_malformed_messages(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/junk"
    async with (
        hosted(mosquitto, name) as server,
        mqtt_client(mosquitto) as observer,
        session(mosquitto, name) as (s, _transport),
    ):
        await observer.publish_wait(
            f"$mcp-server/capability/{server.server_id}/{name}", b"junk"
        )
        assert dump(await s.send_ping()) == {}


# --------------------------------------------------------------------------- #
# Client transport: server gone, server-id, health pings, capability topic,
# requests that cannot be answered.


def mute_handler(
    received: list[dict[str, Any]],
) -> Any:
    """A session handler that answers ``initialize`` and then only records what it gets."""
    from mcp.shared.message import SessionMessage

    async def handler(_cid: str, read: Any, write: Any) -> None:
        async with write:
            first = await read.receive()
            body = {
                "jsonrpc": "2.0",
                "id": mcp_mqtt._root(first.message).id,
                "result": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "serverInfo": {"name": "mute", "version": "0"},
                },
            }
            await write.send(
                SessionMessage(mcp_mqtt._MESSAGE_ADAPTER.validate_python(body))
            )
            async for item in read:
                received.append(dump(mcp_mqtt._root(item.message)))

    return handler


@asynccontextmanager
async def transport_session(
    client: MqttClient, name: str, **kwargs: Any
) -> AsyncIterator[tuple[ClientSession, McpMqttClientTransport]]:
    transport = McpMqttClientTransport(client, name, **kwargs)
    async with transport as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        yield s, transport


async def test_client_ends_when_the_server_presence_is_cleared(
    mosquitto: Mosquitto,
) -> None:
    """An empty retained presence (the server's will) ends the session at once."""
    name = f"test/{uid()}/gone"
    tools = FakeTools()
    cid = f"c-{uid()}"
    async with (
        hosted(mosquitto, name, tools, close_grace=0.2) as server,
        mqtt_client(mosquitto) as observer,
        mqtt_client(mosquitto, cid) as c,
        transport_session(c, name, timeout=5) as (s, transport),
    ):
        tools.delay = 30  # the call stays in flight
        call = asyncio.create_task(s.call_tool("mqtt_read", {"topic": "a/b"}))
        async with asyncio.timeout(5):
            while not tools.calls:  # the call is at the server
                await asyncio.sleep(0.01)
        await observer.publish_wait(
            f"$mcp-server/presence/{server.server_id}/{name}", b"", retain=True
        )
        with pytest.raises(Exception, match="went offline") as failed:
            await asyncio.wait_for(call, 5)
        assert "presence was cleared" in str(failed.value)
        assert transport.closed_reason is not None
        assert transport.stats.errors == 1
        # the session is over: a new call fails at once instead of hanging
        with pytest.raises(Exception):  # noqa: B017 - 1.x ClosedResourceError, 2.x MCPError
            await asyncio.wait_for(s.list_tools(), 2)


async def test_client_ends_on_server_disconnected(mosquitto: Mosquitto) -> None:
    """A server that stops says notifications/disconnected on the RPC topic."""
    name = f"test/{uid()}/bye"
    received: list[Any] = []

    async def message_handler(message: Any) -> None:
        received.append(message)

    async with mqtt_client(mosquitto) as c:
        server_context = hosted(mosquitto, name)
        server = await server_context.__aenter__()
        transport = McpMqttClientTransport(c, name, timeout=5)
        async with (
            transport as (read, write),
            ClientSession(read, write, message_handler=message_handler) as s,
        ):
            await s.initialize()
            assert list(server.sessions) == [c.client_id]
            await server_context.__aexit__(None, None, None)
            async with asyncio.timeout(5):
                while transport.closed_reason is None:
                    await asyncio.sleep(0.01)
            assert "notifications/disconnected" in transport.closed_reason
            with pytest.raises(Exception):  # noqa: B017 - 1.x ClosedResourceError, 2.x MCPError
                await asyncio.wait_for(s.list_tools(), 2)
            async with asyncio.timeout(5):
                while not received:
                    await asyncio.sleep(0.01)
            assert isinstance(received[-1], ConnectionError)
            assert str(received[-1]) == transport.closed_reason


async def test_client_targets_a_server_id(mosquitto: Mosquitto) -> None:
    name = f"test/{uid()}/pick"
    async with (
        hosted(mosquitto, name),
        hosted(mosquitto, name) as second,
        mqtt_client(mosquitto) as c,
    ):
        with pytest.raises(ValueError, match="invalid MQTT client id"):
            McpMqttClientTransport(c, name, server_id="a/b")
        missing = McpMqttClientTransport(c, name, server_id="nobody", timeout=0.3)
        with pytest.raises(
            LookupError, match=r"server 'nobody' of server-name .* not found within"
        ):
            await missing.__aenter__()
        assert c.registry.filters == frozenset()  # nothing left subscribed
        async with transport_session(
            c, name, server_id=second.server_id, timeout=5
        ) as (s, transport):
            assert transport.server_id == second.server_id
            assert list(second.sessions) == [c.client_id]
            assert len((await s.list_tools()).tools) == 2


async def test_client_health_pings(mosquitto: Mosquitto) -> None:
    """Pings are answered by a real server; a server that never answers ends the session."""
    name = f"test/{uid()}/ping"
    mute = f"test/{uid()}/mute"
    received: list[dict[str, Any]] = []
    async with (
        hosted(mosquitto, name) as server,
        hosted(mosquitto, mute, handler=mute_handler(received)) as quiet,
        mqtt_client(mosquitto) as observer,
        mqtt_client(mosquitto) as c,
    ):
        async with transport_session(c, name, ping_interval=0.05, ping_timeout=2) as (
            s,
            transport,
        ):
            async with asyncio.timeout(5):
                while transport.stats.pings < 3:
                    await asyncio.sleep(0.01)
            assert transport.closed_reason is None
            assert len((await s.list_tools()).tools) == 2
            assert server.stats.requests >= 5
        async with mqtt_client(mosquitto) as c2:
            presence = Recorder(observer, f"$mcp-client/presence/{c2.client_id}")
            await presence.sub.wait_granted()
            async with transport_session(
                c2, mute, ping_interval=0.05, ping_timeout=0.2
            ) as (_s, transport):
                async with asyncio.timeout(5):
                    while transport.closed_reason is None:
                        await asyncio.sleep(0.01)
                assert "did not answer a ping within 0.2 s" in transport.closed_reason
                said = await presence.next()
                assert (
                    json.loads(said.payload)["method"] == "notifications/disconnected"
                )
            async with asyncio.timeout(5):
                while quiet.sessions:  # the client said disconnected
                    await asyncio.sleep(0.01)
        assert received[0]["method"] == "notifications/initialized"
        assert received[1]["method"] == "ping"
        assert received[1]["id"].startswith(mcp_mqtt.PING_ID_PREFIX)


async def test_client_capability_changes_reach_the_server(mosquitto: Mosquitto) -> None:
    """notifications/roots/list_changed goes to $mcp-client/capability/{cid} (spec §1.5)."""
    import warnings

    name = f"test/{uid()}/roots"
    received: list[dict[str, Any]] = []
    async with (
        hosted(mosquitto, name, handler=mute_handler(received)),
        mqtt_client(mosquitto) as observer,
        mqtt_client(mosquitto) as c,
        transport_session(c, name, timeout=5) as (s, _transport),
    ):
        capability = Recorder(observer, f"$mcp-client/capability/{c.client_id}")
        rpc = Recorder(observer, f"$mcp-rpc/{c.client_id}/#")
        await asyncio.gather(capability.sub.wait_granted(), rpc.sub.wait_granted())
        with warnings.catch_warnings():  # mcp 2.x: roots are deprecated (SEP-2577)
            warnings.simplefilter("ignore")
            await s.send_roots_list_changed()
        message = await capability.next()
        assert (
            json.loads(message.payload)["method"] == "notifications/roots/list_changed"
        )
        assert props(message) == {COMPONENT_TYPE: "mcp-client", CLIENT_ID: c.client_id}
        async with asyncio.timeout(5):
            while len(received) < 2:
                await asyncio.sleep(0.01)
        assert received[1]["method"] == "notifications/roots/list_changed"
        assert rpc.messages == []  # not on the RPC topic


async def test_client_requests_never_hang_on_the_connection(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost connection, failed publish, unreachable broker: error answers, not hangs."""
    name = f"test/{uid()}/lost"
    tools = FakeTools()
    async with (
        hosted(mosquitto, name, tools) as server,
        mqtt_client(mosquitto) as c,
        transport_session(c, name, timeout=0.5) as (s, transport),
    ):
        code = mcp_mqtt.CONNECTION_CLOSED
        await s.list_tools()
        # 1. the connection drops while a call is in flight: its answer is lost
        tools.delay = 0.5
        call = asyncio.create_task(s.call_tool("mqtt_read", {"topic": "a/b"}))
        async with asyncio.timeout(5):
            while not tools.calls:
                await asyncio.sleep(0.01)
        c.reconnect_now()
        with pytest.raises(Exception, match="connection to the broker was lost"):
            await asyncio.wait_for(call, 5)
        # after the reconnect the retained presence is seen again: calls work
        tools.delay = 0
        assert "content" in dump(await s.call_tool("mqtt_read", {"topic": "a/c"}))
        # 2. a publish that fails is answered at once
        publish = c.publish

        def refuse(*_args: Any, **_kwargs: Any) -> None:
            raise mcp_mqtt.MqttError("refused for the test")

        monkeypatch.setattr(c, "publish", refuse)
        with pytest.raises(Exception, match="not sent: refused for the test"):
            await asyncio.wait_for(s.list_tools(), 5)
        monkeypatch.setattr(c, "publish", publish)
        # 3. the broker is unreachable: requests wait `timeout` for the server
        c.update_settings(MqttSettings("127.0.0.1", 1))
        async with asyncio.timeout(5):
            while c.connected:
                await asyncio.sleep(0.01)
        with pytest.raises(
            Exception, match=r"not reachable: no presence within 0\.5 s"
        ):
            await asyncio.wait_for(s.list_tools(), 5)
        assert transport.stats.errors == 3
        assert transport.closed_reason is None
        assert code == -32000
        assert server.stats.errors == 0
