"""Config flow (user, reauth, reconfigure) and options flow of the MQTT broker entry.

Brokers are real Mosquitto processes (anonymous, with a password, with a
self-signed TLS listener); a closed port and a silent TCP peer stand for an
unreachable and a hanging broker. Only the set-up of created entries is
patched here (the runtime has its own tests, ``test_broker_runtime.py``), plus
the check timeout (shortened; the silent peer is real) and one unexpected
exception. Every result is checked against ``translations/en.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
import json
from typing import Any
from unittest.mock import AsyncMock, patch

from homeassistant.config_entries import SOURCE_USER
from homeassistant.const import CONF_HOST, CONF_PASSWORD, CONF_PORT, CONF_USERNAME
from homeassistant.core import HomeAssistant
from homeassistant.data_entry_flow import FlowResultType
import pytest
from pytest_homeassistant_custom_component.common import MockConfigEntry

from custom_components.mqtt_bridge import config_flow, flow_broker, flow_common
from custom_components.mqtt_bridge.const import (
    CONF_ALLOW_SELF_SIGNED,
    CONF_CA_FILE,
    CONF_CLIENT_ID_PREFIX,
    CONF_ENTRY_TYPE,
    CONF_INCLUDE_ASSIST,
    CONF_MCP_SERVERS,
    CONF_REQUIRE_ADMIN,
    CONF_RULES,
    CONF_TLS,
    DEFAULT_CLIENT_ID_PREFIX,
    DOMAIN,
)
from custom_components.mqtt_bridge.engine.acl import parse_rules, rules_to_json
from devkit.mosquitto import Mosquitto, free_port
from tests.common import TRANSLATIONS, add_broker_entry, check_flow_translations

READ = ["read"]
WRITE = ["write"]
BOTH = ["read", "write"]


@pytest.fixture(autouse=True)
def _translations_checked(hass: HomeAssistant) -> None:
    check_flow_translations(hass)


@pytest.fixture
def mock_setup_entry() -> Iterator[AsyncMock]:
    """Do not start the runtime when a flow creates or reloads an entry."""
    with (
        patch(
            "custom_components.mqtt_bridge.async_setup_entry", return_value=True
        ) as setup,
        patch("custom_components.mqtt_bridge.async_unload_entry", return_value=True),
    ):
        yield setup


class _SilentPeer:
    """A TCP server on 127.0.0.1 that accepts and never answers."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.append(writer)
        await reader.read()

    async def __aenter__(self) -> _SilentPeer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


def _form(port: int, **fields: Any) -> dict[str, Any]:
    return {
        CONF_HOST: "127.0.0.1",
        CONF_PORT: port,
        CONF_TLS: False,
        CONF_ALLOW_SELF_SIGNED: False,
        CONF_CLIENT_ID_PREFIX: "ha-test",
        **fields,
    }


