"""Config subentry flow ``stdio_server``: a stdio MCP server hosted on an MQTT broker entry.

Offered only for MQTT broker entries (``config_flow.py``,
``async_get_supported_subentry_types``; Home Assistant 2025.4's
``ConfigSubentryFlow`` with the ``user`` and ``reconfigure`` steps). One form,
prefilled when reconfiguring:

* ``name``: the subentry's title (and its device's name); not empty;
* ``command``: the program; found on the ``PATH`` (the configured ``PATH``
  if ``env`` sets one, as the child's ``exec`` searches it), or, when it
  contains a ``/``, an executable file (relative to ``cwd`` if given);
* ``args``: a list of strings (a text selector with ``multiple``, which Home
  Assistant 2025.4 shows as one field per argument); empty fields are dropped;
  no NUL character;
* ``env``: ``KEY=VALUE`` lines added to the child's minimal environment; blank
  lines and lines starting with ``#`` are skipped; ``KEY`` must be a name of
  letters, digits and ``_`` not starting with a digit (POSIX "Environment
  Variables" portable names), given once; the value is everything after the
  first ``=``, without NUL characters. The error names the line by its number
  and its key (never its value);
* ``cwd``: optional, the absolute path of an existing directory;
* ``server_name``: the MCP-over-MQTT server-name, checked by
  :func:`.engine.mcp_mqtt.validate_server_name` (spec §1.2) and unique among
  the entry's hosted servers (it is the subentry's unique id);
* ``description``: optional, announced in the server's presence;
* ``request_topic``: optional; when set, the server is also offered to simple
  devices on this fixed request topic (:mod:`.engine.mcp_mqtt_simple`: MQTT 5
  Response Topic and Correlation Data, one shared child process). Checked by
  :func:`request_topic_problem`: a valid MQTT topic name (no ``+`` or ``#``,
  MQTT 5 §4.7.1) that does not start with ``$`` (MQTT 5 §4.7.2 reserves such
  topics for the broker: ``$SYS/`` is the broker's and ``$share/`` would be
  read as a shared subscription), with room for its ``/notifications``
  sub-topic; unique among the entry's hosted servers. Empty means off.

Stored data: ``command``, ``args`` (list), ``env`` (dict), ``cwd`` (str or
``None``), ``server_name``, ``description``, ``request_topic`` (str or
``None``) (:mod:`.const`). The broker entry's update listener applies every
change live (:mod:`.hosted_servers`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import os
import re
import shutil
from typing import Any, Final

from homeassistant.config_entries import ConfigSubentryFlow, SubentryFlowResult
from homeassistant.const import CONF_COMMAND, CONF_DESCRIPTION, CONF_NAME
from homeassistant.helpers.selector import TextSelector, TextSelectorConfig
import voluptuous as vol

from .const import (
    CONF_ARGS,
    CONF_CWD,
    CONF_ENV,
    CONF_REQUEST_TOPIC,
    CONF_SERVER_NAME,
    SUBENTRY_STDIO_SERVER,
)
from .engine.mcp_mqtt import validate_server_name
from .engine.mcp_mqtt_simple import request_topic_problem

# A portable environment variable name (POSIX.1-2017 §8.1): letters, digits, _.
ENV_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Characters of a bad line shown in an error (its key part only).
MAX_SHOWN: Final = 40

# Description placeholders of the errors (config_subentries.stdio_server.error).
PLACEHOLDER_LINE: Final = "line"
PLACEHOLDER_KEY: Final = "key"
PLACEHOLDER_PROBLEM: Final = "problem"
PLACEHOLDER_TOPIC_PROBLEM: Final = "topic_problem"

SCHEMA: Final = vol.Schema(
    {
        vol.Required(CONF_NAME): TextSelector(),
        vol.Required(CONF_COMMAND): TextSelector(),
        vol.Optional(CONF_ARGS): TextSelector(TextSelectorConfig(multiple=True)),
        vol.Optional(CONF_ENV): TextSelector(TextSelectorConfig(multiline=True)),
        vol.Optional(CONF_CWD): TextSelector(),
        vol.Required(CONF_SERVER_NAME): TextSelector(),
        vol.Optional(CONF_DESCRIPTION): TextSelector(
            TextSelectorConfig(multiline=True)
        ),
        vol.Optional(CONF_REQUEST_TOPIC): TextSelector(),
    }
)


class EnvError(ValueError):
    """A line of the ``env`` field is not a valid ``KEY=VALUE``.

    ``error`` is the form's error key (``invalid_env`` or ``duplicate_env``),
    ``line`` the 1-based line number, ``key`` what stands before ``=`` (cut to
    :data:`MAX_SHOWN` characters; the value is never shown).
    """

    def __init__(self, error: str, line: int, key: str) -> None:
        """Describe the bad line."""
        super().__init__(f"{error}: line {line} ({key})")
        self.error = error
        self.line = line
        self.key = key


def parse_env(text: str) -> dict[str, str]:
    """Return the variables of ``KEY=VALUE`` lines (rules: module docstring).

    Raises:
        EnvError: a line is not ``KEY=VALUE`` with a valid key and a value
            without NUL (``invalid_env``), or repeats a key (``duplicate_env``).

    """
    env: dict[str, str] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, equals, value = line.partition("=")
        key = key.strip()
        shown = key[:MAX_SHOWN] + ("…" if len(key) > MAX_SHOWN else "")
        if not equals or not ENV_KEY_RE.fullmatch(key) or "\0" in value:
            raise EnvError("invalid_env", number, shown)
        if key in env:
            raise EnvError("duplicate_env", number, shown)
        env[key] = value
    return env


def env_text(env: Mapping[str, str]) -> str:
    """The ``env`` field for stored variables: one ``KEY=VALUE`` line each."""
    return "\n".join(f"{key}={value}" for key, value in env.items())


def _command_found(command: str, cwd: str | None, env: Mapping[str, str]) -> bool:
    """Whether ``command`` can be executed (blocking: file system)."""
    if os.sep in command:
        path = os.path.join(cwd, command) if cwd else command
        return os.path.isfile(path) and os.access(path, os.X_OK)
    search = env.get("PATH", os.environ.get("PATH", os.defpath))
    return shutil.which(command, path=search) is not None


def _cwd_valid(cwd: str) -> bool:
    """Whether ``cwd`` is the absolute path of an existing directory (blocking)."""
    return os.path.isabs(cwd) and os.path.isdir(cwd)


@dataclass(slots=True)
class _Checked:
    """A submitted form: the subentry's title and data, or its errors."""

    title: str
    data: dict[str, Any]
    errors: dict[str, str]
    placeholders: dict[str, str]


