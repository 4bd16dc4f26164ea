"""A conflict the user must know about: core MCP integrations pinning another ``mcp``.

On Home Assistant 2025.4 to 2025.x, core ``mcp`` and ``mcp_server`` pin
``mcp==1.5.0`` and break with ``mcp >= 1.8`` (its session-message streams),
while this integration's MQTT tools need ``mcp >= 1.12``
(``shared/reference/mcp-over-mqtt.md`` §4.1, §4.4). Only one version can be
installed. When one of those core integrations is set up and its pin does not
accept the installed ``mcp``, a repair issue says so instead of letting either
side fail silently; it is removed when the conflict is gone (e.g. after
upgrading Home Assistant, whose later core pins accept newer ``mcp``). Only
entries that can be set up count: disabled and ignored ones install nothing.
Once checked, the check runs again whenever an entry of those core
integrations is added, changed (e.g. disabled) or removed, so the issue
follows the user's fix without a restart.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from homeassistant.config_entries import (
    SIGNAL_CONFIG_ENTRY_CHANGED,
    ConfigEntry,
    ConfigEntryChange,
)
from homeassistant.core import HomeAssistant, callback
from homeassistant.helpers import issue_registry as ir
from homeassistant.helpers.dispatcher import async_dispatcher_connect
from homeassistant.loader import IntegrationNotFound, async_get_integration
from homeassistant.util.hass_dict import HassKey
from packaging.requirements import InvalidRequirement, Requirement

from .const import DOMAIN

ISSUE_MCP_CONFLICT = "mcp_version_conflict"
CORE_MCP_DOMAINS = ("mcp", "mcp_server")
# Set once the re-check on core MCP entry changes is installed.
_WATCHING: HassKey[bool] = HassKey(f"{DOMAIN}_mcp_conflict_watch")


def _installed_mcp() -> str | None:
    try:
        return version("mcp")
    except PackageNotFoundError:
        return None


async def async_check_mcp_conflict(hass: HomeAssistant) -> list[str]:
    """Raise or clear the repair issue; return the conflicting core requirements.

    Each item is ``"<domain>: <requirement>"``, e.g. ``"mcp_server: mcp==1.5.0"``.
    """
    _async_watch(hass)
    installed = await hass.async_add_executor_job(_installed_mcp)
    conflicts: list[str] = []
    for domain in CORE_MCP_DOMAINS:
        if installed is None or not hass.config_entries.async_entries(
            domain, include_ignore=False, include_disabled=False
        ):
            continue
        try:
            integration = await async_get_integration(hass, domain)
        except IntegrationNotFound:
            continue
        for line in integration.requirements:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.name == "mcp" and not requirement.specifier.contains(
                installed, prereleases=True
            ):
                conflicts.append(f"{domain}: {line}")
    if conflicts:
        ir.async_create_issue(
            hass,
            DOMAIN,
            ISSUE_MCP_CONFLICT,
            is_fixable=False,
            severity=ir.IssueSeverity.WARNING,
            translation_key=ISSUE_MCP_CONFLICT,
            translation_placeholders={
                "installed": str(installed),
                "core": ", ".join(conflicts),
            },
        )
    else:
        ir.async_delete_issue(hass, DOMAIN, ISSUE_MCP_CONFLICT)
    return conflicts


@callback
def _async_watch(hass: HomeAssistant) -> None:
    """Check again when a core MCP entry is added, changed or removed (once per hass)."""
    if hass.data.get(_WATCHING):
        return
    hass.data[_WATCHING] = True

    @callback
    def _changed(_change: ConfigEntryChange, entry: ConfigEntry) -> None:
        if entry.domain in CORE_MCP_DOMAINS:
            hass.async_create_task(
                async_check_mcp_conflict(hass), f"{DOMAIN} mcp version check"
            )

    async_dispatcher_connect(hass, SIGNAL_CONFIG_ENTRY_CHANGED, _changed)
