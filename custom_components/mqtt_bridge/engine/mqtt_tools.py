"""The five MQTT tools for AI agents, with the topic ACL enforced in every call.

:class:`MqttTools` serves ``mqtt_publish``, ``mqtt_read``, ``mqtt_subscribe``,
``mqtt_query`` and ``mqtt_topics`` (names and arguments as mcpMQTT's, extra
arguments optional) over the project's one :class:`~.mqtt_client.MqttClient`.
It knows nothing of MCP or Home Assistant: the MCP server
(:mod:`.mcp_server`) and the Assist LLM API turn :meth:`MqttTools.specs` into
their tool lists and hand every call to :meth:`MqttTools.call`.

Every call, in this order:

1. the arguments are checked against the tool's JSON Schema
   (:attr:`ToolSpec.input_schema`: types, ranges, enums, ``required``,
   ``additionalProperties: false``; ``null`` for an optional argument means its
   default), then topic syntax, payload encoding and size;
2. the ACL (:class:`~.acl.Acl`, fetched afresh for every call, so rule changes
   apply to the next call without reconnecting) is asked; a denied call
   touches the broker in no way and returns ``is_error=True, allowed=False``
   with the missing permission, the topic and the allowed patterns;
3. the broker is used under a deadline (``timeout`` arguments are capped at
   :attr:`ToolLimits.max_timeout`); every subscription the call made is
   cancelled (unsubscribed) when it ends, whatever the outcome, except the
   response topics ``mqtt_query`` generates itself: those stay subscribed for
   the next query (at most :data:`MAX_INBOXES`, dropped by
   :meth:`MqttTools.refresh_acl` and :meth:`MqttTools.stop`), which saves a
   SUBSCRIBE/UNSUBSCRIBE round trip per query;
4. the result is bounded by :attr:`ToolLimits.max_result_bytes` (the JSON of
   ``structured``); payloads that are not UTF-8 come back base64-encoded.

:meth:`MqttTools.call` never raises for bad input, denial, timeouts or broker
trouble: those are ``is_error`` results (cancellation still propagates).

Defects of the existing MQTT MCP servers avoided here
(``shared/reference/mcp-over-mqtt.md`` §2): wildcard subscriptions deliver
(the client's registry matches each received topic against the filter, and
each delivery is checked with :meth:`~.acl.Acl.check_read_topic`); the
response topic of ``mqtt_query`` is subscribed, and its SUBACK awaited, before
the request is published; the callback is registered before SUBSCRIBE is sent,
so retained values are not lost; ``mqtt_subscribe`` collects until its count or
its deadline, never stopping at a quiet gap; every subscription is cancelled.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
import functools
import json
import logging
import math
import time
from typing import Any, Final
import uuid

from .acl import Acl, AclDecision, AclRule, Permission
from .mqtt_client import (
    ConnectionLostError,
    Message,
    MqttClient,
    NotConnectedError,
    ProtocolVersion,
    PublishProperties,
    PublishRefusedError,
)
from .subscriptions import (
    RetainHandling,
    SubscribeOptions,
    Subscription,
    SubscriptionRefusedError,
)
from .topics import TopicError, matches, topic_filter_problem, topic_name_problem

_LOGGER = logging.getLogger(__name__)

TOOL_PUBLISH: Final = "mqtt_publish"
TOOL_READ: Final = "mqtt_read"
TOOL_SUBSCRIBE: Final = "mqtt_subscribe"
TOOL_QUERY: Final = "mqtt_query"
TOOL_TOPICS: Final = "mqtt_topics"
TOOL_NAMES: Final = (TOOL_PUBLISH, TOOL_READ, TOOL_SUBSCRIBE, TOOL_QUERY, TOOL_TOPICS)

# Longest active scan of mqtt_topics, in seconds.
MAX_SCAN_SECONDS: Final = 10.0
# Longest wait for a QoS >= 1 acknowledgement of mqtt_publish / mqtt_query, in seconds.
PUBLISH_TIMEOUT: Final = 10.0
# The level inserted before the unique id of a generated response topic.
RESPONSE_LEVEL: Final = "response"
# Generated response topics kept subscribed (the least recently used idle one goes).
MAX_INBOXES: Final = 64

# Error codes in ``structured["error"]``.
ERR_UNKNOWN_TOOL: Final = "unknown_tool"
ERR_INVALID: Final = "invalid_arguments"
ERR_DENIED: Final = "permission_denied"
ERR_NOT_CONNECTED: Final = "not_connected"
ERR_CONNECTION_LOST: Final = "connection_lost"
ERR_REFUSED: Final = "broker_refused"
ERR_SUBSCRIBE_TIMEOUT: Final = "subscribe_timeout"
ERR_PUBLISH_TIMEOUT: Final = "publish_timeout"
ERR_RESPONSE_TOPIC: Final = "response_topic_required"
ERR_INTERNAL: Final = "internal_error"


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

    ``input_schema`` is a JSON Schema (draft 2020-12 subset: ``type``,
    ``properties``, ``required``, ``additionalProperties``, ``enum``,
    ``minimum``, ``maximum``, ``exclusiveMinimum``, ``minLength``, ``default``,
    ``description``); ``description`` embeds the patterns the ACL allows now.
    """

    name: str
    description: str
    input_schema: dict[str, Any]
    annotations: ToolAnnotations


@dataclass(slots=True)
class ToolResult:
    """The outcome of one tool call.

    ``structured`` is JSON-serialisable (MCP ``structuredContent``; what the HA
    LLM API returns); on errors it holds ``error`` (a code, see the ``ERR_*``
    constants) and ``message``. ``text`` is a one-line summary followed by the
    compact JSON of ``structured`` (MCP ``TextContent``), or the error text.
    ``allowed`` is false only when the ACL denied the call; ``topic`` is the
    topic or filter the call was about (for the audit event).
    """

    structured: dict[str, Any]
    text: str
    is_error: bool
    allowed: bool
    topic: str | None


