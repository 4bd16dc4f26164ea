"""The MQTT tools as an agent sees them: names, limits, input schemas, descriptions.

:func:`build_specs` returns the five :class:`ToolSpec` (``mqtt_publish``,
``mqtt_read``, ``mqtt_subscribe``, ``mqtt_query``, ``mqtt_topics``) that the
MCP server and the Assist LLM API list: a JSON Schema per tool
(:func:`input_schemas`, which depends on the :class:`ToolLimits` only), the
MCP annotations (:data:`TOOL_ANNOTATIONS`) and a description that embeds the
topic patterns the ACL allows at the moment (agents read tool text, not
resources). The arguments are checked against the very same schemas
(:mod:`.tool_arguments`); :mod:`.mqtt_tools` runs the calls.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .acl import Acl, AclRule, Permission

TOOL_PUBLISH: Final = "mqtt_publish"
TOOL_READ: Final = "mqtt_read"
TOOL_SUBSCRIBE: Final = "mqtt_subscribe"
TOOL_QUERY: Final = "mqtt_query"
TOOL_TOPICS: Final = "mqtt_topics"
TOOL_NAMES: Final = (TOOL_PUBLISH, TOOL_READ, TOOL_SUBSCRIBE, TOOL_QUERY, TOOL_TOPICS)

# Longest active scan of mqtt_topics, in seconds.
MAX_SCAN_SECONDS: Final = 10.0
# The level inserted before the unique id of a generated response topic.
RESPONSE_LEVEL: Final = "response"


@dataclass(frozen=True, slots=True)
class ToolLimits:
    """Bounds of every tool call.

    ``max_payload_bytes``: largest payload ``mqtt_publish``/``mqtt_query`` send
    (after base64 decoding); ``max_messages``: most messages one
    ``mqtt_subscribe`` collects; ``max_result_bytes``: largest JSON of a
    result's ``structured`` (UTF-8 bytes), also the most payload bytes kept per
    received message; ``max_timeout``: cap of every ``timeout`` argument, in
    seconds; ``topic_store_size``: topics ``mqtt_topics`` remembers (the least
    recently seen is evicted); ``preview_bytes``: payload bytes shown per topic
    by ``mqtt_topics``.
    """

    max_payload_bytes: int = 65536
    max_messages: int = 100
    max_result_bytes: int = 16384
    max_timeout: float = 60.0
    topic_store_size: int = 1000
    preview_bytes: int = 80


@dataclass(frozen=True, slots=True)
class ToolAnnotations:
    """MCP tool annotations (``readOnlyHint``, ``destructiveHint``, ...)."""

    read_only: bool
    destructive: bool
    open_world: bool = True
    idempotent: bool = False


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """One tool as an agent sees it.

    ``input_schema`` is a JSON Schema (draft 2020-12: ``type``,
    ``properties``, ``required``, ``additionalProperties``, ``enum``,
    ``minimum``, ``maximum``, ``exclusiveMinimum``, ``minLength``, ``default``,
    ``description``), the one the arguments are validated against;
    ``description`` embeds the patterns the ACL allows now.
    """

    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: ToolAnnotations


TOOL_ANNOTATIONS: Final[Mapping[str, ToolAnnotations]] = {
    TOOL_PUBLISH: ToolAnnotations(read_only=False, destructive=True),
    TOOL_READ: ToolAnnotations(read_only=True, destructive=False),
    TOOL_SUBSCRIBE: ToolAnnotations(read_only=True, destructive=False),
    # A request can make the responder do anything a publish could.
    TOOL_QUERY: ToolAnnotations(read_only=False, destructive=True),
    TOOL_TOPICS: ToolAnnotations(read_only=True, destructive=False),
}


def input_schemas(limits: ToolLimits) -> dict[str, dict[str, Any]]:
    """Return the input schema of every tool (they depend on the limits only)."""
    cap = f"seconds, capped at {limits.max_timeout:g}"
    payload = {
        "type": "string",
        "description": (
            "Message payload: UTF-8 text, or base64 when payload_encoding is "
            f"'base64'; at most {limits.max_payload_bytes} bytes."
        ),
    }
    encoding = {
        "type": "string",
        "enum": ["text", "base64"],
        "default": "text",
        "description": "How 'payload' is given: 'text' (UTF-8) or 'base64' (binary).",
    }
    qos = {
        "type": "integer",
        "enum": [0, 1, 2],
        "default": 0,
        "description": (
            "MQTT QoS of the publish: 0 at most once, 1 at least once, 2 exactly once."
        ),
    }

    def obj(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": properties,
            "required": required,
            "additionalProperties": False,
        }

    return {
        TOOL_PUBLISH: obj(
            {
                "topic": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Topic name to publish to (no wildcards).",
                },
                "payload": payload,
                "qos": qos,
                "retain": {
                    "type": "boolean",
                    "default": False,
                    "description": (
                        "Store the message as the topic's retained value; an "
                        "empty retained payload deletes it."
                    ),
                },
                "payload_encoding": encoding,
            },
            ["topic", "payload"],
        ),
        TOOL_READ: obj(
            {
                "topic": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Topic name or filter (+ and # wildcards work).",
                },
                "timeout": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "default": 5,
                    "description": f"How long to wait for a message, in {cap}.",
                },
            },
            ["topic"],
        ),
        TOOL_SUBSCRIBE: obj(
            {
                "topic": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Topic name or filter (+ and # wildcards work).",
                },
                "timeout": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "default": 30,
                    "description": f"How long to collect, in {cap}.",
                },
                "max_messages": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": limits.max_messages,
                    "default": 1,
                    "description": "Stop after this many messages.",
                },
            },
            ["topic"],
        ),
        TOOL_QUERY: obj(
            {
                "request_topic": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Topic name the request is published to.",
                },
                "payload": payload,
                "response_topic": {
                    "type": "string",
                    "minLength": 1,
                    "description": (
                        "Topic name the answer is expected on. Omit it on MQTT 5 "
                        "to use a unique one sent as Response Topic with "
                        "Correlation Data; required on MQTT 3.1.1 brokers."
                    ),
                },
                "timeout": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "default": 5,
                    "description": f"How long to wait for the answer, in {cap}.",
                },
                "qos": qos,
                "payload_encoding": encoding,
            },
            ["request_topic", "payload"],
        ),
        TOOL_TOPICS: obj(
            {
                "topic": {
                    "type": "string",
                    "minLength": 1,
                    "default": "#",
                    "description": (
                        "Filter of the topics to list; '#' (default) lists every "
                        "readable topic seen."
                    ),
                },
                "scan_seconds": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": MAX_SCAN_SECONDS,
                    "default": 0,
                    "description": (
                        "Listen this many seconds before answering (subscribes "
                        "afresh, so retained values are reported too)."
                    ),
                },
            },
            [],
        ),
    }


# -- descriptions ---------------------------------------------------------------------


def _pattern_lines(rules: Iterable[AclRule]) -> str:
    lines = [
        f"- {rule.pattern}" + (f": {rule.description}" if rule.description else "")
        for rule in rules
    ]
    return "\n".join(lines)


def _allowed_text(acl: Acl, permission: Permission) -> str:
    rules = acl.patterns(permission)
    verb = "readable" if permission is Permission.READ else "writable"
    if not rules:
        return (
            f"No topic is {verb} at the moment: every such call is denied "
            "until the Home Assistant user adds a rule."
        )
    return (
        f"Topics {verb} now (MQTT filter syntax: + is one level, # this level "
        f"and all below):\n{_pattern_lines(rules)}"
    )


_SYNTAX = (
    "A filter is allowed only if every topic it can match lies within ONE "
    "readable pattern; '+' and '#' never match topics starting with '$'."
)


def _descriptions(acl: Acl, limits: ToolLimits) -> dict[str, str]:
    """Return every tool's description, naming the patterns ``acl`` allows."""
    readable = _allowed_text(acl, Permission.READ)
    writable = _allowed_text(acl, Permission.WRITE)
    return {
        TOOL_PUBLISH: (
            "Publish one message to an MQTT topic (needs write permission). "
            "Returns when the broker has it (QoS 1/2: acknowledged).\n"
            f"{writable}"
        ),
        TOOL_READ: (
            "Read the current value of a topic or wildcard filter: the "
            "retained message if the broker holds one, else the next message "
            "published, waiting at most 'timeout' seconds (then message is "
            "null and timed_out true). Needs read permission on the whole "
            f"filter. {_SYNTAX}\n{readable}"
        ),
        TOOL_SUBSCRIBE: (
            "Collect messages of a topic or wildcard filter (retained values "
            "first) until 'max_messages' arrived or 'timeout' seconds passed. "
            f"Results over {limits.max_result_bytes} bytes are summarised: "
            "first and last messages, an even sample in between and the "
            f"count per topic. {_SYNTAX}\n{readable}"
        ),
        TOOL_QUERY: (
            "Request/response: subscribe the response topic, publish the "
            "request, return the first answer (or response null and "
            "timed_out true). On MQTT 5 the request carries Response Topic "
            "and Correlation Data and only the answer echoing that "
            "Correlation Data (or carrying none) counts; without "
            "response_topic one unique to Home Assistant's connection is "
            f"used: '<request_topic>/{RESPONSE_LEVEL}/<id>' when readable, "
            f"else '<prefix>/{RESPONSE_LEVEL}/<id>' under a readable pattern "
            "ending in '#'. On MQTT 3.1.1 pass response_topic: the "
            "responder must know where to answer. Needs write permission "
            "on request_topic and read permission on the response topic.\n"
            f"{writable}\n{readable}"
        ),
        TOOL_TOPICS: (
            "List the topics seen on readable patterns since Home Assistant "
            "connected: message count, last time (ISO 8601 UTC), whether "
            "the broker holds a retained value, and a short payload "
            f"preview (the {limits.topic_store_size} most recently seen "
            "topics are kept). 'scan_seconds' (at most "
            f"{MAX_SCAN_SECONDS:g}) listens a little first. {_SYNTAX}\n"
            f"{readable}"
        ),
    }


def build_specs(
    acl: Acl, limits: ToolLimits, schemas: Mapping[str, dict[str, Any]]
) -> list[ToolSpec]:
    """Return the five tools with descriptions naming the patterns ``acl`` allows.

    ``schemas`` are the tools' input schemas (:func:`input_schemas` of
    ``limits``), passed in so that the specs carry the very objects the
    arguments are validated against.
    """
    descriptions = _descriptions(acl, limits)
    return [
        ToolSpec(name, descriptions[name], schemas[name], TOOL_ANNOTATIONS[name])
        for name in TOOL_NAMES
    ]