async def _start_broker_flow(hass: HomeAssistant) -> dict[str, Any]:
    result = await hass.config_entries.flow.async_init(
        DOMAIN, context={"source": SOURCE_USER}
    )
    assert result["type"] is FlowResultType.MENU
    assert result["menu_options"] == ["meshtastic", "mqtt_broker"]
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {"next_step_id": "mqtt_broker"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "mqtt_broker"
    return result


def _defaults(result: dict[str, Any]) -> dict[str, Any]:
    """The form's default and suggested values, by field."""
    values: dict[str, Any] = {}
    for key in result["data_schema"].schema:
        default = key.default() if callable(key.default) else None
        suggested = (key.description or {}).get("suggested_value")
        values[str(key)] = suggested if suggested is not None else default
    return values


def _mqtt_entry(hass: HomeAssistant, **data: Any) -> MockConfigEntry:
    """Home Assistant's own MQTT integration's entry (not set up)."""
    entry = MockConfigEntry(domain="mqtt", data=data)
    entry.add_to_hass(hass)
    return entry


# -- user step ---------------------------------------------------------------------


async def test_create_entry(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, mosquitto: Mosquitto
) -> None:
    result = await _start_broker_flow(hass)
    assert result["description_placeholders"] == {"mqtt_broker": "—"}
    assert _defaults(result) == {
        CONF_HOST: "",
        CONF_PORT: 1883,
        CONF_USERNAME: None,
        CONF_PASSWORD: None,
        CONF_TLS: False,
        CONF_ALLOW_SELF_SIGNED: False,
        CONF_CA_FILE: None,
        CONF_CLIENT_ID_PREFIX: DEFAULT_CLIENT_ID_PREFIX,
    }

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        _form(mosquitto.port, **{CONF_HOST: " 127.0.0.1 ", CONF_CA_FILE: "/x.pem"}),
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["title"] == f"MQTT 127.0.0.1:{mosquitto.port}"
    assert result["data"] == {
        CONF_ENTRY_TYPE: "mqtt_broker",
        CONF_HOST: "127.0.0.1",
        CONF_PORT: mosquitto.port,
        CONF_USERNAME: "",
        CONF_PASSWORD: "",
        CONF_TLS: False,
        CONF_ALLOW_SELF_SIGNED: False,
        # Not checked without TLS (and not used).
        CONF_CA_FILE: "/x.pem",
        CONF_CLIENT_ID_PREFIX: "ha-test",
    }
    assert result["options"] == {
        CONF_RULES: [],
        CONF_REQUIRE_ADMIN: False,
        CONF_INCLUDE_ASSIST: False,
    }
    entry = result["result"]
    assert entry.unique_id == f"127.0.0.1:{mosquitto.port}:"
    assert mock_setup_entry.called


async def test_defaults_from_mqtt_integration(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, password_broker: Mosquitto
) -> None:
    """The MQTT integration's broker is offered; its password is used, not shown."""
    _mqtt_entry(
        hass,
        broker="127.0.0.1",
        port=password_broker.port,
        username="u",
        password="p",
        discovery=True,
    )
    result = await _start_broker_flow(hass)
    assert result["description_placeholders"] == {
        "mqtt_broker": f"127.0.0.1:{password_broker.port}"
    }
    defaults = _defaults(result)
    assert defaults[CONF_HOST] == "127.0.0.1"
    assert defaults[CONF_PORT] == password_broker.port
    assert defaults[CONF_USERNAME] == "u"
    assert defaults[CONF_PASSWORD] is None

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(password_broker.port, **{CONF_USERNAME: "u"})
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_USERNAME] == "u"
    assert result["data"][CONF_PASSWORD] == "p"
    assert result["result"].unique_id == f"127.0.0.1:{password_broker.port}:u"


async def test_mosquitto_add_on_defaults(hass: HomeAssistant) -> None:
    """The usual case: the Mosquitto add-on; an entry without broker is skipped."""
    _mqtt_entry(hass)
    _mqtt_entry(hass, broker="core-mosquitto", port=1883, username="addons")
    result = await _start_broker_flow(hass)
    defaults = _defaults(result)
    assert defaults[CONF_HOST] == "core-mosquitto"
    assert defaults[CONF_PORT] == 1883
    assert defaults[CONF_USERNAME] == "addons"
    assert result["description_placeholders"] == {"mqtt_broker": "core-mosquitto:1883"}


async def test_integration_password_only_for_its_host(
    hass: HomeAssistant, password_broker: Mosquitto
) -> None:
    """The MQTT integration's password is never sent to another host."""
    _mqtt_entry(hass, broker="core-mosquitto", port=1883, username="u", password="p")
    result = await _start_broker_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(password_broker.port, **{CONF_USERNAME: "u"})
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}


async def test_invalid_auth(hass: HomeAssistant, password_broker: Mosquitto) -> None:
    result = await _start_broker_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        _form(password_broker.port, **{CONF_USERNAME: "u", CONF_PASSWORD: "wrong"}),
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"base": "invalid_auth"}
    # The form keeps what was typed (but never the password).
    defaults = _defaults(result)
    assert defaults[CONF_USERNAME] == "u"
    assert defaults[CONF_PASSWORD] is None
    assert defaults[CONF_CLIENT_ID_PREFIX] == "ha-test"


