"""Small shims for Home Assistant APIs that differ between 2025.4 and 2026.x.

* ``llm.LLMContext`` lost its ``user_prompt`` field in 2025.7 (core PR #146787):
  :func:`llm_context` builds one by keyword with the fields the running version
  has (``shared/reference/home-assistant.md`` §6).
* Tool parameters: agents turn ``llm.Tool.parameters`` (a voluptuous schema;
  probatio's from 2026.9, which ``import voluptuous`` then returns) into JSON
  Schema. :func:`schema_from_json` builds that voluptuous schema from the
  tools' own JSON Schema subset, keeping descriptions, defaults, enums, ranges
  and lengths, which
  ``voluptuous_openapi.convert_to_voluptuous`` (removed from core in 2026.9)
  drops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from homeassistant.core import Context
from homeassistant.helpers import llm
import voluptuous as vol

_TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": float,
    "boolean": bool,
    "array": list,
    "object": dict,
}


def _any_value(value: Any) -> Any:
    """Accept any value (converted to the JSON Schema ``{}``, not ``"object"``)."""
    return value


def llm_context(
    platform: str,
    context: Context | None,
    *,
    language: str | None = "*",
    assistant: str | None = None,
    device_id: str | None = None,
) -> llm.LLMContext:
    """Return an ``llm.LLMContext`` on any supported Home Assistant version."""
    kwargs: dict[str, Any] = {
        "platform": platform,
        "context": context,
        "language": language,
        "assistant": assistant,
        "device_id": device_id,
    }
    if "user_prompt" in llm.LLMContext.__dataclass_fields__:
        kwargs["user_prompt"] = None
    return llm.LLMContext(**kwargs)


def _validator(prop: Mapping[str, Any]) -> Any:
    """Return the validator of one JSON Schema property (our subset).

    ``type`` string/integer/number/boolean/array/object, ``enum``,
    ``minimum``/``maximum`` and their ``exclusive`` forms,
    ``minLength``/``maxLength``. Anything else (no type, a list of types) is
    accepted as is (the engine validates every argument again).
    """
    if "enum" in prop:
        return vol.In(list(prop["enum"]))
    kind = prop.get("type")
    kind = _TYPES.get(kind) if isinstance(kind, str) else None
    if kind is None:
        return _any_value
    validators: list[Any] = [vol.Coerce(kind) if kind in (int, float) else kind]
    bounds = {
        "min": prop.get("exclusiveMinimum", prop.get("minimum")),
        "max": prop.get("exclusiveMaximum", prop.get("maximum")),
    }
    if bounds["min"] is not None or bounds["max"] is not None:
        validators.append(
            vol.Range(
                min_included="exclusiveMinimum" not in prop,
                max_included="exclusiveMaximum" not in prop,
                **bounds,
            )
        )
    if "minLength" in prop or "maxLength" in prop:
        validators.append(
            vol.Length(min=prop.get("minLength"), max=prop.get("maxLength"))
        )
    return validators[0] if len(validators) == 1 else vol.All(*validators)


def schema_from_json(schema: Mapping[str, Any]) -> vol.Schema:
    """Return a voluptuous schema for a JSON Schema object of flat properties.

    ``required`` properties become ``vol.Required``, the others ``vol.Optional``
    with their ``default``; every ``description`` is kept on the marker, so
    agents show it to the model.
    """
    required = set(schema.get("required", ()))
    fields: dict[Any, Any] = {}
    for name, prop in dict(schema.get("properties", {})).items():
        description = prop.get("description")
        marker: vol.Marker
        if name in required:
            marker = vol.Required(name, description=description)
        elif "default" in prop:
            marker = vol.Optional(
                name, default=prop["default"], description=description
            )
        else:
            marker = vol.Optional(name, description=description)
        fields[marker] = _validator(prop)
    return vol.Schema(fields)
