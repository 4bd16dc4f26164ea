"""MQTT topic names and topic filters: validation and matching (MQTT 3.1.1/5.0 §4.7).

Pure functions, no I/O. The rules and their sources:

* A topic name or filter is a UTF-8 string of 1 to 65,535 bytes without U+0000
  and without lone surrogates (§1.5.4, §4.7.3).
* Control characters U+0001..U+001F and U+007F..U+009F and Unicode
  non-characters "SHOULD NOT" appear (§1.5.4); Mosquitto treats them as a
  malformed packet and disconnects the client (``lib/utf8_mosq.c``
  ``mosquitto_validate_utf8``), so they are refused here too.
* A topic name contains no wildcard (``+``, ``#``) (§4.7.1).
* In a filter ``+`` occupies a whole level and ``#`` occupies the whole last
  level (§4.7.1.2, §4.7.1.3).
* ``$share/{group}/{filter}`` is a shared subscription: the group is non-empty
  and wildcard-free, and the filter that follows is matched (MQTT 5 §4.8.2).
* A filter whose first level is ``+`` or ``#`` does not match a topic whose
  first level starts with ``$`` (§4.7.2).

Matching uses paho-mqtt's topic trie (:class:`paho.mqtt.matcher.MQTTMatcher`),
which implements these rules.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import enum
import re

from paho.mqtt.client import topic_matches_sub

MAX_TOPIC_BYTES = 65_535
SHARE_PREFIX = "$share/"


class TopicProblem(enum.StrEnum):
    """Why a string is not a valid topic name or filter (a stable reason code)."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    NULL_CHARACTER = "null_character"
    SURROGATE = "lone_surrogate"
    CONTROL_CHARACTER = "control_character"
    WILDCARD = "wildcard"
    INVALID_WILDCARD = "invalid_wildcard"
    INVALID_SHARE = "invalid_shared_subscription"


class TopicError(ValueError):
    """A topic name or filter is not valid; ``problem`` says why."""

    def __init__(self, topic: str, problem: TopicProblem) -> None:
        """Describe ``topic`` (shown with ``repr`` so control characters are visible)."""
        super().__init__(f"invalid topic {topic!r}: {problem.value}")
        self.topic = topic
        self.problem = problem


def _discouraged_characters() -> re.Pattern[str]:
    """Return a pattern of the code points MQTT 5 §1.5.4 says SHOULD NOT be used."""
    ranges = ["\x01-\x1f", "\x7f-\x9f", "\ufdd0-\ufdef"]
    # U+xFFFE and U+xFFFF of every plane are non-characters.
    ranges += [
        f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17)
    ]
    return re.compile("[" + "".join(ranges) + "]")


_DISCOURAGED = _discouraged_characters()


def _string_problem(text: str) -> TopicProblem | None:
    """Return what makes ``text`` unusable as an MQTT topic string, or ``None``."""
    if not text:
        return TopicProblem.EMPTY
    if "\x00" in text:
        return TopicProblem.NULL_CHARACTER
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        return TopicProblem.SURROGATE
    if size > MAX_TOPIC_BYTES:
        return TopicProblem.TOO_LONG
    if _DISCOURAGED.search(text):
        return TopicProblem.CONTROL_CHARACTER
    return None


def topic_name_problem(topic: str) -> TopicProblem | None:
    """Return why ``topic`` cannot be published to, or ``None`` if it is valid.

    A topic name must be a valid MQTT string (see the module docstring) and
    contain no ``+`` or ``#``.
    """
    problem = _string_problem(topic)
    if problem is None and ("+" in topic or "#" in topic):
        return TopicProblem.WILDCARD
    return problem


def _levels_problem(topic_filter: str) -> TopicProblem | None:
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for index, level in enumerate(levels):
        if level in ("+", "#"):
            if level == "#" and index != last:
                return TopicProblem.INVALID_WILDCARD
        elif "+" in level or "#" in level:
            return TopicProblem.INVALID_WILDCARD
    return None


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/{group}/{filter}`` into ``(group, filter)``.

    Any other filter is returned as ``(None, topic_filter)``.

    Raises:
        TopicError: ``$share/`` without a non-empty, wildcard-free group and a
            filter after it.

    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, sep, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep or not group or not rest or "+" in group or "#" in group:
        raise TopicError(topic_filter, TopicProblem.INVALID_SHARE)
    return group, rest


def topic_filter_problem(topic_filter: str) -> TopicProblem | None:
    """Return why ``topic_filter`` cannot be subscribed to, or ``None`` if valid.

    Checks the string rules, the wildcard placement and, for
    ``$share/{group}/{filter}``, the group and the filter after it.
    """
    problem = _string_problem(topic_filter)
    if problem is not None:
        return problem
    try:
        _group, inner = split_shared(topic_filter)
    except TopicError as err:
        return err.problem
    return _levels_problem(inner)


def validate_topic_name(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name.

    Raises:
        TopicError: it is not (see :func:`topic_name_problem`).

    """
    if (problem := topic_name_problem(topic)) is not None:
        raise TopicError(topic, problem)
    return topic


def validate_topic_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid topic filter.

    Raises:
        TopicError: it is not (see :func:`topic_filter_problem`).

    """
    if (problem := topic_filter_problem(topic_filter)) is not None:
        raise TopicError(topic_filter, problem)
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Whether the valid filter ``topic_filter`` matches the topic name ``topic``.

    ``$share/{group}/`` is stripped first (shared subscriptions receive the
    messages of the filter after it). Implements §4.7 including the ``$`` rule.
    """
    _group, inner = split_shared(topic_filter)
    return topic_matches_sub(inner, topic)