async def test_tls(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, tls_broker: Mosquitto
) -> None:
    """A self-signed broker fails verification; its CA file or "allow" passes."""
    assert tls_broker.tls_port is not None
    result = await _start_broker_flow(hass)
    flow_id = result["flow_id"]
    result = await hass.config_entries.flow.async_configure(
        flow_id, _form(tls_broker.tls_port, **{CONF_TLS: True})
    )
    assert result["errors"] == {"base": "tls_failed"}

    result = await hass.config_entries.flow.async_configure(
        flow_id,
        _form(
            tls_broker.tls_port,
            **{CONF_TLS: True, CONF_CA_FILE: str(tls_broker.workdir / "missing.pem")},
        ),
    )
    assert result["errors"] == {CONF_CA_FILE: "invalid_ca_file"}

    result = await hass.config_entries.flow.async_configure(
        flow_id,
        _form(
            tls_broker.tls_port,
            **{CONF_TLS: True, CONF_CA_FILE: str(tls_broker.cert_path)},
        ),
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_CA_FILE] == str(tls_broker.cert_path)
    assert result["data"][CONF_ALLOW_SELF_SIGNED] is False

    result = await _start_broker_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        _form(
            tls_broker.tls_port,
            **{CONF_TLS: True, CONF_ALLOW_SELF_SIGNED: True, CONF_USERNAME: "x"},
        ),
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert result["data"][CONF_ALLOW_SELF_SIGNED] is True


async def test_cannot_connect(hass: HomeAssistant) -> None:
    result = await _start_broker_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(free_port())
    )
    assert result["errors"] == {"base": "cannot_connect"}


async def test_timeout(hass: HomeAssistant) -> None:
    """A peer that accepts and never answers CONNACK is a timeout."""
    result = await _start_broker_flow(hass)
    async with _SilentPeer() as peer:
        with patch.object(flow_common, "BROKER_TIMEOUT", 0.3):
            result = await hass.config_entries.flow.async_configure(
                result["flow_id"], _form(peer.port)
            )
    assert result["errors"] == {"base": "timeout"}


async def test_unknown_error(hass: HomeAssistant) -> None:
    result = await _start_broker_flow(hass)
    with patch.object(
        flow_common, "check_connection", AsyncMock(side_effect=RuntimeError("boom"))
    ):
        result = await hass.config_entries.flow.async_configure(
            result["flow_id"], _form(1883)
        )
    assert result["errors"] == {"base": "unknown"}


async def test_invalid_fields(hass: HomeAssistant) -> None:
    """Field errors are shown before anything connects."""
    result = await _start_broker_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        _form(1883, **{CONF_HOST: "  ", CONF_CLIENT_ID_PREFIX: "has space"}),
    )
    assert result["errors"] == {
        CONF_HOST: "invalid_host",
        CONF_CLIENT_ID_PREFIX: "invalid_client_id_prefix",
    }
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(1883, **{CONF_CLIENT_ID_PREFIX: "x" * 33})
    )
    assert result["errors"] == {CONF_CLIENT_ID_PREFIX: "invalid_client_id_prefix"}


async def test_duplicate_aborts_before_connecting(hass: HomeAssistant) -> None:
    port = free_port()  # nothing listens: a check would fail with cannot_connect
    add_broker_entry(hass, port, username="u")
    result = await _start_broker_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(port, **{CONF_USERNAME: "u", CONF_PASSWORD: "p"})
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "broker_already_configured"


# -- reauth ------------------------------------------------------------------------


async def test_reauth(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, password_broker: Mosquitto
) -> None:
    entry = add_broker_entry(
        hass, password_broker.port, title="Broker", username="u", password="old"
    )
    result = await entry.start_reauth_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "broker_reauth"
    assert result["description_placeholders"] == {
        "name": "Broker",
        "broker": f"127.0.0.1:{password_broker.port}",
    }
    assert _defaults(result) == {CONF_USERNAME: "u", CONF_PASSWORD: None}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_USERNAME: "u", CONF_PASSWORD: "wrong"}
    )
    assert result["errors"] == {"base": "invalid_auth"}

    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_USERNAME: " u ", CONF_PASSWORD: "p"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reauth_successful"
    assert entry.data[CONF_USERNAME] == "u"
    assert entry.data[CONF_PASSWORD] == "p"
    assert entry.data[CONF_CLIENT_ID_PREFIX] == "test-bridge"
    assert entry.unique_id == f"127.0.0.1:{password_broker.port}:u"


