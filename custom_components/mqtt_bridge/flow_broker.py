"""Config and options flow steps of the MQTT broker entry type.

The config flow asks for the broker (host, port, credentials, TLS with
certificate verification on unless "allow self-signed", an optional CA file,
the client id prefix), offers the settings of Home Assistant's own ``mqtt``
integration as defaults (usually the Mosquitto add-on, ``core-mosquitto``),
connects once before creating the entry (:func:`.flow_common.async_check_broker`)
and creates an entry of type ``mqtt_broker`` whose unique id is
``host:port:username``. Reauth asks for new credentials, reconfigure for all
settings; both update the entry and abort, and the entry's update listener
reloads it (the pattern that stays valid in HA 2026.12).

:class:`BrokerOptionsFlow` edits the topic ACL (``options["rules"]``, the
engine's :func:`.engine.acl.rules_to_options` format) as a menu: add, edit,
delete, import (mcpMQTT's ``topics`` JSON), export, and the settings of the
HTTP endpoint, the LLM API and which MCP servers announced on the broker
become LLM APIs (``mcp_servers``, :mod:`.remote_llm`). Every change saves the options at once; the
runtime applies them live, without a reload or a reconnect
(:meth:`.broker_runtime.BrokerRuntime.needs_reload`).

A password field left empty keeps a known password of the same user on the
same host: the saved one (reauth, reconfigure) or the ``mqtt`` integration's
(user step); a password is never sent to the browser as a default.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import re
from typing import Any, Final

from homeassistant.config_entries import (
    ConfigEntry,
    ConfigFlow,
    ConfigFlowResult,
    OptionsFlow,
)
from homeassistant.const import CONF_HOST, CONF_PASSWORD, CONF_PORT, CONF_USERNAME
from homeassistant.helpers.selector import (
    BooleanSelector,
    SelectOptionDict,
    SelectSelector,
    SelectSelectorConfig,
    SelectSelectorMode,
    TextSelector,
    TextSelectorConfig,
)
import voluptuous as vol

from .broker_runtime import broker_settings
from .const import (
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
    DEFAULT_INCLUDE_ASSIST,
    DEFAULT_MCP_SERVERS,
    DEFAULT_REQUIRE_ADMIN,
    DOMAIN,
    EntryType,
)
from .engine.acl import (
    AclImportError,
    AclRule,
    Permission,
    parse_rules,
    problem_text,
    rule_problem,
    rules_from_options,
    rules_to_json,
    rules_to_options,
)
from .engine.mcp_directory import parse_patterns
from .engine.mqtt_client import PORT_PLAIN
from .flow_common import PASSWORD_SELECTOR, PORT_SELECTOR, async_check_broker

# Home Assistant's own MQTT integration and the keys of its entry data.
MQTT_DOMAIN: Final = "mqtt"
MQTT_BROKER: Final = "broker"

# What a client id prefix may be: the client id is "<prefix>-<8 hex digits>",
# within what every broker accepts for a client id (letters, digits, - and _).
CLIENT_ID_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,32}")

# Abort reason (and error key) for a broker entry that exists already.
ALREADY_CONFIGURED: Final = "broker_already_configured"

# The translated error (options.error) for each engine.acl.rule_problem code;
# another code is shown as "invalid_pattern" with the engine's text.
PATTERN_ERRORS: Final[dict[str, str]] = {
    "empty": "pattern_empty",
    "too_long": "pattern_too_long",
    "null_character": "pattern_null_character",
    "lone_surrogate": "pattern_lone_surrogate",
    "control_character": "pattern_control_character",
    "invalid_wildcard": "pattern_invalid_wildcard",
    "invalid_shared_subscription": "pattern_invalid_share",
    "shared_subscription_rule": "pattern_share_rule",
}

CONF_PATTERN: Final = "pattern"
CONF_PERMISSIONS: Final = "permissions"
CONF_DESCRIPTION: Final = "description"
CONF_RULE: Final = "rule"

PERMISSIONS_SELECTOR: Final = SelectSelector(
    SelectSelectorConfig(
        options=[permission.value for permission in Permission],
        multiple=True,
        mode=SelectSelectorMode.LIST,
        translation_key=CONF_PERMISSIONS,
    )
)
MULTILINE_SELECTOR: Final = TextSelector(TextSelectorConfig(multiline=True))


# -- entry data --------------------------------------------------------------------


def broker_unique_id(data: Mapping[str, Any]) -> str:
    """Return the unique id of a broker entry: ``host:port:username``."""
    return f"{data[CONF_HOST]}:{data[CONF_PORT]}:{data.get(CONF_USERNAME) or ''}"


def broker_title(data: Mapping[str, Any]) -> str:
    """Return the default title of a broker entry, e.g. ``MQTT core-mosquitto:1883``."""
    return f"MQTT {data[CONF_HOST]}:{data[CONF_PORT]}"


def _mqtt_integration_data(entries: list[ConfigEntry]) -> dict[str, Any]:
    """Return the broker settings of Home Assistant's ``mqtt`` entry as form data."""
    for entry in entries:
        if broker := entry.data.get(MQTT_BROKER):
            return {
                CONF_HOST: broker,
                CONF_PORT: int(entry.data.get(CONF_PORT) or PORT_PLAIN),
                CONF_USERNAME: entry.data.get(CONF_USERNAME) or "",
                CONF_PASSWORD: entry.data.get(CONF_PASSWORD) or "",
            }
    return {}


