"""NodeLink against a scripted node: handshake corner cases and live FromRadio kinds.

A tiny stream-API server answers ``want_config_id`` with a scripted list of
``FromRadio`` frames (the nonce filled in), then sends live frames; the test
checks what the link makes of them.
"""

from __future__ import annotations

import asyncio
import logging

from meshtastic.protobuf import channel_pb2, mesh_pb2
import pytest

from custom_components.mqtt_bridge.engine.backoff import Backoff
from custom_components.mqtt_bridge.engine.node_link import (
    LinkError,
    LinkState,
    NodeLink,
    NodeLinkListener,
    NodeSnapshot,
    probe_node,
    tcp_connector,
)
from tests.common import scripted, wait_for

NODE = 0x0A0B0C0D


def _my_info() -> mesh_pb2.FromRadio:
    return mesh_pb2.FromRadio(my_info=mesh_pb2.MyNodeInfo(my_node_num=NODE))


def _complete(nonce: int) -> mesh_pb2.FromRadio:
    return mesh_pb2.FromRadio(config_complete_id=nonce)


class Recorder(NodeLinkListener):
    def __init__(self) -> None:
        self.config_changes = 0
        self.ready = 0

    def on_ready(self, snapshot: NodeSnapshot) -> None:
        self.ready += 1

    def on_config_changed(self, snapshot: NodeSnapshot) -> None:
        self.config_changes += 1


async def test_handshake_ignores_stale_and_early_items_then_goes_live(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    def script(nonce: int) -> list[mesh_pb2.FromRadio | bytes]:
        return [
            b"",  # zero-length keepalive frame
            _my_info(),
            _complete(nonce ^ 1),  # answer to an earlier request: ignored
            mesh_pb2.FromRadio(queueStatus=mesh_pb2.QueueStatus(free=4)),
            _complete(nonce),
        ]

    async with scripted(script) as (node, port):
        link = NodeLink(tcp_connector("127.0.0.1", port), name="scripted")
        recorder = Recorder()
        link.add_listener(recorder)
        task = asyncio.create_task(link.run())
        try:
            await wait_for(lambda: link.state is LinkState.READY)
            assert recorder.ready == 1
            assert "queueStatus before config complete" in caplog.text
            channel = channel_pb2.Channel(
                index=1, role=channel_pb2.Channel.Role.SECONDARY
            )
            channel.settings.name = "Live"
            node.send(mesh_pb2.FromRadio(channel=channel))
            await wait_for(lambda: recorder.config_changes == 1)
            assert link.snapshot is not None
            assert link.snapshot.channels[1].settings.name == "Live"
            info = mesh_pb2.NodeInfo(num=0xCAFE)
            info.user.long_name = "Later"
            node.send(mesh_pb2.FromRadio(node_info=info))
            node.send(
                mesh_pb2.FromRadio(log_record=mesh_pb2.LogRecord(message="boot ok"))
            )
            notification = mesh_pb2.ClientNotification(message="low battery")
            node.send(mesh_pb2.FromRadio(clientNotification=notification))
            await wait_for(lambda: "low battery" in caplog.text)
            assert link.snapshot.node_name(0xCAFE) == "Later"
            assert "boot ok" in caplog.text
        finally:
            task.cancel()
            await asyncio.wait({task})


async def test_handshake_without_my_info_fails() -> None:
    async with scripted(lambda nonce: [_complete(nonce)]) as (_node, port):
        with pytest.raises(LinkError, match="without my_info"):
            await probe_node(tcp_connector("127.0.0.1", port), timeout=5)


async def test_reboot_during_handshake_starts_a_new_one() -> None:
    rebooted_once: list[bool] = []

    def script(nonce: int) -> list[mesh_pb2.FromRadio | bytes]:
        if not rebooted_once:
            rebooted_once.append(True)
            return [_my_info(), mesh_pb2.FromRadio(rebooted=True)]
        return [_my_info(), _complete(nonce)]

    async with scripted(script) as (node, port):
        link = NodeLink(
            tcp_connector("127.0.0.1", port),
            name="scripted",
            backoff=Backoff(base=0.01, cap=0.02),
        )
        task = asyncio.create_task(link.run())
        try:
            await wait_for(lambda: link.state is LinkState.READY)
            assert node.handshakes == 2
        finally:
            task.cancel()
            await asyncio.wait({task})