async def test_reauth_empty_password_keeps_saved(
    hass: HomeAssistant, mock_setup_entry: AsyncMock, password_broker: Mosquitto
) -> None:
    """An empty password keeps the saved one (e.g. the broker was misconfigured)."""
    entry = add_broker_entry(hass, password_broker.port, username="u", password="p")
    result = await entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_USERNAME: "u"}
    )
    assert result["reason"] == "reauth_successful"
    assert entry.data[CONF_PASSWORD] == "p"


async def test_reauth_to_a_configured_user_aborts(
    hass: HomeAssistant, password_broker: Mosquitto
) -> None:
    entry = add_broker_entry(hass, password_broker.port, username="old", password="x")
    add_broker_entry(hass, password_broker.port, username="u", password="p")
    result = await entry.start_reauth_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], {CONF_USERNAME: "u", CONF_PASSWORD: "p"}
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "broker_already_configured"
    assert entry.data[CONF_USERNAME] == "old"


# -- reconfigure -------------------------------------------------------------------


async def test_reconfigure(
    hass: HomeAssistant,
    mock_setup_entry: AsyncMock,
    mosquitto: Mosquitto,
    password_broker: Mosquitto,
) -> None:
    """A default title follows the broker; the password is kept when left empty."""
    entry = add_broker_entry(
        hass,
        password_broker.port,
        title=f"MQTT 127.0.0.1:{password_broker.port}",
        username="u",
        password="p",
    )
    result = await entry.start_reconfigure_flow(hass)
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "broker_reconfigure"
    defaults = _defaults(result)
    assert defaults[CONF_PORT] == password_broker.port
    assert defaults[CONF_USERNAME] == "u"
    assert defaults[CONF_PASSWORD] is None
    assert defaults[CONF_CLIENT_ID_PREFIX] == "test-bridge"

    # Same broker, new prefix, empty password: the saved password is used.
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"],
        _form(password_broker.port, **{CONF_USERNAME: "u", CONF_CLIENT_ID_PREFIX: "n"}),
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "reconfigure_successful"
    assert entry.data[CONF_PASSWORD] == "p"
    assert entry.data[CONF_CLIENT_ID_PREFIX] == "n"

    # Another broker: errors first, then the move.
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(free_port())
    )
    assert result["errors"] == {"base": "cannot_connect"}
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(mosquitto.port)
    )
    assert result["reason"] == "reconfigure_successful"
    assert entry.data[CONF_PORT] == mosquitto.port
    assert entry.data[CONF_USERNAME] == ""
    assert entry.data[CONF_PASSWORD] == ""
    assert entry.unique_id == f"127.0.0.1:{mosquitto.port}:"
    assert entry.title == f"MQTT 127.0.0.1:{mosquitto.port}"
    assert entry.options[CONF_RULES] == []


async def test_reconfigure_keeps_custom_title_and_refuses_duplicates(
    hass: HomeAssistant,
    mock_setup_entry: AsyncMock,
    mosquitto: Mosquitto,
    private_mosquitto: Mosquitto,
) -> None:
    entry = add_broker_entry(hass, mosquitto.port, title="Garage broker")
    add_broker_entry(hass, private_mosquitto.port, title="Other")
    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(private_mosquitto.port)
    )
    assert result["type"] is FlowResultType.ABORT
    assert result["reason"] == "broker_already_configured"
    assert entry.data[CONF_PORT] == mosquitto.port

    result = await entry.start_reconfigure_flow(hass)
    result = await hass.config_entries.flow.async_configure(
        result["flow_id"], _form(mosquitto.port, **{CONF_CLIENT_ID_PREFIX: "garage"})
    )
    assert result["reason"] == "reconfigure_successful"
    assert entry.title == "Garage broker"
    assert entry.data[CONF_CLIENT_ID_PREFIX] == "garage"


