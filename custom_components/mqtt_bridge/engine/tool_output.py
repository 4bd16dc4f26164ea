"""What the MQTT tools' results show of messages, within the byte budget.

A received message is kept as a :class:`ReceivedMessage` (payload capped,
UTF-8-ness known) and rendered as JSON: the payload as text when it is valid
UTF-8, else base64 (never a crash), its size and whether it was cut, QoS,
retain flag, an ISO 8601 timestamp and the MQTT 5 properties. Results must
fit :attr:`~.tool_specs.ToolLimits.max_result_bytes` (the compact JSON of
``structured``): :func:`render_fitting` shortens one message's payload,
:func:`fit_rows` keeps the rows that fit, and :func:`fit_collection`
summarises a collection that is too big (first and last messages, an even
sample in between, the count per topic), as bitsperity's pruner does.
Pure: no I/O.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
import json
import time
from typing import Any

from .mqtt_client import Message, PublishProperties


def iso_time(timestamp: float) -> str:
    """Return ``timestamp`` (seconds since the epoch) as ISO 8601 UTC with ms, ``Z``."""
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def is_utf8(payload: bytes) -> bool:
    """Return whether ``payload`` is valid UTF-8."""
    try:
        payload.decode()
    except UnicodeDecodeError:
        return False
    return True


def payload_fields(
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


def to_json(value: Any) -> str:
    """Return ``value`` as compact JSON (non-ASCII kept), as results are measured."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def json_size(value: Any) -> int:
    """Return the UTF-8 size of :func:`to_json` of ``value``, in bytes."""
    return len(to_json(value).encode())


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
            data.decode() if is_utf8(data) else base64.b64encode(data).decode()
        )
        if not is_utf8(data):
            out["correlation_data_encoding"] = "base64"
    if props.user_properties:
        out["user_properties"] = [[k, v] for k, v in props.user_properties]
    if props.message_expiry_interval is not None:
        out["message_expiry_interval"] = props.message_expiry_interval
    if props.payload_format_indicator is not None:
        out["payload_format_indicator"] = props.payload_format_indicator
    return out or None


class ReceivedMessage:
    """A received message as kept by a call: payload capped, UTF-8-ness known."""

    __slots__ = ("at", "payload", "props", "qos", "retain", "size", "text", "topic")

    def __init__(self, message: Message, cap: int) -> None:
        """Keep ``message`` with at most ``cap`` payload bytes, stamped now."""
        payload = message.payload
        self.topic = message.topic
        self.size = len(payload)
        self.text = is_utf8(payload)
        self.payload = payload[:cap]
        self.qos = message.qos
        self.retain = message.retain
        self.props = message.properties
        self.at = time.time()

    def render(self, cap: int, *, with_properties: bool = True) -> dict[str, Any]:
        """Return the JSON form with at most ``cap`` payload bytes shown."""
        out: dict[str, Any] = {"topic": self.topic}
        out.update(payload_fields(self.payload, self.size, self.text, cap))
        out["qos"] = self.qos
        out["retain"] = self.retain
        out["timestamp"] = iso_time(self.at)
        if with_properties and (props := _properties(self.props)) is not None:
            out["properties"] = props
        return out


def render_fitting(
    received: ReceivedMessage,
    budget: int,
    wrap: Callable[[dict[str, Any]], dict[str, Any]],
) -> dict[str, Any]:
    """Return ``wrap(message)`` with the payload shortened until it fits ``budget``."""
    cap = budget
    with_properties = True
    while True:
        result = wrap(received.render(cap, with_properties=with_properties))
        size = json_size(result)
        if size <= budget:
            return result
        if cap > 0:
            cap = max(0, min(cap // 2, cap - (size - budget)))
        elif with_properties:
            with_properties = False
        else:
            return result  # only the topic name is left; it is what it is


def fit_rows(
    structured: dict[str, Any], rows: list[dict[str, Any]], budget: int
) -> list[dict[str, Any]]:
    """Return the longest prefix of ``rows`` that keeps ``structured`` within ``budget``.

    The rows are measured as ``structured["topics"]``.
    """
    low, high = 0, len(rows)
    while low < high:
        middle = (low + high + 1) // 2
        if json_size(structured | {"topics": rows[:middle]}) <= budget:
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


def fit_collection(
    messages: list[ReceivedMessage], budget: int, base: dict[str, Any]
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
    if json_size(full) <= budget:
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
            if json_size(build(middle, cap, topics)) <= budget:
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
