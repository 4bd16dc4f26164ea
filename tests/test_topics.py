"""Topic names and filters (MQTT 3.1.1/5.0 §4.7): validation and matching tables."""

from __future__ import annotations

import pytest

from custom_components.mqtt_bridge.engine.topics import (
    MAX_TOPIC_BYTES,
    TopicError,
    TopicProblem,
    matches,
    split_shared,
    topic_filter_problem,
    topic_name_problem,
    validate_topic_filter,
    validate_topic_name,
)

P = TopicProblem

# U+0001..U+001F and U+007F..U+009F (C0 without NUL, DEL and C1): MQTT 5 §1.5.4
# "SHOULD NOT"; Mosquitto disconnects a client that sends them.
CONTROL_CHARACTERS = [chr(c) for c in range(0x01, 0x20)] + [
    chr(c) for c in range(0x7F, 0xA0)
]
# Unicode non-characters: U+FDD0..U+FDEF and U+xFFFE/U+xFFFF of all 17 planes.
NON_CHARACTERS = [chr(c) for c in range(0xFDD0, 0xFDF0)] + [
    chr(plane << 16 | low) for plane in range(17) for low in (0xFFFE, 0xFFFF)
]
# The neighbours of those ranges are ordinary characters.
ALLOWED_NEIGHBOURS = [
    " ",
    "~",
    "\xa0",
    "\ufdcf",
    "\ufdf0",
    "\ufffd",
    "\U00010000",
    "\U0010fffd",
    "é",
    "€",
    "😀",
]


def test_discouraged_character_sets_are_complete() -> None:
    assert len(CONTROL_CHARACTERS) == 31 + 33
    assert len(NON_CHARACTERS) == 32 + 34


@pytest.mark.parametrize("check", [topic_name_problem, topic_filter_problem])
def test_every_control_character_is_refused(check) -> None:
    wrong = {
        hex(ord(c)): check(f"a/{c}/b")
        for c in CONTROL_CHARACTERS
        if check(f"a/{c}/b") is not P.CONTROL_CHARACTER
    }
    assert wrong == {}
    # Also as a whole level, first and last character.
    assert check("\x01") is P.CONTROL_CHARACTER
    assert check("a\x9f") is P.CONTROL_CHARACTER
    assert check("\x7fa") is P.CONTROL_CHARACTER


@pytest.mark.parametrize("check", [topic_name_problem, topic_filter_problem])
def test_every_non_character_is_refused(check) -> None:
    wrong = {
        hex(ord(c)): check(f"a/{c}")
        for c in NON_CHARACTERS
        if check(f"a/{c}") is not P.CONTROL_CHARACTER
    }
    assert wrong == {}


@pytest.mark.parametrize("check", [topic_name_problem, topic_filter_problem])
def test_neighbours_of_refused_ranges_are_allowed(check) -> None:
    wrong = {
        hex(ord(c)): check(f"a/{c}") for c in ALLOWED_NEIGHBOURS if check(f"a/{c}")
    }
    assert wrong == {}


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        # valid, including empty levels (§4.7.1: "a//b", "/a" and "a/" are legal)
        ("a", None),
        ("a/b/c", None),
        ("/", None),
        ("//", None),
        ("/a", None),
        ("a/", None),
        ("a//b", None),
        ("msh/2/e/LongFast/!1a2b3c4d", None),
        ("$SYS/broker/version", None),
        ("$mcp-server/x", None),
        ("Zürich/€/😀", None),
        (" ", None),
        ("a b", None),
        # empty
        ("", P.EMPTY),
        # wildcards anywhere in a name
        ("+", P.WILDCARD),
        ("#", P.WILDCARD),
        ("a/+", P.WILDCARD),
        ("a/#", P.WILDCARD),
        ("a+b", P.WILDCARD),
        ("a#b", P.WILDCARD),
        ("msh/2/e/C#/!1a2b3c4d", P.WILDCARD),
        ("msh#/2/e/x", P.WILDCARD),
        # NUL (§1.5.4 MUST NOT), lone surrogates (not UTF-8 encodable)
        ("\x00", P.NULL_CHARACTER),
        ("a/\x00/b", P.NULL_CHARACTER),
        ("\ud800", P.SURROGATE),
        ("a/\udfff", P.SURROGATE),
        # control characters
        ("msh/2/e/LongFast/\x01", P.CONTROL_CHARACTER),
        ("a\tb", P.CONTROL_CHARACTER),
        ("a\nb", P.CONTROL_CHARACTER),
        ("a\x7f", P.CONTROL_CHARACTER),
        ("a\x85", P.CONTROL_CHARACTER),
        ("a\ufffe", P.CONTROL_CHARACTER),
        # string problems are reported before wildcards
        ("+\x01", P.CONTROL_CHARACTER),
        ("#\x00", P.NULL_CHARACTER),
        ("+\ud800", P.SURROGATE),
    ],
)
def test_topic_name_problem(topic: str, problem: TopicProblem | None) -> None:
    assert topic_name_problem(topic) is problem


