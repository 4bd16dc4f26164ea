"""Config flow of MQTT Bridge: pick a Meshtastic node, check it, add it.

The user connects to the node over TCP (port 4403) or a serial port; the flow
completes a stream-API handshake with it (``probe_node``), shows what it found
(name, id, firmware, hardware, whether the node's MQTT settings allow the
client proxy) and creates an entry whose unique id is the node number. Nodes
announcing ``_meshtastic._tcp`` over mDNS are discovered. Reconfigure switches
the connection of an entry to the same node; reauth replaces the credentials
of a custom broker; the options flow picks the broker and the proxy settings.

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
import functools
import logging
from typing import Any

import aiomqtt
from homeassistant.config_entries import (
    SOURCE_RECONFIGURE,
    ConfigEntry,
    ConfigEntryState,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.core import callback
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
    TextSelectorType,
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
    CONF_DEVICE,
    CONF_FORWARD_OWN_ECHOES,
    CONF_FORWARD_RETAINED,
    CONF_HOST,
    CONF_PORT,
    CONF_UPLINK_QUEUE_SIZE,
    CONNECTION_SERIAL,
    CONNECTION_TCP,
    DEFAULT_TCP_PORT,
    DEFAULT_UPLINK_QUEUE_SIZE,
    DOMAIN,
)
from .engine.broker import build_tls_context
from .engine.node_link import LinkError, NodeSnapshot, probe_node
from .engine.rules import ProxyRequirement, missing_proxy_settings, parse_node_id
from .runtime import connector_from_data, describe_connection

_LOGGER = logging.getLogger(__name__)

# Seconds the flow waits for a node's complete handshake (a node with a large
# node database needs a few seconds over Wi-Fi).
PROBE_TIMEOUT = 20.0
# Seconds the flow waits for a broker's CONNACK.
BROKER_TIMEOUT = 10.0
DEFAULT_BROKER_PORT = 1883
MIN_UPLINK_QUEUE_SIZE = 10
MAX_UPLINK_QUEUE_SIZE = 100_000

# CONNACK codes that reject the client's credentials or identity: MQTT 3.1.1
# return codes 4 and 5, MQTT 5 reason codes 134, 135, 138 and 140 (paho maps
# the 3.1.1 codes to 134 and 135).
_AUTH_CONNACK_CODES = frozenset({4, 5, 134, 135, 138, 140})

_SETTING_LABELS = {
    ProxyRequirement.MQTT_ENABLED: "MQTT enabled",
    ProxyRequirement.PROXY_TO_CLIENT: "Proxy to client enabled",
}

_PASSWORD_SELECTOR = TextSelector(TextSelectorConfig(type=TextSelectorType.PASSWORD))


class BrokerAuthError(Exception):
    """The broker rejected the credentials (CONNACK)."""


class BrokerConnectionError(Exception):
    """The broker could not be reached or refused the connection otherwise."""


async def validate_broker(
    host: str,
    port: int,
    tls: bool,
    username: str | None,
    password: str | None,
    *,
    verify_tls: bool = True,
) -> None:
    """Connect to an MQTT broker once (MQTT 3.1.1) and disconnect.

    ``verify_tls`` false accepts self-signed certificates.

    Raises:
        BrokerAuthError: the broker rejected the credentials.
        BrokerConnectionError: the broker is unreachable, the TLS handshake
            failed or the broker refused the connection for another reason.

    """
    tls_context = None
    if tls:
        # Loading the CA certificates blocks; do it in the executor.
        tls_context = await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(build_tls_context, verify=verify_tls)
        )
    client = aiomqtt.Client(
        host,
        port,
        username=username or None,
        password=password or None,
        protocol=aiomqtt.ProtocolVersion.V311,
        timeout=BROKER_TIMEOUT,
        tls_context=tls_context,
        logger=_LOGGER,
    )
    try:
        async with client:
            pass
    except aiomqtt.MqttCodeError as err:
        if getattr(err.rc, "value", err.rc) in _AUTH_CONNACK_CODES:
            raise BrokerAuthError(str(err)) from err
        raise BrokerConnectionError(str(err)) from err
    except (aiomqtt.MqttError, OSError) as err:
        raise BrokerConnectionError(str(err) or type(err).__name__) from err


async def _async_validate_broker_form(
    options: Mapping[str, Any], errors: dict[str, str]
) -> bool:
    """Validate the custom broker in ``options``; fill ``errors``; return success."""
    try:
        await validate_broker(
            options[CONF_BROKER_HOST],
            int(options.get(CONF_BROKER_PORT) or DEFAULT_BROKER_PORT),
            bool(options.get(CONF_BROKER_TLS, False)),
            options.get(CONF_BROKER_USERNAME),
            options.get(CONF_BROKER_PASSWORD),
            verify_tls=not options.get(CONF_ALLOW_SELF_SIGNED, False),
        )
    except BrokerAuthError:
        errors["base"] = "invalid_auth"
    except BrokerConnectionError as err:
        _LOGGER.debug("Cannot connect to broker: %s", err)
        errors["base"] = "cannot_connect"
    except Exception:
        _LOGGER.exception("Unexpected error while checking the broker")
        errors["base"] = "unknown"
    return not errors


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
        vol.Optional(CONF_BROKER_PASSWORD): _PASSWORD_SELECTOR,
    }


def _port_label(port: serialx.SerialPortInfo) -> str:
    """Return ``device - product, manufacturer, s/n serial`` with what is known."""
    details = [
        text
        for text in (
            port.product,
            port.manufacturer,
            f"s/n {port.serial_number}" if port.serial_number else None,
        )
        if text
    ]
    return f"{port.device} - {', '.join(details)}" if details else port.device


def _node_placeholders(
    snapshot: NodeSnapshot, data: Mapping[str, Any]
) -> dict[str, str]:
    """Return the confirm step's description placeholders for a probed node."""
    missing = missing_proxy_settings(snapshot.mqtt)
    if missing:
        settings = (
            "⚠️ turn on in the node's MQTT settings: "
            + ", ".join(_SETTING_LABELS[item] for item in missing)
            + ". The node can be added now; the proxy starts once they are on."
        )
    else:
        settings = "ready (MQTT enabled, Proxy to client enabled)"
    return {
        "name": snapshot.long_name,
        "node_id": snapshot.node_id,
        "firmware": snapshot.firmware_version or "unknown",
        "hardware": snapshot.hw_model or "unknown",
        "connection": describe_connection(dict(data)),
        "proxy_settings": settings,
    }


