"""MqttClient edge cases: fake brokers speaking raw MQTT bytes, and small API contracts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
import contextlib
import logging

import pytest

from custom_components.mqtt_bridge.engine import mqtt_client
from custom_components.mqtt_bridge.engine.mcp_mqtt import (
    CLIENT_COMPONENT,
    SERVER_COMPONENT,
    McpMqttServer,
    connect_user_properties,
)
from custom_components.mqtt_bridge.engine.mqtt_client import (
    ClientState,
    Message,
    MqttClient,
    MqttConnectError,
    MqttError,
    MqttSettings,
    MqttTimeoutError,
    MqttTlsError,
    NotConnectedError,
    ProtocolVersion,
    PublishProperties,
    check_connection,
)
from devkit.mosquitto import Mosquitto
from tests.common import wait_for
from tests.test_mqtt_client import running, settings_for

# MQTT 3.1.1 packets (§3.2, §3.3): CONNACK accepted; PUBLISH QoS 0 to a topic
# whose bytes are not UTF-8.
CONNACK_311 = bytes([0x20, 0x02, 0x00, 0x00])
BAD_TOPIC = b"t/\xff\xfe"
PUBLISH_BAD_TOPIC = (
    bytes([0x30, 2 + len(BAD_TOPIC) + 2, 0x00, len(BAD_TOPIC)]) + BAD_TOPIC + b"hi"
)

type Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def fake_broker(handler: Handler) -> AsyncIterator[int]:
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def _close_at_once(
    _reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.close()


async def _silent(reader: asyncio.StreamReader, _writer: asyncio.StreamWriter) -> None:
    await reader.read()


async def test_check_connection_broker_closing_every_connection() -> None:
    async with fake_broker(_close_at_once) as port:
        with pytest.raises(MqttConnectError, match="closed before CONNACK"):
            await check_connection(MqttSettings("127.0.0.1", port), timeout=5)


async def test_check_connection_broker_refusing_every_protocol() -> None:
    async def refuse(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(bytes([0x20, 0x02, 0x00, 0x01]))  # 3.1.1: unacceptable version
        await writer.drain()
        await reader.read()

    async with fake_broker(refuse) as port:
        with pytest.raises(MqttConnectError):
            await check_connection(MqttSettings("127.0.0.1", port), timeout=5)


async def test_check_connection_times_out_on_a_silent_broker(monkeypatch) -> None:
    async with fake_broker(_silent) as port:
        monkeypatch.setattr(mqtt_client, "CONNACK_TIMEOUT", 0.1)
        with pytest.raises(MqttTimeoutError, match="CONNACK"):
            await check_connection(MqttSettings("127.0.0.1", port), timeout=5)
        monkeypatch.setattr(mqtt_client, "CONNACK_TIMEOUT", 10.0)
        with pytest.raises(MqttTimeoutError, match="no answer within"):
            await check_connection(MqttSettings("127.0.0.1", port), timeout=0.1)


async def test_check_connection_unreadable_ca_file(tmp_path) -> None:
    settings = MqttSettings(
        "127.0.0.1", 1, tls=True, ca_file=str(tmp_path / "none.pem")
    )
    with pytest.raises(MqttTlsError, match="TLS set-up failed"):
        await check_connection(settings, timeout=5)


async def test_client_reports_unreadable_ca_file_and_retries(tmp_path) -> None:
    settings = MqttSettings(
        "127.0.0.1", 1, tls=True, ca_file=str(tmp_path / "none.pem")
    )
    async with running(settings, wait=False) as client:
        await wait_for(lambda: client.stats.failures >= 1)
        assert "TLS set-up failed" in (client.stats.last_error or "")
        assert client.state in (ClientState.DISCONNECTED, ClientState.CONNECTING)


async def test_topic_that_is_not_utf8_is_counted_not_delivered() -> None:
    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.read(1024)  # CONNECT
        writer.write(CONNACK_311 + PUBLISH_BAD_TOPIC)
        await writer.drain()
        await reader.read()

    async with fake_broker(handler) as port:
        settings = MqttSettings("127.0.0.1", port)
        async with running(settings, protocol=ProtocolVersion.V311) as client:
            got: list[Message] = []
            client.subscribe("#", got.append)
            await wait_for(lambda: client.stats.invalid_topics == 1)
            assert got == []
            assert client.stats.received == 0


async def test_publish_without_session_raises(mosquitto: Mosquitto) -> None:
    client = MqttClient(settings_for(mosquitto), client_id="no-session")
    with pytest.raises(NotConnectedError):
        client.publish("a/b", b"x")
    with pytest.raises(NotConnectedError):
        await client.publish_wait("a/b", b"x")


async def test_update_settings_reconnects_at_once(mosquitto: Mosquitto) -> None:
    async with running(settings_for(mosquitto)) as client:
        client.update_settings(settings_for(mosquitto, username="other"))
        await wait_for(lambda: client.stats.connects == 2)
        assert client.connected
        assert client.settings.username == "other"


async def test_failing_listeners_and_callbacks_are_logged(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_listener(state: ClientState) -> None:
        raise RuntimeError("listener bug")

    def bad_callback(error: MqttError | None) -> None:
        raise RuntimeError("callback bug")

    async with running(settings_for(mosquitto)) as client:
        client.add_state_listener(bad_listener)
        client.publish("edge/x", b"x", qos=1, on_done=bad_callback)
        await wait_for(lambda: client.stats.published == 1)
        remove = client.add_state_listener(print)
        remove()
        remove()  # removing twice is harmless
    assert "MQTT state listener failed" in caplog.text
    assert "publish completion callback failed" in caplog.text


def test_message_and_properties_helpers() -> None:
    assert PublishProperties.from_paho(None) is None
    message = Message("a/b", b"12345", qos=1, retain=True)
    assert repr(message) == "Message('a/b', 5 bytes, qos=1, retain=True)"
    assert message.properties is None
    ready = PublishProperties(content_type="text/plain")
    assert Message("a", b"", properties=ready).properties == ready
    assert "password" not in repr(MqttSettings("h", password="secret"))
    assert (
        MqttSettings("h", 8883, tls=True, username="u").describe() == "mqtts://u@h:8883"
    )
    assert mqtt_client.connack_reason(135) == "not authorized"
    assert mqtt_client.connack_reason(250) == "reason code 250"


async def test_publish_with_logging(
    mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=mqtt_client.__name__)
    async with running(settings_for(mosquitto)) as client:
        await client.publish_wait("edge/y", b"y", qos=0)
    assert "connected (MQTT 5)" in caplog.text


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


async def test_connect_and_connack_user_properties(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MQTT 5 CONNECT carries the given user properties; CONNACK's are kept.

    The MCP-over-MQTT properties (spec §1.4): ``MCP-COMPONENT-TYPE`` and
    ``MCP-META`` on CONNECT, a broker-assigned ``MCP-SERVER-NAME`` on CONNACK.
    """
    connects: list[bytes] = []
    user = b"\x26" + _utf8("MCP-SERVER-NAME") + _utf8("assigned/name")
    body = b"\x00\x00" + bytes([len(user)]) + user
    connack = bytes([0x20, len(body)]) + body

    async def handler(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        connects.append(await reader.read(1024))
        writer.write(connack)
        await writer.drain()
        await reader.read()

    properties = connect_user_properties(SERVER_COMPONENT, {"version": "1"})
    async with fake_broker(handler) as port:
        settings = MqttSettings("127.0.0.1", port)
        async with running(settings, connect_user_properties=properties) as client:
            assert client.connack_user_properties == (
                ("MCP-SERVER-NAME", "assigned/name"),
            )
            server = McpMqttServer(client, "configured/name", handler=_no_session)
            server._check_assigned_name()
    assert _utf8("MCP-COMPONENT-TYPE") + _utf8("mcp-server") in connects[0]
    assert _utf8("MCP-META") + _utf8('{"version":"1"}') in connects[0]
    assert "assigned the server-name 'assigned/name'" in caplog.text
    assert connect_user_properties(CLIENT_COMPONENT) == (
        ("MCP-COMPONENT-TYPE", "mcp-client"),
        ("MCP-META", '{"implementation":"mqtt-bridge"}'),
    )


async def _no_session(*_args: object) -> None:
    """A session handler that is never called."""