@pytest.mark.parametrize(
    ("topic_filter", "problem"),
    [
        # valid
        ("a", None),
        ("#", None),
        ("+", None),
        ("a/#", None),
        ("a/+", None),
        ("a/+/c", None),
        ("+/+", None),
        ("+/#", None),
        ("/#", None),
        ("/+", None),
        ("a//+", None),
        ("a//#", None),
        ("+//+", None),
        ("$SYS/#", None),
        ("$share", None),  # no slash: an ordinary filter
        ("$sharex/a", None),
        ("$share/g/a/+", None),
        ("$share/g/#", None),
        ("$share/g/+", None),
        ("$share/g/$SYS/#", None),
        ("$share/g/a//b", None),
        ("$share/g/a/b/c", None),
        # empty
        ("", P.EMPTY),
        # misplaced wildcards (§4.7.1.2, §4.7.1.3)
        ("a/#/b", P.INVALID_WILDCARD),
        ("#/", P.INVALID_WILDCARD),
        ("#/#", P.INVALID_WILDCARD),
        ("a#", P.INVALID_WILDCARD),
        ("a/b#", P.INVALID_WILDCARD),
        ("a+", P.INVALID_WILDCARD),
        ("+a", P.INVALID_WILDCARD),
        ("a/+b/c", P.INVALID_WILDCARD),
        ("++", P.INVALID_WILDCARD),
        ("+#", P.INVALID_WILDCARD),
        ("msh/2/e/C#/+", P.INVALID_WILDCARD),
        ("msh/2/e/x+y/+", P.INVALID_WILDCARD),
        # shared subscriptions (MQTT 5 §4.8.2)
        ("$share/", P.INVALID_SHARE),
        ("$share/g", P.INVALID_SHARE),
        ("$share/g/", P.INVALID_SHARE),
        ("$share//a", P.INVALID_SHARE),
        ("$share/+/a", P.INVALID_SHARE),
        ("$share/#/a", P.INVALID_SHARE),
        ("$share/g+/a", P.INVALID_SHARE),
        ("$share/g#/a", P.INVALID_SHARE),
        ("$share/g/a/#/b", P.INVALID_WILDCARD),
        ("$share/g/a+", P.INVALID_WILDCARD),
        # string problems
        ("a/\x00", P.NULL_CHARACTER),
        ("\ud800/#", P.SURROGATE),
        ("a/\x1f/#", P.CONTROL_CHARACTER),
        ("$share/g\x01/a", P.CONTROL_CHARACTER),
        ("a#\x01", P.CONTROL_CHARACTER),
    ],
)
def test_topic_filter_problem(topic_filter: str, problem: TopicProblem | None) -> None:
    assert topic_filter_problem(topic_filter) is problem


@pytest.mark.parametrize("check", [topic_name_problem, topic_filter_problem])
def test_length_limit_is_65535_utf8_bytes(check) -> None:
    assert MAX_TOPIC_BYTES == 65_535
    assert check("a" * 65_535) is None
    assert check("a" * 65_536) is P.TOO_LONG
    # Bytes, not characters: "é" is 2 bytes, "😀" 4.
    assert check("é" * 32_767 + "a") is None  # 65,535 bytes
    assert check("é" * 32_768) is P.TOO_LONG  # 65,536 bytes, 32,768 characters
    assert check("😀" * 16_383 + "abc") is None  # 65,535 bytes
    assert check("😀" * 16_384) is P.TOO_LONG
    # Levels do not matter for the length.
    assert check("a/" * 32_767 + "a") is None
    assert check("a/" * 32_768) is P.TOO_LONG


def test_surrogate_is_checked_before_length() -> None:
    # A lone surrogate cannot be encoded, so its length is meaningless.
    assert topic_name_problem("a" * 70_000 + "\ud800") is P.SURROGATE
    assert topic_name_problem("a" * 70_000 + "\x00") is P.NULL_CHARACTER


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("a/b", (None, "a/b")),
        ("#", (None, "#")),
        ("$SYS/#", (None, "$SYS/#")),
        ("$share", (None, "$share")),
        ("$sharex/g/a", (None, "$sharex/g/a")),
        ("$share/g/a/b", ("g", "a/b")),
        ("$share/group-1/#", ("group-1", "#")),
        ("$share/g/+/x", ("g", "+/x")),
        ("$share/g//x", ("g", "/x")),
        ("$share/g/$SYS/#", ("g", "$SYS/#")),
    ],
)
def test_split_shared(topic_filter: str, expected: tuple[str | None, str]) -> None:
    assert split_shared(topic_filter) == expected