async def test_options_flow_is_the_broker_one(hass: HomeAssistant) -> None:
    entry = add_broker_entry(hass, 1883)
    flow = config_flow.MqttBridgeConfigFlow
    assert flow.async_supports_options_flow(entry)
    assert isinstance(flow.async_get_options_flow(entry), flow_broker.BrokerOptionsFlow)


# -- options: the rules menu ---------------------------------------------------------


def _rule(pattern: str, permissions: list[str], description: str = "") -> dict:
    return {"pattern": pattern, "permissions": permissions, "description": description}


@pytest.fixture
async def broker_entry(
    hass: HomeAssistant, mock_setup_entry: AsyncMock
) -> MockConfigEntry:
    """A broker entry (runtime not started) with two rules and settings off."""
    return add_broker_entry(
        hass,
        1883,
        rules=[
            _rule("sensors/+/temperature", READ, "Temperatures in °C"),
            _rule("lights/`odd`/set", WRITE),
        ],
    )


async def _menu(hass: HomeAssistant, entry: MockConfigEntry) -> dict[str, Any]:
    result = await hass.config_entries.options.async_init(entry.entry_id)
    assert result["type"] is FlowResultType.MENU
    return result


async def _choose(
    hass: HomeAssistant, entry: MockConfigEntry, option: str
) -> dict[str, Any]:
    result = await _menu(hass, entry)
    return await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": option}
    )


async def test_menu_lists_rules(
    hass: HomeAssistant, broker_entry: MockConfigEntry
) -> None:
    result = await _menu(hass, broker_entry)
    assert result["step_id"] == "acl"
    assert result["menu_options"] == [
        "add_rule",
        "edit_rule",
        "delete_rules",
        "import_rules",
        "export_rules",
        "settings",
    ]
    assert result["description_placeholders"] == {
        "count": "2",
        "rules": "- `sensors/+/temperature` (read): Temperatures in °C\n"
        "- `` lights/`odd`/set `` (write)",
    }


async def test_menu_without_rules_says_default_deny(
    hass: HomeAssistant, mock_setup_entry: AsyncMock
) -> None:
    entry = add_broker_entry(hass, 1883)
    result = await _menu(hass, entry)
    assert result["step_id"] == "acl_empty"
    assert result["menu_options"] == ["add_rule", "import_rules", "settings"]
    description = TRANSLATIONS["options"]["step"]["acl_empty"]["description"]
    assert "every tool call is denied" in description


async def test_unreadable_stored_rules_are_replaced(
    hass: HomeAssistant, mock_setup_entry: AsyncMock
) -> None:
    """Rules the runtime cannot read (they grant nothing) are replaced when saving."""
    entry = add_broker_entry(hass, 1883, options={CONF_RULES: "garbage"})
    result = await _menu(hass, entry)
    assert result["step_id"] == "acl_empty"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"next_step_id": "add_rule"}
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"pattern": "a/#", "permissions": READ}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert entry.options[CONF_RULES] == [_rule("a/#", READ)]


async def test_add_rule(hass: HomeAssistant, broker_entry: MockConfigEntry) -> None:
    result = await _choose(hass, broker_entry, "add_rule")
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "rule"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            "pattern": "home/+/state",
            "permissions": BOTH,
            "description": "  Room states\n",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert broker_entry.options[CONF_RULES][-1] == _rule(
        "home/+/state", BOTH, "Room states"
    )
    assert len(broker_entry.options[CONF_RULES]) == 3
    assert broker_entry.options[CONF_REQUIRE_ADMIN] is False


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("", "pattern_empty"),
        ("a" * 65536, "pattern_too_long"),
        ("a/\x00", "pattern_null_character"),
        ("a/\ud800", "pattern_lone_surrogate"),
        ("a/\x07", "pattern_control_character"),
        ("a/#/b", "pattern_invalid_wildcard"),
        ("a/b+", "pattern_invalid_wildcard"),
        ("$share//a", "pattern_invalid_share"),
        ("$share/group/a/#", "pattern_share_rule"),
        ("sensors/+/temperature", "duplicate_pattern"),
    ],
)
async def test_add_rule_pattern_errors(
    hass: HomeAssistant, broker_entry: MockConfigEntry, pattern: str, error: str
) -> None:
    before = dict(broker_entry.options)
    result = await _choose(hass, broker_entry, "add_rule")
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"pattern": pattern, "permissions": READ}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"pattern": error}
    assert dict(broker_entry.options) == before


