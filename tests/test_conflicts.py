"""The repair issue for core MCP integrations whose ``mcp`` pin excludes ours.

HA 2025.4.4's core ``mcp`` and ``mcp_server`` require ``mcp==1.5.0``; the test
venv has ``mcp`` 1.12.4 (what this integration needs). A core MCP entry that
is only added (never set up) is enough to make the conflict live.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from unittest.mock import AsyncMock

from homeassistant.config_entries import SOURCE_IGNORE, ConfigEntryDisabler, ConfigFlow
from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from homeassistant.loader import async_get_integration
import pytest
from pytest_homeassistant_custom_component.common import (
    MockConfigEntry,
    MockModule,
    mock_config_flow,
    mock_integration,
    mock_platform,
)

from custom_components.mqtt_bridge import conflicts
from custom_components.mqtt_bridge.conflicts import (
    ISSUE_MCP_CONFLICT,
    async_check_mcp_conflict,
)
from custom_components.mqtt_bridge.const import DOMAIN
from devkit.mosquitto import Mosquitto
from tests.common import TRANSLATIONS, _placeholders
from tests.test_broker_runtime import setup_broker

INSTALLED = version("mcp")


def issue(issue_registry: ir.IssueRegistry) -> ir.IssueEntry | None:
    return issue_registry.async_get_issue(DOMAIN, ISSUE_MCP_CONFLICT)


def test_environment() -> None:
    """The versions these tests are about."""
    assert INSTALLED == "1.12.4"


async def test_core_pins_mcp_1_5(hass: HomeAssistant) -> None:
    for domain in ("mcp", "mcp_server"):
        integration = await async_get_integration(hass, domain)
        assert "mcp==1.5.0" in integration.requirements


async def test_issue_created_with_the_real_pin(
    hass: HomeAssistant, issue_registry: ir.IssueRegistry
) -> None:
    """HA 2025.4.4's own manifests: a core MCP entry, never set up, conflicts."""
    MockConfigEntry(domain="mcp_server", title="MCP Server").add_to_hass(hass)

    assert await async_check_mcp_conflict(hass) == ["mcp_server: mcp==1.5.0"]
    found = issue(issue_registry)
    assert found is not None
    assert found.domain == DOMAIN
    assert found.translation_key == ISSUE_MCP_CONFLICT
    assert found.severity is ir.IssueSeverity.WARNING
    assert found.is_fixable is False
    assert found.translation_placeholders == {
        "installed": INSTALLED,
        "core": "mcp_server: mcp==1.5.0",
    }
    # The English text exists and uses exactly these placeholders.
    strings = TRANSLATIONS["issues"][ISSUE_MCP_CONFLICT]
    assert strings["title"]
    assert _placeholders(strings["title"] + strings["description"]) == {
        "installed",
        "core",
    }

    # The client integration too: both named.
    MockConfigEntry(domain="mcp", title="Remote MCP").add_to_hass(hass)
    assert await async_check_mcp_conflict(hass) == [
        "mcp: mcp==1.5.0",
        "mcp_server: mcp==1.5.0",
    ]
    found = issue(issue_registry)
    assert found is not None
    assert found.translation_placeholders["core"] == (
        "mcp: mcp==1.5.0, mcp_server: mcp==1.5.0"
    )


class _CoreFlow(ConfigFlow):
    """Stands for a core MCP integration's config flow (never run)."""

    VERSION = 1


@pytest.fixture
async def core_mcp(hass: HomeAssistant) -> AsyncIterator[None]:
    """Core ``mcp`` and ``mcp_server`` with their real pins, but a module that loads.

    The real ``mcp_server`` cannot be imported here (its ``aiohttp_sse`` is
    not installed) and removing or setting up an entry imports it.
    """
    for domain in ("mcp", "mcp_server"):
        requirements = (await async_get_integration(hass, domain)).requirements
        assert "mcp==1.5.0" in requirements
        mock_integration(
            hass,
            MockModule(
                domain,
                requirements=list(requirements),
                async_setup_entry=AsyncMock(return_value=True),
                async_unload_entry=AsyncMock(return_value=True),
            ),
        )
        mock_platform(hass, f"{domain}.config_flow")
    with (
        mock_config_flow("mcp", _CoreFlow),
        mock_config_flow("mcp_server", _CoreFlow),
    ):
        yield


