"""The MQTT tools (engine/mqtt_tools.py) against a real Mosquitto and a real 3.1.1 broker.

Independent peers are aiomqtt clients (``tests.test_mqtt_client.peer``) or a
second :class:`MqttClient`; every test uses topics of its own under a unique
prefix on the shared session broker.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterable
import contextlib
from dataclasses import dataclass
from datetime import datetime
import json
import re
from typing import Any, cast

import pytest

from custom_components.mqtt_bridge.engine import mqtt_tools
from custom_components.mqtt_bridge.engine.acl import (
    Acl,
    AclDecision,
    AclRule,
    Permission,
)
from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.mqtt_client import (
    ConnectionLostError,
    Message,
    MqttClient,
    MqttSettings,
    ProtocolVersion,
    PublishProperties,
)
from custom_components.mqtt_bridge.engine.mqtt_tools import (
    ERR_CONNECTION_LOST,
    ERR_DENIED,
    ERR_INTERNAL,
    ERR_INVALID,
    ERR_NOT_CONNECTED,
    ERR_PUBLISH_TIMEOUT,
    ERR_REFUSED,
    ERR_RESPONSE_TOPIC,
    ERR_SUBSCRIBE_TIMEOUT,
    ERR_UNKNOWN_TOOL,
    MqttTools,
    ToolResult,
)
from custom_components.mqtt_bridge.engine.subscriptions import (
    FilterState,
    Subscription,
    SubscriptionRefusedError,
)
from custom_components.mqtt_bridge.engine.tool_arguments import validate_arguments
from custom_components.mqtt_bridge.engine.tool_output import (
    ReceivedMessage as _Received,
    fit_collection as _fit_collection,
    render_fitting as _render_fitting,
)
from custom_components.mqtt_bridge.engine.tool_specs import TOOL_NAMES, ToolLimits
from custom_components.mqtt_bridge.engine.topic_store import TopicStore as _TopicStore
from devkit.mosquitto import Mosquitto
from devkit.rabbitmq import RabbitMQ
from tests.common import wait_for
from tests.test_mqtt_client import peer, running, settings_for, unique

READ = frozenset({Permission.READ})
WRITE = frozenset({Permission.WRITE})
BOTH = READ | WRITE


def rule(
    pattern: str, permissions: frozenset[Permission], description: str = ""
) -> AclRule:
    return AclRule(pattern, permissions, description)


@dataclass
class Rules:
    """The ACL provider of a test: assign ``acl`` to change the rules."""

    acl: Acl

    def set(self, *rules: AclRule) -> None:
        self.acl = Acl(rules)


@dataclass
class Env:
    client: MqttClient
    tools: MqttTools
    rules: Rules

    async def call(self, name: str, **arguments: Any) -> ToolResult:
        result = await self.tools.call(name, arguments)
        assert isinstance(result.text, str)
        json.dumps(result.structured)  # always JSON-serialisable
        return result


@contextlib.asynccontextmanager
async def tools_on(
    settings: MqttSettings,
    rules: Iterable[AclRule],
    *,
    limits: ToolLimits | None = None,
    start: bool = True,
    **client_kwargs: Any,
) -> AsyncIterator[Env]:
    provider = Rules(Acl(rules))
    async with running(settings, **client_kwargs) as client:
        tools = MqttTools(client, lambda: provider.acl, limits)
        if start:
            await tools.start()
        try:
            yield Env(client, tools, provider)
        finally:
            await tools.stop()
    # Every subscription of the calls and of the store is gone.
    assert client.registry.filters == frozenset()


def ok(result: ToolResult) -> dict[str, Any]:
    assert not result.is_error, result.text
    assert result.allowed
    return result.structured


def failed(result: ToolResult, code: str) -> dict[str, Any]:
    assert result.is_error, result.text
    assert result.structured["error"] == code, result.text
    assert result.allowed is (code != ERR_DENIED)
    return result.structured


def granted(client: MqttClient, topic_filter: str) -> bool:
    return client.registry.state_of(topic_filter) is FilterState.GRANTED


# -- specs -----------------------------------------------------------------------------


async def test_specs_describe_tools_with_current_rules(mosquitto: Mosquitto) -> None:
    async with tools_on(
        settings_for(mosquitto),
        [rule("sensors/+/temperature", READ, "room temperatures")],
        start=False,
    ) as env:
        specs = {spec.name: spec for spec in env.tools.specs()}
        assert tuple(specs) == TOOL_NAMES
        for spec in specs.values():
            schema = spec.input_schema
            assert schema["type"] == "object"
            assert schema["additionalProperties"] is False
            assert set(schema["required"]) <= set(schema["properties"])
        assert specs["mqtt_publish"].input_schema["required"] == ["topic", "payload"]
        assert specs["mqtt_query"].input_schema["required"] == [
            "request_topic",
            "payload",
        ]
        assert specs["mqtt_topics"].input_schema["required"] == []
        assert (
            "sensors/+/temperature: room temperatures" in specs["mqtt_read"].description
        )
        assert "No topic is writable" in specs["mqtt_publish"].description
        annotations = {name: spec.annotations for name, spec in specs.items()}
        assert annotations["mqtt_publish"].destructive
        assert not annotations["mqtt_publish"].read_only
        assert not annotations["mqtt_query"].read_only
        for name in ("mqtt_read", "mqtt_subscribe", "mqtt_topics"):
            assert annotations[name].read_only
            assert not annotations[name].destructive
        assert all(a.open_world for a in annotations.values())

        # Rules change: the next specs() shows the new ones, no restart.
        env.rules.set(rule("lights/+/set", WRITE, "switch a light"))
        env.tools.refresh_acl()  # not started: nothing to subscribe
        assert env.client.registry.filters == frozenset()
        specs = {spec.name: spec for spec in env.tools.specs()}
        assert "lights/+/set: switch a light" in specs["mqtt_publish"].description
        assert "No topic is readable" in specs["mqtt_read"].description
        assert "lights/+/set" in specs["mqtt_query"].description


# -- mqtt_publish -----------------------------------------------------------------------


async def test_publish_allowed_reaches_subscriber(mosquitto: Mosquitto) -> None:
    base = unique("pub")
    async with (
        peer(mosquitto, f"{base}/#") as spy,
        tools_on(settings_for(mosquitto), [rule(f"{base}/+/set", WRITE)]) as env,
    ):
        result = await env.call(
            "mqtt_publish", topic=f"{base}/lamp/set", payload="ON", qos=1
        )
        structured = ok(result)
        assert structured == {
            "topic": f"{base}/lamp/set",
            "published": True,
            "qos": 1,
            "retain": False,
            "payload_bytes": 2,
        }
        assert result.topic == f"{base}/lamp/set"
        assert result.text.startswith("Published 2 bytes")
        raw = bytes(range(256))
        ok(
            await env.call(
                "mqtt_publish",
                topic=f"{base}/blob/set",
                payload=base64.b64encode(raw).decode(),
                payload_encoding="base64",
                qos=2,
            )
        )
        await wait_for(lambda: len(spy.messages) == 2)
        assert spy.payloads() == [b"ON", raw]
        assert env.tools.stats.published == 2
        assert env.tools.stats.calls == 2


async def test_publish_denied_sends_nothing(mosquitto: Mosquitto) -> None:
    base = unique("deny")
    async with (
        peer(mosquitto, f"{base}/#") as spy,
        tools_on(
            settings_for(mosquitto),
            [
                rule(f"{base}/ok", WRITE, "the only writable topic"),
                rule(f"{base}/#", READ),
            ],
        ) as env,
    ):
        filters = env.client.registry.filters
        result = await env.call("mqtt_publish", topic=f"{base}/secret", payload="x")
        structured = failed(result, ERR_DENIED)
        assert structured["permission"] == "write"
        assert structured["topic"] == f"{base}/secret"
        assert structured["allowed_patterns"] == [
            {"pattern": f"{base}/ok", "description": "the only writable topic"}
        ]
        assert "write" in result.text
        assert f"{base}/secret" in result.text
        assert f"{base}/ok" in result.text
        # $share/ is never a topic to publish to.
        failed(
            await env.call("mqtt_publish", topic=f"$share/g/{base}/ok", payload="x"),
            ERR_DENIED,
        )
        # A query with no write permission on its request topic publishes nothing.
        failed(
            await env.call(
                "mqtt_query",
                request_topic=f"{base}/secret",
                payload="x",
                response_topic=f"{base}/r",
            ),
            ERR_DENIED,
        )
        assert env.client.registry.filters == filters  # nothing subscribed either
        assert env.client.stats.published == 0
        # A marker published afterwards arrives alone: the denied ones never left.
        ok(await env.call("mqtt_publish", topic=f"{base}/ok", payload="marker", qos=1))
        await wait_for(lambda: len(spy.messages) >= 1)
        await asyncio.sleep(0.05)
        assert spy.payloads() == [b"marker"]
        assert env.tools.stats.denied == 3
        assert env.tools.stats.errors == 3


async def test_publish_retained_then_read_non_utf8(mosquitto: Mosquitto) -> None:
    topic = unique("bin") + "/raw"
    payload = b"\xff\xfe\x00\x80binary"
    async with tools_on(settings_for(mosquitto), [rule(topic, BOTH)]) as env:
        ok(
            await env.call(
                "mqtt_publish",
                topic=topic,
                payload=base64.b64encode(payload).decode(),
                payload_encoding="base64",
                retain=True,
                qos=1,
            )
        )
        message = ok(await env.call("mqtt_read", topic=topic, timeout=2))["message"]
        assert message["payload_encoding"] == "base64"
        assert base64.b64decode(message["payload"]) == payload
        assert message["payload_bytes"] == len(payload)
        assert message["retain"] is True
        # Clear the retained value again (empty retained payload).
        ok(await env.call("mqtt_publish", topic=topic, payload="", retain=True, qos=1))
        result = await env.call("mqtt_read", topic=topic, timeout=0.2)
        assert ok(result)["message"] is None


async def test_publish_broker_refuses(mosquitto: Mosquitto) -> None:
    # Mosquitto refuses writes to $SYS (PUBACK "Not authorized"), whatever our ACL says.
    async with tools_on(settings_for(mosquitto), [rule("$SYS/#", WRITE)]) as env:
        structured = failed(
            await env.call(
                "mqtt_publish", topic="$SYS/mqtt-tools-test", payload="x", qos=1
            ),
            ERR_REFUSED,
        )
        assert structured["reason_code"] == 135
        assert env.tools.stats.published == 0


async def test_publish_connection_lost_and_ack_timeout(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = unique("lost")
    async with tools_on(
        settings_for(mosquitto),
        [rule(topic, WRITE), rule(f"{topic}/#", READ)],
        limits=ToolLimits(max_timeout=0.1),
        start=False,
    ) as env:

        async def lost(*_args: Any, **_kwargs: Any) -> None:
            raise ConnectionLostError("the broker session ended")

        monkeypatch.setattr(env.client, "publish_wait", lost)
        result = await env.call("mqtt_publish", topic=topic, payload="x", qos=1)
        assert "may or may not" in failed(result, ERR_CONNECTION_LOST)["message"]
        result = await env.call("mqtt_query", request_topic=topic, payload="x")
        failed(result, ERR_CONNECTION_LOST)

        async def never(*_args: Any, **_kwargs: Any) -> None:
            await asyncio.Event().wait()

        monkeypatch.setattr(env.client, "publish_wait", never)
        failed(
            await env.call("mqtt_publish", topic=topic, payload="x", qos=1),
            ERR_PUBLISH_TIMEOUT,
        )


# -- mqtt_read ------------------------------------------------------------------------


async def test_read_retained_value(mosquitto: Mosquitto) -> None:
    base = unique("ret")
    async with peer(mosquitto) as p:
        await p.client.publish(f"{base}/t", b"21.5", qos=1, retain=True)
        async with tools_on(settings_for(mosquitto), [rule(f"{base}/#", READ)]) as env:
            result = await env.call("mqtt_read", topic=f"{base}/t")
            structured = ok(result)
            assert structured["timed_out"] is False
            message = structured["message"]
            assert message["topic"] == f"{base}/t"
            assert message["payload"] == "21.5"
            assert message["payload_encoding"] == "text"
            assert message["retain"] is True
            assert message["qos"] == 1
            assert datetime.fromisoformat(message["timestamp"]).tzinfo is not None
            assert message["timestamp"].endswith("Z")
            assert "retained value" in result.text
            assert env.tools.stats.received == 1
        await p.client.publish(f"{base}/t", b"", qos=1, retain=True)


async def test_read_wildcard_retained_and_next_message(mosquitto: Mosquitto) -> None:
    base = unique("wild")
    async with (
        peer(mosquitto) as p,
        tools_on(settings_for(mosquitto), [rule(f"{base}/+/temperature", READ)]) as env,
    ):
        props_topic = f"{base}/kitchen/temperature"
        await p.client.publish(props_topic, b"19", qos=1, retain=True)
        structured = ok(await env.call("mqtt_read", topic=f"{base}/+/temperature"))
        assert structured["message"]["topic"] == props_topic
        assert structured["message"]["payload"] == "19"
        await p.client.publish(props_topic, b"", qos=1, retain=True)

        # No retained value: the next message published wins, whichever topic.
        call = asyncio.create_task(
            env.tools.call(
                "mqtt_read", {"topic": f"{base}/+/temperature", "timeout": 5}
            )
        )
        await wait_for(lambda: granted(env.client, f"{base}/+/temperature"))
        await p.client.publish(f"{base}/hall/humidity", b"no", qos=1)  # not matching
        await p.client.publish(f"{base}/hall/temperature", b"22", qos=1)
        structured = ok(await call)
        assert structured["message"]["topic"] == f"{base}/hall/temperature"
        assert structured["message"]["payload"] == "22"
        assert structured["message"]["retain"] is False


async def test_read_timeout_is_empty_result(mosquitto: Mosquitto) -> None:
    topic = unique("quiet") + "/x"
    async with tools_on(
        settings_for(mosquitto), [rule(topic, READ)], start=False
    ) as env:
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = await env.call("mqtt_read", topic=topic, timeout=0.2)
        assert 0.19 <= loop.time() - started < 1.0
        assert ok(result) == {"topic": topic, "message": None, "timed_out": True}
        assert "No message" in result.text
        assert env.client.registry.state_of(topic) is None  # unsubscribed


async def test_read_denied_subscribes_nothing(mosquitto: Mosquitto) -> None:
    base = unique("rd")
    async with tools_on(
        settings_for(mosquitto), [rule(f"{base}/+", READ, "one level")], start=False
    ) as env:
        result = await env.call("mqtt_read", topic=f"{base}/#")
        structured = failed(result, ERR_DENIED)
        assert structured["permission"] == "read"
        assert f"{base}/+ (one level)" in result.text
        failed(await env.call("mqtt_subscribe", topic=f"{base}/#"), ERR_DENIED)
        assert env.client.registry.filters == frozenset()


async def test_sys_read_denied_under_hash_rule(mosquitto: Mosquitto) -> None:
    async with tools_on(
        settings_for(mosquitto), [rule("#", READ, "everything")]
    ) as env:
        result = await env.call("mqtt_read", topic="$SYS/broker/version")
        failed(result, ERR_DENIED)
        assert "$SYS/broker/version" in result.text
        assert "# (everything)" in result.text
        failed(await env.call("mqtt_subscribe", topic="$SYS/#"), ERR_DENIED)
        failed(await env.call("mqtt_topics", topic="$SYS/#"), ERR_DENIED)
        # An explicit $SYS rule grants it (Mosquitto retains its version there).
        env.rules.set(rule("$SYS/broker/#", READ))
        message = ok(
            await env.call("mqtt_read", topic="$SYS/broker/version", timeout=2)
        )["message"]
        assert message["payload"].startswith("mosquitto version")


class HidingAcl(Acl):
    """Rules whose read check also hides topics ending in ``/hidden``."""

    def check_read_topic(self, topic: str) -> AclDecision:
        if topic.endswith("/hidden"):
            return AclDecision(False, Permission.READ, topic, None, "hidden")
        return super().check_read_topic(topic)


async def test_deliveries_filtered_by_read_check(mosquitto: Mosquitto) -> None:
    """Every delivery goes through check_read_topic, for calls and for the store."""
    base = unique("filt")
    async with (
        peer(mosquitto) as p,
        tools_on(settings_for(mosquitto), []) as env,
    ):
        env.rules.acl = HidingAcl([rule(f"{base}/+", READ)])
        env.tools.refresh_acl()
        call = asyncio.create_task(
            env.tools.call(
                "mqtt_subscribe",
                {"topic": f"{base}/+", "timeout": 5, "max_messages": 2},
            )
        )
        await wait_for(lambda: granted(env.client, f"{base}/+"))
        for name in ("hidden", "a", "b"):
            await p.client.publish(f"{base}/{name}", name.encode(), qos=1)
        structured = ok(await call)
        assert [m["topic"] for m in structured["messages"]] == [
            f"{base}/a",
            f"{base}/b",
        ]
        topics = ok(await env.call("mqtt_topics"))["topics"]
        assert [t["topic"] for t in topics] == [f"{base}/a", f"{base}/b"]
        assert env.tools.stats.filtered >= 2  # the call's copy and the store's


async def test_read_shared_subscription(mosquitto: Mosquitto) -> None:
    base = unique("share")
    async with (
        peer(mosquitto) as p,
        tools_on(
            settings_for(mosquitto), [rule(f"{base}/+", READ)], start=False
        ) as env,
    ):
        shared = f"$share/g/{base}/+"
        call = asyncio.create_task(
            env.tools.call("mqtt_read", {"topic": shared, "timeout": 5})
        )
        await wait_for(lambda: granted(env.client, shared))
        await p.client.publish(f"{base}/a", b"1", qos=1)
        assert ok(await call)["message"]["payload"] == "1"


# -- mqtt_subscribe -----------------------------------------------------------------


async def test_subscribe_wildcard_collects_and_unsubscribes(
    mosquitto: Mosquitto,
) -> None:
    base = unique("sub")
    async with (
        peer(mosquitto) as p,
        tools_on(
            settings_for(mosquitto), [rule(f"{base}/#", READ)], start=False
        ) as env,
    ):
        await p.client.publish(f"{base}/state", b"retained", qos=1, retain=True)
        call = asyncio.create_task(
            env.tools.call(
                "mqtt_subscribe",
                {"topic": f"{base}/#", "timeout": 5, "max_messages": 4},
            )
        )
        await wait_for(lambda: granted(env.client, f"{base}/#"))
        for index in range(3):
            await p.client.publish(f"{base}/dev{index}/x", f"m{index}".encode(), qos=1)
        result = await call
        structured = ok(result)
        assert structured["messages_received"] == 4
        assert structured["timed_out"] is False
        assert structured["summarised"] is False
        messages = structured["messages"]
        assert messages[0] == messages[0] | {"topic": f"{base}/state", "retain": True}
        assert [m["payload"] for m in messages[1:]] == ["m0", "m1", "m2"]
        assert [m["topic"] for m in messages[1:]] == [
            f"{base}/dev{i}/x" for i in range(3)
        ]
        assert "Collected 4 messages" in result.text
        assert env.client.registry.state_of(f"{base}/#") is None
        await p.client.publish(f"{base}/state", b"", qos=1, retain=True)


async def test_subscribe_waits_whole_timeout_through_gaps(mosquitto: Mosquitto) -> None:
    topic = unique("gap")
    async with (
        peer(mosquitto) as p,
        tools_on(settings_for(mosquitto), [rule(topic, READ)], start=False) as env,
    ):
        call = asyncio.create_task(
            env.tools.call(
                "mqtt_subscribe", {"topic": topic, "timeout": 0.6, "max_messages": 5}
            )
        )
        await wait_for(lambda: granted(env.client, topic))
        await p.client.publish(topic, b"1", qos=1)
        await asyncio.sleep(0.3)  # a quiet gap does not end the collection
        await p.client.publish(topic, b"2", qos=1)
        structured = ok(await call)
        assert [m["payload"] for m in structured["messages"]] == ["1", "2"]
        assert structured["timed_out"] is True
        assert structured["duration_seconds"] >= 0.55


async def test_subscribe_summarises_over_byte_budget(mosquitto: Mosquitto) -> None:
    base = unique("many")
    budget = 3000
    async with (
        peer(mosquitto) as p,
        tools_on(
            settings_for(mosquitto),
            [rule(f"{base}/#", READ)],
            limits=ToolLimits(max_result_bytes=budget),
            start=False,
        ) as env,
    ):
        call = asyncio.create_task(
            env.tools.call(
                "mqtt_subscribe",
                {"topic": f"{base}/#", "timeout": 5, "max_messages": 60},
            )
        )
        await wait_for(lambda: granted(env.client, f"{base}/#"))
        for index in range(60):
            await p.client.publish(
                f"{base}/{'a' if index % 3 else 'b'}",
                f"{index:03d}".encode() * 30,
                qos=1,
            )
        result = await call
        structured = ok(result)
        assert (
            len(
                json.dumps(
                    structured, ensure_ascii=False, separators=(",", ":")
                ).encode()
            )
            <= budget
        )
        assert structured["summarised"] is True
        assert structured["messages_received"] == 60
        shown = structured["messages"]
        assert 5 <= len(shown) < 60
        assert shown[0]["index"] == 0
        assert shown[0]["payload"].startswith("000")
        assert shown[-1]["index"] == 59
        assert shown[-1]["payload"].startswith("059")
        assert structured["omitted"] == 60 - len(shown)
        assert {t["topic"]: t["count"] for t in structured["per_topic"]} == {
            f"{base}/a": 40,
            f"{base}/b": 20,
        }
        assert "summarised" in result.text


async def test_retained_repeat_is_collected_once(mosquitto: Mosquitto) -> None:
    """A read of the same filter makes the broker re-send retained values: kept once."""
    base = unique("rep")
    async with (
        peer(mosquitto) as p,
        tools_on(
            settings_for(mosquitto), [rule(f"{base}/#", READ)], start=False
        ) as env,
    ):
        await p.client.publish(f"{base}/state", b"r", qos=1, retain=True)
        collecting = asyncio.create_task(
            env.tools.call(
                "mqtt_subscribe",
                {"topic": f"{base}/#", "timeout": 0.5, "max_messages": 5},
            )
        )
        await wait_for(lambda: granted(env.client, f"{base}/#"))
        read = ok(await env.call("mqtt_read", topic=f"{base}/#"))
        assert read["message"]["payload"] == "r"
        structured = ok(await collecting)
        assert [m["payload"] for m in structured["messages"]] == ["r"]
        await p.client.publish(f"{base}/state", b"", qos=1, retain=True)


# -- limits and arguments ----------------------------------------------------------


async def test_limits(mosquitto: Mosquitto) -> None:
    topic = unique("lim")
    limits = ToolLimits(max_payload_bytes=10, max_messages=3, max_timeout=0.2)
    async with tools_on(
        settings_for(mosquitto), [rule(topic, BOTH)], limits=limits, start=False
    ) as env:
        result = await env.call("mqtt_publish", topic=topic, payload="x" * 11)
        assert "11 bytes" in failed(result, ERR_INVALID)["message"]
        failed(
            await env.call(
                "mqtt_publish",
                topic=topic,
                payload=base64.b64encode(b"y" * 11).decode(),
                payload_encoding="base64",
            ),
            ERR_INVALID,
        )
        failed(
            await env.call("mqtt_query", request_topic=topic, payload="z" * 11),
            ERR_INVALID,
        )
        result = await env.call("mqtt_subscribe", topic=topic, max_messages=4)
        assert "at most 3" in failed(result, ERR_INVALID)["message"]
        assert (
            env.tools.specs()[2].input_schema["properties"]["max_messages"]["maximum"]
            == 3
        )
        # A timeout above the cap is capped, not refused.
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert ok(await env.call("mqtt_read", topic=topic, timeout=100))["timed_out"]
        assert loop.time() - started < 1.0
        assert env.client.stats.published == 0


async def test_large_payload_truncated_to_budget(mosquitto: Mosquitto) -> None:
    topic = unique("big")
    budget = 1000
    async with (
        peer(mosquitto) as p,
        tools_on(
            settings_for(mosquitto),
            [rule(topic, READ)],
            limits=ToolLimits(max_result_bytes=budget),
            start=False,
        ) as env,
    ):
        await p.client.publish(topic, "é".encode() * 5000, qos=1, retain=True)
        structured = ok(await env.call("mqtt_read", topic=topic))
        assert len(json.dumps(structured, ensure_ascii=False).encode()) <= budget
        message = structured["message"]
        assert message["payload_truncated"] is True
        assert message["payload_bytes"] == 10000
        assert set(message["payload"]) == {"é"}  # cut on a character boundary
        await p.client.publish(topic, b"", qos=1, retain=True)


@pytest.mark.parametrize(
    ("tool", "arguments", "fragment"),
    [
        ("mqtt_publish", {"topic": 1, "payload": "x"}, "'topic' must be a string"),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "x", "qos": "1"},
            "'qos' must be an integer",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "x", "qos": 3},
            "'qos' must be one of 0, 1, 2",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "x", "qos": True},
            "'qos' must be an integer",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "x", "retain": "yes"},
            "'retain' must be a boolean",
        ),
        ("mqtt_publish", {"topic": "a"}, "'payload' is required"),
        ("mqtt_publish", {"topic": "", "payload": "x"}, "'topic' must not be empty"),
        (
            "mqtt_publish",
            {"topic": "a/+", "payload": "x"},
            "not a valid MQTT topic name",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "x", "extra": 1},
            "unknown argument 'extra'",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "%%", "payload_encoding": "base64"},
            "not valid base64",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "\ud800"},
            "cannot be encoded as UTF-8",
        ),
        (
            "mqtt_publish",
            {"topic": "a", "payload": "x", "payload_encoding": "hex"},
            "'payload_encoding' must be one of",
        ),
        ("mqtt_read", {"topic": "a/#/b"}, "not a valid MQTT topic filter"),
        ("mqtt_read", {"topic": "a", "timeout": 0}, "'timeout' must be greater than 0"),
        (
            "mqtt_read",
            {"topic": "a", "timeout": float("nan")},
            "'timeout' must be a number",
        ),
        ("mqtt_read", {"topic": "a", "timeout": "5"}, "'timeout' must be a number"),
        ("mqtt_read", {"topic": "a", "x": 1, "y": 2}, "unknown arguments 'x', 'y'"),
        (
            "mqtt_subscribe",
            {"topic": "a", "max_messages": 0},
            "'max_messages' must be at least 1",
        ),
        (
            "mqtt_subscribe",
            {"topic": "a", "max_messages": 1.5},
            "'max_messages' must be an integer",
        ),
        (
            "mqtt_query",
            {"request_topic": "a", "payload": "x", "response_topic": "a"},
            "must differ",
        ),
        (
            "mqtt_query",
            {"request_topic": "a", "payload": "x", "response_topic": "r/#"},
            "not a valid MQTT topic name",
        ),
        ("mqtt_topics", {"scan_seconds": 11}, "'scan_seconds' must be at most 10"),
        ("mqtt_topics", {"scan_seconds": -1}, "'scan_seconds' must be at least 0"),
    ],
)
async def test_invalid_arguments(
    mosquitto: Mosquitto, tool: str, arguments: dict[str, Any], fragment: str
) -> None:
    async with tools_on(settings_for(mosquitto), [rule("#", BOTH)], start=False) as env:
        result = await env.tools.call(tool, arguments)
        structured = failed(result, ERR_INVALID)
        assert fragment in structured["message"], structured["message"]
        assert result.text.startswith(f"{tool}: ")
        assert env.tools.stats.errors == 1
        assert env.tools.stats.denied == 0
        assert env.client.stats.published == 0
        assert env.client.registry.filters == frozenset()


async def test_unknown_tool_and_odd_argument_objects(mosquitto: Mosquitto) -> None:
    async with tools_on(settings_for(mosquitto), [rule("#", BOTH)], start=False) as env:
        result = await env.tools.call("mqtt_delete_everything", {"topic": "a"})
        failed(result, ERR_UNKNOWN_TOOL)
        assert result.topic is None
        assert "mqtt_publish" in result.text
        result = await env.tools.call("mqtt_read", ["a"])  # type: ignore[arg-type]
        assert "must be an object" in failed(result, ERR_INVALID)["message"]
        # No arguments at all: mqtt_topics has defaults for everything.
        assert ok(await env.tools.call("mqtt_topics", None))["topic"] == "#"
        # null for an optional argument means its default.
        structured = ok(
            await env.tools.call("mqtt_topics", {"topic": None, "scan_seconds": None})
        )
        assert structured["topic"] == "#"
        assert structured["scanned_seconds"] == 0
        assert env.tools.stats.calls == 4


def test_validate_arguments_fills_defaults() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "default": 3},
            "b": {"type": "number", "default": 1.5},
        },
        "required": [],
        "additionalProperties": False,
    }
    assert validate_arguments(schema, {}) == {"a": 3, "b": 1.5}
    assert validate_arguments(schema, {"a": 2.0, "b": 2}) == {"a": 2, "b": 2}
    assert isinstance(validate_arguments(schema, {"a": 2.0})["a"], int)


async def test_internal_error_is_a_result(mosquitto: Mosquitto) -> None:
    async with running(settings_for(mosquitto)) as client:

        def broken() -> Acl:
            raise RuntimeError("rules unavailable")

        tools = MqttTools(client, broken)
        result = await tools.call("mqtt_read", {"topic": "a"})
        assert failed(result, ERR_INTERNAL)["message"].startswith("mqtt_read failed")
        assert result.topic == "a"


async def test_subscription_refused_or_unconfirmed(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = unique("ref")
    async with tools_on(
        settings_for(mosquitto),
        [rule(topic, BOTH), rule(f"{topic}/#", READ)],
        start=False,
    ) as env:

        async def refused(self: Subscription) -> None:
            raise SubscriptionRefusedError(
                f"broker refused {self.topic_filter!r}: not authorized"
            )

        monkeypatch.setattr(Subscription, "wait_granted", refused)
        failed(await env.call("mqtt_read", topic=topic), ERR_REFUSED)
        failed(await env.call("mqtt_subscribe", topic=topic), ERR_REFUSED)
        failed(
            await env.call(
                "mqtt_query",
                request_topic=topic,
                payload="x",
                response_topic=f"{topic}/r",
            ),
            ERR_REFUSED,
        )

        async def silent(self: Subscription) -> None:
            await asyncio.Event().wait()

        monkeypatch.setattr(Subscription, "wait_granted", silent)
        result = await env.call("mqtt_read", topic=topic, timeout=0.1)
        assert "(broker connected)" in failed(result, ERR_SUBSCRIBE_TIMEOUT)["message"]
        failed(
            await env.call(
                "mqtt_query",
                request_topic=topic,
                payload="x",
                response_topic=f"{topic}/r",
                timeout=0.1,
            ),
            ERR_SUBSCRIBE_TIMEOUT,
        )
        failed(
            await env.call("mqtt_query", request_topic=topic, payload="x", timeout=0.1),
            ERR_SUBSCRIBE_TIMEOUT,
        )
        failed(
            await env.call("mqtt_topics", topic=topic, scan_seconds=0.1),
            ERR_SUBSCRIBE_TIMEOUT,
        )
        assert env.client.stats.published == 0  # no request without a SUBACK
        assert env.client.registry.filters == frozenset()


# -- ACL changes ----------------------------------------------------------------------


async def test_acl_change_applies_to_next_call_without_reconnect(
    mosquitto: Mosquitto,
) -> None:
    base = unique("chg")
    async with peer(mosquitto) as p:
        await p.client.publish(f"{base}/a", b"A", qos=1, retain=True)
        await p.client.publish(f"{base}/b", b"B", qos=1, retain=True)
        async with tools_on(settings_for(mosquitto), []) as env:
            failed(await env.call("mqtt_read", topic=f"{base}/a"), ERR_DENIED)
            assert (
                "none"
                in (await env.call("mqtt_publish", topic=f"{base}/a", payload="x")).text
            )

            env.rules.set(rule(f"{base}/#", BOTH))
            env.tools.refresh_acl()
            assert (
                ok(await env.call("mqtt_read", topic=f"{base}/a"))["message"]["payload"]
                == "A"
            )
            await wait_for(lambda: env.tools.topics_known >= 2)
            assert f"{base}/#" in env.client.registry.filters

            env.rules.set(rule(f"{base}/b", READ))
            failed(await env.call("mqtt_read", topic=f"{base}/a"), ERR_DENIED)
            failed(
                await env.call("mqtt_publish", topic=f"{base}/b", payload="x"),
                ERR_DENIED,
            )
            env.tools.refresh_acl()
            assert f"{base}/#" not in env.client.registry.filters
            assert f"{base}/b" in env.client.registry.filters
            topics = ok(await env.call("mqtt_topics"))["topics"]
            assert [t["topic"] for t in topics] == [f"{base}/b"]
            assert env.client.stats.connects == 1
        await p.client.publish(f"{base}/a", b"", qos=1, retain=True)
        await p.client.publish(f"{base}/b", b"", qos=1, retain=True)


# -- mqtt_query ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def responder(
    settings: MqttSettings,
    request_topic: str,
    *,
    fixed_response_topic: str | None = None,
    echo_correlation: bool = True,
    decoy: bool = False,
    repeat: int = 1,
    **client_kwargs: Any,
) -> AsyncIterator[list[Message]]:
    """A client answering each request with ``pong:<payload>``.

    It answers on the request's Response Topic (MQTT 5) or on
    ``fixed_response_topic``; with ``decoy`` it first sends an answer with the
    wrong Correlation Data; ``repeat`` answers more than once.
    """
    seen: list[Message] = []
    async with running(settings, **client_kwargs) as client:

        def answer(message: Message) -> None:
            seen.append(message)
            props = message.properties
            topic = fixed_response_topic or (props.response_topic if props else None)
            assert topic is not None
            correlation = props.correlation_data if props and echo_correlation else None
            if decoy:
                client.publish(
                    topic,
                    b"decoy",
                    properties=PublishProperties(correlation_data=b"somebody-else"),
                )
            for _ in range(repeat):
                client.publish(
                    topic,
                    b"pong:" + message.payload,
                    properties=PublishProperties(correlation_data=correlation)
                    if correlation
                    else None,
                )

        await client.subscribe(request_topic, answer).wait_granted()
        yield seen


async def test_query_v5_correlation_data(mosquitto: Mosquitto) -> None:
    base = unique("rpc")
    request = f"{base}/cmd"
    async with (
        responder(settings_for(mosquitto), request, decoy=True) as seen,
        tools_on(
            settings_for(mosquitto), [rule(request, WRITE), rule(f"{base}/#", READ)]
        ) as env,
    ):
        assert env.client.protocol is ProtocolVersion.V5
        result = await env.call(
            "mqtt_query", request_topic=request, payload="ping", timeout=2
        )
        structured = ok(result)
        assert structured["response"]["payload"] == "pong:ping"
        assert structured["correlated_by"] == "correlation_data"
        assert structured["timed_out"] is False
        assert structured["protocol"] == "5"
        assert structured["response_topic_generated"] is True
        assert re.fullmatch(
            rf"{re.escape(request)}/response/[0-9a-f]{{16}}",
            structured["response_topic"],
        )
        props = seen[0].properties
        assert props is not None
        assert props.response_topic == structured["response_topic"]
        assert props.correlation_data == structured["correlation_data"].encode()
        assert (
            structured["response"]["properties"]["correlation_data"]
            == structured["correlation_data"]
        )
        assert env.tools.stats.published == 1
        assert env.tools.stats.received == 1
        # The generated response topic stays subscribed for the next query
        # (no SUBSCRIBE round trip per query); answers are told apart by
        # their Correlation Data.
        inbox = structured["response_topic"]
        assert granted(env.client, inbox)
        again = ok(await env.call("mqtt_query", request_topic=request, payload="2"))
        assert again["response_topic"] == inbox
        assert again["correlation_data"] != structured["correlation_data"]
        assert again["response"]["payload"] == "pong:2"
        env.tools.refresh_acl()  # rules may have changed: subscribed afresh next time
        assert env.client.registry.state_of(inbox) is None

        # Two queries at once on the same explicit response topic: each gets its own answer.
        fixed = f"{base}/replies"
        results = await asyncio.gather(
            *(
                env.call(
                    "mqtt_query",
                    request_topic=request,
                    payload=f"q{i}",
                    response_topic=fixed,
                    timeout=2,
                )
                for i in range(5)
            )
        )
        assert [ok(r)["response"]["payload"] for r in results] == [
            f"pong:q{i}" for i in range(5)
        ]


async def test_query_v5_without_echo_falls_back_to_topic(mosquitto: Mosquitto) -> None:
    base = unique("rpcfix")
    request, response = f"{base}/req", f"{base}/resp"
    async with peer(mosquitto) as p:
        # A stale retained value on the response topic is not an answer.
        await p.client.publish(response, b"stale", qos=1, retain=True)
        async with (
            responder(
                settings_for(mosquitto),
                request,
                fixed_response_topic=response,
                echo_correlation=False,
                repeat=2,
            ),
            tools_on(
                settings_for(mosquitto), [rule(request, WRITE), rule(response, READ)]
            ) as env,
        ):
            structured = ok(
                await env.call(
                    "mqtt_query",
                    request_topic=request,
                    payload="hi",
                    response_topic=response,
                    qos=1,
                )
            )
            assert structured["response"]["payload"] == "pong:hi"
            assert structured["correlated_by"] == "topic"
            assert structured["response_topic_generated"] is False
        await p.client.publish(response, b"", qos=1, retain=True)


async def test_query_generated_topic_without_echo_and_inbox_bound(
    mosquitto: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = unique("inbox")
    request = f"{base}/req"
    monkeypatch.setattr(mqtt_tools, "MAX_INBOXES", 2)
    async with (
        responder(settings_for(mosquitto), request, echo_correlation=False),
        tools_on(
            settings_for(mosquitto), [rule(f"{base}/#", BOTH)], start=False
        ) as env,
    ):
        # A responder that answers on the Response Topic without echoing the
        # Correlation Data: the waiting query takes the answer.
        structured = ok(
            await env.call("mqtt_query", request_topic=request, payload="a")
        )
        assert structured["response"]["payload"] == "pong:a"
        assert structured["correlated_by"] == "topic"
        # At most MAX_INBOXES generated response topics stay subscribed.
        for index in range(3):
            ok(
                await env.call(
                    "mqtt_query",
                    request_topic=f"{base}/quiet{index}",
                    payload="x",
                    timeout=0.05,
                )
            )
        kept = sorted(f for f in env.client.registry.filters if "/response/" in f)
        assert [f.split("/")[1] for f in kept] == ["quiet1", "quiet2"]


class _FakeSub:
    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def test_inbox_ignores_stale_retained_and_unknown_answers() -> None:
    fake = _FakeSub()
    inbox = mqtt_tools._Inbox("r", 100, lambda _callback: cast(Subscription, fake))
    waiter: asyncio.Future[_Received] = asyncio.get_running_loop().create_future()
    inbox.waiters[b"mine"] = waiter
    inbox.on_message(Message("r", b"old", retain=True))
    inbox.on_message(
        Message("r", b"other", properties=PublishProperties(correlation_data=b"x"))
    )
    assert not waiter.done()
    inbox.on_message(
        Message("r", b"ok", properties=PublishProperties(correlation_data=b"mine"))
    )
    assert waiter.result().payload == b"ok"
    inbox.close()
    assert fake.cancelled is False  # a query still waits: it unsubscribes at its end
    inbox.release(b"mine")
    assert fake.cancelled is True


async def test_query_timeout_and_response_topic_choice(mosquitto: Mosquitto) -> None:
    base = unique("rpcto")
    request = f"{base}/dev/cmd"
    async with tools_on(
        settings_for(mosquitto),
        [
            rule(request, WRITE),
            rule(f"{unique('other')}/#", READ),
            rule(f"{base}/replies/#", READ),
        ],
        start=False,
    ) as env:
        result = await env.call(
            "mqtt_query", request_topic=request, payload="x", timeout=0.2
        )
        structured = ok(result)
        assert structured["timed_out"] is True
        assert structured["response"] is None
        # Not under the request topic (not readable): under the readable '#'
        # pattern sharing the longest prefix with the request topic.
        assert structured["response_topic"].startswith(f"{base}/replies/response/")
        assert "No answer" in result.text

        env.rules.set(rule(request, WRITE), rule(f"{base}/+/x", READ, "no room"))
        result = await env.call("mqtt_query", request_topic=request, payload="x")
        structured = failed(result, ERR_DENIED)
        assert structured["permission"] == "read"
        assert "response_topic" in result.text
        assert f"{base}/+/x (no room)" in result.text

        result = await env.call(
            "mqtt_query", request_topic=request, payload="x", response_topic=f"{base}/r"
        )
        assert failed(result, ERR_DENIED)["topic"] == f"{base}/r"
        assert env.client.stats.published == 1  # the first query's request only


async def test_query_on_mqtt311_broker(rabbitmq: RabbitMQ) -> None:
    settings = MqttSettings("127.0.0.1", rabbitmq.port)
    base = unique("rpc311")
    request, response = f"{base}/req", f"{base}/resp"
    async with (
        responder(
            settings,
            request,
            fixed_response_topic=response,
            protocol=ProtocolVersion.V311,
        ) as seen,
        tools_on(settings, [rule(request, WRITE), rule(f"{base}/#", READ)]) as env,
    ):
        assert env.client.protocol is ProtocolVersion.V311
        structured = ok(
            await env.call(
                "mqtt_query",
                request_topic=request,
                payload="ping",
                response_topic=response,
                timeout=5,
            )
        )
        assert structured["response"]["payload"] == "pong:ping"
        assert structured["correlated_by"] == "topic"
        assert structured["protocol"] == "3.1.1"
        assert structured["correlation_data"] is None
        assert seen[0].properties is None
        # Without a response topic the responder could not know where to answer.
        result = await env.call("mqtt_query", request_topic=request, payload="ping")
        assert "response_topic" in failed(result, ERR_RESPONSE_TOPIC)["message"]
        # The other tools work on 3.1.1 too (wildcard read of the next message).
        call = asyncio.create_task(
            env.tools.call("mqtt_read", {"topic": f"{base}/+", "timeout": 5})
        )
        await wait_for(lambda: granted(env.client, f"{base}/+"))
        ok(await env.call("mqtt_publish", topic=request, payload="again", qos=1))
        message = ok(await call)["message"]
        assert message["topic"] in (request, response)
        await wait_for(lambda: len(seen) == 2)


# -- mqtt_topics ---------------------------------------------------------------------


async def test_topics_store_counts_retained_and_previews(mosquitto: Mosquitto) -> None:
    base = unique("disc")
    async with peer(mosquitto) as p:
        await p.client.publish(f"{base}/a/state", b"on", qos=1, retain=True)
        async with tools_on(
            settings_for(mosquitto),
            [
                rule(f"{base}/#", READ),
                rule(f"{base}/+/state", READ),
                rule("other/#", READ),
            ],
            limits=ToolLimits(preview_bytes=4),
        ) as env:
            await wait_for(lambda: env.tools.topics_known == 1)
            await p.client.publish(f"{base}/b/temp", b"\xff\x00\x01\x02\x03", qos=1)
            await p.client.publish(f"{base}/a/state", b"off-long-text", qos=1)
            await p.client.publish(f"{base}/b/temp", b"x", qos=1)
            await wait_for(lambda: env.tools.stats.observed >= 4)
            structured = ok(await env.call("mqtt_topics"))
            rows = {row["topic"]: row for row in structured["topics"]}
            assert set(rows) == {f"{base}/a/state", f"{base}/b/temp"}
            state = rows[f"{base}/a/state"]
            # Overlapping read patterns do not count a message twice.
            assert state["messages"] == 2
            assert state["retained"] is True
            assert state["payload_preview"] == "off-"
            assert state["payload_preview_truncated"] is True
            assert state["payload_preview_bytes"] == 13
            assert datetime.fromisoformat(state["last_seen"]).utcoffset() is not None
            temp = rows[f"{base}/b/temp"]
            assert temp["messages"] == 2
            assert temp["retained"] is False
            assert temp["payload_preview"] == "x"
            assert structured["matched"] == 2
            assert structured["truncated"] is False

            # The (older) retained value sent again on re-subscription is not a
            # new message and does not replace the newer live payload.
            structured = ok(
                await env.call(
                    "mqtt_topics", topic=f"{base}/+/state", scan_seconds=0.05
                )
            )
            assert structured["topics"][0]["messages"] == 2
            assert structured["topics"][0]["payload_preview"] == "off-"
            assert (
                ok(await env.call("mqtt_read", topic=f"{base}/a/state"))["message"][
                    "payload"
                ]
                == "on"
            )
            failed(await env.call("mqtt_topics", topic="elsewhere/#"), ERR_DENIED)
        await p.client.publish(f"{base}/a/state", b"", qos=1, retain=True)


async def test_topics_scan_eviction_and_truncation(mosquitto: Mosquitto) -> None:
    base = unique("scan")
    async with peer(mosquitto) as p:
        for index in range(6):
            await p.client.publish(
                f"{base}/t{index}", f"v{index}".encode(), qos=1, retain=True
            )
        async with tools_on(
            settings_for(mosquitto),
            [rule(f"{base}/#", READ)],
            limits=ToolLimits(topic_store_size=4, max_result_bytes=700),
            start=False,
        ) as env:
            # Not started: the store is empty until a scan.
            assert ok(await env.call("mqtt_topics"))["topics"] == []
            result = await env.call("mqtt_topics", scan_seconds=0.1)
            structured = ok(result)
            assert structured["scanned_seconds"] == 0.1
            assert env.tools.topics_known == 4  # oldest evicted
            assert structured["known"] == 4
            assert structured["capacity"] == 4
            assert structured["truncated"] is True
            assert 0 < len(structured["topics"]) < 4
            assert structured["matched"] == 4
            assert "narrow the filter" in result.text
            assert (
                len(
                    json.dumps(
                        structured, ensure_ascii=False, separators=(",", ":")
                    ).encode()
                )
                <= 700
            )
            names = [t["topic"] for t in structured["topics"]]
            assert names == sorted(names)
            scan = asyncio.create_task(
                env.tools.call(
                    "mqtt_topics", {"topic": f"{base}/t5", "scan_seconds": 0.3}
                )
            )
            await wait_for(lambda: granted(env.client, f"{base}/t5"))
            await p.client.publish(f"{base}/t5", b"live", qos=1)
            structured = ok(await scan)
            assert [t["topic"] for t in structured["topics"]] == [f"{base}/t5"]
            # The retained value is not counted twice; the live message is.
            assert structured["topics"][0]["messages"] == 2
            assert structured["topics"][0]["payload_preview"] == "live"
        for index in range(6):
            await p.client.publish(f"{base}/t{index}", b"", qos=1, retain=True)


async def test_topics_without_read_rules_denied(mosquitto: Mosquitto) -> None:
    async with tools_on(
        settings_for(mosquitto), [rule("x", WRITE)], start=False
    ) as env:
        result = await env.call("mqtt_topics")
        failed(result, ERR_DENIED)
        assert "none" in result.text


def test_topic_store_unit() -> None:
    store = _TopicStore(capacity=2, preview_bytes=3)
    assert store.record(Message("a", b"1", retain=True))
    assert not store.record(Message("a", b"1", retain=True))  # repeated retained
    assert store.record(Message("a", b"1"))  # a live message counts
    assert store.record(Message("b", b"2"))
    assert store.record(Message("c", b"3"))
    assert list(store.entries) == ["b", "c"]
    assert store.evicted == 1
    store.purge(lambda topic: topic != "b")
    assert list(store.entries) == ["c"]


# -- summaries and rendering (pure) ---------------------------------------------------


def _message(topic: str, payload: bytes, **props: Any) -> _Received:
    return _Received(
        Message(
            topic, payload, properties=PublishProperties(**props) if props else None
        ),
        1 << 20,
    )


def test_fit_collection_extremes() -> None:
    base = {"topic": "#"}
    # Many distinct long topics and a tiny budget: the per-topic list shrinks too.
    messages = [_message(f"t/{i}/" + "x" * 60, b"p" * 50) for i in range(40)]
    result = _fit_collection(messages, 400, base)
    assert result["summarised"] is True
    assert (
        len(json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode())
        <= 400
    )
    assert result.get("per_topic_truncated") is True
    # Few but huge messages: payloads shortened, first and last kept.
    messages = [_message("t", b"z" * 5000) for _ in range(3)]
    result = _fit_collection(messages, 3000, base)
    assert [m["index"] for m in result["messages"]] == [0, 1, 2]
    assert all(m["payload_truncated"] for m in result["messages"])


def test_render_fitting_drops_properties_last() -> None:
    received = _message(
        "t",
        b"payload",
        user_properties=tuple((f"k{i}", "v" * 40) for i in range(20)),
        content_type="text/plain",
        response_topic="r",
        correlation_data=b"\xff\x00",
        message_expiry_interval=5,
        payload_format_indicator=0,
    )
    full = received.render(100)
    assert full["properties"]["correlation_data_encoding"] == "base64"
    assert full["properties"]["content_type"] == "text/plain"
    fitted = _render_fitting(received, 300, lambda m: {"message": m})
    assert "properties" not in fitted["message"]
    assert fitted["message"]["payload"] == ""
    tiny = _render_fitting(_message("t" * 500, b"x"), 100, lambda m: {"message": m})
    assert tiny["message"]["topic"] == "t" * 500  # the topic cannot be shortened


# -- concurrency and broker restarts ---------------------------------------------------


async def test_hundred_concurrent_calls(mosquitto: Mosquitto) -> None:
    base = unique("conc")
    request = f"{base}/rpc"
    async with peer(mosquitto) as p:
        for index in range(10):
            await p.client.publish(
                f"{base}/r{index}", f"{index}".encode(), qos=1, retain=True
            )
        async with (
            responder(settings_for(mosquitto), request),
            tools_on(settings_for(mosquitto), [rule(f"{base}/#", BOTH)]) as env,
        ):
            calls = []
            for index in range(100):
                kind = index % 4
                if kind == 0:
                    calls.append(
                        env.call("mqtt_read", topic=f"{base}/r{index % 10}", timeout=5)
                    )
                elif kind == 1:
                    calls.append(
                        env.call(
                            "mqtt_publish",
                            topic=f"{base}/p/{index}",
                            payload="x",
                            qos=1,
                        )
                    )
                elif kind == 2:
                    calls.append(
                        env.call(
                            "mqtt_query",
                            request_topic=request,
                            payload=str(index),
                            timeout=5,
                        )
                    )
                else:
                    calls.append(
                        env.call(
                            "mqtt_subscribe",
                            topic=f"{base}/+",
                            timeout=5,
                            max_messages=1,
                        )
                    )
            loop = asyncio.get_running_loop()
            started = loop.time()
            results = await asyncio.gather(*calls)
            elapsed = loop.time() - started
            assert [r.text for r in results if r.is_error] == []
            for index, result in enumerate(results):
                if index % 4 == 0:
                    assert result.structured["message"]["payload"] == str(index % 10)
                elif index % 4 == 2:
                    assert result.structured["response"]["payload"] == f"pong:{index}"
            assert elapsed < 5
            assert env.tools.stats.calls == 100
        for index in range(10):
            await p.client.publish(f"{base}/r{index}", b"", qos=1, retain=True)


async def test_broker_restart_while_tools_in_use(private_mosquitto: Mosquitto) -> None:
    broker = private_mosquitto
    base = unique("restart")
    async with tools_on(
        settings_for(broker),
        [rule(f"{base}/#", BOTH)],
        backoff=Backoff(base=0.05, cap=0.1),
    ) as env:
        ok(
            await env.call(
                "mqtt_publish", topic=f"{base}/v", payload="1", retain=True, qos=1
            )
        )
        await wait_for(lambda: env.tools.topics_known == 1)
        pending = asyncio.create_task(
            env.tools.call("mqtt_read", {"topic": f"{base}/never", "timeout": 0.5})
        )
        await wait_for(lambda: granted(env.client, f"{base}/never"))
        broker.kill()
        await wait_for(lambda: not env.client.connected)
        # The call in flight ends cleanly at its deadline.
        assert ok(await pending)["timed_out"] is True
        # Calls while the broker is down fail cleanly and at once.
        for name, arguments in (
            ("mqtt_publish", {"topic": f"{base}/v", "payload": "2"}),
            ("mqtt_read", {"topic": f"{base}/v"}),
            ("mqtt_subscribe", {"topic": f"{base}/v"}),
            ("mqtt_query", {"request_topic": f"{base}/q", "payload": "x"}),
            ("mqtt_topics", {"scan_seconds": 1}),
        ):
            result = await env.tools.call(name, arguments)
            assert "not connected" in failed(result, ERR_NOT_CONNECTED)["message"]
        # The store still answers from what it saw.
        structured = ok(await env.call("mqtt_topics"))
        assert structured["connected"] is False
        assert [t["topic"] for t in structured["topics"]] == [f"{base}/v"]

        broker.start()
        await wait_for(lambda: env.client.connected)
        assert ok(
            await env.call(
                "mqtt_publish", topic=f"{base}/v", payload="3", qos=1, retain=True
            )
        )
        assert (
            ok(await env.call("mqtt_read", topic=f"{base}/v", timeout=2))["message"][
                "payload"
            ]
            == "3"
        )
        # The store subscription came back with the session.
        await wait_for(lambda: granted(env.client, f"{base}/#"))
        assert env.client.stats.connects == 2