async def test_add_rule_needs_a_permission(
    hass: HomeAssistant, broker_entry: MockConfigEntry
) -> None:
    result = await _choose(hass, broker_entry, "add_rule")
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"pattern": "a/#", "permissions": []}
    )
    assert result["errors"] == {"permissions": "no_permissions"}
    # What was typed is kept.
    assert _defaults(result)["pattern"] == "a/#"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"pattern": "a/b+", "permissions": []}
    )
    assert result["errors"] == {
        "pattern": "pattern_invalid_wildcard",
        "permissions": "no_permissions",
    }


async def test_unknown_pattern_problem_is_shown_with_its_text(
    hass: HomeAssistant, broker_entry: MockConfigEntry
) -> None:
    """A problem code this version has no translation for shows the engine's text."""
    result = await _choose(hass, broker_entry, "add_rule")
    with patch.object(flow_broker, "rule_problem", return_value="is odd"):
        result = await hass.config_entries.options.async_configure(
            result["flow_id"], {"pattern": "x", "permissions": READ}
        )
    assert result["errors"] == {"pattern": "invalid_pattern"}
    assert result["description_placeholders"]["problem"] == "is odd"


async def test_edit_rule(hass: HomeAssistant, broker_entry: MockConfigEntry) -> None:
    result = await _choose(hass, broker_entry, "edit_rule")
    assert result["step_id"] == "edit_rule"
    selector = result["data_schema"].schema["rule"]
    assert [o["label"] for o in selector.config["options"]] == [
        "sensors/+/temperature (read): Temperatures in °C",
        "lights/`odd`/set (write)",
    ]
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"rule": "0"}
    )
    assert result["step_id"] == "rule"
    assert _defaults(result) == {
        "pattern": "sensors/+/temperature",
        "permissions": READ,
        "description": "Temperatures in °C",
    }
    # Its own pattern is not a duplicate; another rule's is.
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"pattern": "lights/`odd`/set", "permissions": READ}
    )
    assert result["errors"] == {"pattern": "duplicate_pattern"}
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {"pattern": "sensors/+/temperature", "permissions": BOTH},
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert broker_entry.options[CONF_RULES] == [
        _rule("sensors/+/temperature", BOTH),
        _rule("lights/`odd`/set", WRITE),
    ]


async def test_edit_rule_that_went_away(
    hass: HomeAssistant, broker_entry: MockConfigEntry
) -> None:
    """The rules changed meanwhile (another flow): the choice is asked again."""
    result = await _choose(hass, broker_entry, "edit_rule")
    hass.config_entries.async_update_entry(
        broker_entry, options={**broker_entry.options, CONF_RULES: []}
    )
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"rule": "1"}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "edit_rule"


async def test_delete_rules(hass: HomeAssistant, broker_entry: MockConfigEntry) -> None:
    result = await _choose(hass, broker_entry, "delete_rules")
    assert result["step_id"] == "delete_rules"
    result = await hass.config_entries.options.async_configure(result["flow_id"], {})
    assert result["errors"] == {"rules": "no_rules_selected"}
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"rules": ["0"]}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert broker_entry.options[CONF_RULES] == [_rule("lights/`odd`/set", WRITE)]


MCPMQTT_TOPICS = """[
  {"pattern": "sensors/+/temperature", "permissions": ["read"],
   "description": "Temperature readings"},
  {"pattern": "actuators/#", "permissions": ["read", "write"], "description": null},
  {"pattern": "status", "permissions": ["write", "read", "read"]}
]"""