def _broker_schema(defaults: Mapping[str, Any]) -> vol.Schema:
    """Return the broker form; the password is never pre-filled."""
    return vol.Schema(
        {
            vol.Required(CONF_HOST, default=defaults.get(CONF_HOST, "")): str,
            vol.Required(
                CONF_PORT, default=int(defaults.get(CONF_PORT) or PORT_PLAIN)
            ): PORT_SELECTOR,
            vol.Optional(
                CONF_USERNAME,
                description={"suggested_value": defaults.get(CONF_USERNAME) or None},
            ): str,
            vol.Optional(CONF_PASSWORD): PASSWORD_SELECTOR,
            vol.Required(
                CONF_TLS, default=bool(defaults.get(CONF_TLS, False))
            ): BooleanSelector(),
            vol.Required(
                CONF_ALLOW_SELF_SIGNED,
                default=bool(defaults.get(CONF_ALLOW_SELF_SIGNED, False)),
            ): BooleanSelector(),
            vol.Optional(
                CONF_CA_FILE,
                description={"suggested_value": defaults.get(CONF_CA_FILE) or None},
            ): str,
            vol.Required(
                CONF_CLIENT_ID_PREFIX,
                default=defaults.get(CONF_CLIENT_ID_PREFIX) or DEFAULT_CLIENT_ID_PREFIX,
            ): str,
        }
    )


def _keep_password(
    password: str, data: Mapping[str, Any], known: Mapping[str, Any]
) -> str:
    """Return ``password``, or ``known``'s when it is empty and host and user agree."""
    if (
        not password
        and known.get(CONF_PASSWORD)
        and data[CONF_HOST] == known.get(CONF_HOST)
        and data[CONF_USERNAME] == (known.get(CONF_USERNAME) or "")
    ):
        return str(known[CONF_PASSWORD])
    return password