class StdioServerSubentryFlow(ConfigSubentryFlow):
    """Add or reconfigure a hosted stdio MCP server (a subentry of a broker entry)."""

    async def _async_check(
        self, user_input: Mapping[str, Any], subentry_id: str | None
    ) -> _Checked:
        """Validate a submitted form; ``subentry_id`` is the one reconfigured."""
        errors: dict[str, str] = {}
        placeholders: dict[str, str] = {}
        title = str(user_input.get(CONF_NAME, "")).strip()
        command = str(user_input.get(CONF_COMMAND, "")).strip()
        args = [str(arg) for arg in user_input.get(CONF_ARGS) or () if arg != ""]
        cwd = str(user_input.get(CONF_CWD) or "").strip() or None
        server_name = str(user_input.get(CONF_SERVER_NAME, "")).strip()
        description = str(user_input.get(CONF_DESCRIPTION) or "").strip()
        request_topic = str(user_input.get(CONF_REQUEST_TOPIC) or "").strip() or None
        env: dict[str, str] = {}
        if not title:
            errors[CONF_NAME] = "name_required"
        try:
            env = parse_env(str(user_input.get(CONF_ENV) or ""))
        except EnvError as err:
            errors[CONF_ENV] = err.error
            placeholders[PLACEHOLDER_LINE] = str(err.line)
            placeholders[PLACEHOLDER_KEY] = err.key
        if any("\0" in arg for arg in args):
            errors[CONF_ARGS] = "invalid_args"
        hass = self.hass
        if cwd is not None and not await hass.async_add_executor_job(_cwd_valid, cwd):
            errors[CONF_CWD] = "invalid_cwd"
        if not command or "\0" in command:
            errors[CONF_COMMAND] = "command_required"
        elif CONF_CWD not in errors and not await hass.async_add_executor_job(
            _command_found, command, cwd, env
        ):
            errors[CONF_COMMAND] = "command_not_found"
        try:
            validate_server_name(server_name)
        except ValueError as err:
            errors[CONF_SERVER_NAME] = "invalid_server_name"
            placeholders[PLACEHOLDER_PROBLEM] = str(err)
        else:
            entry = self._get_entry()
            if any(
                other.subentry_type == SUBENTRY_STDIO_SERVER
                and other.unique_id == server_name
                and other_id != subentry_id
                for other_id, other in entry.subentries.items()
            ):
                errors[CONF_SERVER_NAME] = "server_name_in_use"
        if request_topic is not None:
            if (problem := request_topic_problem(request_topic)) is not None:
                errors[CONF_REQUEST_TOPIC] = "invalid_request_topic"
                placeholders[PLACEHOLDER_TOPIC_PROBLEM] = problem
            elif any(
                other.subentry_type == SUBENTRY_STDIO_SERVER
                and other.data.get(CONF_REQUEST_TOPIC) == request_topic
                and other_id != subentry_id
                for other_id, other in self._get_entry().subentries.items()
            ):
                errors[CONF_REQUEST_TOPIC] = "request_topic_in_use"
        data = {
            CONF_COMMAND: command,
            CONF_ARGS: args,
            CONF_ENV: env,
            CONF_CWD: cwd,
            CONF_SERVER_NAME: server_name,
            CONF_DESCRIPTION: description,
            CONF_REQUEST_TOPIC: request_topic,
        }
        return _Checked(title, data, errors, placeholders)

    def _form(
        self,
        step_id: str,
        values: Mapping[str, Any],
        checked: _Checked | None = None,
    ) -> SubentryFlowResult:
        return self.async_show_form(
            step_id=step_id,
            data_schema=self.add_suggested_values_to_schema(SCHEMA, values),
            errors=checked.errors if checked else None,
            description_placeholders=checked.placeholders if checked else None,
        )

    async def async_step_user(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Ask for the server; create the subentry (unique id: the server-name)."""
        if user_input is None:
            return self._form("user", {})
        checked = await self._async_check(user_input, None)
        if checked.errors:
            return self._form("user", user_input, checked)
        return self.async_create_entry(
            title=checked.title,
            data=checked.data,
            unique_id=checked.data[CONF_SERVER_NAME],
        )

    async def async_step_reconfigure(
        self, user_input: dict[str, Any] | None = None
    ) -> SubentryFlowResult:
        """Change the server (the same form, prefilled); it restarts at once."""
        subentry = self._get_reconfigure_subentry()
        if user_input is None:
            data = subentry.data
            return self._form(
                "reconfigure",
                {
                    CONF_NAME: subentry.title,
                    CONF_COMMAND: data.get(CONF_COMMAND, ""),
                    CONF_ARGS: list(data.get(CONF_ARGS) or []),
                    CONF_ENV: env_text(data.get(CONF_ENV) or {}),
                    CONF_CWD: data.get(CONF_CWD) or "",
                    CONF_SERVER_NAME: data.get(CONF_SERVER_NAME, ""),
                    CONF_DESCRIPTION: data.get(CONF_DESCRIPTION) or "",
                    CONF_REQUEST_TOPIC: data.get(CONF_REQUEST_TOPIC) or "",
                },
            )
        checked = await self._async_check(user_input, subentry.subentry_id)
        if checked.errors:
            return self._form("reconfigure", user_input, checked)
        return self.async_update_and_abort(
            self._get_entry(),
            subentry,
            title=checked.title,
            data=checked.data,
            unique_id=checked.data[CONF_SERVER_NAME],
        )
