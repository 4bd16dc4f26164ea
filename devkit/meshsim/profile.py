"""Node profile: the persisted configuration of a simulated Meshtastic node.

A :class:`NodeProfile` plays the role of the firmware's ``/prefs/*.proto``
files (``config``, ``module_config``, ``channels``, ``owner``).  The
:class:`~devkit.meshsim.node.SimulatedNode` takes a copy of it at start and at
every ``reboot()``, as the firmware loads its preferences at boot.

Channel naming follows ``Channels::getName`` (``src/mesh/Channels.cpp``) and
``DisplayFormatters::getModemPresetDisplayName`` (``src/DisplayFormatters.cpp``)
of the 2.7 branch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from meshtastic.protobuf import config_pb2, mesh_pb2

_PRESETS = config_pb2.Config.LoRaConfig.ModemPreset
_REGIONS = config_pb2.Config.LoRaConfig.RegionCode

#: ``DisplayFormatters::getModemPresetDisplayName(preset, useShortName=false,
#: usePreset=true)`` in the 2.7 branch; any other preset (VERY_LONG_SLOW and
#: the develop-only LITE_*/NARROW_* ones) yields ``"Invalid"``.
PRESET_DISPLAY_NAMES: dict[str, str] = {
    "SHORT_TURBO": "ShortTurbo",
    "SHORT_SLOW": "ShortSlow",
    "SHORT_FAST": "ShortFast",
    "MEDIUM_SLOW": "MediumSlow",
    "MEDIUM_FAST": "MediumFast",
    "LONG_SLOW": "LongSlow",
    "LONG_FAST": "LongFast",
    "LONG_TURBO": "LongTurbo",
    "LONG_MODERATE": "LongMod",
}

CHANNEL_ROLES = ("PRIMARY", "SECONDARY", "DISABLED")

#: ``MAX_NUM_CHANNELS`` (``src/mesh/mesh-pb-constants.h``): always 8 slots.
MAX_NUM_CHANNELS = 8

#: Field sizes from ``module_config.pb.h`` / ``channel.pb.h`` (bytes, NUL excluded).
MQTT_ADDRESS_MAX = 63
MQTT_USERNAME_MAX = 63
MQTT_PASSWORD_MAX = 31
MQTT_ROOT_MAX = 31
CHANNEL_NAME_MAX = 11


def preset_display_name(modem_preset: str, use_preset: bool = True) -> str:
    """Return the name the firmware uses for a blank channel name.

    ``DisplayFormatters::getModemPresetDisplayName`` (``src/DisplayFormatters.cpp``,
    2.7): ``Custom`` when ``use_preset`` is false, else the preset's display name
    (``LongFast``, ``MediumFast``, ``LongMod``, ...), ``Invalid`` for presets the
    2.7 table does not know.
    """
    if not use_preset:
        return "Custom"
    return PRESET_DISPLAY_NAMES.get(modem_preset, "Invalid")


@dataclass
class ChannelSpec:
    r"""One channel slot (``channel_pb2.Channel`` + ``ChannelSettings``).

    ``name``: at most 11 bytes; blank means "use the modem preset display name"
    (``Channels::getName``).  ``psk``: 0, 1, 16 or 32 bytes (1 byte = index of the
    well-known default key, ``b"\\x01"`` = the public ``AQ==`` key, ``b"\\x00"`` =
    no encryption).  ``role``: ``"PRIMARY"`` | ``"SECONDARY"`` | ``"DISABLED"``.
    """

    name: str = ""
    psk: bytes = b"\x01"
    uplink: bool = True
    downlink: bool = True
    role: str = "PRIMARY"


def _default_channels() -> list[ChannelSpec]:
    return [ChannelSpec()]


def _default_other_nodes() -> list[tuple[int, str, str]]:
    return [
        (0x433E1F70, "Alpine Hut", "ALP"),
        (0x9C2D5B11, "River Relay", "RIV"),
        (0xDA71C0DE, "Bike Tracker", "BIK"),
    ]


def _default_files() -> list[tuple[str, int]]:
    return [
        ("/prefs/channels.proto", 110),
        ("/prefs/config.proto", 239),
        ("/prefs/module.proto", 163),
        ("/prefs/nodes.proto", 1422),
    ]


@dataclass
class NodeProfile:
    """Everything the simulated firmware reports and obeys.

    Mutating a profile has no effect on a running node until
    :meth:`SimulatedNode.reboot` (the firmware reads its preferences at boot).

    Units: ``voltage`` in volts, ``channel_utilization``/``air_util_tx`` in
    percent, ``battery_level`` in percent (101 = powered), ``position`` as
    ``(latitude_deg, longitude_deg, altitude_m)``; ``files`` as
    ``(path, size_bytes)`` for the ``fileInfo`` manifest of the handshake.
    """

    node_num: int = 0x1A2B3C4D
    long_name: str = "Sim Node"
    short_name: str = "SIM"
    firmware_version: str = "2.7.15.567b8ea"
    hw_model: str = "TBEAM"
    channels: list[ChannelSpec] = field(default_factory=_default_channels)
    use_preset: bool = True
    modem_preset: str = "LONG_FAST"
    region: str = "EU_868"
    mqtt_enabled: bool = True
    proxy_to_client_enabled: bool = True
    mqtt_address: str = ""
    mqtt_username: str = ""
    mqtt_password: str = ""
    mqtt_root: str = "msh"
    mqtt_tls_enabled: bool = False
    mqtt_encryption_enabled: bool = True
    other_nodes: list[tuple[int, str, str]] = field(
        default_factory=_default_other_nodes
    )
    battery_level: int = 87
    voltage: float = 4.01
    channel_utilization: float = 12.5
    air_util_tx: float = 3.2
    # --- additions beyond the required API -------------------------------
    mqtt_map_reporting_enabled: bool = False
    map_publish_interval_secs: int = 3600
    map_position_precision: int = 14
    role: str = "CLIENT"
    hop_limit: int = 3
    ok_to_mqtt: bool = False
    position: tuple[float, float, int] | None = None
    files: list[tuple[str, int]] = field(default_factory=_default_files)
    simulate_acks: bool = True

    @property
    def node_id(self) -> str:
        """The ``!xxxxxxxx`` user id (``owner.id``)."""
        return f"!{self.node_num & 0xFFFFFFFF:08x}"

    def validate(self) -> None:
        """Raise ``ValueError`` for values the firmware could not hold.

        Checks enum names against ``meshtastic.protobuf`` and field sizes against
        the nanopb limits (``module_config.pb.h``, ``channel.pb.h``).
        """
        if not 0 < self.node_num < 0xFFFFFFFF:
            raise ValueError(f"node_num out of range: {self.node_num:#x}")
        mesh_pb2.HardwareModel.Value(self.hw_model)
        _PRESETS.Value(self.modem_preset)
        _REGIONS.Value(self.region)
        config_pb2.Config.DeviceConfig.Role.Value(self.role)
        if len(self.channels) > MAX_NUM_CHANNELS:
            raise ValueError("at most 8 channels")
        for spec in self.channels:
            if spec.role not in CHANNEL_ROLES:
                raise ValueError(f"bad channel role {spec.role!r}")
            if len(spec.name.encode()) > CHANNEL_NAME_MAX:
                raise ValueError(f"channel name too long: {spec.name!r}")
            if len(spec.psk) > 32:
                raise ValueError("psk longer than 32 bytes")
        for value, limit, what in (
            (self.mqtt_address, MQTT_ADDRESS_MAX, "mqtt_address"),
            (self.mqtt_username, MQTT_USERNAME_MAX, "mqtt_username"),
            (self.mqtt_password, MQTT_PASSWORD_MAX, "mqtt_password"),
            (self.mqtt_root, MQTT_ROOT_MAX, "mqtt_root"),
        ):
            if len(value.encode()) > limit:
                raise ValueError(f"{what} longer than {limit} bytes")

    def channel_spec(self, index: int) -> ChannelSpec | None:
        """The spec in slot ``index`` (0-7), or ``None`` for an unused slot."""
        if 0 <= index < len(self.channels):
            return self.channels[index]
        return None

    def channel_name(self, index: int) -> str:
        """``Channels::getName(index)``: the stored name or the preset display name."""
        spec = self.channel_spec(index)
        if spec is not None and spec.name:
            return spec.name
        return preset_display_name(self.modem_preset, self.use_preset)

    def topic_root(self) -> str:
        """``moduleConfig.mqtt.root``, or ``msh`` when empty (``MQTT::MQTT``)."""
        return self.mqtt_root or "msh"


def default_profile(**overrides: Any) -> NodeProfile:
    """Return a :class:`NodeProfile` with the defaults, overridden by keyword.

    Unknown keywords raise ``TypeError``; invalid values raise ``ValueError``.
    """
    known = {f.name for f in fields(NodeProfile)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"unknown NodeProfile field(s): {sorted(unknown)}")
    profile = NodeProfile(**overrides)
    profile.validate()
    return profile
