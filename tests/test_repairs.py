"""Repair issues are raised only when the user must act, and cleared when fixed."""

from __future__ import annotations

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge.const import DOMAIN
from custom_components.mqtt_bridge.engine.proxy import ProxyStatus
from devkit.meshsim import SimulatedNode, default_profile
from devkit.mosquitto import Mosquitto
from tests.common import add_node_entry, wait_for


async def _setup(hass: HomeAssistant, node: SimulatedNode) -> MockConfigEntry:
    entry = add_node_entry(hass, node.port)
    assert await hass.config_entries.async_setup(entry.entry_id)
    await wait_for(lambda: entry.runtime_data.available)
    return entry


def _reauth_flows(hass: HomeAssistant) -> list:
    return [
        flow
        for flow in hass.config_entries.flow.async_progress()
        if flow["context"]["source"] == "reauth"
    ]


async def test_missing_settings_issue_cleared_after_fix(
    hass: HomeAssistant, mosquitto: Mosquitto, issue_registry: ir.IssueRegistry
) -> None:
    node = SimulatedNode(
        default_profile(
            mqtt_address=f"127.0.0.1:{mosquitto.port}",
            mqtt_enabled=False,
            proxy_to_client_enabled=False,
        )
    )
    await node.start_tcp()
    try:
        entry = await _setup(hass, node)
        runtime = entry.runtime_data
        issue_id = f"node_settings_missing_{entry.entry_id}"
        await wait_for(lambda: issue_registry.async_get_issue(DOMAIN, issue_id))
        issue = issue_registry.async_get_issue(DOMAIN, issue_id)
        assert issue is not None
        assert issue.translation_placeholders["settings"] == (
            "mqtt_enabled, proxy_to_client_enabled"
        )
        assert not issue.is_fixable
        runtime.link.backoff.base = runtime.link.backoff.cap = 0.05
        node.profile.mqtt_enabled = True
        node.profile.proxy_to_client_enabled = True
        await node.reboot()
        await wait_for(lambda: runtime.proxy.status is ProxyStatus.RUNNING)
        assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
        await wait_for(lambda: runtime.proxy.broker_connected)
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await node.stop()


async def test_rejected_node_broker_credentials_raise_repair_not_reauth(
    hass: HomeAssistant, password_broker: Mosquitto, issue_registry: ir.IssueRegistry
) -> None:
    node = SimulatedNode(
        default_profile(
            mqtt_address=f"127.0.0.1:{password_broker.port}",
            mqtt_username="u",
            mqtt_password="wrong",
        )
    )
    await node.start_tcp()
    try:
        entry = await _setup(hass, node)
        issue_id = f"broker_auth_failed_{entry.entry_id}"
        await wait_for(lambda: issue_registry.async_get_issue(DOMAIN, issue_id))
        issue = issue_registry.async_get_issue(DOMAIN, issue_id)
        assert issue is not None
        assert "credentials" in issue.translation_placeholders["error"]
        # The node's settings are wrong: HA cannot re-authenticate for it.
        assert _reauth_flows(hass) == []
        assert entry.runtime_data.proxy.status is ProxyStatus.BROKER_AUTH_FAILED
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await node.stop()


async def test_invalid_node_broker_address_raises_repair(
    hass: HomeAssistant, issue_registry: ir.IssueRegistry
) -> None:
    node = SimulatedNode(default_profile(mqtt_address="broker.lan:notaport"))
    await node.start_tcp()
    try:
        entry = await _setup(hass, node)
        issue_id = f"invalid_broker_address_{entry.entry_id}"
        await wait_for(lambda: issue_registry.async_get_issue(DOMAIN, issue_id))
        issue = issue_registry.async_get_issue(DOMAIN, issue_id)
        assert issue is not None
        assert "broker.lan:notaport" in issue.translation_placeholders["error"]
        assert entry.runtime_data.proxy.broker is None
        assert await hass.config_entries.async_unload(entry.entry_id)
    finally:
        await node.stop()