@dataclass(slots=True)
class ToolStats:
    """Counters since the tools were created.

    ``calls``: every call; ``denied``: calls the ACL refused; ``errors``: every
    ``is_error`` result (denials included); ``published``: messages published
    (requests of ``mqtt_query`` included); ``received``: messages handed to
    agents (a read's message, each collected message, a query's response,
    ACL-filtered); ``observed``: messages recorded by the ``mqtt_topics``
    store; ``filtered``: deliveries dropped because the ACL does not let the
    agent read their topic.
    """

    calls: int = 0
    denied: int = 0
    errors: int = 0
    published: int = 0
    received: int = 0
    observed: int = 0
    filtered: int = 0


class _ArgumentError(ValueError):
    """Internal: an argument is invalid; the message is shown to the agent."""


# -- payloads and times ----------------------------------------------------------------


def _iso(timestamp: float) -> str:
    """Return ``timestamp`` (seconds since the epoch) as ISO 8601 UTC with ms, ``Z``."""
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


def _payload_fields(
    payload: bytes, size: int, text: bool, cap: int, *, prefix: str = "payload"
) -> dict[str, Any]:
    """Render ``payload`` (the first bytes of ``size``) within ``cap`` shown bytes.

    ``text``: the whole original payload is valid UTF-8 (else base64). The
    result has ``{prefix}``, ``{prefix}_encoding``, ``{prefix}_bytes`` (the
    original size) and ``{prefix}_truncated`` when not all of it is shown.
    """
    cap = max(cap, 0)
    if text:
        shown = payload[:cap].decode("utf-8", "ignore")  # drops a cut character only
        shown_bytes = len(shown.encode())
        encoding = "text"
    else:
        part = payload[: cap // 4 * 3]
        shown = base64.b64encode(part).decode("ascii")
        shown_bytes = len(part)
        encoding = "base64"
    fields: dict[str, Any] = {
        prefix: shown,
        f"{prefix}_encoding": encoding,
        f"{prefix}_bytes": size,
    }
    if shown_bytes < size:
        fields[f"{prefix}_truncated"] = True
    return fields


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_size(value: Any) -> int:
    return len(_json(value).encode())


def _properties(props: PublishProperties | None) -> dict[str, Any] | None:
    """Return the MQTT 5 properties of a received message as JSON, or ``None``."""
    if props is None:
        return None
    out: dict[str, Any] = {}
    if props.content_type is not None:
        out["content_type"] = props.content_type
    if props.response_topic is not None:
        out["response_topic"] = props.response_topic
    if props.correlation_data is not None:
        data = props.correlation_data
        out["correlation_data"] = (
            data.decode() if _is_utf8(data) else base64.b64encode(data).decode()
        )
        if not _is_utf8(data):
            out["correlation_data_encoding"] = "base64"
    if props.user_properties:
        out["user_properties"] = [[k, v] for k, v in props.user_properties]
    if props.message_expiry_interval is not None:
        out["message_expiry_interval"] = props.message_expiry_interval
    if props.payload_format_indicator is not None:
        out["payload_format_indicator"] = props.payload_format_indicator
    return out or None


class _Received:
    """A received message as kept by a call: payload capped, UTF-8-ness known."""

    __slots__ = ("at", "payload", "props", "qos", "retain", "size", "text", "topic")

    def __init__(self, message: Message, cap: int) -> None:
        payload = message.payload
        self.topic = message.topic
        self.size = len(payload)
        self.text = _is_utf8(payload)
        self.payload = payload[:cap]
        self.qos = message.qos
        self.retain = message.retain
        self.props = message.properties
        self.at = time.time()

    def render(self, cap: int, *, with_properties: bool = True) -> dict[str, Any]:
        """Return the JSON form with at most ``cap`` payload bytes shown."""
        out: dict[str, Any] = {"topic": self.topic}
        out.update(_payload_fields(self.payload, self.size, self.text, cap))
        out["qos"] = self.qos
        out["retain"] = self.retain
        out["timestamp"] = _iso(self.at)
        if with_properties and (props := _properties(self.props)) is not None:
            out["properties"] = props
        return out


def _render_fitting(
    received: _Received, budget: int, wrap: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """Return ``wrap(message)`` with the payload shortened until it fits ``budget``."""
    cap = budget
    with_properties = True
    while True:
        result = wrap(received.render(cap, with_properties=with_properties))
        size = _json_size(result)
        if size <= budget:
            return result
        if cap > 0:
            cap = max(0, min(cap // 2, cap - (size - budget)))
        elif with_properties:
            with_properties = False
        else:
            return result  # only the topic name is left; it is what it is


# -- the topic store -------------------------------------------------------------------


class _TopicEntry:
    __slots__ = (
        "count",
        "digest",
        "last",
        "preview",
        "retained",
        "retained_digest",
        "size",
        "text",
    )

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.retained = False
        self.preview = b""
        self.size = 0
        self.text = True
        self.digest = 0
        self.retained_digest: int | None = None


class _TopicStore:
    """Topics seen, least recently seen first; bounded (the oldest is evicted)."""

    def __init__(self, capacity: int, preview_bytes: int) -> None:
        self.capacity = max(1, capacity)
        self.preview_bytes = max(0, preview_bytes)
        self.entries: OrderedDict[str, _TopicEntry] = OrderedDict()
        self.evicted = 0

    def record(self, message: Message) -> bool:
        """Record ``message``; return whether it counted as a new message.

        The broker sends retained values again on every SUBSCRIBE and
        reconnect: a retained message equal to the topic's last payload or to
        the retained value seen before marks the topic retained but is neither
        counted again nor shown instead of a newer live payload.
        """
        payload = message.payload
        digest = hash(payload)
        entry = self.entries.get(message.topic)
        if entry is None:
            entry = _TopicEntry()
            self.entries[message.topic] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
                self.evicted += 1
        elif message.retain and digest in (entry.digest, entry.retained_digest):
            entry.retained = True
            entry.retained_digest = digest
            return False
        self.entries.move_to_end(message.topic)
        entry.count += 1
        entry.last = time.time()
        if message.retain:
            entry.retained = True
            entry.retained_digest = digest
        entry.size = len(payload)
        entry.text = _is_utf8(payload)
        entry.preview = payload[: self.preview_bytes]
        entry.digest = digest
        return True

    def purge(self, keep: Callable[[str], bool]) -> None:
        """Forget every topic for which ``keep(topic)`` is false."""
        for topic in [t for t in self.entries if not keep(t)]:
            del self.entries[topic]


# -- argument validation -------------------------------------------------------------------


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer()
        )
    if kind == "number":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value)
        )
    raise ValueError(f"unsupported schema type {kind!r}")  # pragma: no cover


def _check_property(name: str, value: Any, schema: Mapping[str, Any]) -> Any:
    """Return ``value`` (integers as ``int``) if it satisfies ``schema``.

    Raises:
        _ArgumentError: it does not; the message names the argument.

    """
    kind = schema["type"]
    if not _type_ok(value, kind):
        article = "an" if kind[0] in "aeiou" else "a"
        raise _ArgumentError(
            f"'{name}' must be {article} {kind}, not {type(value).__name__} {value!r:.40}"
        )
    if kind == "integer":
        value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(json.dumps(c) for c in schema["enum"])
        raise _ArgumentError(f"'{name}' must be one of {choices}, not {value!r:.40}")
    if "minimum" in schema and value < schema["minimum"]:
        raise _ArgumentError(f"'{name}' must be at least {schema['minimum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise _ArgumentError(
            f"'{name}' must be greater than {schema['exclusiveMinimum']}"
        )
    if "maximum" in schema and value > schema["maximum"]:
        raise _ArgumentError(f"'{name}' must be at most {schema['maximum']}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        raise _ArgumentError(f"'{name}' must not be empty")
    return value


def validate_arguments(
    schema: Mapping[str, Any], arguments: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Return ``arguments`` checked against ``schema``, with defaults filled in.

    ``schema`` is a :attr:`ToolSpec.input_schema`. ``None`` arguments mean
    ``{}``; ``null`` for an optional property means its default.

    Raises:
        _ArgumentError: not an object, a missing required or unknown argument,
            or a value of the wrong type or out of range.

    """
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise _ArgumentError(
            f"arguments must be an object, not {type(arguments).__name__}"
        )
    properties: Mapping[str, Any] = schema["properties"]
    required: list[str] = schema.get("required", [])
    unknown = sorted(str(k) for k in arguments if k not in properties)
    if unknown:
        raise _ArgumentError(
            f"unknown argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)}; accepted: {', '.join(properties)}"
        )
    result: dict[str, Any] = {}
    for name, prop in properties.items():
        value = arguments.get(name)
        if value is None:
            if name in required:
                raise _ArgumentError(f"'{name}' is required")
            result[name] = prop.get("default")
            continue
        result[name] = _check_property(name, value, prop)
    return result


def _decode_payload(payload: str, encoding: str, limit: int) -> bytes:
    """Return the bytes of ``payload`` given as ``text`` or ``base64``.

    Raises:
        _ArgumentError: invalid base64, unencodable text, or more than
            ``limit`` bytes.

    """
    if encoding == "base64":
        try:
            data = base64.b64decode(payload.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as err:
            raise _ArgumentError(f"'payload' is not valid base64: {err}") from err
    else:
        try:
            data = payload.encode()
        except UnicodeEncodeError as err:
            raise _ArgumentError(
                f"'payload' cannot be encoded as UTF-8 ({err.reason}); "
                "send binary data with payload_encoding='base64'"
            ) from err
    if len(data) > limit:
        raise _ArgumentError(
            f"'payload' is {len(data)} bytes; the limit is {limit} bytes"
        )
    return data


def _topic_name(name: str, value: str) -> str:
    if (problem := topic_name_problem(value)) is not None:
        raise _ArgumentError(
            f"'{name}' {value!r:.80} is not a valid MQTT topic name ({problem.value}): "
            "publishing needs a concrete topic without + or #"
        )
    return value


def _topic_filter(name: str, value: str) -> str:
    if (problem := topic_filter_problem(value)) is not None:
        raise _ArgumentError(
            f"'{name}' {value!r:.80} is not a valid MQTT topic filter ({problem.value}): "
            "+ must fill a whole level and # must be the whole last level"
        )
    return value


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


def _annotations() -> dict[str, ToolAnnotations]:
    return {
        TOOL_PUBLISH: ToolAnnotations(read_only=False, destructive=True),
        TOOL_READ: ToolAnnotations(read_only=True, destructive=False),
        TOOL_SUBSCRIBE: ToolAnnotations(read_only=True, destructive=False),
        # A request can make the responder do anything a publish could.
        TOOL_QUERY: ToolAnnotations(read_only=False, destructive=True),
        TOOL_TOPICS: ToolAnnotations(read_only=True, destructive=False),
    }


def _schemas(limits: ToolLimits) -> dict[str, dict[str, Any]]:
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


class _Inbox:
    """A generated response topic of ``mqtt_query``, kept subscribed (MQTT 5).

    ``waiters`` maps each pending query's Correlation Data to its future, in
    arrival order. ``closed``: dropped from the tools; the last query still
    waiting on it unsubscribes.
    """

    __slots__ = ("cap", "closed", "sub", "topic", "waiters")

    def __init__(
        self,
        topic: str,
        cap: int,
        subscribe: Callable[[Callable[[Message], None]], Subscription],
    ) -> None:
        self.topic = topic
        self.cap = cap
        self.waiters: dict[bytes, asyncio.Future[_Received]] = {}
        self.closed = False
        self.sub = subscribe(self.on_message)

    def on_message(self, message: Message) -> None:
        """Hand an answer to the query whose Correlation Data it carries.

        An answer without Correlation Data (a responder that does not echo
        it) goes to the longest-waiting query; a retained one to none.
        """
        props = message.properties
        data = props.correlation_data if props else None
        if data is not None:
            waiter = self.waiters.get(data)
        elif message.retain:
            return
        else:
            waiter = next((w for w in self.waiters.values() if not w.done()), None)
        if waiter is not None and not waiter.done():
            waiter.set_result(_Received(message, self.cap))

    def release(self, key: bytes) -> None:
        """Forget the query waiting with Correlation Data ``key``."""
        self.waiters.pop(key, None)
        if self.closed and not self.waiters:
            self.sub.cancel()

    def close(self) -> None:
        self.closed = True
        if not self.waiters:
            self.sub.cancel()


# -- the tools ---------------------------------------------------------------------


type _Handler = Callable[[Acl, dict[str, Any]], Awaitable[ToolResult]]


@dataclass(slots=True)
class _Outcome:
    """Internal: a finished collection of messages."""

    messages: list[_Received] = field(default_factory=list)
    timed_out: bool = False


class MqttTools:
    """The MQTT tools over one :class:`~.mqtt_client.MqttClient` and a live ACL.

    ``acl()`` returns the rules in force; it is called once per tool call (and
    by :meth:`specs` / :meth:`refresh_acl`), so a changed rule set applies to
    the next call without reconnecting. Run :meth:`start` to keep the topic
    store of ``mqtt_topics`` fed (one subscription per readable pattern),
    :meth:`refresh_acl` when the rules change and :meth:`stop` at the end.
    """

    def __init__(
        self,
        client: MqttClient,
        acl: Callable[[], Acl],
        limits: ToolLimits | None = None,
    ) -> None:
        """Bind the tools to ``client`` and the ACL provider ``acl``."""
        self._client = client
        self._acl = acl
        self.limits = limits or ToolLimits()
        self.stats = ToolStats()
        self._schemas = _schemas(self.limits)
        self._annotations = _annotations()
        self._handlers: dict[str, _Handler] = {
            TOOL_PUBLISH: self._publish,
            TOOL_READ: self._read,
            TOOL_SUBSCRIBE: self._subscribe,
            TOOL_QUERY: self._query,
            TOOL_TOPICS: self._topics,
        }
        self._store = _TopicStore(
            self.limits.topic_store_size, self.limits.preview_bytes
        )
        self._store_acl: Acl | None = None
        self._store_subs: dict[str, Subscription] = {}
        self._store_patterns: list[str] = []
        # The id in generated response topics: unique to this instance.
        self._inbox_id = uuid.uuid4().hex[:16]
        self._inboxes: OrderedDict[str, _Inbox] = OrderedDict()
        self._started = False

    # -- public ----------------------------------------------------------------------

    @property
    def topics_known(self) -> int:
        """How many topics the ``mqtt_topics`` store holds."""
        return len(self._store.entries)

    def specs(self) -> list[ToolSpec]:
        """Return the five tools with descriptions naming the patterns allowed now."""
        acl = self._acl()
        readable = _allowed_text(acl, Permission.READ)
        writable = _allowed_text(acl, Permission.WRITE)
        limits = self.limits
        descriptions = {
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
        return [
            ToolSpec(
                name,
                descriptions[name],
                self._schemas[name],
                self._annotations[name],
            )
            for name in TOOL_NAMES
        ]

    async def call(self, name: str, arguments: Mapping[str, Any] | None) -> ToolResult:
        """Run tool ``name`` with ``arguments`` (a JSON object).

        Never raises for an unknown tool, invalid arguments, an ACL denial, a
        timeout or a broker problem: those come back as ``is_error`` results
        (``structured["error"]`` holds the code). Cancellation propagates.
        """
        self.stats.calls += 1
        result = await self._dispatch(name, arguments)
        if result.is_error:
            self.stats.errors += 1
        return result

    async def _dispatch(
        self, name: str, arguments: Mapping[str, Any] | None
    ) -> ToolResult:
        handler = self._handlers.get(name)
        if handler is None:
            return self._error(
                ERR_UNKNOWN_TOOL,
                f"unknown tool {name!r}; the tools are {', '.join(TOOL_NAMES)}",
                None,
            )
        topic = _topic_of(arguments)
        try:
            args = validate_arguments(self._schemas[name], arguments)
            return await handler(self._acl(), args)
        except _ArgumentError as err:
            return self._error(ERR_INVALID, f"{name}: {err}", topic)
        except Exception as err:
            _LOGGER.exception("MQTT tool %s failed", name)
            return self._error(ERR_INTERNAL, f"{name} failed: {err!r}", topic)

    async def start(self) -> None:
        """Subscribe the topic store to every readable pattern (idempotent).

        The subscriptions wait in the client's registry while it is not
        connected and are renewed on every reconnect.
        """
        self._started = True
        self.refresh_acl()

    def refresh_acl(self) -> None:
        """Follow a rule change: re-subscribe the store, forget unreadable topics.

        Generated response topics of ``mqtt_query`` are unsubscribed too (the
        next query subscribes afresh what the new rules allow).
        """
        acl = self._acl()
        self._store_acl = acl
        self._store.purge(lambda topic: acl.check_read_topic(topic).allowed)
        self._close_inboxes()
        if not self._started:
            return
        wanted = {rule.pattern for rule in acl.patterns(Permission.READ)}
        for pattern in set(self._store_subs) - wanted:
            self._store_subs.pop(pattern).cancel()
        for pattern in sorted(wanted - set(self._store_subs)):
            try:
                self._store_subs[pattern] = self._client.subscribe(
                    pattern,
                    functools.partial(self._on_store_message, pattern),
                    _STORE_OPTIONS,
                )
            except TopicError:  # pragma: no cover - the ACL keeps invalid patterns out
                _LOGGER.warning("cannot subscribe the rule pattern %r", pattern)
        self._store_patterns = sorted(self._store_subs)

    async def stop(self) -> None:
        """Unsubscribe the topic store and the kept response topics.

        The topics seen are kept.
        """
        self._started = False
        self._close_inboxes()
        subs, self._store_subs = self._store_subs, {}
        self._store_patterns = []
        for sub in subs.values():
            sub.cancel()

    # -- results ---------------------------------------------------------------------

    def _error(
        self,
        code: str,
        message: str,
        topic: str | None,
        **extra: Any,
    ) -> ToolResult:
        """Return a failed call that the ACL allowed (or that never got that far)."""
        return ToolResult(
            {"error": code, "message": message, **extra},
            message,
            is_error=True,
            allowed=True,
            topic=topic,
        )

    def _denied(self, acl: Acl, decision: AclDecision, tool: str) -> ToolResult:
        return self._denial(
            acl, tool, decision.permission, decision.topic, decision.reason
        )

    def _denial(
        self, acl: Acl, tool: str, permission: Permission, topic: str, why: str
    ) -> ToolResult:
        """Return the result of a call the ACL refused (nothing was sent).

        The text names the tool, the missing permission, the topic, ``why``
        and (unless ``why`` lists them already) the allowed patterns.
        """
        self.stats.denied += 1
        rules = acl.patterns(permission)
        text = (
            f"Permission denied: {tool} needs {permission.value} permission on "
            f"{topic!r}. {why}."
        )
        if not rules or not all(rule.pattern in why for rule in rules):
            listed = "; ".join(
                r.pattern + (f" ({r.description})" if r.description else "")
                for r in rules
            )
            text += f" Patterns with {permission.value} permission: {listed or 'none'}."
        return ToolResult(
            {
                "error": ERR_DENIED,
                "message": text,
                "permission": permission.value,
                "topic": topic,
                "reason": why,
                "allowed_patterns": [
                    {"pattern": r.pattern, "description": r.description} for r in rules
                ],
            },
            text,
            is_error=True,
            allowed=False,
            topic=topic,
        )

    def _not_connected(self, topic: str) -> ToolResult:
        return self._error(
            ERR_NOT_CONNECTED,
            f"the MQTT broker {self._client.settings.describe()} is not connected "
            "right now; Home Assistant keeps reconnecting, try again shortly",
            topic,
        )

    def _ok(self, summary: str, structured: dict[str, Any], topic: str) -> ToolResult:
        return ToolResult(
            structured,
            f"{summary}\n{_json(structured)}",
            is_error=False,
            allowed=True,
            topic=topic,
        )

    def _timeout(self, requested: float) -> float:
        return min(requested, self.limits.max_timeout)

    # -- subscriptions of one call -------------------------------------------------------

    async def _granted(self, sub: Subscription, deadline: float) -> ToolResult | None:
        """Wait for the SUBACK of ``sub`` until ``deadline`` (loop time).

        Returns an error result if the broker refused or did not answer in time.
        """
        try:
            async with asyncio.timeout_at(deadline):
                await sub.wait_granted()
        except SubscriptionRefusedError as err:
            return self._error(
                ERR_REFUSED,
                f"the broker refused the subscription: {err}",
                sub.topic_filter,
            )
        except TimeoutError:
            state = "connected" if self._client.connected else "not connected"
            return self._error(
                ERR_SUBSCRIBE_TIMEOUT,
                f"the broker did not confirm the subscription to "
                f"{sub.topic_filter!r} in time (broker {state})",
                sub.topic_filter,
            )
        return None

    async def _collect(
        self,
        acl: Acl,
        topic_filter: str,
        timeout: float,
        max_messages: int,
    ) -> _Outcome | ToolResult:
        """Subscribe ``topic_filter``, collect readable messages, unsubscribe.

        Retained values come first (retain handling 0); a retained message
        repeated because the filter was subscribed again is kept once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        outcome = _Outcome()
        full = loop.create_future()
        cap = self.limits.max_result_bytes
        seen_retained: set[tuple[str, int]] = set()

        def on_message(message: Message) -> None:
            if full.done():
                return
            if not acl.check_read_topic(message.topic).allowed:
                self.stats.filtered += 1
                return
            if message.retain:
                key = (message.topic, hash(message.payload))
                if key in seen_retained:
                    return
                seen_retained.add(key)
            outcome.messages.append(_Received(message, cap))
            if len(outcome.messages) >= max_messages:
                full.set_result(None)

        sub = self._client.subscribe(topic_filter, on_message, _CALL_OPTIONS)
        try:
            if (
                error := await self._granted(sub, deadline)
            ) is not None and not full.done():
                return error
            try:
                async with asyncio.timeout_at(deadline):
                    await full
            except TimeoutError:
                outcome.timed_out = True
        finally:
            sub.cancel()
        self.stats.received += len(outcome.messages)
        return outcome

    # -- mqtt_publish ----------------------------------------------------------------

    async def _publish_checked(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        properties: PublishProperties | None = None,
    ) -> ToolResult | None:
        """Publish; return an error result or ``None`` once the broker has it."""
        try:
            async with asyncio.timeout(min(PUBLISH_TIMEOUT, self.limits.max_timeout)):
                await self._client.publish_wait(
                    topic, payload, qos=qos, retain=retain, properties=properties
                )
        except NotConnectedError:
            return self._not_connected(topic)
        except ConnectionLostError:
            return self._error(
                ERR_CONNECTION_LOST,
                f"the connection to the broker was lost before it acknowledged the "
                f"publish to {topic!r}; it may or may not have been delivered",
                topic,
            )
        except PublishRefusedError as err:
            return self._error(
                ERR_REFUSED, str(err), topic, reason_code=err.reason_code
            )
        except TimeoutError:
            return self._error(
                ERR_PUBLISH_TIMEOUT,
                f"the broker did not acknowledge the publish to {topic!r} in time; "
                "it may still be delivered",
                topic,
            )
        self.stats.published += 1
        return None

    async def _publish(self, acl: Acl, args: dict[str, Any]) -> ToolResult:
        topic = _topic_name("topic", args["topic"])
        payload = _decode_payload(
            args["payload"], args["payload_encoding"], self.limits.max_payload_bytes
        )
        decision = acl.check_publish(topic)
        if not decision.allowed:
            return self._denied(acl, decision, TOOL_PUBLISH)
        qos: int = args["qos"]
        retain: bool = args["retain"]
        if (
            error := await self._publish_checked(topic, payload, qos, retain)
        ) is not None:
            return error
        structured = {
            "topic": topic,
            "published": True,
            "qos": qos,
            "retain": retain,
            "payload_bytes": len(payload),
        }
        flags = f"QoS {qos}" + (", retained" if retain else "")
        return self._ok(
            f"Published {len(payload)} bytes to {topic!r} ({flags}).", structured, topic
        )

    # -- mqtt_read --------------------------------------------------------------------

    async def _read(self, acl: Acl, args: dict[str, Any]) -> ToolResult:
        topic_filter = _topic_filter("topic", args["topic"])
        decision = acl.check_subscribe(topic_filter)
        if not decision.allowed:
            return self._denied(acl, decision, TOOL_READ)
        if not self._client.connected:
            return self._not_connected(topic_filter)
        timeout = self._timeout(args["timeout"])
        outcome = await self._collect(acl, topic_filter, timeout, 1)
        if isinstance(outcome, ToolResult):
            return outcome
        budget = self.limits.max_result_bytes
        if not outcome.messages:
            structured: dict[str, Any] = {
                "topic": topic_filter,
                "message": None,
                "timed_out": True,
            }
            return self._ok(
                f"No message on {topic_filter!r} within {timeout:g} s "
                "(no retained value, nothing published).",
                structured,
                topic_filter,
            )
        received = outcome.messages[0]
        structured = _render_fitting(
            received,
            budget,
            lambda m: {"topic": topic_filter, "message": m, "timed_out": False},
        )
        kind = "retained value" if received.retain else "message"
        return self._ok(
            f"Read the {kind} of {received.topic!r} ({received.size} bytes).",
            structured,
            topic_filter,
        )

    # -- mqtt_subscribe --------------------------------------------------------------

    async def _subscribe(self, acl: Acl, args: dict[str, Any]) -> ToolResult:
        topic_filter = _topic_filter("topic", args["topic"])
        decision = acl.check_subscribe(topic_filter)
        if not decision.allowed:
            return self._denied(acl, decision, TOOL_SUBSCRIBE)
        if not self._client.connected:
            return self._not_connected(topic_filter)
        timeout = self._timeout(args["timeout"])
        max_messages: int = args["max_messages"]
        started = time.monotonic()
        outcome = await self._collect(acl, topic_filter, timeout, max_messages)
        if isinstance(outcome, ToolResult):
            return outcome
        base: dict[str, Any] = {
            "topic": topic_filter,
            "messages_received": len(outcome.messages),
            "timed_out": outcome.timed_out,
            "duration_seconds": round(time.monotonic() - started, 3),
        }
        structured = _fit_collection(
            outcome.messages, self.limits.max_result_bytes, base
        )
        count = len(outcome.messages)
        summary = (
            f"Collected {count} message{'' if count == 1 else 's'} on {topic_filter!r}"
        )
        summary += " (timed out)." if outcome.timed_out else "."
        if structured["summarised"]:
            summary += (
                f" Over {self.limits.max_result_bytes} bytes: summarised to "
                f"{len(structured['messages'])} messages plus counts per topic."
            )
        return self._ok(summary, structured, topic_filter)

    # -- mqtt_query ---------------------------------------------------------------------

    def _response_topic(self, acl: Acl, request_topic: str, token: str) -> str | None:
        """Return a unique response topic the ACL lets the agent read, or ``None``.

        First ``{request_topic}/response/{token}``; else, under the readable
        pattern ending in ``#`` (without ``+``) that shares the longest prefix
        with the request topic, ``{prefix}response/{token}``. ``token`` is
        unique to this instance; the answers of several queries on one such
        topic are told apart by their Correlation Data.
        """
        candidates = [f"{request_topic}/{RESPONSE_LEVEL}/{token}"]
        prefixes = sorted(
            (
                rule.pattern[:-1]
                for rule in acl.patterns(Permission.READ)
                if rule.pattern.endswith("#") and "+" not in rule.pattern
            ),
            key=lambda p: (-_common_prefix(p, request_topic), p),
        )
        candidates += [f"{p}{RESPONSE_LEVEL}/{token}" for p in prefixes]
        for candidate in candidates:
            if (
                topic_name_problem(candidate) is None
                and acl.check_subscribe(candidate).allowed
            ):
                return candidate
        return None

    def _inbox(self, topic: str) -> _Inbox:
        """Return the kept subscription of the generated response ``topic``."""
        inbox = self._inboxes.get(topic)
        if inbox is not None:
            self._inboxes.move_to_end(topic)
            return inbox
        inbox = _Inbox(
            topic,
            self.limits.max_result_bytes,
            lambda callback: self._client.subscribe(topic, callback, _RESPONSE_OPTIONS),
        )
        self._inboxes[topic] = inbox
        return inbox

    def _drop_inbox(self, inbox: _Inbox) -> None:
        if self._inboxes.get(inbox.topic) is inbox:
            del self._inboxes[inbox.topic]
        inbox.close()

    def _trim_inboxes(self) -> None:
        """Unsubscribe the least recently used idle inboxes over :data:`MAX_INBOXES`."""
        excess = len(self._inboxes) - MAX_INBOXES
        if excess > 0:
            idle = [i for i in self._inboxes.values() if not i.waiters][:excess]
            for inbox in idle:
                self._drop_inbox(inbox)

    def _close_inboxes(self) -> None:
        inboxes, self._inboxes = self._inboxes, OrderedDict()
        for inbox in inboxes.values():
            inbox.close()

    async def _query(self, acl: Acl, args: dict[str, Any]) -> ToolResult:
        request_topic = _topic_name("request_topic", args["request_topic"])
        given: str | None = args["response_topic"]
        if given is not None:
            _topic_name("response_topic", given)
            if given == request_topic:
                raise _ArgumentError(
                    "'response_topic' must differ from 'request_topic' "
                    "(the request itself would be taken as the answer)"
                )
        payload = _decode_payload(
            args["payload"], args["payload_encoding"], self.limits.max_payload_bytes
        )
        decision = acl.check_publish(request_topic)
        if not decision.allowed:
            return self._denied(acl, decision, TOOL_QUERY)
        v5 = self._client.protocol is ProtocolVersion.V5
        token = uuid.uuid4().hex
        if given is None:
            if not v5:
                return self._error(
                    ERR_RESPONSE_TOPIC,
                    "the broker speaks MQTT 3.1.1, which cannot tell the responder "
                    "where to answer: pass response_topic (the topic the responder "
                    "answers on)",
                    request_topic,
                )
            response_topic = self._response_topic(acl, request_topic, self._inbox_id)
            if response_topic is None:
                return self._denial(
                    acl,
                    TOOL_QUERY,
                    Permission.READ,
                    f"{request_topic}/{RESPONSE_LEVEL}/<id>",
                    "no response_topic was given, this default is not readable "
                    "and no readable pattern ending in '#' has room for one; pass "
                    "response_topic (a topic the responder answers on and a read "
                    "rule covers)",
                )
        else:
            response_topic = given
            decision = acl.check_subscribe(response_topic)
            if not decision.allowed:
                return self._denied(acl, decision, TOOL_QUERY)
        if not self._client.connected:
            return self._not_connected(request_topic)
        correlation = token.encode("ascii") if v5 else None
        loop = asyncio.get_running_loop()
        timeout = self._timeout(args["timeout"])
        deadline = loop.time() + timeout
        answer: asyncio.Future[_Received] = loop.create_future()
        inbox: _Inbox | None = None
        if given is None and correlation is not None:
            inbox = self._inbox(response_topic)
            inbox.waiters[correlation] = answer
            self._trim_inboxes()
            sub = inbox.sub
        else:
            cap = self.limits.max_result_bytes

            def on_message(message: Message) -> None:
                if answer.done():
                    return
                props = message.properties
                data = props.correlation_data if props else None
                if data is not None and data != correlation:
                    return  # somebody else's answer
                if data is None and message.retain:
                    return  # a stale retained value, not an answer to this request
                answer.set_result(_Received(message, cap))

            sub = self._client.subscribe(response_topic, on_message, _RESPONSE_OPTIONS)
        try:
            if (error := await self._granted(sub, deadline)) is not None:
                if inbox is not None:
                    self._drop_inbox(inbox)
                return error
            properties = (
                PublishProperties(
                    response_topic=response_topic, correlation_data=correlation
                )
                if v5
                else None
            )
            error = await self._publish_checked(
                request_topic, payload, args["qos"], False, properties
            )
            if error is not None:
                return error
            try:
                async with asyncio.timeout_at(deadline):
                    received: _Received | None = await answer
            except TimeoutError:
                received = None
        finally:
            if inbox is None:
                sub.cancel()
            else:
                inbox.release(token.encode("ascii"))
        base: dict[str, Any] = {
            "request_topic": request_topic,
            "response_topic": response_topic,
            "response_topic_generated": given is None,
            "protocol": "5" if v5 else "3.1.1",
            "correlation_data": token if v5 else None,
        }
        if received is None:
            structured = base | {
                "response": None,
                "correlated_by": None,
                "timed_out": True,
            }
            return self._ok(
                f"No answer on {response_topic!r} within {timeout:g} s.",
                structured,
                request_topic,
            )
        self.stats.received += 1
        by = (
            "correlation_data"
            if received.props is not None
            and received.props.correlation_data is not None
            else "topic"
        )
        structured = _render_fitting(
            received,
            self.limits.max_result_bytes,
            lambda m: base | {"response": m, "correlated_by": by, "timed_out": False},
        )
        return self._ok(
            f"Answer on {response_topic!r} ({received.size} bytes, matched by {by}).",
            structured,
            request_topic,
        )

    # -- mqtt_topics --------------------------------------------------------------------

    def _store_owner(self, topic: str) -> str | None:
        """The store pattern that records ``topic``: the first one matching it.

        Overlapping readable patterns (``a/#`` and ``a/+/c``) each get a copy
        of a message (MQTT 5: one per subscription; 3.1.1: the registry hands
        the one copy to both); only the owner's copy is recorded.
        """
        for pattern in self._store_patterns:
            if matches(pattern, topic):
                return pattern
        return None

    def _on_store_message(self, pattern: str, message: Message) -> None:
        if self._store_owner(message.topic) == pattern:
            self._observe(self._store_acl, message)

    def _observe(self, acl: Acl | None, message: Message) -> None:
        """Record ``message`` in the store if ``acl`` lets the agent read it."""
        if acl is None or not acl.check_read_topic(message.topic).allowed:
            self.stats.filtered += 1
            return
        if self._store.record(message):
            self.stats.observed += 1

    async def _scan(
        self, acl: Acl, filters: list[str], seconds: float
    ) -> ToolResult | None:
        """Subscribe ``filters`` for ``seconds`` feeding the store (retained too)."""

        def on_message(message: Message) -> None:
            # Live traffic on a topic the store subscribes anyway reaches it
            # through its own subscription; retained repeats are not counted.
            if message.retain or self._store_owner(message.topic) is None:
                self._observe(acl, message)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        subs = [self._client.subscribe(f, on_message, _STORE_OPTIONS) for f in filters]
        try:
            for sub in subs:
                if (error := await self._granted(sub, deadline)) is not None:
                    return error
            await asyncio.sleep(max(0.0, deadline - loop.time()))
        finally:
            for sub in subs:
                sub.cancel()
        return None

    async def _topics(self, acl: Acl, args: dict[str, Any]) -> ToolResult:
        topic_filter = _topic_filter("topic", args["topic"])
        # '#' lists the store, which holds readable topics only (and is
        # filtered again below): it needs some read rule, not one granting '#'.
        everything = topic_filter == "#"
        if not everything or not acl.patterns(Permission.READ):
            decision = acl.check_subscribe(topic_filter)
            if not decision.allowed:
                return self._denied(acl, decision, TOOL_TOPICS)
        seconds = min(
            float(args["scan_seconds"]), MAX_SCAN_SECONDS, self.limits.max_timeout
        )
        if seconds > 0:
            if not self._client.connected:
                return self._not_connected(topic_filter)
            filters = (
                [rule.pattern for rule in acl.patterns(Permission.READ)]
                if everything
                else [topic_filter]
            )
            if (error := await self._scan(acl, filters, seconds)) is not None:
                return error
        found = [
            (topic, entry)
            for topic, entry in self._store.entries.items()
            if (everything or matches(topic_filter, topic))
            and acl.check_read_topic(topic).allowed
        ]
        found.sort(key=lambda item: item[0])
        rows = [
            {
                "topic": topic,
                "messages": entry.count,
                "last_seen": _iso(entry.last),
                "retained": entry.retained,
            }
            | _payload_fields(
                entry.preview,
                entry.size,
                entry.text,
                self.limits.preview_bytes,
                prefix="payload_preview",
            )
            for topic, entry in found
        ]
        structured: dict[str, Any] = {
            "topic": topic_filter,
            "topics": rows,
            "matched": len(rows),
            "known": len(self._store.entries),
            "capacity": self._store.capacity,
            "scanned_seconds": seconds,
            "connected": self._client.connected,
            "truncated": False,
        }
        budget = self.limits.max_result_bytes
        if _json_size(structured) > budget:
            structured["truncated"] = True
            structured["topics"] = _fit_rows(structured, rows, budget)
        shown = len(structured["topics"])
        summary = (
            f"{len(rows)} topic{'' if len(rows) == 1 else 's'} seen on {topic_filter!r}"
        )
        if structured["truncated"]:
            summary += f" (first {shown} by name shown; narrow the filter for the rest)"
        summary += "."
        if not rows and not seconds:
            summary += (
                " Nothing seen yet: scan_seconds listens for a while first "
                "(retained values included)."
            )
        return self._ok(summary, structured, topic_filter)


_CALL_OPTIONS: Final = SubscribeOptions(
    qos=1, retain_handling=RetainHandling.SEND_ON_SUBSCRIBE
)
_RESPONSE_OPTIONS: Final = SubscribeOptions(
    qos=1, retain_handling=RetainHandling.DONT_SEND
)
# The same QoS as the calls': a call on a filter the store also holds then
# leaves the merged options unchanged when it ends, so the registry does not
# subscribe again (which would make the broker re-send every retained value).
_STORE_OPTIONS: Final = SubscribeOptions(
    qos=1, retain_handling=RetainHandling.SEND_ON_SUBSCRIBE
)


def _topic_of(arguments: Any) -> str | None:
    """The topic an argument object names (for error results), if any."""
    if isinstance(arguments, Mapping):
        for key in ("topic", "request_topic"):
            if isinstance(value := arguments.get(key), str):
                return value
    return None


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def _fit_rows(
    structured: dict[str, Any], rows: list[dict[str, Any]], budget: int
) -> list[dict[str, Any]]:
    """Return the longest prefix of ``rows`` that keeps ``structured`` within ``budget``."""
    low, high = 0, len(rows)
    while low < high:
        middle = (low + high + 1) // 2
        if _json_size(structured | {"topics": rows[:middle]}) <= budget:
            low = middle
        else:
            high = middle - 1
    return rows[:low]


def _spread(count: int, keep: int) -> list[int]:
    """Return ``keep`` indices of ``range(count)``, evenly spread, first and last included."""
    if keep >= count:
        return list(range(count))
    if keep == 1:
        return [0]
    return sorted({round(i * (count - 1) / (keep - 1)) for i in range(keep)})


def _fit_collection(
    messages: list[_Received], budget: int, base: dict[str, Any]
) -> dict[str, Any]:
    """Return ``base`` plus the messages, summarised if over ``budget`` bytes.

    Everything fits: ``messages`` lists them all, ``summarised`` is false.
    Else (as bitsperity's pruner does) ``messages`` keeps the first, the last
    and an even sample in between, each with its ``index`` in arrival order,
    payloads shortened if needed, and ``per_topic`` counts every message.
    """
    full = base | {
        "summarised": False,
        "messages": [m.render(budget) for m in messages],
    }
    if _json_size(full) <= budget:
        return full
    count = len(messages)
    per_topic = [
        {"topic": topic, "count": n}
        for topic, n in Counter(m.topic for m in messages).most_common()
    ]

    def build(keep: int, cap: int, topics: list[dict[str, Any]]) -> dict[str, Any]:
        shown = [
            {"index": i} | messages[i].render(cap, with_properties=cap > 0)
            for i in _spread(count, keep)
        ]
        result = base | {
            "summarised": True,
            "messages": shown,
            "omitted": count - len(shown),
            "per_topic": topics,
        }
        if len(topics) < len(per_topic):
            result["per_topic_truncated"] = True
        return result

    def most(cap: int, topics: list[dict[str, Any]]) -> int:
        low, high = 0, count
        while low < high:
            middle = (low + high + 1) // 2
            if _json_size(build(middle, cap, topics)) <= budget:
                low = middle
            else:
                high = middle - 1
        return low

    # Prefer whole payloads; shorten them until at least five messages (or
    # all) fit; failing that, the most messages with some payload shown.
    wanted = min(count, 5)
    keep, cap = 0, 0
    for candidate in (budget // 4, budget // 16, 256, 64, 0):
        fitting = most(candidate, per_topic)
        if fitting > keep and (candidate > 0 or keep == 0):
            keep, cap = fitting, candidate
        if fitting >= wanted:
            break
    topics = per_topic
    while keep == 0 and topics:
        topics = topics[: len(topics) // 2]
        keep = most(0, topics)
    return build(keep, cap, topics)
