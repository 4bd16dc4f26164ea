"""Pure pieces of the node link: snapshot fields, undecodable uplinks, FromRadio folding."""

from __future__ import annotations

import asyncio
import logging

from meshtastic.protobuf import channel_pb2, mesh_pb2
import pytest

from custom_components.mqtt_bridge.engine.node_link import (
    LinkError,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
    apply_from_radio,
    probe_node,
    serial_connector,
    tcp_connector,
    undecodable_proxy_topic,
)


def _proxy_frame(topic: bytes, data: bytes = b"x") -> bytes:
    message = mesh_pb2.FromRadio()
    message.mqttClientProxyMessage.topic = "T" * len(topic)
    message.mqttClientProxyMessage.data = data
    return message.SerializeToString().replace(b"T" * len(topic), topic)


def test_undecodable_proxy_topic_recognises_uplinks_only() -> None:
    raw = _proxy_frame(b"msh/2/e/\xff\xfe/!1")
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError
        mesh_pb2.FromRadio().ParseFromString(raw)
    assert undecodable_proxy_topic(raw) == b"msh/2/e/\xff\xfe/!1"
    # A proxy message without a topic field: recognised, empty topic.
    no_topic = mesh_pb2.FromRadio()
    no_topic.mqttClientProxyMessage.data = b"\x01"
    assert undecodable_proxy_topic(no_topic.SerializeToString()) == b""
    # Another FromRadio, and garbage, are not uplinks.
    other = mesh_pb2.FromRadio(config_complete_id=5).SerializeToString()
    assert undecodable_proxy_topic(other) is None
    assert undecodable_proxy_topic(b"\xff\xff\xff") is None


def test_snapshot_hardware_model_names() -> None:
    snapshot = NodeSnapshot()
    assert snapshot.hw_model is None
    snapshot.nodes[0] = mesh_pb2.NodeInfo()
    snapshot.metadata = mesh_pb2.DeviceMetadata(hw_model=4)
    assert snapshot.hw_model == mesh_pb2.HardwareModel.Name(4)
    unknown = max(mesh_pb2.HardwareModel.values()) + 1000  # newer than our protobufs
    snapshot.metadata = mesh_pb2.DeviceMetadata(hw_model=unknown)
    assert snapshot.hw_model == str(unknown)


def test_channel_index_out_of_range_is_ignored() -> None:
    snapshot = NodeSnapshot()
    message = mesh_pb2.FromRadio()
    message.channel.index = 9
    message.channel.role = channel_pb2.Channel.Role.SECONDARY
    assert apply_from_radio(snapshot, message) is True
    assert snapshot.channels == []


async def test_serial_connector_maps_errors_to_oserror(tmp_path) -> None:
    connect = serial_connector(str(tmp_path / "no-such-port"))
    with pytest.raises(OSError):
        await connect()


async def test_write_buffer_size_without_transport() -> None:
    link = NodeLink(tcp_connector("127.0.0.1", 1), name="t")
    assert link.write_buffer_size() == 1  # not connected


async def test_probe_of_silent_node_times_out() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises((TimeoutError, LinkError)):
            await probe_node(tcp_connector("127.0.0.1", port), timeout=0.3)
    finally:
        server.close()
        await server.wait_closed()


async def test_probe_of_closing_node_is_a_link_error() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(LinkError):
            await probe_node(tcp_connector("127.0.0.1", port), timeout=2)
    finally:
        server.close()
        await server.wait_closed()


def test_listener_defaults_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    listener = NodeLinkListener()
    listener.on_invalid_proxy_message(b"x")
    caplog.set_level(logging.DEBUG)
    link = NodeLink(tcp_connector("127.0.0.1", 1), name="t")
    link._log_text(b"  hello console  ")
    assert "hello console" in caplog.text