async def test_import_rules(hass: HomeAssistant, broker_entry: MockConfigEntry) -> None:
    """mcpMQTT's topics array, pasted unchanged, replaces the rules."""
    result = await _choose(hass, broker_entry, "import_rules")
    assert result["step_id"] == "import_rules"
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"rules": MCPMQTT_TOPICS}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert broker_entry.options[CONF_RULES] == [
        _rule("sensors/+/temperature", READ, "Temperature readings"),
        _rule("actuators/#", BOTH),
        _rule("status", BOTH),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", ("invalid_rules", "", "not valid JSON")),
        ('{"topics": []}', ("invalid_rules", "", "paste only the value")),
        (
            '[{"pattern": "a", "permissions": ["read"]}, '
            '{"pattern": "a/#/b", "permissions": ["read"]}]',
            ("invalid_rule", "1", "not a valid topic filter"),
        ),
        ('[{"pattern": "a", "permissions": []}]', ("invalid_rule", "0", "empty")),
        (
            '[{"pattern": "a", "permissions": ["admin"]}]',
            ("invalid_rule", "0", "unknown permission"),
        ),
        (
            '[{"pattern": "a", "permissions": ["read"]}, '
            '{"pattern": "a", "permissions": ["write"]}]',
            ("invalid_rule", "1", "already used by rule 0"),
        ),
    ],
)
async def test_import_rules_errors_change_nothing(
    hass: HomeAssistant,
    broker_entry: MockConfigEntry,
    text: str,
    expected: tuple[str, str, str],
) -> None:
    error, index, problem = expected
    before = dict(broker_entry.options)
    result = await _choose(hass, broker_entry, "import_rules")
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"rules": text}
    )
    assert result["type"] is FlowResultType.FORM
    assert result["errors"] == {"rules": error}
    placeholders = result["description_placeholders"]
    assert placeholders["index"] == index
    assert problem in placeholders["problem"]
    # The pasted text stays in the field to be fixed.
    assert _defaults(result)["rules"] == text
    assert dict(broker_entry.options) == before


async def test_import_empty_list_denies_all(
    hass: HomeAssistant, broker_entry: MockConfigEntry
) -> None:
    result = await _choose(hass, broker_entry, "import_rules")
    result = await hass.config_entries.options.async_configure(
        result["flow_id"], {"rules": "[]"}
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert broker_entry.options[CONF_RULES] == []


async def test_export_rules(hass: HomeAssistant, broker_entry: MockConfigEntry) -> None:
    """The rules as mcpMQTT JSON in the description; submitting goes back."""
    result = await _choose(hass, broker_entry, "export_rules")
    assert result["type"] is FlowResultType.FORM
    assert result["step_id"] == "export_rules"
    assert result["data_schema"] is None
    exported = result["description_placeholders"]["rules"]
    assert json.loads(exported) == broker_entry.options[CONF_RULES]
    # What is exported imports back to the same rules.
    assert rules_to_json(parse_rules(exported)) == exported

    result = await hass.config_entries.options.async_configure(result["flow_id"], {})
    assert result["type"] is FlowResultType.MENU
    assert result["step_id"] == "acl"


async def test_settings(hass: HomeAssistant, broker_entry: MockConfigEntry) -> None:
    rules = broker_entry.options[CONF_RULES]
    result = await _choose(hass, broker_entry, "settings")
    assert result["step_id"] == "settings"
    assert _defaults(result) == {
        CONF_REQUIRE_ADMIN: False,
        CONF_INCLUDE_ASSIST: False,
        CONF_MCP_SERVERS: "*",
    }
    result = await hass.config_entries.options.async_configure(
        result["flow_id"],
        {
            CONF_REQUIRE_ADMIN: True,
            CONF_INCLUDE_ASSIST: True,
            CONF_MCP_SERVERS: "home/*, tools",
        },
    )
    assert result["type"] is FlowResultType.CREATE_ENTRY
    assert broker_entry.options == {
        CONF_RULES: rules,
        CONF_REQUIRE_ADMIN: True,
        CONF_INCLUDE_ASSIST: True,
        CONF_MCP_SERVERS: ["home/*", "tools"],
    }
    result = await _choose(hass, broker_entry, "settings")
    assert _defaults(result) == {
        CONF_REQUIRE_ADMIN: True,
        CONF_INCLUDE_ASSIST: True,
        CONF_MCP_SERVERS: "home/*\ntools",
    }
