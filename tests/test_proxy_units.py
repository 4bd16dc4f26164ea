"""MeshtasticProxy branches driven through a stand-in link (no node, no broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import time
from typing import Any

from meshtastic.protobuf import mesh_pb2, mqtt_pb2, portnums_pb2
import pytest

from custom_components.mqtt_bridge.engine.mqtt_client import Message
from custom_components.mqtt_bridge.engine.node_link import (
    LinkNotReadyError,
    LinkState,
    NodeLinkListener,
)
from custom_components.mqtt_bridge.engine.proxy import MeshtasticProxy, ProxyOptions
from custom_components.mqtt_bridge.engine.rules import DownlinkDrop
from tests.common import wait_for


class StandInLink:
    """Just what the proxy uses of a NodeLink; ``ready`` toggles writes."""

    name = "stand-in"
    snapshot = None

    def __init__(self) -> None:
        self.listeners: list[NodeLinkListener] = []
        self.ready = False
        self.sent: list[mesh_pb2.ToRadio] = []

    def add_listener(self, listener: NodeLinkListener) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def send(self, message: mesh_pb2.ToRadio) -> None:
        if not self.ready:
            raise LinkNotReadyError("down")
        self.sent.append(message)

    def write_buffer_size(self) -> int:
        return 0 if self.ready else 1

    async def drain(self) -> None:
        await asyncio.sleep(0)


def _envelope(gateway: str = "!cafe0001") -> bytes:
    envelope = mqtt_pb2.ServiceEnvelope(channel_id="LongFast", gateway_id=gateway)
    envelope.packet.decoded.portnum = portnums_pb2.PortNum.TEXT_MESSAGE_APP
    envelope.packet.decoded.payload = b"hi"
    return envelope.SerializeToString()


def _proxy(**options: Any) -> tuple[StandInLink, MeshtasticProxy]:
    link = StandInLink()
    proxy = MeshtasticProxy(link, ProxyOptions(**options))  # type: ignore[arg-type]
    return link, proxy


def test_uplinks_without_payload_or_broker_are_counted() -> None:
    _link, proxy = _proxy()
    proxy.on_proxy_message(mesh_pb2.MqttClientProxyMessage(topic="msh/2/e/x/!1"))
    proxy.on_proxy_message(
        mesh_pb2.MqttClientProxyMessage(topic="msh/2/e/x/!1", data=b"\x01")
    )
    proxy.on_invalid_proxy_message(b"msh/\xff")
    assert proxy.stats.dropped == {
        "uplink_no_payload": 1,
        "uplink_proxy_not_running": 1,
        "uplink_invalid_topic": 1,
    }


def test_failing_change_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise RuntimeError("callback bug")

    proxy = MeshtasticProxy(StandInLink(), on_change=boom)  # type: ignore[arg-type]
    proxy.on_state(LinkState.READY)
    assert "proxy change callback failed" in caplog.text


async def test_downlinks_wait_for_the_node_and_age_out() -> None:
    link, proxy = _proxy(downlink_queue_size=2, downlink_max_age=0.05)
    task = asyncio.create_task(proxy.run())
    try:
        for _ in range(3):
            proxy._on_broker_message(Message("msh/2/e/LongFast/!cafe0001", _envelope()))
        assert proxy.downlink_queue_depth == 2
        assert proxy.stats.dropped[f"downlink_{DownlinkDrop.QUEUE_FULL}"] == 1
        await asyncio.sleep(0.1)  # older than downlink_max_age
        proxy._on_broker_message(Message("msh/2/e/LongFast/!cafe0001", _envelope()))
        link.ready = True
        proxy.on_state(LinkState.READY)
        await wait_for(lambda: proxy.downlink_queue_depth == 0)
        assert proxy.stats.dropped[f"downlink_{DownlinkDrop.NODE_GONE}"] == 1
        assert proxy.stats.dropped[f"downlink_{DownlinkDrop.QUEUE_FULL}"] == 2
        assert len(link.sent) == 1
        assert proxy.stats.downlink_messages == 1
        assert proxy.stats.last_downlink is not None
        assert proxy.stats.last_downlink <= time.time()
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert link.listeners == []  # run() let go of the link
