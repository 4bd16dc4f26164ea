"""MCP over MQTT for simple devices (request topic + Response Topic + Correlation Data).

Against the real Mosquitto fixture, on mcp 1.x and 2.x: the stdio test server
``stdio_servers/echo.py`` behind ``StdioHost`` (one child shared by all
devices), an in-process upstream server on raw ``SessionMessage`` streams for
progress, server requests and handler restarts, and a device written with raw
paho (MQTT 5 ResponseTopic / CorrelationData properties).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
import json
import queue
import threading
from typing import Any

import anyio
from mcp import types
from mcp.shared.message import SessionMessage
from mqtt_bridge_engine import mcp_mqtt_simple
from mqtt_bridge_engine.mcp_mqtt_simple import (
    ID_PREFIX,
    SimpleMcpMqttClient,
    SimpleMcpMqttServer,
    notifications_topic,
)
from mqtt_bridge_engine.mqtt_client import (
    Message,
    MqttClient,
    MqttSettings,
    PublishProperties,
)
from mqtt_bridge_engine.subscriptions import SubscribeOptions
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import TypeAdapter
import pytest

from devkit.mosquitto import Mosquitto

from . import common
from .common import (  # noqa: F401 - no_leftovers: autouse fixture
    FAST,
    echo_host,
    mqtt_client,
    no_leftovers,
    running,
    uid,
)

pytestmark = pytest.mark.timeout(60)

_ADAPTER: TypeAdapter[Any] = TypeAdapter(types.JSONRPCMessage)


@asynccontextmanager
async def bridge(
    broker: Mosquitto, handler: Any, *, wait: bool = True, **kwargs: Any
) -> AsyncIterator[SimpleMcpMqttServer]:
    async with mqtt_client(broker) as client:
        kwargs.setdefault("restart_backoff", FAST)
        server = SimpleMcpMqttServer(
            client, f"test/{uid()}/simple", handler=handler, **kwargs
        )
        async with running(server.run()):
            if wait:
                async with asyncio.timeout(20):
                    await server.wait_ready()
            else:
                await common.wait_for(lambda: client.registry.granted)
            yield server


@asynccontextmanager
async def device(
    broker: Mosquitto, server: SimpleMcpMqttServer, **kwargs: Any
) -> AsyncIterator[SimpleMcpMqttClient]:
    async with (
        mqtt_client(broker) as client,
        SimpleMcpMqttClient(client, server.request_topic, **kwargs) as dev,
    ):
        yield dev


class Inbox:
    """Messages of one topic filter, as received (topic, properties)."""

    def __init__(self, client: MqttClient, topic_filter: str) -> None:
        self.messages: list[Message] = []
        self.event = asyncio.Event()
        self.sub = client.subscribe(topic_filter, self._on, SubscribeOptions(qos=1))

    def _on(self, message: Message) -> None:
        self.messages.append(message)
        self.event.set()

    async def next(self, timeout: float = 10) -> Message:
        async with asyncio.timeout(timeout):
            while not self.messages:
                self.event.clear()
                await self.event.wait()
        return self.messages.pop(0)


def text_of(response: dict[str, Any]) -> str:
    return str(response["result"]["content"][0]["text"])


async def wait_for(condition: Any, timeout: float = 10) -> None:
    await common.wait_for(condition, timeout)


# --------------------------------------------------------------------------- #
# An in-process upstream server on raw SessionMessage streams
# --------------------------------------------------------------------------- #


class RawServer:
    """A handler answering test methods; ``modes`` picks each run's behaviour.

    Modes: ``ok``; ``raise`` (fails at once); ``init-error`` (answers
    initialize with an error); ``stuck`` (never answers initialize and
    ignores its input ending).
    """

    def __init__(self, modes: tuple[str, ...] = ()) -> None:
        self.modes = list(modes)
        self.runs = 0
        self.inits = 0
        self.seen: list[dict[str, Any]] = []
        self.got_initialize = asyncio.Event()
        self.init_gate: asyncio.Event | None = None
        self.held: list[Any] = []
        self.asks: dict[str, Any] = {}

    async def __call__(self, _cid: str, read: Any, write: Any) -> None:
        self.runs += 1
        mode = self.modes.pop(0) if self.modes else "ok"
        if mode == "raise":
            raise RuntimeError("upstream broke")
        async with write:

            async def send(body: dict[str, Any]) -> None:
                await write.send(
                    SessionMessage(_ADAPTER.validate_python({"jsonrpc": "2.0", **body}))
                )

            async for item in read:
                body = item.message.model_dump(
                    by_alias=True, mode="json", exclude_none=True
                )
                self.seen.append(body)
                method = body.get("method")
                rid = body.get("id")
                params = body.get("params") or {}
                if method == "initialize":
                    self.inits += 1
                    self.got_initialize.set()
                    if mode == "stuck":
                        await anyio.sleep_forever()
                    if self.init_gate is not None:
                        await self.init_gate.wait()
                    if mode == "init-error":
                        await send(
                            {"id": rid, "error": {"code": -1, "message": "no thanks"}}
                        )
                        continue
                    await send(
                        {
                            "id": rid,
                            "result": {
                                "protocolVersion": params["protocolVersion"],
                                "capabilities": {"tools": {}},
                                "serverInfo": {"name": "raw", "version": "1"},
                            },
                        }
                    )
                elif method == "test/echo":
                    await send({"id": rid, "result": {"echo": params}})
                elif method == "test/progress":
                    token = params.get("_meta", {}).get("progressToken")
                    await send(
                        {
                            "method": "notifications/progress",
                            "params": {
                                "progressToken": token,
                                "progress": 1,
                                "total": 2,
                            },
                        }
                    )
                    await send(
                        {
                            "method": "notifications/message",
                            "params": {"level": "info", "data": params.get("tag")},
                        }
                    )
                    await send(
                        {
                            "method": "notifications/progress",
                            "params": {"progressToken": "unknown", "progress": 1},
                        }
                    )
                    await send({"method": "notifications/cancelled", "params": {}})
                    await send({"id": rid, "result": {"token": token}})
                elif method == "test/ask":
                    ask_id = f"ask-{len(self.asks)}"
                    self.asks[ask_id] = rid
                    await send({"id": ask_id, "method": params["method"], "params": {}})
                elif method == "test/hold":
                    self.held.append(rid)
                elif method == "test/release":
                    for held in self.held:
                        await send({"id": held, "result": {"late": True}})
                    self.held.clear()
                    await send({"id": "not-a-bridge-id", "result": {}})
                    await send({"id": 12345, "result": {}})
                    await send({"id": rid, "result": {"released": True}})
                elif method == "test/quit":
                    return
                elif method is None and rid in self.asks:
                    await send({"id": self.asks.pop(rid), "result": {"answer": body}})


# --------------------------------------------------------------------------- #
# With the stdio echo server behind StdioHost
# --------------------------------------------------------------------------- #


async def test_devices_call_tools_without_initialize(mosquitto: Mosquitto) -> None:
    host = echo_host()
    async with bridge(mosquitto, host.serve_session) as server:
        notes: list[dict[str, Any]] = []
        async with device(
            mosquitto, server, on_notification=notes.append, server_notifications=True
        ) as dev:
            listed = await dev.request("tools/list", timeout=10)
            assert listed["id"] == 1
            assert {"echo", "sleep", "die"} <= {
                tool["name"] for tool in listed["result"]["tools"]
            }
            called = await dev.request(
                "tools/call", {"name": "echo", "arguments": {"text": "hi"}}
            )
            assert called["id"] == 2
            assert text_of(called) == "hi"
            # a device's own initialize is answered from the cached result
            init = await dev.request(
                "initialize",
                {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "device", "version": "1"},
                },
                request_id="init",
            )
            assert init["id"] == "init"
            assert init["result"] == server.initialize_result
            assert init["result"]["serverInfo"]["name"] == "echo"
            dev.notify("notifications/initialized")
            # a logging notification goes to {request_topic}/notifications
            logged = await dev.request(
                "tools/call", {"name": "log", "arguments": {"text": "note"}}
            )
            assert text_of(logged) == "logged"
            await wait_for(lambda: notes)
            assert notes[0]["method"] == "notifications/message"
            assert notes[0]["params"]["data"] == "note"
            # a server->client request (roots) cannot be answered by a device
            roots = await dev.request("tools/call", {"name": "roots", "arguments": {}})
            assert "error" in roots or roots["result"].get("isError")
            assert server.stats.server_requests == 1
        assert host.stats.sessions_started == 1  # one child for all devices
        assert host.stats.sessions == 1
        assert server.pending_requests == 0
        assert server.stats.requests == 5
        assert server.stats.responses == 5
        assert server.stats.server_notifications == 1
    assert host.stats.running == 0
    assert host.stats.sessions == 0


async def test_two_devices_with_the_same_ids_never_collide(
    mosquitto: Mosquitto,
) -> None:
    host = echo_host()
    async with (
        bridge(mosquitto, host.serve_session) as server,
        device(mosquitto, server) as one,
        device(mosquitto, server) as two,
    ):

        async def call(dev: SimpleMcpMqttClient, tag: str) -> tuple[str, Any, str]:
            response = await dev.request(
                "tools/call", {"name": "echo", "arguments": {"text": tag}}, timeout=30
            )
            return tag, response["id"], text_of(response)

        calls = [
            call(dev, f"{name}-{n}")
            for n in range(1, 51)
            for dev, name in ((one, "one"), (two, "two"))
        ]
        results = await asyncio.gather(*calls)
        for tag, response_id, text in results:
            assert text == tag
            assert response_id == int(tag.split("-")[1])  # both devices used 1..50
        assert server.stats.requests == 100
        assert server.stats.responses == 100
        assert server.stats.errors == 0
        assert server.pending_requests == 0
        assert server._by_origin == {}
        assert server._clients == {}


async def test_timeout_answers_and_frees_the_entry(mosquitto: Mosquitto) -> None:
    host = echo_host()
    async with (
        bridge(mosquitto, host.serve_session, request_timeout=0.5) as server,
        device(mosquitto, server) as dev,
    ):
        answer = await dev.request(
            "tools/call", {"name": "sleep", "arguments": {"seconds": 10}}
        )
        assert answer["error"] == {"code": -32001, "message": "request timed out"}
        assert answer["id"] == 1
        assert server.stats.timeouts == 1
        assert server.pending_requests == 0
        assert server._by_origin == {}
        assert server._clients == {}
        again = await dev.request(
            "tools/call", {"name": "echo", "arguments": {"text": "still"}}
        )
        assert text_of(again) == "still"


async def test_child_death_is_an_error_then_recovers(mosquitto: Mosquitto) -> None:
    host = echo_host()
    async with (
        bridge(mosquitto, host.serve_session) as server,
        device(mosquitto, server) as dev,
    ):
        before = await dev.request("tools/call", {"name": "pid", "arguments": {}})
        slow = asyncio.create_task(
            dev.request("tools/call", {"name": "sleep", "arguments": {"seconds": 30}})
        )
        await wait_for(lambda: host.stats.requests >= 3)  # init, pid, sleep
        died = await dev.request("tools/call", {"name": "die", "arguments": {}})
        assert died["error"]["code"] == -32603
        assert "exited" in died["error"]["message"]
        assert (await slow)["error"]["code"] == -32603
        after = await dev.request("tools/call", {"name": "pid", "arguments": {}})
        assert text_of(after) != text_of(before)
        assert host.stats.restarts >= 1
        assert server.stats.restarts == 0  # StdioHost restarted the child itself
        assert server.pending_requests == 0


async def test_raw_paho_device(mosquitto: Mosquitto) -> None:
    """A device written with paho only: MQTT 5 ResponseTopic and CorrelationData."""
    host = echo_host()
    async with bridge(mosquitto, host.serve_session) as server:
        response_topic = f"devices/{uid()}/answers"
        received: queue.Queue[Any] = queue.Queue()
        subscribed = threading.Event()
        dev = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=f"paho-{uid()}",
            protocol=paho.MQTTv5,
        )
        dev.on_message = lambda _c, _u, msg: received.put(msg)
        dev.on_subscribe = lambda *_args: subscribed.set()
        dev.connect("127.0.0.1", mosquitto.port)
        dev.loop_start()
        try:
            dev.subscribe(response_topic, qos=1)
            assert await asyncio.to_thread(subscribed.wait, 10)

            def publish(payload: bytes, correlation: bytes | None) -> None:
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = response_topic
                if correlation is not None:
                    props.CorrelationData = correlation
                dev.publish(server.request_topic, payload, qos=1, properties=props)

            publish(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": "call-1",
                        "method": "tools/call",
                        "params": {"name": "echo", "arguments": {"text": "paho"}},
                    }
                ).encode(),
                b"\x00corr\xff",
            )
            msg = await asyncio.to_thread(received.get, True, 10)
            body = json.loads(msg.payload)
            assert body["id"] == "call-1"
            assert text_of(body) == "paho"
            assert msg.properties.CorrelationData == b"\x00corr\xff"
            assert ("MCP-COMPONENT-TYPE", "mcp-server") in msg.properties.UserProperty
            assert msg.topic == response_topic
            # malformed JSON: a parse error with id null, correlation echoed
            publish(b"{not json", b"bad")
            msg = await asyncio.to_thread(received.get, True, 10)
            body = json.loads(msg.payload)
            assert body["id"] is None
            assert body["error"]["code"] == -32700
            assert msg.properties.CorrelationData == b"bad"
            # no correlation data: none in the answer
            publish(b'{"jsonrpc":"2.0","id":7,"method":"ping"}', None)
            msg = await asyncio.to_thread(received.get, True, 10)
            assert json.loads(msg.payload) == {"jsonrpc": "2.0", "id": 7, "result": {}}
            assert not hasattr(msg.properties, "CorrelationData")
        finally:
            dev.disconnect()
            dev.loop_stop()
        assert server.stats.parse_errors == 1


async def test_bad_device_messages(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    server_handler = RawServer()
    async with (
        bridge(mosquitto, server_handler) as server,
        mqtt_client(mosquitto) as c,
    ):
        reply_topic = f"devices/{uid()}"
        inbox = Inbox(c, reply_topic)
        await inbox.sub.wait_granted()
        props = PublishProperties(response_topic=reply_topic, correlation_data=b"c")

        async def send(payload: bytes, properties: PublishProperties | None) -> None:
            await c.publish_wait(server.request_topic, payload, properties=properties)

        async def answer() -> dict[str, Any]:
            body: dict[str, Any] = json.loads((await inbox.next()).payload)
            return body

        # no Response Topic: counted and dropped
        await send(b'{"jsonrpc":"2.0","id":1,"method":"test/echo"}', None)
        await wait_for(lambda: server.stats.no_response_topic == 1)
        assert "without a Response Topic" in caplog.text
        # the request topic itself as Response Topic, or one that is not a
        # topic name (the broker would refuse it: delivered here directly)
        await send(
            b'{"jsonrpc":"2.0","id":1,"method":"test/echo"}',
            PublishProperties(response_topic=server.request_topic),
        )
        server._on_message(
            Message(
                server.request_topic,
                b'{"jsonrpc":"2.0","id":1,"method":"test/echo"}',
                properties=PublishProperties(response_topic="a/+/b"),
            )
        )
        await wait_for(lambda: server.stats.no_response_topic == 3)
        assert "unusable Response Topic" in caplog.text
        # malformed JSON without a Response Topic: counted only
        await send(b"[", None)
        await wait_for(lambda: server.stats.parse_errors == 1)
        cases: list[tuple[bytes, Any, int]] = [
            (b"{nope", None, -32700),
            (b"[]", None, -32600),
            (b'{"jsonrpc":"1.0","id":1,"method":"x"}', None, -32600),
            (b'{"jsonrpc":"2.0","id":4}', 4, -32600),
            (b'{"jsonrpc":"2.0","id":[1],"method":5}', None, -32600),
            (b'{"jsonrpc":"2.0","id":true,"method":"x"}', None, -32600),
            (b'{"jsonrpc":"2.0","id":null,"method":"x"}', None, -32600),
            (b'{"jsonrpc":"2.0","id":6,"method":"x","params":5}', 6, -32600),
            (b'{"jsonrpc":"2.0","method":"x/y","params":5}', None, -32600),
        ]
        for payload, expected_id, code in cases:
            await send(payload, props)
            body = await answer()
            assert (body["id"], body["error"]["code"]) == (expected_id, code), payload
        assert server.stats.parse_errors == 1 + len(cases)
        # a device response (to nothing) and a cancellation of nothing: dropped
        await send(b'{"jsonrpc":"2.0","id":3,"result":{}}', props)
        await send(
            b'{"jsonrpc":"2.0","method":"notifications/cancelled",'
            b'"params":{"requestId":99}}',
            props,
        )
        await send(
            b'{"jsonrpc":"2.0","method":"notifications/cancelled",'
            b'"params":{"requestId":99}}',
            None,
        )
        await wait_for(lambda: server.stats.dropped == 2)
        assert server.stats.no_response_topic == 4
        # the bridge keeps serving
        await send(b'{"jsonrpc":"2.0","id":1,"method":"test/echo"}', props)
        body = await answer()
        assert body == {"jsonrpc": "2.0", "id": 1, "result": {"echo": {}}}
        assert inbox.messages == []


# --------------------------------------------------------------------------- #
# With an in-process upstream server
# --------------------------------------------------------------------------- #


async def test_progress_and_server_messages_are_routed(mosquitto: Mosquitto) -> None:
    upstream = RawServer()
    async with bridge(mosquitto, upstream) as server:
        notes: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
        async with (
            device(mosquitto, server, on_notification=notes["a"].append) as a,
            device(
                mosquitto,
                server,
                on_notification=notes["b"].append,
                server_notifications=True,
            ) as b,
            mqtt_client(mosquitto) as observer,
        ):
            everything = Inbox(observer, f"{server.request_topic}/#")
            await everything.sub.wait_granted()
            # both devices use id 1 and progress token "tok"
            results = await asyncio.gather(
                *(
                    dev.request(
                        "test/progress",
                        {"_meta": {"progressToken": "tok"}, "tag": tag},
                        request_id=1,
                    )
                    for dev, tag in ((a, "a"), (b, "b"))
                )
            )
            assert [r["id"] for r in results] == [1, 1]
            seen = [s for s in upstream.seen if s.get("method") == "test/progress"]
            tokens = {s["params"]["_meta"]["progressToken"] for s in seen}
            ids = {s["id"] for s in seen}
            assert tokens == ids  # the bridge id doubles as the progress token
            assert len(ids) == 2
            assert all(str(i).startswith(ID_PREFIX) for i in ids)
            # the server saw (and answered with) the namespaced tokens
            assert {r["result"]["token"] for r in results} == ids
            await wait_for(lambda: len(notes["b"]) == 3 and len(notes["a"]) == 1)
            for name in ("a", "b"):
                progress = [
                    n for n in notes[name] if n["method"] == "notifications/progress"
                ]
                assert progress == [
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/progress",
                        "params": {"progressToken": "tok", "progress": 1, "total": 2},
                    }
                ]
            logged = [n for n in notes["b"] if n["method"] == "notifications/message"]
            assert sorted(n["params"]["data"] for n in logged) == ["a", "b"]
            assert server.stats.dropped == 2  # progress for an unknown token
            # server->client requests: refused with -32601, ping answered
            refused = await a.request("test/ask", {"method": "sampling/createMessage"})
            inner = refused["result"]["answer"]
            assert inner["error"]["code"] == -32601
            assert inner["id"] == "ask-0"
            pong = await a.request("test/ask", {"method": "ping"})
            assert pong["result"]["answer"]["result"] == {}
            assert server.stats.server_requests == 1
            # every bridge publish carries the user properties
            await wait_for(lambda: len(everything.messages) >= 6)
            for message in everything.messages:
                if message.topic.startswith(f"{server.request_topic}/response/"):
                    assert message.properties is not None
                    user = dict(message.properties.user_properties)
                    assert user["MCP-COMPONENT-TYPE"] == "mcp-server"
            on_notifications = [
                m
                for m in everything.messages
                if m.topic == notifications_topic(server.request_topic)
            ]
            assert len(on_notifications) >= 2


async def test_cancel_unknown_and_late_answers(mosquitto: Mosquitto) -> None:
    upstream = RawServer()
    async with (
        bridge(mosquitto, upstream) as server,
        device(mosquitto, server) as dev,
    ):
        held = asyncio.create_task(dev.request("test/hold", request_id="h1", timeout=1))
        await wait_for(lambda: upstream.held)
        dev.notify("notifications/cancelled", {"requestId": "h1", "reason": "bored"})
        await wait_for(lambda: server.pending_requests == 0)
        with pytest.raises(TimeoutError):
            await held  # cancelled requests get no answer (MCP "Cancellation")
        cancelled = [
            s for s in upstream.seen if s.get("method") == "notifications/cancelled"
        ]
        assert cancelled[0]["params"] == {
            "requestId": upstream.held[0],
            "reason": "bored",
        }
        released = await dev.request("test/release")
        assert released["result"] == {"released": True}
        assert server.stats.unknown_responses == 3  # late, foreign str id, int id
        assert server.stats.notifications == 1


async def test_limits(mosquitto: Mosquitto) -> None:
    upstream = RawServer()
    async with (
        bridge(mosquitto, upstream, max_clients=1, max_pending=2) as server,
        device(mosquitto, server) as a,
        device(mosquitto, server) as b,
    ):
        holds = [asyncio.create_task(a.request("test/hold", timeout=5))]
        await wait_for(lambda: len(upstream.held) == 1)
        refused = await b.request("test/echo")
        assert refused["error"]["code"] == -32000
        assert "too many clients" in refused["error"]["message"]
        holds.append(asyncio.create_task(a.request("test/hold", timeout=5)))
        await wait_for(lambda: len(upstream.held) == 2)
        refused = await a.request("test/echo")
        assert refused["error"]["code"] == -32000
        assert "too many requests" in refused["error"]["message"]
        assert server.stats.rejected == 2
        for task in holds:
            task.cancel()
        await asyncio.wait(holds)


async def test_handler_end_fails_pending_and_restarts(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mcp_mqtt_simple, "HEALTHY_AFTER", 0.0)  # backoff reset
    upstream = RawServer()
    async with (
        bridge(mosquitto, upstream) as server,
        device(mosquitto, server) as dev,
    ):
        held = asyncio.create_task(dev.request("test/hold"))
        await wait_for(lambda: upstream.held)
        upstream.init_gate = asyncio.Event()  # the next initialize waits
        upstream.got_initialize.clear()
        quit_answer = await dev.request("test/quit")
        assert quit_answer["error"] == {
            "code": -32603,
            "message": "MCP server session ended",
        }
        assert (await held)["error"]["code"] == -32603
        # requests while the session is down wait for the restarted one
        waiting = asyncio.create_task(dev.request("test/echo", {"n": 1}))
        init = asyncio.create_task(dev.request("initialize", {}, request_id="again"))
        await upstream.got_initialize.wait()
        await asyncio.sleep(0.1)
        assert not waiting.done()
        upstream.init_gate.set()
        assert (await waiting)["result"] == {"echo": {"n": 1}}
        assert (await init)["result"]["serverInfo"]["name"] == "raw"
        assert upstream.runs == 2
        assert upstream.inits == 2
        assert server.stats.restarts == 1
        assert server.stats.sessions_started == 2
        assert server.pending_requests == 0


async def test_device_initialize_before_the_first_session(
    mosquitto: Mosquitto,
) -> None:
    upstream = RawServer()
    upstream.init_gate = asyncio.Event()
    async with bridge(mosquitto, upstream, wait=False) as server:
        await upstream.got_initialize.wait()
        assert not server.ready
        async with device(mosquitto, server) as dev:
            init = asyncio.create_task(dev.request("initialize", {}))
            echo = asyncio.create_task(dev.request("test/echo", {"x": 1}))
            dev.notify("notifications/roots/list_changed")
            # a request cancelled before it reached the server is just forgotten
            dropped = asyncio.create_task(
                dev.request("test/echo", request_id="gone", timeout=0.5)
            )
            await wait_for(lambda: len(server._backlog) == 3)
            assert server.pending_requests == 3
            dev.notify("notifications/cancelled", {"requestId": "gone"})
            await wait_for(lambda: server.pending_requests == 2)
            with pytest.raises(TimeoutError):
                await dropped
            upstream.init_gate.set()
            assert (await init)["result"]["serverInfo"] == {
                "name": "raw",
                "version": "1",
            }
            assert (await echo)["result"] == {"echo": {"x": 1}}
            assert server.ready
            await wait_for(
                lambda: any(
                    s.get("method") == "notifications/roots/list_changed"
                    for s in upstream.seen
                )
            )


async def test_failing_handlers_are_restarted(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = RawServer(("raise", "init-error", "stuck"))
    async with (
        bridge(
            mosquitto, upstream, init_timeout=0.3, close_grace=0.2, request_timeout=20
        ) as server,
        device(mosquitto, server) as dev,
    ):
        assert upstream.runs == 4
        assert server.stats.handler_failures == 4  # raised (2 counts), error, stuck
        assert server.stats.restarts == 3
        answer = await dev.request("test/echo")
        assert answer["result"] == {"echo": {}}
    assert "session handler failed" in caplog.text
    assert "initialize failed" in caplog.text
    assert "did not initialize" in caplog.text


async def test_stop_answers_pending_requests(mosquitto: Mosquitto) -> None:
    upstream = RawServer()
    async with device_and_bridge(mosquitto, upstream) as (server, dev, stop):
        held = asyncio.create_task(dev.request("test/hold"))
        await wait_for(lambda: upstream.held)
        await stop()
        answer = await held
        assert answer["error"] == {"code": -32603, "message": "MCP bridge stopped"}
        assert server.pending_requests == 0


async def test_stop_answers_requests_waiting_for_the_session(
    mosquitto: Mosquitto,
) -> None:
    upstream = RawServer()
    upstream.init_gate = asyncio.Event()  # never initialized
    async with (
        device_and_bridge(mosquitto, upstream, ready=False) as (server, dev, stop),
    ):
        await upstream.got_initialize.wait()
        waiting = asyncio.create_task(dev.request("test/echo"))
        await wait_for(lambda: server.pending_requests == 1)
        await stop()
        answer = await waiting
        assert answer["error"] == {"code": -32603, "message": "MCP bridge stopped"}
        assert server._backlog == []


@asynccontextmanager
async def device_and_bridge(
    broker: Mosquitto, handler: Any, *, ready: bool = True
) -> AsyncIterator[tuple[SimpleMcpMqttServer, SimpleMcpMqttClient, Any]]:
    """A bridge whose run task the test can stop while a device stays connected."""
    async with mqtt_client(broker) as client:
        server = SimpleMcpMqttServer(
            client, f"test/{uid()}/s", handler=handler, close_grace=0.2
        )
        task = asyncio.create_task(server.run())

        async def stop() -> None:
            task.cancel()
            await asyncio.wait({task})

        try:
            if ready:
                async with asyncio.timeout(10):
                    await server.wait_ready()
            async with device(broker, server) as dev:
                yield server, dev, stop
        finally:
            await stop()


# --------------------------------------------------------------------------- #
# Without a broker
# --------------------------------------------------------------------------- #


async def test_unit_edges() -> None:
    async def handler(_cid: str, _read: Any, _write: Any) -> None:
        return

    client = MqttClient(MqttSettings("127.0.0.1", 1), client_id="offline")
    with pytest.raises(ValueError, match="invalid topic"):
        SimpleMcpMqttServer(client, "a/+", handler=handler)
    server = SimpleMcpMqttServer(client, "a/b", handler=handler, max_pending=1)
    assert server.notifications_topic == "a/b/notifications"
    assert server.session_id == "simple:a/b"
    # a publish without a connection is counted, not raised
    server._publish("a/b/x", b"{}", None)
    assert server.stats.publish_errors == 1
    note = SessionMessage(_ADAPTER.validate_python({"jsonrpc": "2.0", "method": "x/y"}))
    # no session and a full backlog: notifications are dropped
    server._forward(None, note)
    server._forward(None, note)
    assert server.stats.dropped == 1
    assert len(server._backlog) == 1
    # a full upstream buffer refuses, a closed one keeps the message for later
    send, receive = anyio.create_memory_object_stream[Any](0)
    server._to_handler = send
    server._forward(None, note)
    assert server.stats.dropped == 2
    send.close()
    receive.close()
    server._forward(None, note)
    assert len(server._backlog) == 2
    server._send_upstream({"jsonrpc": "2.0", "method": "x/y"})  # suppressed
    # a request meeting a full upstream buffer: "busy" (published if it could be)
    send, receive = anyio.create_memory_object_stream[Any](0)
    server._to_handler = send
    server._backlog.clear()
    server._on_message(
        Message(
            "a/b",
            b'{"jsonrpc":"2.0","id":1,"method":"x/y"}',
            properties=PublishProperties(response_topic="a/b/r"),
        )
    )
    assert server.pending_requests == 0
    assert server.stats.rejected == 3
    assert server.stats.publish_errors == 2
    send.close()
    receive.close()
    server._to_handler = None
    server._send_upstream({"jsonrpc": "2.0", "method": "x/y"})  # no session


async def test_client_edges(mosquitto: Mosquitto) -> None:
    async with mqtt_client(mosquitto) as c:
        topic = f"test/{uid()}/nobody"
        notes: list[dict[str, Any]] = []
        dev = SimpleMcpMqttClient(
            c, topic, client_id="me", on_notification=notes.append
        )
        assert dev.response_topic == f"{topic}/response/me"
        async with dev:
            with pytest.raises(TimeoutError):
                await dev.request("tools/list", timeout=0.2)
            assert dev._waiting == {}
            for payload in (b"{bad", b"[1]", b'{"jsonrpc":"2.0","method":"n"}'):
                await c.publish_wait(dev.response_topic, payload)
            await wait_for(lambda: notes)
            assert notes == [{"jsonrpc": "2.0", "method": "n"}]
            pending = asyncio.create_task(dev.request("tools/list", timeout=5))
            await wait_for(lambda: dev._waiting)
        with pytest.raises(ConnectionError):
            await pending
