"""Handshake cache and live node database of a virtual node.

A :class:`NodeDb` is built from the ``FromRadio`` items of one complete handshake
with the real node (``NodeLink.handshake_messages``) and answers any number of
client handshakes from it, in the order the firmware sends them
(``PhoneAPI::getFromRadio``, the ``STATE_SEND_*`` sequence the client apps
assume)::

    my_info, deviceuiConfig, own node_info, metadata, channels (8),
    config sections, module config sections, other nodes' node_info,
    fileInfo manifest, config_complete_id = the client's nonce

``want_config_id`` 69420 (``SPECIAL_NONCE_ONLY_CONFIG``) skips the other nodes;
69421 (``SPECIAL_NONCE_ONLY_NODES``) sends only the own and the other nodes'
``node_info`` before ``config_complete_id`` (``PhoneAPI::handleStartConfig``,
``STATE_SEND_FILEMANIFEST``).

The node database is kept current from the node's live packets as the
firmware's ``NodeDB::updateFrom`` and its modules do: any packet from a node
updates ``last_heard`` (``rx_time``), ``snr``, ``via_mqtt``, ``hops_away``
(``hop_start - hop_limit``) and ``channel``; ``NODEINFO_APP`` the ``user``
(an empty ``public_key`` keeps the known one), ``POSITION_APP`` the position
(packets without coordinates are ignored), ``TELEMETRY_APP`` the
``device_metrics``. Unknown senders are added; beyond ``max_nodes`` the
non-favourite node heard longest ago is evicted (``NodeDB`` keeps at most
``MAX_NUM_NODES``). The own node's ``last_heard`` is the time of the replay and
it is always a favourite without ``hops_away`` (``STATE_SEND_OWN_NODEINFO``).

Pure: no I/O, no asyncio. This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import contextlib
import hashlib
import time
from types import MappingProxyType

from google.protobuf.message import DecodeError
from meshtastic.protobuf import channel_pb2, mesh_pb2, portnums_pb2, telemetry_pb2

#: ``SPECIAL_NONCE_ONLY_CONFIG`` / ``SPECIAL_NONCE_ONLY_NODES`` (``src/mesh/PhoneAPI.h``).
SPECIAL_NONCE_ONLY_CONFIG = 69420
SPECIAL_NONCE_ONLY_NODES = 69421
#: Default bound of the node database (``MAX_NUM_NODES`` of boards with PSRAM).
DEFAULT_MAX_NODES = 250
#: ``NODENUM_BROADCAST``.
BROADCAST_NUM = 0xFFFFFFFF

_PORT = portnums_pb2.PortNum
# Plain ints: an attribute of a protobuf enum wrapper costs a Python call each time.
_NODEINFO_APP = int(_PORT.NODEINFO_APP)
_POSITION_APP = int(_PORT.POSITION_APP)
_TELEMETRY_APP = int(_PORT.TELEMETRY_APP)


def _copy(message: mesh_pb2.FromRadio) -> mesh_pb2.FromRadio:
    """Return a copy of ``message`` without its ``id`` (each client numbers its own)."""
    copy = mesh_pb2.FromRadio()
    copy.CopyFrom(message)
    copy.ClearField("id")
    return copy


def _section(message: mesh_pb2.FromRadio) -> str | None:
    """The set section of a ``config``/``moduleConfig`` item (``lora``, ``mqtt``...)."""
    if message.WhichOneof("payload_variant") == "config":
        return message.config.WhichOneof("payload_variant")
    return message.moduleConfig.WhichOneof("payload_variant")  # None if unset


class NodeDb:
    """What a node reported in its handshake, kept current by its live packets.

    Raises:
        ValueError: ``handshake`` has no ``my_info`` (not a complete handshake).

    """

    def __init__(
        self,
        handshake: Iterable[mesh_pb2.FromRadio],
        *,
        max_nodes: int = DEFAULT_MAX_NODES,
    ) -> None:
        """Build the cache from the items of one handshake, in the node's order."""
        if max_nodes < 1:
            raise ValueError("max_nodes must be at least 1")
        self.max_nodes = max_nodes
        self.my_info: mesh_pb2.MyNodeInfo | None = None
        self.metadata: mesh_pb2.DeviceMetadata | None = None
        self._ui: mesh_pb2.FromRadio | None = None
        self._channels: list[mesh_pb2.FromRadio] = []
        self._config: list[mesh_pb2.FromRadio] = []
        self._modules: list[mesh_pb2.FromRadio] = []
        self._files: list[mesh_pb2.FromRadio] = []
        self._nodes: dict[int, mesh_pb2.NodeInfo] = {}
        #: Live updates applied since the cache was built.
        self.updates = 0
        for message in handshake:
            self._fold(message)
        if self.my_info is None:
            raise ValueError("a handshake without my_info cannot be replayed")

    # -- reading ---------------------------------------------------------------

    @property
    def node_num(self) -> int:
        """The node's own number (``my_info.my_node_num``)."""
        assert self.my_info is not None
        return int(self.my_info.my_node_num)

    @property
    def nodes(self) -> Mapping[int, mesh_pb2.NodeInfo]:
        """Every known node by number, the own node included (read-only view)."""
        return MappingProxyType(self._nodes)

    @property
    def channels(self) -> list[channel_pb2.Channel]:
        """Copies of the channels, in the order the node sent them."""
        channels = []
        for message in self._channels:
            channel = channel_pb2.Channel()
            channel.CopyFrom(message.channel)
            channels.append(channel)
        return channels

    def config_digest(self) -> bytes:
        """Digest of what a client configures from: everything but other nodes.

        Covers ``my_info``, the device UI config, the own ``User``, metadata,
        channels, config and module config; used to tell whether a refreshed
        handshake changed anything a connected client shows.
        """
        digest = hashlib.sha256()
        parts: list[bytes] = []
        assert self.my_info is not None
        parts.append(self.my_info.SerializeToString(deterministic=True))
        own = self._nodes.get(self.node_num)
        parts.append(own.user.SerializeToString(deterministic=True) if own else b"")
        if self.metadata is not None:
            parts.append(self.metadata.SerializeToString(deterministic=True))
        fixed = [self._ui] if self._ui is not None else []
        parts.extend(
            m.SerializeToString(deterministic=True)
            for m in fixed + self._channels + self._config + self._modules
        )
        for part in parts:
            digest.update(len(part).to_bytes(4, "big"))
            digest.update(part)
        return digest.digest()

    def handshake(
        self, nonce: int, now: float | None = None
    ) -> list[mesh_pb2.FromRadio]:
        """Return the items answering ``want_config_id = nonce``, firmware order.

        The last item is ``config_complete_id = nonce``. ``now`` (seconds since
        the epoch, default the current time) becomes the own node's ``last_heard``.
        The messages carry no ``id``; they are fresh copies the caller may keep.
        """
        only_nodes = nonce == SPECIAL_NONCE_ONLY_NODES
        out: list[mesh_pb2.FromRadio] = []
        if not only_nodes:
            assert self.my_info is not None
            out.append(mesh_pb2.FromRadio(my_info=self.my_info))
            if self._ui is not None:
                out.append(_copy(self._ui))
        own = self._nodes.get(self.node_num)
        if own is not None:
            info = mesh_pb2.NodeInfo()
            info.CopyFrom(own)
            info.last_heard = int(time.time() if now is None else now)
            info.is_favorite = True
            info.ClearField("hops_away")
            out.append(mesh_pb2.FromRadio(node_info=info))
        if not only_nodes:
            if self.metadata is not None:
                out.append(mesh_pb2.FromRadio(metadata=self.metadata))
            out.extend(_copy(m) for m in self._channels + self._config + self._modules)
        if nonce != SPECIAL_NONCE_ONLY_CONFIG:
            out.extend(
                mesh_pb2.FromRadio(node_info=info)
                for num, info in self._nodes.items()
                if num != self.node_num
            )
        if not only_nodes:
            out.extend(_copy(m) for m in self._files)
        out.append(mesh_pb2.FromRadio(config_complete_id=nonce))
        return out

    # -- updating ----------------------------------------------------------------

    def _fold(self, message: mesh_pb2.FromRadio) -> bool:
        """Take one handshake-kind item in (replacing what it updates)."""
        kind = message.WhichOneof("payload_variant")
        if kind == "my_info":
            self.my_info = mesh_pb2.MyNodeInfo()
            self.my_info.CopyFrom(message.my_info)
        elif kind == "metadata":
            self.metadata = mesh_pb2.DeviceMetadata()
            self.metadata.CopyFrom(message.metadata)
        elif kind == "deviceuiConfig":
            self._ui = _copy(message)
        elif kind == "node_info":
            info = mesh_pb2.NodeInfo()
            info.CopyFrom(message.node_info)
            num = int(info.num)
            if num not in self._nodes:
                self._make_room()
            self._nodes[num] = info
        elif kind == "channel":
            self._replace(
                self._channels,
                message,
                lambda m: m.channel.index == message.channel.index,
            )
        elif kind in ("config", "moduleConfig"):
            target = self._config if kind == "config" else self._modules
            section = _section(message)
            # Empty sections (2.7 sends three empty module configs) are kept
            # as they came: they never replace anything.
            if section is None:
                target.append(_copy(message))
            else:
                self._replace(target, message, lambda m: _section(m) == section)
        elif kind == "fileInfo":
            self._files.append(_copy(message))
        else:
            return False
        return True

    @staticmethod
    def _replace(
        items: list[mesh_pb2.FromRadio],
        message: mesh_pb2.FromRadio,
        same: Callable[[mesh_pb2.FromRadio], bool],
    ) -> None:
        for index, existing in enumerate(items):
            if same(existing):
                items[index] = _copy(message)
                return
        items.append(_copy(message))

    def apply(self, message: mesh_pb2.FromRadio, now: float | None = None) -> bool:
        """Fold a live ``FromRadio`` in; return whether the database changed.

        ``packet`` updates the sending node (see the module docstring); the
        handshake kinds (``node_info``, ``channel``, ``config``...) replace what
        they describe. Anything else is ignored.
        """
        if message.WhichOneof("payload_variant") == "packet":
            changed = self.apply_packet(message.packet, now)
        else:
            changed = self._fold(message)
        if changed:
            self.updates += 1
        return changed

    def apply_packet(
        self, packet: mesh_pb2.MeshPacket, now: float | None = None
    ) -> bool:
        """Update the sender of a live packet; return whether anything changed.

        ``now`` (seconds since the epoch) stands in for a missing ``rx_time``.
        """
        sender = int(getattr(packet, "from"))
        if sender in (0, BROADCAST_NUM):
            return False
        own = sender == self.node_num
        info = self._nodes.get(sender)
        if info is None:
            self._make_room()
            info = self._nodes[sender] = mesh_pb2.NodeInfo(num=sender)
        if not own:
            info.last_heard = int(
                packet.rx_time or (time.time() if now is None else now)
            )
            if packet.rx_snr:
                info.snr = packet.rx_snr
            info.via_mqtt = packet.via_mqtt
            info.channel = (
                packet.channel if packet.HasField("decoded") else info.channel
            )
            if packet.hop_start and packet.hop_limit <= packet.hop_start:
                info.hops_away = packet.hop_start - packet.hop_limit
        if packet.HasField("decoded"):
            self._apply_payload(info, packet.decoded)
        return True

    @staticmethod
    def _apply_payload(info: mesh_pb2.NodeInfo, data: mesh_pb2.Data) -> None:
        with contextlib.suppress(DecodeError, RuntimeWarning):
            if data.portnum == _NODEINFO_APP:
                user = mesh_pb2.User()
                user.ParseFromString(data.payload)
                if not user.public_key and info.user.public_key:
                    user.public_key = info.user.public_key
                info.user.CopyFrom(user)
            elif data.portnum == _POSITION_APP:
                position = mesh_pb2.Position()
                position.ParseFromString(data.payload)
                if position.latitude_i or position.longitude_i:
                    info.position.CopyFrom(position)
            elif data.portnum == _TELEMETRY_APP:
                telemetry = telemetry_pb2.Telemetry()
                telemetry.ParseFromString(data.payload)
                if telemetry.HasField("device_metrics"):
                    info.device_metrics.CopyFrom(telemetry.device_metrics)

    def _make_room(self) -> None:
        """Evict the non-favourite node heard longest ago when the database is full."""
        if len(self._nodes) < self.max_nodes:
            return
        own = int(self.my_info.my_node_num) if self.my_info is not None else None
        candidates = [
            info
            for num, info in self._nodes.items()
            if num != own and not info.is_favorite
        ]
        if not candidates:
            candidates = [info for num, info in self._nodes.items() if num != own]
        if candidates:
            oldest = min(candidates, key=lambda info: info.last_heard)
            del self._nodes[int(oldest.num)]
