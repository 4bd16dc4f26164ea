"""Repair issues are raised only when the user must act, and cleared when fixed."""

from __future__ import annotations

import json
from pathlib import Path

from homeassistant.core import HomeAssistant
from homeassistant.helpers import issue_registry as ir
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge import issues
from custom_components.mqtt_bridge.const import DOMAIN
from custom_components.mqtt_bridge.engine.proxy import ProxyStatus
from custom_components.mqtt_bridge.engine.rules import ProxyRequirement
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
        mqtt_issue = f"node_mqtt_disabled_{entry.entry_id}"
        proxy_issue = f"node_proxy_to_client_disabled_{entry.entry_id}"
        # One issue per setting that is off, translated without enum values.
        await wait_for(
            lambda: (
                issue_registry.async_get_issue(DOMAIN, mqtt_issue) is not None
                and issue_registry.async_get_issue(DOMAIN, proxy_issue) is not None
            )
        )
        for issue_id in (mqtt_issue, proxy_issue):
            issue = issue_registry.async_get_issue(DOMAIN, issue_id)
            assert issue is not None
            assert issue.translation_placeholders == {"name": "Sim Node"}
            assert not issue.is_fixable
        runtime.link.backoff.base = runtime.link.backoff.cap = 0.05

        # MQTT turned on, "Proxy to client" still off: only that issue remains.
        handshakes = runtime.link.stats.handshakes
        node.profile.mqtt_enabled = True
        await node.reboot()
        await wait_for(lambda: runtime.link.stats.handshakes > handshakes)
        await wait_for(
            lambda: issue_registry.async_get_issue(DOMAIN, mqtt_issue) is None
        )
        assert runtime.proxy.status is ProxyStatus.NODE_SETTINGS_MISSING
        assert issue_registry.async_get_issue(DOMAIN, proxy_issue) is not None

        node.profile.proxy_to_client_enabled = True
        await node.reboot()
        await wait_for(lambda: runtime.proxy.status is ProxyStatus.RUNNING)
        assert issue_registry.async_get_issue(DOMAIN, proxy_issue) is None
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
        proxy = entry.runtime_data.proxy
        assert proxy.error
        assert issue.translation_placeholders == {
            "name": "Sim Node",
            "error": proxy.error,
        }
        # The node's settings are wrong: HA cannot re-authenticate for it.
        assert _reauth_flows(hass) == []
        assert proxy.status is ProxyStatus.BROKER_AUTH_FAILED
        assert await hass.config_entries.async_unload(entry.entry_id)
        # An unloaded entry has no issues: the next runtime checks again.
        assert issue_registry.async_get_issue(DOMAIN, issue_id) is None
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


def test_every_node_setting_has_a_translated_issue() -> None:
    """Each setting the proxy can report as missing has its own translated issue."""
    strings = json.loads(
        (Path(issues.__file__).parent / "translations" / "en.json").read_text(
            encoding="utf-8"
        )
    )["issues"]
    assert set(issues.SETTING_ISSUES) == set(ProxyRequirement)
    for key in issues.ALL_ISSUES:
        assert strings[key]["title"].startswith("{name}: ")
        assert strings[key]["description"]