@pytest.mark.usefixtures("core_mcp")
async def test_issue_follows_the_core_entries(
    hass: HomeAssistant, issue_registry: ir.IssueRegistry
) -> None:
    """Added, set up, disabled, enabled, removed: the issue follows by itself."""
    server = MockConfigEntry(domain="mcp_server", title="MCP Server")
    server.add_to_hass(hass)
    client = MockConfigEntry(domain="mcp", title="Remote MCP")
    client.add_to_hass(hass)
    assert await async_check_mcp_conflict(hass) == [
        "mcp: mcp==1.5.0",
        "mcp_server: mcp==1.5.0",
    ]
    for entry in (server, client):
        assert await hass.config_entries.async_setup(entry.entry_id)
    await hass.async_block_till_done()

    # Removing one: the check runs again by itself.
    await hass.config_entries.async_remove(client.entry_id)
    await hass.async_block_till_done()
    found = issue(issue_registry)
    assert found is not None
    assert found.translation_placeholders["core"] == "mcp_server: mcp==1.5.0"

    # Disabled (unloaded, never set up again): cleared; enabled: back.
    await hass.config_entries.async_set_disabled_by(
        server.entry_id, ConfigEntryDisabler.USER
    )
    await hass.async_block_till_done()
    assert issue(issue_registry) is None
    await hass.config_entries.async_set_disabled_by(server.entry_id, None)
    await hass.async_block_till_done()
    assert issue(issue_registry) is not None

    # Removed: cleared.
    await hass.config_entries.async_remove(server.entry_id)
    await hass.async_block_till_done()
    assert issue(issue_registry) is None
    assert await async_check_mcp_conflict(hass) == []

    # Added again (as a flow adds it): raised again without an explicit check.
    await hass.config_entries.async_add(MockConfigEntry(domain="mcp_server"))
    await hass.async_block_till_done()
    assert issue(issue_registry) is not None


async def test_no_core_mcp_entry(
    hass: HomeAssistant, issue_registry: ir.IssueRegistry
) -> None:
    MockConfigEntry(domain="mqtt").add_to_hass(hass)
    assert await async_check_mcp_conflict(hass) == []
    assert issue(issue_registry) is None
    # Unrelated entries coming and going check nothing.
    MockConfigEntry(domain="mqtt").add_to_hass(hass)
    await hass.async_block_till_done()
    assert issue(issue_registry) is None


async def test_disabled_or_ignored_entry_is_no_conflict(
    hass: HomeAssistant, issue_registry: ir.IssueRegistry
) -> None:
    """Such entries are never set up: nothing installs their pin."""
    MockConfigEntry(
        domain="mcp_server", disabled_by=ConfigEntryDisabler.USER
    ).add_to_hass(hass)
    MockConfigEntry(domain="mcp", source=SOURCE_IGNORE).add_to_hass(hass)
    assert await async_check_mcp_conflict(hass) == []
    assert issue(issue_registry) is None


async def test_core_without_mcp_requirement(
    hass: HomeAssistant,
    issue_registry: ir.IssueRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A core manifest that accepts ours, names no mcp, or has an unreadable line."""
    MockConfigEntry(domain="mcp_server").add_to_hass(hass)
    integration = await async_get_integration(hass, "mcp_server")
    monkeypatch.setattr(
        integration, "requirements", ["aiohttp_sse==2.2.0", "not a req!"]
    )
    assert await async_check_mcp_conflict(hass) == []
    assert issue(issue_registry) is None

    # A later core pin that accepts the installed version.
    monkeypatch.setattr(integration, "requirements", ["mcp>=1.12,<2"])
    assert await async_check_mcp_conflict(hass) == []
    # One that does not.
    monkeypatch.setattr(integration, "requirements", ["mcp==1.26.0"])
    assert await async_check_mcp_conflict(hass) == ["mcp_server: mcp==1.26.0"]
    assert issue(issue_registry) is not None
    # The same entry still there, the pin fixed (HA upgraded): cleared.
    monkeypatch.setattr(integration, "requirements", ["mcp>=1.12"])
    assert await async_check_mcp_conflict(hass) == []
    assert issue(issue_registry) is None


async def test_mcp_not_installed_or_core_missing(
    hass: HomeAssistant,
    issue_registry: ir.IssueRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    MockConfigEntry(domain="mcp_server").add_to_hass(hass)

    def missing(_name: str) -> str:
        raise PackageNotFoundError("mcp")

    with monkeypatch.context() as patch:
        patch.setattr(conflicts, "version", missing)
        assert await async_check_mcp_conflict(hass) == []
    assert issue(issue_registry) is None

    # A HA without the core integration (removed in some later release).
    monkeypatch.setattr(conflicts, "CORE_MCP_DOMAINS", ("mcp_server_gone",))
    MockConfigEntry(domain="mcp_server_gone").add_to_hass(hass)
    assert await async_check_mcp_conflict(hass) == []
    assert issue(issue_registry) is None


async def test_broker_entry_runs_the_check(
    hass: HomeAssistant, mosquitto: Mosquitto, issue_registry: ir.IssueRegistry
) -> None:
    """Setting up a broker entry checks, in the background."""
    MockConfigEntry(domain="mcp_server").add_to_hass(hass)
    await setup_broker(hass, mosquitto.port)
    found = issue(issue_registry)
    assert found is not None
    assert found.translation_placeholders == {
        "installed": INSTALLED,
        "core": "mcp_server: mcp==1.5.0",
    }
