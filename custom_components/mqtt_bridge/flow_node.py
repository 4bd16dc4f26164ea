"""Config and options flow steps of the Meshtastic node entry type.

The user connects to the node over TCP (port 4403) or a serial port; the flow
completes a stream-API handshake with it (``probe_node``), shows what it found
(name, id, firmware, hardware, and a translated warning when the node's MQTT
settings do not allow the client proxy yet; the node can be added anyway) and
creates an entry of type ``meshtastic_node`` whose unique id is the node
number. Nodes announcing ``_meshtastic._tcp`` over mDNS are discovered.
Reconfigure switches the connection of an entry to the same node; reauth
replaces the credentials of a custom broker; :class:`NodeOptionsFlow` picks the
broker and the proxy settings and whether Home Assistant shares the node with
other clients (port, bind address, allowed networks: checked by binding the
port once; :mod:`.node_sharing`). Brokers are checked with the engine's one
connection check (:func:`.flow_common.async_check_broker`).

Flows never reload an entry themselves: they update it and the entry's update
listener reloads it (the pattern that stays valid in HA 2026.12, see
``shared/reference/home-assistant.md`` §6). The one exception is reconfigure of
a loaded entry: a node serves a single API client and a serial port is opened
exclusively, so the entry lets go of the node while the flow probes it and is
set up again afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import replace
import logging
from typing import Any, Final

from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.const import CONF_DEVICE, CONF_HOST, CONF_PORT
from homeassistant.helpers.selector import (
    BooleanSelector,
    NumberSelector,
    NumberSelectorConfig,
    NumberSelectorMode,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
)
from homeassistant.helpers.service_info.zeroconf import ZeroconfServiceInfo
import serialx
import voluptuous as vol

from .const import (
    BROKER_MODE_CUSTOM,
    BROKER_MODE_NODE,
    CONF_ALLOW_SELF_SIGNED,
    CONF_BROKER_HOST,
    CONF_BROKER_MODE,
    CONF_BROKER_PASSWORD,
    CONF_BROKER_PORT,
    CONF_BROKER_TLS,
    CONF_BROKER_USERNAME,
    CONF_CONNECTION,
    CONF_ENTRY_TYPE,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_SHARE_HOST,
    CONF_SHARE_NETWORKS,
    CONF_SHARE_NODE,
    CONF_SHARE_PORT,
    CONF_UPLINK_QUEUE_SIZE,
    CONNECTION_SERIAL,
    CONNECTION_TCP,
    DEFAULT_UPLINK_QUEUE_SIZE,
    DOMAIN,
    EntryType,
)
from .engine.mqtt_client import PORT_PLAIN, MqttSettings
from .engine.node_link import DEFAULT_TCP_PORT, LinkError, NodeSnapshot, probe_node
from .engine.rules import (
    ProxyRequirement,
    missing_proxy_settings,
    parse_node_id,
)
from .engine.virtual_node import LOCAL_NETWORKS, InvalidNetworkError
from .flow_common import PASSWORD_SELECTOR, PORT_SELECTOR, async_check_broker
from .node_runtime import (
    NodeRuntime,
    connector_from_data,
    describe_connection,
    proxy_options_from_entry,
)
from .node_sharing import (
    ShareSettings,
    bind_problem,
    normalize_bind_address,
    parse_network_text,
)

_LOGGER = logging.getLogger(__name__)

# Seconds the flow waits for a node's complete handshake (a node with a large
# node database needs a few seconds over Wi-Fi).
PROBE_TIMEOUT = 20.0
MIN_UPLINK_QUEUE_SIZE: Final = 10
MAX_UPLINK_QUEUE_SIZE: Final = 100_000
# Shown for a firmware version or hardware model the node did not report.
NOT_REPORTED: Final = "—"

# The confirm steps' warning (an ``errors["base"]`` key, translated under
# config.error) when one node setting the client proxy needs is off; when more
# are off: SETTINGS_WARNING_ALL.
SETTINGS_WARNINGS: Final[dict[frozenset[ProxyRequirement], str]] = {
    frozenset({ProxyRequirement.MQTT_ENABLED}): "mqtt_disabled",
    frozenset({ProxyRequirement.PROXY_TO_CLIENT}): "proxy_to_client_disabled",
}
SETTINGS_WARNING_ALL: Final = "node_settings_missing"

NETWORKS_SELECTOR: Final = TextSelector(TextSelectorConfig(multiline=True))


def node_entry_data(connection: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """Return the data of a node entry: its type and how to reach the node.

    ``connection`` is ``tcp`` (``fields``: ``host``, ``port``) or ``serial``
    (``fields``: ``device``, a path).
    """
    return {
        CONF_ENTRY_TYPE: EntryType.MESHTASTIC_NODE.value,
        CONF_CONNECTION: connection,
        **fields,
    }


def custom_broker_settings(options: Mapping[str, Any]) -> MqttSettings | None:
    """Return the custom broker of node ``options`` to check, or ``None`` if unused.

    The same rules as the running proxy (:func:`.node_runtime.proxy_options_from_entry`):
    the port defaults to 8883 with TLS, else 1883; empty credentials are none.
    """
    proxy_options = proxy_options_from_entry(dict(options))
    override = proxy_options.broker_override
    if override is None:
        return None
    return MqttSettings(
        host=override.host,
        port=override.port,
        tls=override.tls,
        verify_tls=proxy_options.verify_tls,
        username=override.username,
        password=override.password,
    )


async def _async_probe(data: Mapping[str, Any]) -> tuple[NodeSnapshot | None, str]:
    """Handshake with the node of connection ``data``; return it or an error key."""
    try:
        # The flow owns the deadline; probe_node's own timers (handshake stall,
        # overall timeout) are later, so a silent node is always a "timeout",
        # never a LinkError from the stall timer.
        async with asyncio.timeout(PROBE_TIMEOUT):
            snapshot = await probe_node(
                connector_from_data(dict(data)), timeout=PROBE_TIMEOUT + 5.0
            )
    except TimeoutError:
        return None, "timeout"
    except (OSError, LinkError) as err:
        _LOGGER.debug("Cannot connect to %s: %s", describe_connection(dict(data)), err)
        return None, "cannot_connect"
    except Exception:
        _LOGGER.exception(
            "Unexpected error while connecting to %s", describe_connection(dict(data))
        )
        return None, "unknown"
    return snapshot, ""


def _credential_fields(current: Mapping[str, Any]) -> dict[Any, Any]:
    """Return the broker username/password fields; the password is never pre-filled."""
    return {
        vol.Optional(
            CONF_BROKER_USERNAME,
            description={"suggested_value": current.get(CONF_BROKER_USERNAME) or None},
        ): str,
        vol.Optional(CONF_BROKER_PASSWORD): PASSWORD_SELECTOR,
    }


def _port_label(port: serialx.SerialPortInfo) -> str:
    """Return ``device - product, manufacturer, serial number`` with what is known."""
    details = [
        text for text in (port.product, port.manufacturer, port.serial_number) if text
    ]
    return f"{port.device} - {', '.join(details)}" if details else port.device


class NodeFlowMixin(ConfigFlow):
    """The config flow steps that add and maintain Meshtastic node entries.

    Mixed into the integration's config flow (``config_flow.py``), which owns
    the menu and dispatches reconfigure and reauth by entry type.
    """

    _node_data: dict[str, Any]
    _node_snapshot: NodeSnapshot | None = None

    # -- user: connection menu -----------------------------------------------------

    async def async_step_meshtastic(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose how Home Assistant reaches the node."""
        return self.async_show_menu(
            step_id="meshtastic", menu_options=["tcp", "serial"]
        )

    # -- connection forms (user and reconfigure) -------------------------------------

    def _current_node_data(self) -> Mapping[str, Any]:
        """Return the reconfigured entry's data, or nothing in other flows."""
        if self.source == SOURCE_RECONFIGURE:
            return self._get_reconfigure_entry().data
        return {}

    async def async_step_tcp(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the node's host and API port."""
        errors: dict[str, str] = {}
        if user_input is not None:
            host = user_input[CONF_HOST].strip()
            if not host:
                errors[CONF_HOST] = "invalid_host"
            else:
                data = node_entry_data(
                    CONNECTION_TCP,
                    {CONF_HOST: host, CONF_PORT: int(user_input[CONF_PORT])},
                )
                if (result := await self._async_use_node(data, errors)) is not None:
                    return result
        current = self._current_node_data()
        if current.get(CONF_CONNECTION) != CONNECTION_TCP:
            current = {}
        defaults = user_input or current
        schema = vol.Schema(
            {
                vol.Required(CONF_HOST, default=defaults.get(CONF_HOST, "")): str,
                vol.Required(
                    CONF_PORT, default=int(defaults.get(CONF_PORT, DEFAULT_TCP_PORT))
                ): PORT_SELECTOR,
            }
        )
        return self.async_show_form(step_id="tcp", data_schema=schema, errors=errors)

    async def async_step_serial(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the node's serial port (listed, or typed in)."""
        errors: dict[str, str] = {}
        if user_input is not None:
            data = node_entry_data(
                CONNECTION_SERIAL, {CONF_DEVICE: user_input[CONF_DEVICE].strip()}
            )
            if (result := await self._async_use_node(data, errors)) is not None:
                return result
        ports = await serialx.async_list_serial_ports()
        options = [
            SelectOptionDict(value=port.device, label=_port_label(port))
            for port in ports
        ]
        default = (user_input or self._current_node_data()).get(CONF_DEVICE)
        if default is None and options:
            default = options[0]["value"]
        field = (
            vol.Required(CONF_DEVICE, default=default)
            if default
            else vol.Required(CONF_DEVICE)
        )
        schema = vol.Schema(
            {
                field: SelectSelector(
                    SelectSelectorConfig(
                        options=options,
                        custom_value=True,
                        mode=SelectSelectorMode.DROPDOWN,
                        sort=False,
                    )
                )
            }
        )
        return self.async_show_form(
            step_id="serial",
            data_schema=schema,
            errors=errors,
            description_placeholders={"count": str(len(options))},
        )

    async def _async_use_node(
        self, data: dict[str, Any], errors: dict[str, str]
    ) -> ConfigFlowResult | None:
        """Probe the node of ``data``; go on to confirm (or finish a reconfigure).

        Returns ``None`` with ``errors["base"]`` set when the node cannot be used.
        """
        if self.source == SOURCE_RECONFIGURE:
            return await self._async_reconfigure_node(data, errors)
        snapshot, error = await _async_probe(data)
        if snapshot is None:
            errors["base"] = error
            return None
        await self.async_set_unique_id(str(snapshot.node_num), raise_on_progress=False)
        self._abort_if_unique_id_configured(updates=data, reload_on_update=False)
        self._node_data = data
        self._node_snapshot = snapshot
        return await self.async_step_confirm()

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show the node found and create the entry on confirmation."""
        return self._async_confirm_node("confirm", user_input)

    def _async_confirm_node(
        self, step_id: str, user_input: dict[str, Any] | None
    ) -> ConfigFlowResult:
        """Create the entry on confirmation, else show the node and any warning.

        A node whose MQTT settings do not allow the client proxy yet gets a
        translated warning (``errors["base"]``, see :data:`SETTINGS_WARNINGS`);
        it can still be added, the proxy starts once the settings are on.
        """
        snapshot = self._node_snapshot
        assert snapshot is not None
        if user_input is not None:
            return self.async_create_entry(
                title=snapshot.long_name, data=self._node_data
            )
        missing = frozenset(missing_proxy_settings(snapshot.mqtt))
        warning = (
            SETTINGS_WARNINGS.get(missing, SETTINGS_WARNING_ALL) if missing else None
        )
        return self.async_show_form(
            step_id=step_id,
            errors={"base": warning} if warning else None,
            description_placeholders={
                "name": snapshot.long_name,
                "node_id": snapshot.node_id,
                "firmware": snapshot.firmware_version or NOT_REPORTED,
                "hardware": snapshot.hw_model or NOT_REPORTED,
                "connection": describe_connection(self._node_data),
            },
        )

    # -- zeroconf ------------------------------------------------------------------

    async def async_step_zeroconf(
        self, discovery_info: ZeroconfServiceInfo
    ) -> ConfigFlowResult:
        """Handle a node announcing ``_meshtastic._tcp`` over mDNS."""
        self._node_data = node_entry_data(
            CONNECTION_TCP,
            {
                CONF_HOST: discovery_info.host,
                CONF_PORT: int(discovery_info.port or DEFAULT_TCP_PORT),
            },
        )
        # The firmware announces its node id in TXT "id": a known node is
        # recognised without connecting, which would take the node's single API
        # connection away from its running entry.
        try:
            announced = parse_node_id(str(discovery_info.properties.get("id", "")))
        except ValueError:
            announced = None
        if announced is not None:
            await self.async_set_unique_id(str(announced))
            self._abort_if_node_configured()
        snapshot, error = await _async_probe(self._node_data)
        if snapshot is None:
            return self.async_abort(reason=error)
        await self.async_set_unique_id(str(snapshot.node_num))
        self._abort_if_node_configured()
        self._node_snapshot = snapshot
        self.context["title_placeholders"] = {"name": snapshot.long_name}
        return await self.async_step_zeroconf_confirm()

    def _abort_if_node_configured(self) -> None:
        """Abort for a known node; move a TCP entry to the announced address."""
        entry = self.hass.config_entries.async_entry_for_domain_unique_id(
            DOMAIN, str(self.unique_id)
        )
        serial = entry is not None and (
            entry.data.get(CONF_CONNECTION) == CONNECTION_SERIAL
        )
        self._abort_if_unique_id_configured(
            updates=None if serial else self._node_data, reload_on_update=False
        )

    async def async_step_zeroconf_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show the discovered node and create the entry on confirmation."""
        return self._async_confirm_node("zeroconf_confirm", user_input)

    # -- reconfigure ---------------------------------------------------------------

    def async_show_node_reconfigure_menu(self) -> ConfigFlowResult:
        """Choose the new connection to the same node (step ``reconfigure``)."""
        return self.async_show_menu(
            step_id="reconfigure", menu_options=["tcp", "serial"]
        )

    async def _async_reconfigure_node(
        self, data: dict[str, Any], errors: dict[str, str]
    ) -> ConfigFlowResult | None:
        """Probe the node of ``data`` and, if it is the entry's node, switch to it."""
        entry = self._get_reconfigure_entry()
        loaded = entry.state is ConfigEntryState.LOADED
        if loaded:
            # A node serves one TCP client and a serial port is opened exclusively:
            # the running entry would take the node away from the probe.
            await self.hass.config_entries.async_unload(entry.entry_id)
        try:
            snapshot, error = await _async_probe(data)
            if snapshot is None:
                errors["base"] = error
                return None
            await self.async_set_unique_id(
                str(snapshot.node_num), raise_on_progress=False
            )
            self._abort_if_unique_id_mismatch(
                reason="wrong_node",
                description_placeholders={
                    "name": snapshot.long_name,
                    "node_id": snapshot.node_id,
                },
            )
            # Unloaded, the entry has no update listener: nothing reloads twice.
            self.hass.config_entries.async_update_entry(entry, data=data)
            return self.async_abort(reason="reconfigure_successful")
        finally:
            if loaded:
                self.hass.config_entries.async_schedule_reload(entry.entry_id)

    # -- reauth (custom broker credentials) ----------------------------------------

    async def async_step_reauth_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the custom broker's username and password, check and save them."""
        entry = self._get_reauth_entry()
        options = dict(entry.options)
        settings = custom_broker_settings(options)
        if settings is None:
            return self.async_abort(reason="no_custom_broker")
        errors: dict[str, str] = {}
        if user_input is not None:
            username = user_input.get(CONF_BROKER_USERNAME, "").strip()
            password = user_input.get(CONF_BROKER_PASSWORD, "")
            options[CONF_BROKER_USERNAME] = username
            options[CONF_BROKER_PASSWORD] = password
            checked = replace(
                settings, username=username or None, password=password or None
            )
            if await async_check_broker(checked, errors):
                self.hass.config_entries.async_update_entry(entry, options=options)
                return self.async_abort(reason="reauth_successful")
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=vol.Schema(_credential_fields(options)),
            errors=errors,
            description_placeholders={
                "name": entry.title,
                "broker": f"{settings.host}:{settings.port}",
            },
        )


class NodeOptionsFlow(OptionsFlow):
    """Choose the broker, how the proxy forwards messages and whether to share the node.

    Steps: ``init`` (proxy settings, broker choice, "Share this node"), then
    ``broker`` for a custom broker, then ``share`` when sharing is on. Saving
    reloads the entry (its update listener), which applies every change.
    """

    def __init__(self) -> None:
        """Start with the entry's current options (read in the first step)."""
        self._options: dict[str, Any] = {}

    async def async_step_init(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Proxy settings and the broker choice."""
        current = dict(self.config_entry.options)
        if user_input is not None:
            self._options = {
                **current,
                CONF_BROKER_MODE: user_input[CONF_BROKER_MODE],
                CONF_ALLOW_SELF_SIGNED: user_input[CONF_ALLOW_SELF_SIGNED],
                CONF_FORWARD_RETAINED: user_input[CONF_FORWARD_RETAINED],
                CONF_FORWARD_OWN_ECHOES: user_input[CONF_FORWARD_OWN_ECHOES],
                CONF_UPLINK_QUEUE_SIZE: int(user_input[CONF_UPLINK_QUEUE_SIZE]),
                CONF_SHARE_NODE: user_input[CONF_SHARE_NODE],
            }
            if user_input[CONF_BROKER_MODE] == BROKER_MODE_CUSTOM:
                return await self.async_step_broker()
            return await self._async_finish(self._options)
        schema = vol.Schema(
            {
                vol.Required(
                    CONF_BROKER_MODE,
                    default=current.get(CONF_BROKER_MODE, BROKER_MODE_NODE),
                ): SelectSelector(
                    SelectSelectorConfig(
                        options=[BROKER_MODE_NODE, BROKER_MODE_CUSTOM],
                        mode=SelectSelectorMode.LIST,
                        translation_key=CONF_BROKER_MODE,
                    )
                ),
                vol.Required(
                    CONF_ALLOW_SELF_SIGNED,
                    default=bool(current.get(CONF_ALLOW_SELF_SIGNED, False)),
                ): BooleanSelector(),
                vol.Required(
                    CONF_FORWARD_RETAINED,
                    default=bool(current.get(CONF_FORWARD_RETAINED, False)),
                ): BooleanSelector(),
                vol.Required(
                    CONF_FORWARD_OWN_ECHOES,
                    default=bool(current.get(CONF_FORWARD_OWN_ECHOES, False)),
                ): BooleanSelector(),
                vol.Required(
                    CONF_UPLINK_QUEUE_SIZE,
                    default=int(
                        current.get(CONF_UPLINK_QUEUE_SIZE, DEFAULT_UPLINK_QUEUE_SIZE)
                    ),
                ): NumberSelector(
                    NumberSelectorConfig(
                        min=MIN_UPLINK_QUEUE_SIZE,
                        max=MAX_UPLINK_QUEUE_SIZE,
                        step=1,
                        mode=NumberSelectorMode.BOX,
                    )
                ),
                vol.Required(
                    CONF_SHARE_NODE,
                    default=bool(current.get(CONF_SHARE_NODE, False)),
                ): BooleanSelector(),
            }
        )
        return self.async_show_form(step_id="init", data_schema=schema)

    async def _async_finish(self, options: dict[str, Any]) -> ConfigFlowResult:
        """Save ``options``, after the ``share`` step when sharing is on."""
        self._options = options
        if options.get(CONF_SHARE_NODE):
            return await self.async_step_share()
        return self.async_create_entry(data=options)

    async def async_step_broker(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """The custom broker: address, TLS and credentials, checked by connecting."""
        errors: dict[str, str] = {}
        saved = self._options
        if user_input is not None:
            host = user_input[CONF_BROKER_HOST].strip()
            username = user_input.get(CONF_BROKER_USERNAME, "").strip()
            password = user_input.get(CONF_BROKER_PASSWORD, "")
            if (
                not password
                and username
                and username == saved.get(CONF_BROKER_USERNAME)
            ):
                # An empty password field keeps the saved password of this user.
                password = saved.get(CONF_BROKER_PASSWORD, "")
            options = {
                **saved,
                CONF_BROKER_HOST: host,
                CONF_BROKER_PORT: int(user_input[CONF_BROKER_PORT]),
                CONF_BROKER_TLS: user_input[CONF_BROKER_TLS],
                CONF_BROKER_USERNAME: username,
                CONF_BROKER_PASSWORD: password,
            }
            settings = custom_broker_settings(options)
            if settings is None:
                errors[CONF_BROKER_HOST] = "invalid_host"
            elif await async_check_broker(settings, errors):
                return await self._async_finish(options)
        defaults = user_input or saved
        schema = vol.Schema(
            {
                vol.Required(
                    CONF_BROKER_HOST, default=defaults.get(CONF_BROKER_HOST, "")
                ): str,
                vol.Required(
                    CONF_BROKER_PORT,
                    default=int(defaults.get(CONF_BROKER_PORT) or PORT_PLAIN),
                ): PORT_SELECTOR,
                vol.Required(
                    CONF_BROKER_TLS, default=bool(defaults.get(CONF_BROKER_TLS, False))
                ): BooleanSelector(),
                **_credential_fields(defaults),
            }
        )
        return self.async_show_form(step_id="broker", data_schema=schema, errors=errors)

    async def async_step_share(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Sharing the node: port, bind address and allowed networks, checked.

        Error keys (``options.error``): ``share_invalid_address`` (not an IP
        address), ``share_invalid_networks`` (placeholder ``problem``),
        ``share_port_in_use``, ``share_address_unavailable`` and
        ``share_cannot_bind`` (placeholder ``error``) from binding the port once
        (:func:`.node_sharing.bind_problem`); the port this entry's shared node
        listens on now is not checked (the reload frees it first).
        """
        errors: dict[str, str] = {}
        placeholders = {
            "local_networks": ", ".join(LOCAL_NETWORKS),
            "problem": "",
            "error": "",
        }
        saved = ShareSettings.from_options(self._options)
        if user_input is not None:
            port = int(user_input[CONF_SHARE_PORT])
            host = ""
            networks: list[str] = []
            try:
                host = normalize_bind_address(user_input[CONF_SHARE_HOST])
            except ValueError:
                errors[CONF_SHARE_HOST] = "share_invalid_address"
            try:
                networks = parse_network_text(user_input.get(CONF_SHARE_NETWORKS, ""))
            except InvalidNetworkError as err:
                errors[CONF_SHARE_NETWORKS] = "share_invalid_networks"
                placeholders["problem"] = str(err)
            if not errors and not self._shared_here(port):
                problem = bind_problem(host, port)
                if problem is not None:
                    errors[CONF_SHARE_PORT], placeholders["error"] = problem
            if not errors:
                return self.async_create_entry(
                    data={
                        **self._options,
                        CONF_SHARE_PORT: port,
                        CONF_SHARE_HOST: host,
                        CONF_SHARE_NETWORKS: networks,
                    }
                )
        defaults: dict[str, Any] = {
            CONF_SHARE_PORT: saved.port,
            CONF_SHARE_HOST: saved.host,
            CONF_SHARE_NETWORKS: "\n".join(saved.networks),
            **(user_input or {}),
        }
        schema = vol.Schema(
            {
                vol.Required(
                    CONF_SHARE_PORT, default=int(defaults[CONF_SHARE_PORT])
                ): PORT_SELECTOR,
                vol.Required(CONF_SHARE_HOST, default=defaults[CONF_SHARE_HOST]): str,
                vol.Optional(
                    CONF_SHARE_NETWORKS,
                    description={
                        "suggested_value": defaults[CONF_SHARE_NETWORKS] or None
                    },
                ): NETWORKS_SELECTOR,
            }
        )
        return self.async_show_form(
            step_id="share",
            data_schema=schema,
            errors=errors,
            description_placeholders=placeholders,
        )

    def _shared_here(self, port: int) -> bool:
        """Whether this entry's shared node listens on ``port`` right now."""
        entry = self.config_entry
        loaded = entry.state is ConfigEntryState.LOADED
        runtime = entry.runtime_data if loaded else None
        server = runtime.sharing.server if isinstance(runtime, NodeRuntime) else None
        return server is not None and server.listening and server.port == port