class BrokerFlowMixin(ConfigFlow):
    """The config flow steps that add and maintain MQTT broker entries.

    Mixed into the integration's config flow (``config_flow.py``), which owns
    the menu and dispatches reconfigure and reauth by entry type.
    """

    async def _async_broker_data(
        self, user_input: Mapping[str, Any], known: Mapping[str, Any]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Return the entry data of a submitted broker form and its field errors.

        An empty password keeps ``known``'s password for the same host and user.
        """
        errors: dict[str, str] = {}
        data: dict[str, Any] = {
            CONF_ENTRY_TYPE: EntryType.MQTT_BROKER.value,
            CONF_HOST: user_input[CONF_HOST].strip(),
            CONF_PORT: int(user_input[CONF_PORT]),
            CONF_USERNAME: user_input.get(CONF_USERNAME, "").strip(),
            CONF_PASSWORD: user_input.get(CONF_PASSWORD, ""),
            CONF_TLS: bool(user_input[CONF_TLS]),
            CONF_ALLOW_SELF_SIGNED: bool(user_input[CONF_ALLOW_SELF_SIGNED]),
            CONF_CA_FILE: user_input.get(CONF_CA_FILE, "").strip(),
            CONF_CLIENT_ID_PREFIX: user_input[CONF_CLIENT_ID_PREFIX].strip(),
        }
        data[CONF_PASSWORD] = _keep_password(data[CONF_PASSWORD], data, known)
        if not data[CONF_HOST]:
            errors[CONF_HOST] = "invalid_host"
        if not CLIENT_ID_PREFIX_RE.fullmatch(data[CONF_CLIENT_ID_PREFIX]):
            errors[CONF_CLIENT_ID_PREFIX] = "invalid_client_id_prefix"
        if (
            data[CONF_TLS]
            and data[CONF_CA_FILE]
            and not await self.hass.async_add_executor_job(
                os.path.isfile, data[CONF_CA_FILE]
            )
        ):
            errors[CONF_CA_FILE] = "invalid_ca_file"
        return data, errors

    def _is_other_entrys(self, data: Mapping[str, Any], entry_id: str | None) -> bool:
        """Whether an entry other than ``entry_id`` has the broker of ``data``."""
        other = self.hass.config_entries.async_entry_for_domain_unique_id(
            DOMAIN, broker_unique_id(data)
        )
        return other is not None and other.entry_id != entry_id

    # -- user ----------------------------------------------------------------------

    async def async_step_mqtt_broker(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the broker, connect once and create the entry."""
        known = _mqtt_integration_data(
            self.hass.config_entries.async_entries(MQTT_DOMAIN)
        )
        errors: dict[str, str] = {}
        if user_input is not None:
            data, errors = await self._async_broker_data(user_input, known)
            if not errors:
                await self.async_set_unique_id(
                    broker_unique_id(data), raise_on_progress=False
                )
                self._abort_if_unique_id_configured(
                    reload_on_update=False, error=ALREADY_CONFIGURED
                )
                if await async_check_broker(broker_settings(data), errors):
                    return self.async_create_entry(
                        title=broker_title(data),
                        data=data,
                        options={
                            CONF_RULES: [],
                            CONF_REQUIRE_ADMIN: DEFAULT_REQUIRE_ADMIN,
                            CONF_INCLUDE_ASSIST: DEFAULT_INCLUDE_ASSIST,
                        },
                    )
        defaults = user_input or known
        return self.async_show_form(
            step_id="mqtt_broker",
            data_schema=_broker_schema(defaults),
            errors=errors,
            description_placeholders={
                "mqtt_broker": f"{known[CONF_HOST]}:{known[CONF_PORT]}"
                if known
                else "—"
            },
        )

    # -- reconfigure ---------------------------------------------------------------

    async def async_step_broker_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Change every setting of a broker entry (checked by connecting once)."""
        entry = self._get_reconfigure_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            data, errors = await self._async_broker_data(user_input, entry.data)
            if not errors:
                if self._is_other_entrys(data, entry.entry_id):
                    return self.async_abort(reason=ALREADY_CONFIGURED)
                if await async_check_broker(broker_settings(data), errors):
                    return self._async_update_broker_entry(
                        entry, data, "reconfigure_successful"
                    )
        return self.async_show_form(
            step_id="broker_reconfigure",
            data_schema=_broker_schema(user_input or entry.data),
            errors=errors,
            description_placeholders={"name": entry.title},
        )

    # -- reauth --------------------------------------------------------------------

    async def async_step_broker_reauth(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Ask for the broker's username and password, check and save them."""
        entry = self._get_reauth_entry()
        errors: dict[str, str] = {}
        if user_input is not None:
            data = {
                **entry.data,
                CONF_USERNAME: user_input.get(CONF_USERNAME, "").strip(),
                CONF_PASSWORD: user_input.get(CONF_PASSWORD, ""),
            }
            data[CONF_PASSWORD] = _keep_password(data[CONF_PASSWORD], data, entry.data)
            if self._is_other_entrys(data, entry.entry_id):
                return self.async_abort(reason=ALREADY_CONFIGURED)
            if await async_check_broker(broker_settings(data), errors):
                return self._async_update_broker_entry(entry, data, "reauth_successful")
        current = user_input or entry.data
        return self.async_show_form(
            step_id="broker_reauth",
            data_schema=vol.Schema(
                {
                    vol.Optional(
                        CONF_USERNAME,
                        description={
                            "suggested_value": current.get(CONF_USERNAME) or None
                        },
                    ): str,
                    vol.Optional(CONF_PASSWORD): PASSWORD_SELECTOR,
                }
            ),
            errors=errors,
            description_placeholders={
                "name": entry.title,
                "broker": f"{entry.data[CONF_HOST]}:{entry.data[CONF_PORT]}",
            },
        )

    def _async_update_broker_entry(
        self, entry: ConfigEntry, data: dict[str, Any], reason: str
    ) -> ConfigFlowResult:
        """Save ``data``, the unique id and a default title, and abort with ``reason``.

        A title the user chose is kept. The update listener reloads the entry.
        """
        title = entry.title
        if title == broker_title(entry.data):
            title = broker_title(data)
        self.hass.config_entries.async_update_entry(
            entry, data=data, unique_id=broker_unique_id(data), title=title
        )
        return self.async_abort(reason=reason)


# -- options: the topic ACL ----------------------------------------------------------


def _code(text: str) -> str:
    """Return ``text`` as Markdown inline code (a backtick inside needs ``)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _permissions_text(rule: AclRule) -> str:
    return ", ".join(p.value for p in Permission if p in rule.permissions)


def rules_markdown(rules: list[AclRule]) -> str:
    """Return the rules as a Markdown list: pattern, permissions, description."""
    lines = []
    for rule in rules:
        line = f"- {_code(rule.pattern)} ({_permissions_text(rule)})"
        if description := _one_line(rule.description):
            line += f": {description}"
        lines.append(line)
    return "\n".join(lines)


def _rule_label(rule: AclRule) -> str:
    label = f"{rule.pattern} ({_permissions_text(rule)})"
    if description := _one_line(rule.description):
        label += f": {description}"
    return label


class BrokerOptionsFlow(OptionsFlow):
    """Edit the topic ACL and the settings of the HTTP endpoint and the LLM API."""

    def __init__(self) -> None:
        """Nothing is being edited yet."""
        self._editing: int | None = None

    # -- helpers -------------------------------------------------------------------

    @property
    def _rules(self) -> list[AclRule]:
        """The entry's current rules (none when the stored ones cannot be read).

        Stored rules that cannot be read grant nothing (the runtime logs
        them); saving rules here replaces them.
        """
        try:
            return rules_from_options(self.config_entry.options.get(CONF_RULES) or [])
        except AclImportError:
            return []

    def _save_rules(self, rules: list[AclRule]) -> ConfigFlowResult:
        """Save ``rules`` (the other options unchanged) and end the flow."""
        return self.async_create_entry(
            data={**self.config_entry.options, CONF_RULES: rules_to_options(rules)}
        )

    def _rule_options(self, rules: list[AclRule]) -> list[SelectOptionDict]:
        return [
            SelectOptionDict(value=str(index), label=_rule_label(rule))
            for index, rule in enumerate(rules)
        ]

    # -- menu ----------------------------------------------------------------------

    async def async_step_init(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show the rules menu."""
        return await self.async_step_acl()

    async def async_step_acl(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """List the rules and offer what can be done with them.

        Without rules (everything denied) the menu is ``acl_empty``: its text
        says so, and there is nothing to edit, delete or export.
        """
        rules = self._rules
        if not rules:
            return self.async_show_menu(
                step_id="acl_empty",
                menu_options=["add_rule", "import_rules", "settings"],
            )
        return self.async_show_menu(
            step_id="acl",
            menu_options=[
                "add_rule",
                "edit_rule",
                "delete_rules",
                "import_rules",
                "export_rules",
                "settings",
            ],
            description_placeholders={
                "rules": rules_markdown(rules),
                "count": str(len(rules)),
            },
        )

    # The menu without rules: Home Assistant wants a step of each shown step id.
    async_step_acl_empty = async_step_acl

    # -- add and edit ----------------------------------------------------------------

    async def async_step_add_rule(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Add a rule: the rule form, empty."""
        self._editing = None
        return await self.async_step_rule()

    async def async_step_edit_rule(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose the rule to edit, then show it in the rule form."""
        rules = self._rules
        if user_input is not None:
            index = int(user_input[CONF_RULE])
            if 0 <= index < len(rules):
                self._editing = index
                return await self.async_step_rule()
        return self.async_show_form(
            step_id="edit_rule",
            data_schema=vol.Schema(
                {
                    vol.Required(CONF_RULE): SelectSelector(
                        SelectSelectorConfig(
                            options=self._rule_options(rules),
                            mode=SelectSelectorMode.LIST,
                        )
                    )
                }
            ),
        )

    async def async_step_rule(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """A rule's pattern, permissions and description; saved when valid."""
        rules = self._rules
        editing = self._editing
        errors: dict[str, str] = {}
        placeholders: dict[str, str] = {}
        if user_input is not None:
            pattern = user_input[CONF_PATTERN]
            permissions = frozenset(
                Permission(value) for value in user_input.get(CONF_PERMISSIONS, [])
            )
            if (problem := rule_problem(pattern)) is not None:
                errors[CONF_PATTERN] = PATTERN_ERRORS.get(problem, "invalid_pattern")
                placeholders["problem"] = problem_text(problem)
            elif any(
                rule.pattern == pattern
                for index, rule in enumerate(rules)
                if index != editing
            ):
                errors[CONF_PATTERN] = "duplicate_pattern"
            if not permissions:
                errors[CONF_PERMISSIONS] = "no_permissions"
            if not errors:
                rule = AclRule(
                    pattern,
                    permissions,
                    user_input.get(CONF_DESCRIPTION, "").strip(),
                )
                if editing is None or editing >= len(rules):
                    rules.append(rule)
                else:
                    rules[editing] = rule
                return self._save_rules(rules)
        current: dict[str, Any] = {}
        if user_input is not None:
            current = user_input
        elif editing is not None and editing < len(rules):
            rule = rules[editing]
            current = {
                CONF_PATTERN: rule.pattern,
                CONF_PERMISSIONS: [
                    p.value for p in Permission if p in rule.permissions
                ],
                CONF_DESCRIPTION: rule.description,
            }
        schema = vol.Schema(
            {
                vol.Required(CONF_PATTERN): str,
                vol.Required(CONF_PERMISSIONS): PERMISSIONS_SELECTOR,
                vol.Optional(CONF_DESCRIPTION): MULTILINE_SELECTOR,
            }
        )
        return self.async_show_form(
            step_id="rule",
            data_schema=self.add_suggested_values_to_schema(schema, current),
            errors=errors,
            description_placeholders={"problem": "", **placeholders},
        )

    # -- delete ------------------------------------------------------------------------

    async def async_step_delete_rules(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Choose rules to delete; saved at once."""
        rules = self._rules
        errors: dict[str, str] = {}
        if user_input is not None:
            chosen = {int(value) for value in user_input.get(CONF_RULES, [])}
            if chosen:
                return self._save_rules(
                    [rule for index, rule in enumerate(rules) if index not in chosen]
                )
            errors[CONF_RULES] = "no_rules_selected"
        return self.async_show_form(
            step_id="delete_rules",
            data_schema=vol.Schema(
                {
                    vol.Optional(CONF_RULES): SelectSelector(
                        SelectSelectorConfig(
                            options=self._rule_options(rules),
                            multiple=True,
                            mode=SelectSelectorMode.LIST,
                        )
                    )
                }
            ),
            errors=errors,
        )

    # -- import and export -------------------------------------------------------------

    async def async_step_import_rules(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Replace the rules with a pasted mcpMQTT ``topics`` list, if it is valid.

        An invalid list changes nothing; the error names the rule's index (0 is
        the first) and the problem.
        """
        errors: dict[str, str] = {}
        placeholders = {"index": "", "problem": ""}
        if user_input is not None:
            try:
                rules = parse_rules(user_input.get(CONF_RULES, ""))
            except AclImportError as err:
                errors[CONF_RULES] = (
                    "invalid_rules" if err.index is None else "invalid_rule"
                )
                placeholders = {
                    "index": "" if err.index is None else str(err.index),
                    "problem": err.problem,
                }
            else:
                return self._save_rules(rules)
        schema = vol.Schema({vol.Required(CONF_RULES): MULTILINE_SELECTOR})
        return self.async_show_form(
            step_id="import_rules",
            data_schema=self.add_suggested_values_to_schema(schema, user_input or {}),
            errors=errors,
            description_placeholders=placeholders,
        )

    async def async_step_export_rules(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Show the rules as mcpMQTT ``topics`` JSON; submitting goes back."""
        if user_input is not None:
            return await self.async_step_acl()
        return self.async_show_form(
            step_id="export_rules",
            description_placeholders={"rules": rules_to_json(self._rules)},
        )

    # -- settings ----------------------------------------------------------------------

    async def async_step_settings(
        self, user_input: dict[str, Any] | None = None
    ) -> ConfigFlowResult:
        """Who may use the HTTP endpoint; what the LLM API offers; which MCP servers.

        ``mcp_servers``: server-name patterns (commas or new lines; ``*`` for
        all, empty for none), stored as a list
        (:func:`.engine.mcp_directory.parse_patterns`); a pattern with an
        MQTT wildcard or a control character is refused with its problem.
        """
        options = self.config_entry.options
        errors: dict[str, str] = {}
        placeholders = {"problem": ""}
        if user_input is not None:
            try:
                patterns = parse_patterns(user_input.get(CONF_MCP_SERVERS, ""))
            except ValueError as err:
                errors[CONF_MCP_SERVERS] = "invalid_mcp_servers"
                placeholders["problem"] = str(err)
            else:
                return self.async_create_entry(
                    data={
                        **options,
                        CONF_REQUIRE_ADMIN: bool(user_input[CONF_REQUIRE_ADMIN]),
                        CONF_INCLUDE_ASSIST: bool(user_input[CONF_INCLUDE_ASSIST]),
                        CONF_MCP_SERVERS: patterns,
                    }
                )
        current = options.get(CONF_MCP_SERVERS, DEFAULT_MCP_SERVERS)
        schema = vol.Schema(
            {
                vol.Required(
                    CONF_REQUIRE_ADMIN,
                    default=bool(
                        options.get(CONF_REQUIRE_ADMIN, DEFAULT_REQUIRE_ADMIN)
                    ),
                ): BooleanSelector(),
                vol.Required(
                    CONF_INCLUDE_ASSIST,
                    default=bool(
                        options.get(CONF_INCLUDE_ASSIST, DEFAULT_INCLUDE_ASSIST)
                    ),
                ): BooleanSelector(),
                vol.Optional(CONF_MCP_SERVERS): MULTILINE_SELECTOR,
            }
        )
        return self.async_show_form(
            step_id="settings",
            data_schema=self.add_suggested_values_to_schema(
                schema,
                user_input
                or {
                    CONF_MCP_SERVERS: "\n".join(current)
                    if isinstance(current, list | tuple)
                    else str(current)
                },
            ),
            errors=errors,
            description_placeholders=placeholders,
        )
