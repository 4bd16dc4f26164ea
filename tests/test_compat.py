"""The compatibility shims: ``LLMContext`` with and without ``user_prompt``, and
JSON Schema → voluptuous for the tools' parameters (checked through
``voluptuous_openapi.convert``, what HA 2025.4's agents use, and by validating).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from homeassistant.core import Context
from homeassistant.helpers import llm
import pytest
import voluptuous as vol
import voluptuous_openapi

from custom_components.mqtt_bridge.compat import llm_context, schema_from_json


def test_llm_context_on_this_version() -> None:
    """HA 2025.4 has ``user_prompt``: it is given (None), positional order kept."""
    assert "user_prompt" in {field.name for field in fields(llm.LLMContext)}
    context = Context(user_id="u1")
    built = llm_context("conversation", context, assistant="conversation")
    assert isinstance(built, llm.LLMContext)
    assert built.platform == "conversation"
    assert built.context is context
    assert built.user_prompt is None
    assert built.language == "*"
    assert built.assistant == "conversation"
    assert built.device_id is None

    other = llm_context("mcp", None, language="de", device_id="d1")
    assert other.context is None
    assert other.language == "de"
    assert other.assistant is None
    assert other.device_id == "d1"


@dataclass(slots=True)
class LLMContext2025_7:
    """``llm.LLMContext`` from HA 2025.7 on (core PR #146787): no ``user_prompt``."""

    platform: str
    context: Context | None
    language: str | None
    assistant: str | None
    device_id: str | None


def test_llm_context_without_user_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "LLMContext", LLMContext2025_7)
    context = Context()
    built = llm_context("conversation", context, assistant="conversation")
    assert isinstance(built, LLMContext2025_7)
    assert built == LLMContext2025_7(
        platform="conversation",
        context=context,
        language="*",
        assistant="conversation",
        device_id=None,
    )


SCHEMA = {
    "type": "object",
    "properties": {
        "topic": {"type": "string", "minLength": 1, "description": "The topic."},
        "payload": {"type": "string", "maxLength": 4},
        "qos": {"type": "integer", "enum": [0, 1, 2], "default": 0},
        "retain": {"type": "boolean", "default": False, "description": "Keep it."},
        "timeout": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 60,
            "default": 5,
        },
        "count": {"type": "integer", "minimum": 1, "maximum": 100},
        "ratio": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
        "tags": {"type": "array"},
        "extra": {"type": "object"},
        "anything": {"description": "No type at all."},
        "nullable": {"type": ["string", "null"]},
        "weird": {"type": "uuid"},
    },
    "required": ["topic"],
    "additionalProperties": False,
}


def test_schema_converts_to_json_schema() -> None:
    converted = voluptuous_openapi.convert(schema_from_json(SCHEMA))
    props = converted["properties"]
    assert converted["type"] == "object"
    assert converted["required"] == ["topic"]
    assert props["topic"] == {
        "type": "string",
        "minLength": 1,
        "description": "The topic.",
    }
    assert props["payload"] == {"type": "string", "maxLength": 4}
    assert props["qos"] == {"type": "integer", "enum": [0, 1, 2], "default": 0}
    assert props["retain"] == {
        "type": "boolean",
        "description": "Keep it.",
        "default": False,
    }
    assert props["timeout"] == {
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 60,
        "default": 5,
    }
    assert props["count"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert props["ratio"] == {"type": "number", "minimum": 0, "exclusiveMaximum": 1}
    assert props["tags"]["type"] == "array"
    assert props["extra"]["type"] == "object"
    # Without a usable type: described, and never claimed to be an object.
    assert props["anything"]["description"] == "No type at all."
    for name in ("anything", "nullable", "weird"):
        assert props[name].get("type") != "object", name


def test_schema_validates() -> None:
    schema = schema_from_json(SCHEMA)
    assert schema({"topic": "a/b"}) == {
        "topic": "a/b",
        "qos": 0,
        "retain": False,
        "timeout": 5,
    }
    full = schema(
        {
            "topic": "a",
            "payload": "abcd",
            "qos": 2,
            "retain": True,
            "timeout": "2.5",
            "count": "3",
            "ratio": 0.5,
            "tags": ["x"],
            "extra": {"k": 1},
            "anything": [1, {"x": None}],
            "nullable": None,
            "weird": 7,
        }
    )
    assert full["timeout"] == 2.5
    assert full["count"] == 3
    assert full["anything"] == [1, {"x": None}]
    for bad in (
        {},
        {"topic": ""},
        {"topic": "a", "payload": "abcde"},
        {"topic": "a", "qos": 3},
        {"topic": "a", "retain": "yes"},
        {"topic": "a", "timeout": 0},
        {"topic": "a", "timeout": 61},
        {"topic": "a", "count": 0},
        {"topic": "a", "ratio": 1},
        {"topic": "a", "tags": "x"},
        {"topic": "a", "extra": []},
        {"topic": "a", "unknown": 1},
    ):
        with pytest.raises(vol.Invalid):
            schema(bad)


def test_empty_schema() -> None:
    schema = schema_from_json({"type": "object"})
    assert voluptuous_openapi.convert(schema) == {
        "type": "object",
        "properties": {},
        "required": [],
    }
    assert schema({}) == {}
