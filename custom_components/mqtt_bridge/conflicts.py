"""A conflict the user must know about: core MCP integrations pinning another ``mcp``.

On Home Assistant 2025.4 to 2025.x, core ``mcp`` and ``mcp_server`` pin
``mcp==1.5.0`` and break with ``mcp >= 1.8`` (its session-message streams),
while this integration's MQTT tools need ``mcp >= 1.12``
(``shared/reference/mcp-over-mqtt.md`` §4.1, §4.4). Only one version can be
installed. When one of those core integrations is set up and its pin does not
accept the installed ``mcp``, a repair issue says so instead of letting either
side fail silently; it is removed when the conflict is gone (e.g. after
upgrading Home Assistant, whose later core pins accept newer ``mcp``).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.loader import IntegrationNotFound, async_get_integration
from packaging.requirements import InvalidRequirement, Requirement

from .const import DOMAIN

ISSUE_MCP_CONFLICT = "mcp_version_conflict"
CORE_MCP_DOMAINS = ("mcp", "mcp_server")


def _installed_mcp() -> str | None:
    try:
        return version("mcp")
    except PackageNotFoundError:
        return None


async def async_check_mcp_conflict(hass: HomeAssistant) -> list[str]:
    """Raise or clear the repair issue; return the conflicting core requirements.

    Each item is ``"<domain>: <requirement>"``, e.g. ``"mcp_server: mcp==1.5.0"``.
    """
    installed = await hass.async_add_executor_job(_installed_mcp)
    conflicts: list[str] = []
    for domain in CORE_MCP_DOMAINS:
        if installed is None or not hass.config_entries.async_entries(domain):
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
