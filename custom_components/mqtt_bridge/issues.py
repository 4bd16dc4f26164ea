"""Repair issues of a Meshtastic node entry, raised and cleared from the proxy status.

Issues appear only when the user must act (quality scale: repair-issues), one
per cause, with ids ``<translation key>_<entry id>``:

* ``node_mqtt_disabled`` / ``node_proxy_to_client_disabled``: one issue per node
  setting the client proxy needs (:class:`~.engine.rules.ProxyRequirement`);
* ``invalid_broker_address``: the node's MQTT address cannot be parsed;
* ``broker_auth_failed``: the broker in the *node's* settings rejected the
  credentials (only the node's settings can fix it). With a custom broker
  Home Assistant owns the credentials, so a reauth flow starts instead, once
  per runtime;
* ``virtual_node_port_in_use``: the port of the shared node (the virtual node
  server, :mod:`.node_sharing`) cannot be bound (placeholders ``port`` and
  ``error``). Raised by :meth:`NodeIssues.async_share_port_unavailable`,
  deleted once the port is bound (:meth:`NodeIssues.async_share_port_bound`)
  and when the entry is unloaded (a change of the options reloads it).

Not named ``repairs.py``: Home Assistant loads ``<integration>.repairs`` as the
repairs platform and rejects one without ``async_create_fix_flow``
(``homeassistant/components/repairs/issue_handler.py``); none of these issues
has a fix flow.
"""

from __future__ import annotations

from typing import Final

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir

from .const import (
    BROKER_MODE_CUSTOM,
    CONF_BROKER_MODE,
    DOMAIN,
    ISSUE_BROKER_ADDRESS,
    ISSUE_BROKER_AUTH,
    ISSUE_MQTT_DISABLED,
    ISSUE_PROXY_TO_CLIENT_DISABLED,
    ISSUE_VIRTUAL_NODE_PORT,
)
from .engine.proxy import MeshtasticProxy, ProxyStatus
from .engine.rules import ProxyRequirement

# The repair issue of each node setting the client proxy needs.
SETTING_ISSUES: Final[dict[ProxyRequirement, str]] = {
    ProxyRequirement.MQTT_ENABLED: ISSUE_MQTT_DISABLED,
    ProxyRequirement.PROXY_TO_CLIENT: ISSUE_PROXY_TO_CLIENT_DISABLED,
}
# The issues the proxy status decides (async_update raises or deletes each).
ALL_ISSUES: Final = (*SETTING_ISSUES.values(), ISSUE_BROKER_ADDRESS, ISSUE_BROKER_AUTH)
# The issues of sharing the node (raised and deleted by NodeSharing).
SHARING_ISSUES: Final = (ISSUE_VIRTUAL_NODE_PORT,)


class NodeIssues:
    """Keeps the repair issues (and the reauth flow) of one node entry current."""

    def __init__(self, hass: HomeAssistant, entry: ConfigEntry) -> None:
        """Track the issues of ``entry``; nothing is raised before the first update."""
        self.hass = hass
        self.entry = entry
        self._last: tuple[object, ...] | None = None
        self._reauth_started = False

    def issue_id(self, key: str) -> str:
        """Return the id of the entry's issue with translation key ``key``."""
        return f"{key}_{self.entry.entry_id}"

    def _raise(self, key: str, placeholders: dict[str, str]) -> None:
        """Create (or update in place) this entry's error issue ``key``, not fixable."""
        ir.async_create_issue(
            self.hass,
            DOMAIN,
            self.issue_id(key),
            is_fixable=False,
            severity=ir.IssueSeverity.ERROR,
            translation_key=key,
            translation_placeholders=placeholders,
        )

    @callback
    def async_update(self, proxy: MeshtasticProxy) -> None:
        """Raise the issues the proxy's status calls for and delete the others.

        Cheap when nothing changed (called on every proxy change): the status, the
        missing settings and the error text are compared with the last call.
        """
        status = proxy.status
        missing = tuple(proxy.missing_settings)
        state = (status, missing, proxy.error)
        if state == self._last:
            return
        self._last = state
        custom_broker = self.entry.options.get(CONF_BROKER_MODE) == BROKER_MODE_CUSTOM
        wanted: dict[str, dict[str, str]] = {}
        name = {"name": self.entry.title}
        if status is ProxyStatus.NODE_SETTINGS_MISSING:
            for setting in missing:
                if (key := SETTING_ISSUES.get(setting)) is not None:
                    wanted[key] = name
        elif status is ProxyStatus.INVALID_BROKER_ADDRESS:
            wanted[ISSUE_BROKER_ADDRESS] = {**name, "error": proxy.error or ""}
        elif status is ProxyStatus.BROKER_AUTH_FAILED:
            if custom_broker:
                if not self._reauth_started:
                    self._reauth_started = True
                    self.entry.async_start_reauth(self.hass)
            else:
                wanted[ISSUE_BROKER_AUTH] = {**name, "error": proxy.error or ""}
        for key in ALL_ISSUES:
            if key in wanted:
                self._raise(key, wanted[key])
            else:
                ir.async_delete_issue(self.hass, DOMAIN, self.issue_id(key))

    @callback
    def async_share_port_unavailable(self, port: int, error: str) -> None:
        """Raise ``virtual_node_port_in_use``: ``port`` cannot be bound (``error``).

        Raising it again with other placeholders updates it in place.
        """
        self._raise(
            ISSUE_VIRTUAL_NODE_PORT,
            {"name": self.entry.title, "port": str(port), "error": error},
        )

    @callback
    def async_share_port_bound(self) -> None:
        """Delete ``virtual_node_port_in_use``: the shared node listens now."""
        ir.async_delete_issue(self.hass, DOMAIN, self.issue_id(ISSUE_VIRTUAL_NODE_PORT))

    @callback
    def async_clear(self) -> None:
        """Delete all issues of the entry (it is unloaded; a new runtime re-checks)."""
        self._last = None
        for key in (*ALL_ISSUES, *SHARING_ISSUES):
            ir.async_delete_issue(self.hass, DOMAIN, self.issue_id(key))