class MqttBridgeConfigFlow(ConfigFlow, domain=DOMAIN):
    """Add a Meshtastic node whose MQTT traffic Home Assistant proxies."""

    VERSION = 1

    def __init__(self) -> None:
        """Start with no node chosen."""
        self._data: dict[str, Any] = {}
        self._snapshot: NodeSnapshot | None = None

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> OptionsFlow:
        """Return the options flow (no config entry argument: HA 2025.12+)."""
        return MqttBridgeOptionsFlow()

    # -- user: menus ---------------------------------------------------------------

    async def async_step_user(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose what to add (the Meshtastic proxy for now)."""
        return self.async_show_menu(step_id="user", menu_options=["meshtastic"])

    async def async_step_meshtastic(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose how Home Assistant reaches the node."""
        return self.async_show_menu(
            step_id="meshtastic", menu_options=["tcp", "serial"]
        )

    # -- connection forms (user and reconfigure) -------------------------------------

    def _current_data(self) -> Mapping[str, Any]:
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
                data = {
                    CONF_CONNECTION: CONNECTION_TCP,
                    CONF_HOST: host,
                    CONF_PORT: int(user_input[CONF_PORT]),
                }
                if (result := await self._async_use_node(data, errors)) is not None:
                    return result
        current = self._current_data()
        if current.get(CONF_CONNECTION) != CONNECTION_TCP:
            current = {}
        defaults = user_input or current
        schema = vol.Schema(
            {
                vol.Required(CONF_HOST, default=defaults.get(CONF_HOST, "")): str,
                vol.Required(
                    CONF_PORT, default=int(defaults.get(CONF_PORT, DEFAULT_TCP_PORT))
                ): NumberSelector(
                    NumberSelectorConfig(
                        min=1, max=65535, step=1, mode=NumberSelectorMode.BOX
                    )
                ),
            }
        )
        return self.async_show_form(step_id="tcp", data_schema=schema, errors=errors)

    async def async_step_serial(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the node's serial port (listed, or typed in)."""
        errors: dict[str, str] = {}
        if user_input is not None:
            data = {
                CONF_CONNECTION: CONNECTION_SERIAL,
                CONF_DEVICE: user_input[CONF_DEVICE].strip(),
            }
            if (result := await self._async_use_node(data, errors)) is not None:
                return result
        ports = await serialx.async_list_serial_ports()
        options = [
            SelectOptionDict(value=port.device, label=_port_label(port))
            for port in ports
        ]
        default = (user_input or self._current_data()).get(CONF_DEVICE)
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
        self._data = data
        self._snapshot = snapshot
        return await self.async_step_confirm()

    async def async_step_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show the node found and create the entry on confirmation."""
        return self._confirm("confirm", user_input)

    def _confirm(
        self, step_id: str, user_input: dict[str, Any] | None
    ) -> ConfigFlowResult:
        snapshot = self._snapshot
        assert snapshot is not None
        if user_input is not None:
            return self.async_create_entry(title=snapshot.long_name, data=self._data)
        return self.async_show_form(
            step_id=step_id,
            description_placeholders=_node_placeholders(snapshot, self._data),
        )

    # -- zeroconf ------------------------------------------------------------------

    async def async_step_zeroconf(
        self, discovery_info: ZeroconfServiceInfo
    ) -> ConfigFlowResult:
        """Handle a node announcing ``_meshtastic._tcp`` over mDNS."""
        self._data = {
            CONF_CONNECTION: CONNECTION_TCP,
            CONF_HOST: discovery_info.host,
            CONF_PORT: int(discovery_info.port or DEFAULT_TCP_PORT),
        }
        # The firmware announces its node id in TXT "id": a known node is
        # recognised without connecting, which would take the node's single API
        # connection away from its running entry.
        try:
            announced = parse_node_id(str(discovery_info.properties.get("id", "")))
        except ValueError:
            announced = None
        if announced is not None:
            await self.async_set_unique_id(str(announced))
            self._abort_if_discovered_configured()
        snapshot, error = await _async_probe(self._data)
        if snapshot is None:
            return self.async_abort(reason=error)
        await self.async_set_unique_id(str(snapshot.node_num))
        self._abort_if_discovered_configured()
        self._snapshot = snapshot
        self.context["title_placeholders"] = {"name": snapshot.long_name}
        return await self.async_step_zeroconf_confirm()

    def _abort_if_discovered_configured(self) -> None:
        """Abort for a known node; update the address of a TCP entry."""
        entry = self.hass.config_entries.async_entry_for_domain_unique_id(
            DOMAIN, str(self.unique_id)
        )
        serial = entry is not None and (
            entry.data.get(CONF_CONNECTION) == CONNECTION_SERIAL
        )
        self._abort_if_unique_id_configured(
            updates=None if serial else self._data, reload_on_update=False
        )

    async def async_step_zeroconf_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show the discovered node and create the entry on confirmation."""
        return self._confirm("zeroconf_confirm", user_input)

    # -- reconfigure ---------------------------------------------------------------

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose the new connection to the same node."""
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

    async def async_step_reauth(
        self, entry_data: Mapping[str, Any]
    ) -> ConfigFlowResult:
        """Start asking for new credentials of the custom broker."""
        return await self.async_step_reauth_confirm()

    async def async_step_reauth_confirm(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the custom broker's username and password, check and save them."""
        entry = self._get_reauth_entry()
        options = dict(entry.options)
        if not options.get(CONF_BROKER_HOST):
            return self.async_abort(reason="no_custom_broker")
        errors: dict[str, str] = {}
        if user_input is not None:
            options[CONF_BROKER_USERNAME] = user_input.get(
                CONF_BROKER_USERNAME, ""
            ).strip()
            options[CONF_BROKER_PASSWORD] = user_input.get(CONF_BROKER_PASSWORD, "")
            if await _async_validate_broker_form(options, errors):
                self.hass.config_entries.async_update_entry(entry, options=options)
                return self.async_abort(reason="reauth_successful")
        schema = vol.Schema(
            {
                **_credential_fields(options),
            }
        )
        return self.async_show_form(
            step_id="reauth_confirm",
            data_schema=schema,
            errors=errors,
            description_placeholders={
                "name": entry.title,
                "broker": f"{options[CONF_BROKER_HOST]}:"
                f"{options.get(CONF_BROKER_PORT) or DEFAULT_BROKER_PORT}",
            },
        )


class MqttBridgeOptionsFlow(OptionsFlow):
    """Choose the broker and how the proxy forwards messages."""

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
            }
            if user_input[CONF_BROKER_MODE] == BROKER_MODE_CUSTOM:
                return await self.async_step_broker()
            return self.async_create_entry(data=self._options)
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
            }
        )
        return self.async_show_form(step_id="init", data_schema=schema)

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
            if not host:
                errors[CONF_BROKER_HOST] = "invalid_host"
            elif await _async_validate_broker_form(options, errors):
                return self.async_create_entry(data=options)
        defaults = user_input or saved
        schema = vol.Schema(
            {
                vol.Required(
                    CONF_BROKER_HOST, default=defaults.get(CONF_BROKER_HOST, "")
                ): str,
                vol.Required(
                    CONF_BROKER_PORT,
                    default=int(defaults.get(CONF_BROKER_PORT) or DEFAULT_BROKER_PORT),
                ): NumberSelector(
                    NumberSelectorConfig(
                        min=1, max=65535, step=1, mode=NumberSelectorMode.BOX
                    )
                ),
                vol.Required(
                    CONF_BROKER_TLS, default=bool(defaults.get(CONF_BROKER_TLS, False))
                ): BooleanSelector(),
                **_credential_fields(defaults),
            }
        )
        return self.async_show_form(step_id="broker", data_schema=schema, errors=errors)
