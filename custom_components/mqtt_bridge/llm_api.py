"""The MQTT tools of a broker entry as a Home Assistant LLM API (for Assist agents).

One ``llm.API`` per "MQTT broker" entry, named after the entry, id
``mqtt_bridge-<entry_id>``; registered while the entry is loaded, so it shows
in every conversation agent's options (and in core ``mcp_server``). Each call
goes through :meth:`BrokerRuntime.async_call_tool`, the same path as the MCP
endpoint: the topic ACL is enforced there, and the call is counted and fired as
``mqtt_bridge_tool_call`` with source ``assist``.

With the option "include Home Assistant's Assist tools" the API also offers
the tools and prompt of the built-in ``assist`` API: on HA 2025.4 an agent can
select only one API and would otherwise lose device control
(``shared/reference/home-assistant.md`` §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from homeassistant.config_entries import ConfigEntry
from homeassistant.core import HomeAssistant
from homeassistant.helpers import llm
from homeassistant.util.json import JsonObjectType

from .compat import schema_from_json
from .const import CONF_INCLUDE_ASSIST, DOMAIN
from .engine.acl import Permission

if TYPE_CHECKING:
    from .broker_runtime import BrokerRuntime
    from .engine.tool_specs import ToolSpec

SOURCE_ASSIST = "assist"


def api_id(entry_id: str) -> str:
    """Return the LLM API id of a broker entry."""
    return f"{DOMAIN}-{entry_id}"


class MqttTool(llm.Tool):
    """One MQTT tool of a broker entry, called through the entry's runtime."""

    def __init__(self, runtime: BrokerRuntime, spec: ToolSpec) -> None:
        """Describe the tool for the model from its spec (name, text, schema)."""
        self._runtime = runtime
        self.name = spec.name
        self.description = spec.description
        self.parameters = schema_from_json(spec.input_schema)

    async def async_call(
        self,
        hass: HomeAssistant,
        tool_input: llm.ToolInput,
        llm_context: llm.LLMContext,
    ) -> JsonObjectType:
        """Run the tool; a denied or failed call returns ``error`` for the model.

        Returns the tool's structured result; when the call is an error the
        dict also has ``error`` (the explanation, e.g. which permission is
        missing for which topic and what is allowed).
        """
        context = llm_context.context
        result = await self._runtime.async_call_tool(
            self.name,
            tool_input.tool_args,
            source=SOURCE_ASSIST,
            user_id=context.user_id if context is not None else None,
        )
        data: dict[str, Any] = dict(result.structured)
        if result.is_error:
            data["error"] = result.text
        return data


def api_prompt(runtime: BrokerRuntime) -> str:
    """Return the prompt that explains the tools and the topic rules to the model."""
    acl = runtime.acl
    lines = [
        f"You can read and publish MQTT messages on the broker "
        f'"{runtime.entry.title}" with the mqtt_* tools, only within these '
        "topic rules (MQTT filter syntax: + is one level, # is any number of "
        "levels at the end). Anything else is denied.",
    ]
    for permission, label in (
        (Permission.READ, "Readable"),
        (Permission.WRITE, "Writable"),
    ):
        rules = acl.patterns(permission)
        if rules:
            lines.append(f"{label}:")
            lines.extend(
                f"- {rule.pattern}"
                + (f": {rule.description}" if rule.description else "")
                for rule in rules
            )
    if not acl.rules:
        lines.append("No topic is allowed yet: every MQTT tool call will be denied.")
    return "\n".join(lines)


@dataclass(slots=True, kw_only=True)
class MqttBridgeApi(llm.API):
    """The LLM API of one broker entry."""

    runtime: BrokerRuntime

    async def async_get_api_instance(
        self, llm_context: llm.LLMContext
    ) -> llm.APIInstance:
        """Return the tools with the current rules (read at every conversation turn)."""
        runtime = self.runtime
        tools: list[llm.Tool] = [
            MqttTool(runtime, spec) for spec in runtime.tools.specs()
        ]
        prompt = api_prompt(runtime)
        serializer = None
        if runtime.entry.options.get(CONF_INCLUDE_ASSIST, False):
            assist = await llm.async_get_api(self.hass, llm.LLM_API_ASSIST, llm_context)
            tools.extend(assist.tools)
            prompt = f"{assist.api_prompt}\n\n{prompt}"
            serializer = assist.custom_serializer
        return llm.APIInstance(
            api=self,
            api_prompt=prompt,
            llm_context=llm_context,
            tools=tools,
            custom_serializer=serializer,
        )


def async_register(hass: HomeAssistant, runtime: BrokerRuntime) -> None:
    """Register the entry's LLM API until the entry unloads.

    The API keeps the entry's title: a renamed entry is not reloaded, so the
    name follows the entry's updates here.
    """
    entry = runtime.entry
    api = MqttBridgeApi(
        hass=hass, id=api_id(entry.entry_id), name=entry.title, runtime=runtime
    )
    entry.async_on_unload(llm.async_register_api(hass, api))

    async def _async_entry_updated(_hass: HomeAssistant, updated: ConfigEntry) -> None:
        api.name = updated.title

    entry.async_on_unload(entry.add_update_listener(_async_entry_updated))