@pytest.mark.parametrize(
    "topic_filter",
    ["$share/", "$share/g", "$share/g/", "$share//a", "$share/+/a", "$share/g#/a"],
)
def test_split_shared_rejects(topic_filter: str) -> None:
    with pytest.raises(TopicError) as err:
        split_shared(topic_filter)
    assert err.value.problem is P.INVALID_SHARE
    assert err.value.topic == topic_filter


# (filter, topic, matches?) -- also checked against the registry's trie.
MATCH_TABLE: list[tuple[str, str, bool]] = [
    # literal
    ("a/b", "a/b", True),
    ("a/b", "a/c", False),
    ("a/b", "a/b/c", False),
    ("a/b", "a", False),
    ("A", "a", False),
    ("a//b", "a//b", True),
    ("a//b", "a/b", False),
    ("/a", "/a", True),
    ("/a", "a", False),
    ("Zürich/€", "Zürich/€", True),
    # "+" matches exactly one level, which may be empty
    ("a/+", "a/b", True),
    ("a/+", "a/", True),
    ("a/+", "a", False),
    ("a/+", "a/b/c", False),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a//c", True),
    ("a/+/c", "a/b/d", False),
    ("+", "a", True),
    ("+", "/a", False),
    ("+/+", "/a", True),
    ("+/+", "a/", True),
    ("+/+", "/", True),
    ("/+", "/a", True),
    # "#" matches the parent and any number of children (§4.7.1.2)
    ("a/#", "a", True),
    ("a/#", "a/", True),
    ("a/#", "a/b", True),
    ("a/#", "a/b/c/d", True),
    ("a/#", "ab", False),
    ("a/#", "b/a", False),
    ("#", "a", True),
    ("#", "a/b/c", True),
    ("#", "/", True),
    ("+/#", "a", True),
    ("+/#", "a/b/c", True),
    ("a/+/#", "a/b", True),
    ("a/+/#", "a", False),
    ("/#", "/a", True),
    ("/#", "a", False),
    # "$" topics are not matched by a first-level wildcard (§4.7.2)
    ("#", "$SYS/x", False),
    ("#", "$", False),
    ("+/x", "$SYS/x", False),
    ("+", "$SYS", False),
    ("+/#", "$SYS/x", False),
    ("+/#", "$SYS", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS", True),
    ("$SYS/+", "$SYS/x", True),
    ("$mcp-server/#", "$mcp-server/a/b", True),
    ("a/#", "a/$x", True),  # only the first level counts
    ("a/+", "a/$x", True),
    # shared subscriptions match the filter after the group
    ("$share/g/a/+", "a/b", True),
    ("$share/g/a/+", "a/b/c", False),
    ("$share/g/#", "x/y", True),
    ("$share/g/#", "$SYS/x", False),
    ("$share/g/$SYS/#", "$SYS/x", True),
    ("$share/g/a/#", "b", False),
    ("$share/g/a", "$share/g/a", False),
]


@pytest.mark.parametrize(("topic_filter", "topic", "expected"), MATCH_TABLE)
def test_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_filter_problem(topic_filter) is None
    assert matches(topic_filter, topic) is expected


def test_validate_raises_with_reason_and_visible_topic() -> None:
    assert validate_topic_name("a/b") == "a/b"
    assert validate_topic_filter("a/#") == "a/#"
    with pytest.raises(TopicError) as err:
        validate_topic_name("msh/2/e/LongFast/\x01")
    assert err.value.problem is P.CONTROL_CHARACTER
    assert err.value.topic == "msh/2/e/LongFast/\x01"
    assert "\\x01" in str(err.value)  # repr: the control character is visible
    assert "control_character" in str(err.value)
    assert isinstance(err.value, ValueError)
    with pytest.raises(TopicError) as err:
        validate_topic_filter("a/#/b")
    assert err.value.problem is P.INVALID_WILDCARD
    with pytest.raises(TopicError) as err:
        validate_topic_name("a/#")
    assert err.value.problem is P.WILDCARD


def test_problem_codes_are_stable_strings() -> None:
    # Shown in diagnostics and counted by reason: the values are an interface.
    assert {p.value for p in TopicProblem} == {
        "empty",
        "too_long",
        "null_character",
        "lone_surrogate",
        "control_character",
        "wildcard",
        "invalid_wildcard",
        "invalid_shared_subscription",
    }
