"""Config flow of MQTT Bridge: a menu of entry types, dispatching by type.

The ``user`` step offers what can be added (the Meshtastic node first, then
the MQTT broker); each type's steps live in their own module (node:
:mod:`.flow_node`, broker: :mod:`.flow_broker`, mixed in here). Flows started for an existing entry
(reconfigure, reauth, options) choose the steps of the entry's type
(``entry.data["entry_type"]``); an entry of a type this version does not know
has none of them. A broker entry has config subentries of type
``stdio_server`` (hosted stdio MCP servers, :mod:`.flow_stdio`); a node entry
has none. Entries are version 1.2 (1.2 added ``entry_type``; see
``async_migrate_entry`` in ``__init__.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from homeassistant.config_entries import (
    ConfigEntry,
    ConfigFlowResult,
    ConfigSubentryFlow,
    OptionsFlow,
)
from homeassistant.core import callback
from homeassistant.data_entry_flow import UnknownHandler

from .const import DOMAIN, SUBENTRY_STDIO_SERVER, EntryType
from .flow_broker import BrokerFlowMixin, BrokerOptionsFlow
from .flow_node import NodeFlowMixin, NodeOptionsFlow
from .flow_stdio import StdioServerSubentryFlow
from .models import entry_type_of

# The options flow of each entry type.
OPTIONS_FLOWS: Final[dict[EntryType, type[OptionsFlow]]] = {
    EntryType.MESHTASTIC_NODE: NodeOptionsFlow,
    EntryType.MQTT_BROKER: BrokerOptionsFlow,
}
# The config subentry flows of each entry type, by subentry type.
SUBENTRY_FLOWS: Final[dict[EntryType, dict[str, type[ConfigSubentryFlow]]]] = {
    EntryType.MQTT_BROKER: {SUBENTRY_STDIO_SERVER: StdioServerSubentryFlow},
}
# The user menu: one option (a step) per entry type that can be added.
USER_MENU: Final = ["meshtastic", "mqtt_broker"]


class MqttBridgeConfigFlow(NodeFlowMixin, BrokerFlowMixin, domain=DOMAIN):
    """Add an entry of one of the integration's types; maintain existing ones."""

    VERSION = 1
    MINOR_VERSION = 2

    @staticmethod
    @callback
    def async_get_options_flow(config_entry: ConfigEntry) -> OptionsFlow:
        """Return the options flow of the entry's type (no entry argument: 2025.12+).

        Raises:
            UnknownHandler: the entry's type has no options flow (Home Assistant
                answers "invalid handler"; the UI does not offer it, see
                :meth:`async_supports_options_flow`).

        """
        entry_type = entry_type_of(config_entry)
        flow = OPTIONS_FLOWS.get(entry_type) if entry_type is not None else None
        if flow is None:
            raise UnknownHandler
        return flow()

    @classmethod
    @callback
    def async_supports_options_flow(cls, config_entry: ConfigEntry) -> bool:
        """Whether the entry's type has an options flow (the UI shows "Configure")."""
        return entry_type_of(config_entry) in OPTIONS_FLOWS

    @classmethod
    @callback
    def async_get_supported_subentry_types(
        cls, config_entry: ConfigEntry
    ) -> dict[str, type[ConfigSubentryFlow]]:
        """Return the subentry flows of the entry's type (broker: ``stdio_server``)."""
        entry_type = entry_type_of(config_entry)
        if entry_type is None:
            return {}
        return dict(SUBENTRY_FLOWS.get(entry_type, {}))

    async def async_step_user(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose what to add."""
        return self.async_show_menu(step_id="user", menu_options=USER_MENU)

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Change how Home Assistant reaches the entry's peer, by entry type."""
        entry_type = entry_type_of(self._get_reconfigure_entry())
        if entry_type is EntryType.MESHTASTIC_NODE:
            return self.async_show_node_reconfigure_menu()
        if entry_type is EntryType.MQTT_BROKER:
            return await self.async_step_broker_reconfigure()
        return self.async_abort(reason="not_supported")

    async def async_step_reauth(
        self, entry_data: Mapping[str, Any]
    ) -> ConfigFlowResult:
        """Ask for new credentials, by entry type."""
        entry_type = entry_type_of(self._get_reauth_entry())
        if entry_type is EntryType.MESHTASTIC_NODE:
            return await self.async_step_reauth_confirm()
        if entry_type is EntryType.MQTT_BROKER:
            return await self.async_step_broker_reauth()
        return self.async_abort(reason="not_supported")
