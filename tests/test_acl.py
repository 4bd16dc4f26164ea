"""Topic ACL (MQTT 3.1.1/5.0 §4.7, MQTT 5 §4.8.2): tables, bypass attempts, oracles.

The tables state each decision by hand. The brute-force tests check the same
functions against paho-mqtt's matcher (``topics.matches``) over a generated
universe of topics and filters: ``filter_within`` must be exact set inclusion
(with the one documented exception ``#`` / ``+/#``), and the ACL's own matcher
must agree with paho on every (pattern, topic) pair.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from itertools import product
import json

import pytest

from custom_components.mqtt_bridge.engine.acl import (
    RULE_KEYS,
    SHARE_RULE_PROBLEM,
    Acl,
    AclDecision,
    AclImportError,
    AclRule,
    Permission,
    filter_within,
    parse_rules,
    problem_text,
    rule_problem,
    rules_from_options,
    rules_to_json,
    rules_to_options,
)
from custom_components.mqtt_bridge.engine.topics import (
    TopicProblem,
    matches,
    topic_filter_problem,
    topic_name_problem,
)

R = Permission.READ
W = Permission.WRITE
P = TopicProblem


def short(value: object) -> str:
    """A readable test id: long strings cut, control characters escaped."""
    text = value if isinstance(value, str) else repr(value)
    return ascii(text[:40]) + (f"...({len(text)})" if len(text) > 40 else "")


def rule(pattern: str, *permissions: Permission, description: str = "") -> AclRule:
    return AclRule(pattern, frozenset(permissions or (R, W)), description)


# --- filter_within: table ---------------------------------------------------

FILTER_WITHIN = [
    # literals, case, identity
    ("a", "a", True),
    ("a", "b", False),
    ("a", "A", False),
    ("A", "a", False),
    ("a/b", "a/b", True),
    ("a/b", "a/B", False),
    ("a/b", "a", False),
    ("a", "a/b", False),
    # `+`: exactly one level, which may be empty
    ("a", "+", True),
    ("+", "a", False),
    ("+", "+", True),
    ("a/x", "a/+", True),
    ("a/", "a/+", True),
    ("a/+", "a/+", True),
    ("a", "a/+", False),
    ("a/x/y", "a/+", False),
    ("a//", "a/+", False),
    ("a//b", "a/+/b", True),
    ("/a", "+/a", True),
    ("/", "+/+", True),
    ("/", "+", False),
    ("+/+", "+/+", True),
    ("+/+", "+", False),
    ("+", "+/+", False),
    # `#`: the last whole level, matches the parent too (§4.7.1.2)
    ("#", "#", True),
    ("a", "#", True),
    ("+", "#", True),
    ("+/#", "#", True),
    ("/", "#", True),
    ("/#", "#", True),
    ("a/#", "#", True),
    ("#", "a", False),
    ("#", "+", False),
    ("#", "a/#", False),
    ("a", "a/#", True),
    ("a/b", "a/#", True),
    ("a/b/c/d", "a/#", True),
    ("a/", "a/#", True),
    ("a/#", "a/#", True),
    ("a/+", "a/#", True),
    ("a/+/+", "a/#", True),
    ("a/+/#", "a/#", True),
    ("a/#", "a/+", False),  # mcpMQTT's defect: a filter checked as a topic
    ("a/#", "a/+/+", False),
    ("a/+", "a/+/#", True),  # `#` matches the parent `a/x`
    ("a/x", "a/+/#", True),
    ("a/x/y/z", "a/+/#", True),
    ("a/+/#", "a/+", False),
    ("a/#", "a/+/#", False),  # `a/#` matches `a`, `a/+/#` does not
    ("a", "a/+/#", False),
    ("b/#", "a/#", False),
    ("a/#", "a", False),
    ("a/#", "a/b", False),
    # `#` and `+/#`: equal sets, `#` deliberately not within `+/#` (the issue)
    ("#", "+/#", False),
    ("+/#", "+/#", True),
    ("+", "+/#", True),
    ("a", "+/#", True),
    ("a/b/c", "+/#", True),
    ("#", "+/+/#", False),
    ("+/#", "+/+/#", False),
    ("+/+", "+/+/#", True),
    ("+/+/#", "+/#", True),
    ("/#", "/#", True),
    ("/", "/#", True),
    ("#", "/#", False),
    # `/#` and `/+/#`: differ only on "" (the parent of `/#`), not a topic name
    ("/#", "/+/#", False),
    ("/#", "+/+/#", False),
    ("/+/#", "/#", True),
    # deep
    ("a/b/c/d/e", "a/+/c/+/e", True),
    ("a/b/c/d/e", "a/+/c/+", False),
    ("a/+/c/+/e", "a/+/c/+/e", True),
    ("a/+/c/+/e", "a/b/c/+/e", False),
    # trailing slash and empty levels are levels
    ("a/", "a", False),
    ("a", "a/", False),
    ("a//b", "a/b", False),
    ("a/b", "a//b", False),
    ("/a", "a", False),
    ("a", "/a", False),
    ("//", "+/+/+", True),
    ("//", "+/+", False),
    # `$` first levels (§4.7.2): `+`/`#` as first level never match them
    ("$SYS/x", "#", False),
    ("$SYS/#", "#", False),
    ("$SYS", "#", False),
    ("$SYS/x", "+/x", False),
    ("$SYS/x", "+/+", False),
    ("$SYS/x", "+/#", False),
    ("$SYS/x", "$SYS/#", True),
    ("$SYS", "$SYS/#", True),
    ("$SYS/+", "$SYS/#", True),
    ("$SYS/#", "$SYS/#", True),
    ("$SYS/#", "$SYS/+", False),
    ("$SYS/x", "$sys/#", False),
    ("$x", "+", False),
    ("$x", "$x", True),
    ("$", "+", False),
    ("$", "$", True),
    ("$", "#", False),
    ("+/x", "$x/x", False),
    ("+", "$x", False),
    ("#", "$SYS/#", False),
    ("$mcp-server/a", "#", False),
    ("$mcp-rpc/c/s/n", "+/+/+/+", False),
    ("$mcp-server/#", "$mcp-server/#", True),
    ("$queue/a", "#", False),
    ("$queue/a", "$queue/#", True),
    ("a/$SYS", "a/+", True),  # only the first level counts
    ("a/$SYS/x", "a/#", True),
    ("x$/a", "+/a", True),  # `$` not the first character
    (" $x", "+", True),
    # shared subscriptions: the filter after $share/{group}/ (MQTT 5 §4.8.2)
    ("$share/g/a", "a", True),
    ("$share/g/a", "#", True),
    ("$share/g/#", "#", True),
    ("$share/g/a/+", "a/#", True),
    ("$share/g/a/#", "a/+", False),
    ("$share/g/$SYS/#", "#", False),
    ("$share/g/$SYS/#", "$SYS/#", True),
    ("$share/g/#", "+/#", False),
    ("$share//a", "a", False),
    ("$share/g+/a", "a", False),
    ("$share/+/a", "a", False),
    ("$share/g#/a", "a", False),
    ("$share/g", "#", False),
    ("$share/g", "$share/g", False),  # an invalid shared subscription
    ("$share/g/", "#", False),
    ("$share/", "#", False),
    ("$share/g/a", "$share/g/a", False),  # a rule cannot be a shared filter
    ("$share/g/a", "$share/#", False),
    ("$share", "#", False),  # no slash: a literal `$` topic
    ("$share", "$share", True),
    ("$SHARE/g/a", "#", False),  # case: not a share prefix, a `$` topic
    ("$SHARE/g/a", "$SHARE/#", True),
    # nothing is normalised: regex metacharacters, dots, spaces, Unicode
    ("a.b", "a.b", True),
    ("aXb", "a.b", False),
    ("a.b", "aXb", False),
    ("a.*", "a.*", True),
    ("abc", "a.*", False),
    ("a", "^a$", False),
    ("^a$", "^a$", True),
    ("a(b", "a(b", True),
    ("[ab]", "[ab]", True),
    ("a", "[ab]", False),
    ("a|b", "a", False),
    ("a\\b", "a\\b", True),
    ("ab", "a\\b", False),
    ("a/./b", "a/+/b", True),
    ("a/./b", "a/b", False),
    ("a/../b", "b", False),
    ("b", "a/../b", False),
    ("a/..", "a/+", True),
    ("a/..", "a", False),
    ("a b", "a b", True),
    ("a b", "ab", False),
    (" a", "a", False),
    ("a ", "a", False),
    ("café", "café", True),
    ("cafe\u0301", "café", False),  # NFD vs NFC
    ("café", "cafe\u0301", False),
    ("\u0441ensor", "sensor", False),  # Cyrillic es
    ("sensor", "\u0441ensor", False),
    ("\uff41", "a", False),  # fullwidth a
    ("\u212a", "K", False),  # Kelvin sign
    ("straße", "strasse", False),
    ("STRASSE", "straße", False),
    ("a\u200b", "a", False),  # zero-width space
    ("😀/x", "😀/+", True),
    # invalid filters and invalid patterns: never within
    ("a/#/b", "#", False),
    ("a/b+", "#", False),
    ("a/+b", "a/+", False),
    ("#/a", "#", False),
    ("", "#", False),
    ("a\x00", "#", False),
    ("a\x01", "#", False),
    ("a\n", "#", False),
    ("\ud800", "#", False),
    ("a/x/b", "a/#/b", False),
    ("a/b+", "a/b+", False),
    ("a", "", False),
    ("a", "a\x00", False),
]


@pytest.mark.parametrize(
    ("topic_filter", "pattern", "expected"), FILTER_WITHIN, ids=short
)
def test_filter_within(topic_filter: str, pattern: str, expected: bool) -> None:
    assert filter_within(topic_filter, pattern) is expected


# Where filter_within is stricter than set inclusion over topic names (its
# docstring): a filter `#` needs a pattern `#` at the same level.
STRICTER = {("#", "+/#"), ("/#", "/+/#"), ("/#", "+/+/#"), ("$share/g/#", "+/#")}


def test_filter_within_table_agrees_with_paho_where_a_witness_exists() -> None:
    """Every `False` row with valid inputs has a topic matched by F and not P."""
    witnesses = [
        "a",
        "b",
        "a/",
        "a/x",
        "a/x/y",
        "a/b",
        "/",
        "//",
        "/a",
        "$SYS",
        "$SYS/x",
        "x",
    ]
    for topic_filter, pattern, expected in FILTER_WITHIN:
        if (
            expected
            or topic_filter_problem(topic_filter) is not None
            or rule_problem(pattern) is not None
            or (topic_filter, pattern) in STRICTER
        ):
            continue
        extra = [topic_filter.replace("+", "q").replace("#", "q/r")]
        if topic_filter.startswith("$share/"):
            extra = [extra[0].split("/", 2)[2]]
        assert any(
            matches(topic_filter, t) and not matches(pattern, t)
            for t in witnesses + extra
            if topic_name_problem(t) is None
        ), (topic_filter, pattern)


def test_length_limits_in_filter_within() -> None:
    assert filter_within("a" * 65_535, "#")
    assert filter_within("a" * 65_535, "a" * 65_535)
    assert not filter_within("a" * 65_536, "#")
    assert not filter_within("a", "a" * 65_536)
    assert filter_within("+/" * 32_767 + "#", "#")
    assert not filter_within("+/" * 32_767 + "#", "+/" * 32_767 + "+")


# --- brute force: paho's matcher as the oracle ------------------------------

TOPIC_LEVELS = ("a", "$a", "", "z", "$z")
FILTER_LEVELS = ("a", "$a", "", "+")


def _universe() -> list[str]:
    topics = [
        "/".join(levels)
        for depth in range(1, 5)
        for levels in product(TOPIC_LEVELS, repeat=depth)
    ]
    return [t for t in topics if topic_name_problem(t) is None]


def _filters() -> list[str]:
    plain = [
        "/".join(levels)
        for depth in range(1, 4)
        for levels in product(FILTER_LEVELS, repeat=depth)
    ]
    multi = [
        "/".join((*levels, "#"))
        for depth in range(3)
        for levels in product(FILTER_LEVELS, repeat=depth)
    ]
    return [f for f in plain + multi if topic_filter_problem(f) is None]


UNIVERSE = _universe()
FILTERS = _filters()
MATCHED = {f: frozenset(t for t in UNIVERSE if matches(f, t)) for f in FILTERS}


def test_universe_is_what_the_oracle_needs() -> None:
    assert len(UNIVERSE) == 5 + 25 + 125 + 625 - 1  # "" is not a topic name
    assert len(FILTERS) == 4 + 16 + 64 + 1 + 4 + 16 - 1  # "" is not a filter
    # paho: `#` matches the parent, `+` an empty level, the `$` rule holds
    assert "a" in MATCHED["a/#"]
    assert "a/" in MATCHED["a/+"]
    assert not any(t.startswith("$") for t in MATCHED["#"])
    assert not any(t.startswith("$") for t in MATCHED["+/#"])
    # and `#` and `+/#` match the same topic names
    assert MATCHED["#"] == MATCHED["+/#"]


def test_filter_within_is_exact_set_inclusion_over_the_universe() -> None:
    """Sound everywhere; exact except for the documented stricter cases."""
    unsound = []
    differs = []
    for topic_filter in FILTERS:
        for pattern in FILTERS:
            inclusion = MATCHED[topic_filter] <= MATCHED[pattern]
            within = filter_within(topic_filter, pattern)
            if within and not inclusion:
                unsound.append((topic_filter, pattern))
            if within != inclusion:
                differs.append((topic_filter, pattern))
    assert unsound == []
    assert differs == [("#", "+/#"), ("/#", "/+/#"), ("/#", "+/+/#")]
    # `#` and `+/#` are equal sets; `/#` differs from `/+/#` only on "",
    # which is not a topic name
    assert matches("/#", "")
    assert not matches("/+/#", "")
    assert topic_name_problem("") is P.EMPTY


def test_shared_filters_are_judged_by_the_filter_after_the_group() -> None:
    for topic_filter in FILTERS:
        for pattern in ("#", "+/#", "a/#", "+", "$a/#", "a/+", "+/+/#"):
            assert filter_within(f"$share/g/{topic_filter}", pattern) is (
                filter_within(topic_filter, pattern)
            ), (topic_filter, pattern)


def test_filter_within_is_reflexive_and_transitive() -> None:
    for topic_filter in FILTERS:
        assert filter_within(topic_filter, topic_filter)
    sample = FILTERS[::3]
    for first in sample:
        for second in sample:
            if not filter_within(first, second):
                continue
            for third in sample:
                if filter_within(second, third):
                    assert filter_within(first, third), (first, second, third)


def test_topic_checks_agree_with_paho_over_the_universe() -> None:
    wrong = []
    for pattern in FILTERS:
        acl = Acl([rule(pattern)])
        for topic in UNIVERSE:
            expected = topic in MATCHED[pattern]
            if acl.check_read_topic(topic).allowed is not expected:
                wrong.append(("read", pattern, topic))
            if acl.check_publish(topic).allowed is not expected:
                wrong.append(("write", pattern, topic))
    assert wrong == []


def test_subscribe_needs_one_single_rule_over_the_universe() -> None:
    """A two-rule ACL allows exactly the filters within one of its rules."""
    sample = FILTERS[::5]
    wrong = []
    for first in sample:
        for second in sample:
            acl = Acl([rule(first, R), rule(second, R)])
            for topic_filter in FILTERS:
                expected = filter_within(topic_filter, first) or filter_within(
                    topic_filter, second
                )
                if acl.check_subscribe(topic_filter).allowed is not expected:
                    wrong.append((first, second, topic_filter))
    assert wrong == []


def test_no_rules_deny_everything() -> None:
    acl = Acl([])
    for text in UNIVERSE + FILTERS:
        assert not acl.check_publish(text).allowed
        assert not acl.check_read_topic(text).allowed
        assert not acl.check_subscribe(text).allowed
    assert acl.rules == ()
    assert acl.invalid == ()
    assert acl.patterns(R) == []
    assert acl.patterns(W) == []


def test_permissions_are_separate_over_the_universe() -> None:
    for pattern in FILTERS[::4]:
        read_only = Acl([rule(pattern, R)])
        write_only = Acl([rule(pattern, W)])
        for topic in UNIVERSE[::7]:
            assert not read_only.check_publish(topic).allowed
            assert not write_only.check_read_topic(topic).allowed
        for topic_filter in FILTERS:
            assert not write_only.check_subscribe(topic_filter).allowed


# --- the ACLs of the decision tables ----------------------------------------

HOUSE = Acl(
    [
        rule("home/+/temperature", R, description="temperatures"),
        rule("home/lights/#", W, description="light commands"),
        rule("exact/topic", R, W, description="one exact topic"),
        rule("a.b", W, description="a dot is literal"),
        rule("$SYS/#", R, description="broker statistics"),
        rule("$mcp-server/#", R, W, description="MCP servers"),
        rule("$queue/#", W),
        rule("café", W),
        rule("Case/x", W),
        rule("/lead", W),
        rule("trail/", W),
        rule("e//mpty", W),
        rule("x/+/y", W),
        rule("a/#/b", R, W, description="invalid: grants nothing"),
        rule("w/b+", R, W),
        rule("$share/g/exact/#", R, W),
    ]
)
EVERYTHING = Acl([rule("#", R, W, description="everything")])
PLUS_HASH = Acl([rule("+/#", R, W)])
A_PLUS = Acl([rule("a/+", R, W)])
A_HASH = Acl([rule("a/#", R, W)])
A_PLUS_HASH = Acl([rule("a/+/#", R, W)])

LONG_OK = "home/lights/" + "x" * (65_535 - len("home/lights/"))
LONG_BAD = LONG_OK + "x"

PUBLISH = [
    # (acl, topic, allowed, granting pattern)
    (HOUSE, "home/lights/kitchen", True, "home/lights/#"),
    (HOUSE, "home/lights", True, "home/lights/#"),  # `#` matches the parent
    (HOUSE, "home/lights/", True, "home/lights/#"),
    (HOUSE, "home/lights/a/b/c", True, "home/lights/#"),
    (HOUSE, LONG_OK, True, "home/lights/#"),
    (HOUSE, LONG_BAD, False, None),  # 65,536 bytes
    (HOUSE, "home/lightsX", False, None),
    (HOUSE, "home/Lights/kitchen", False, None),
    (HOUSE, "HOME/lights/kitchen", False, None),
    (HOUSE, "home/kitchen/temperature", False, None),  # read only
    (HOUSE, "exact/topic", True, "exact/topic"),
    (HOUSE, "exact/topic/", False, None),
    (HOUSE, "exact/topic/x", False, None),
    (HOUSE, "exact//topic", False, None),
    (HOUSE, "Exact/topic", False, None),
    (HOUSE, " exact/topic", False, None),
    (HOUSE, "exact/topic ", False, None),
    # wildcards in a topic name are never a topic (mcpMQTT bypass)
    (HOUSE, "home/lights/+", False, None),
    (HOUSE, "home/lights/#", False, None),
    (HOUSE, "home/+/kitchen", False, None),
    (HOUSE, "exact/+", False, None),
    (HOUSE, "#", False, None),
    (HOUSE, "+", False, None),
    (HOUSE, "home/lights/a+b", False, None),
    # regex metacharacters are literal
    (HOUSE, "a.b", True, "a.b"),
    (HOUSE, "aXb", False, None),
    (HOUSE, "a.bc", False, None),
    (HOUSE, "a/b", False, None),
    # `$` topics: literal, granted only by a `$` rule
    (HOUSE, "$SYS/broker/version", False, None),  # read only
    (HOUSE, "$mcp-server/x/y", True, "$mcp-server/#"),
    (HOUSE, "$mcp-server", True, "$mcp-server/#"),
    (HOUSE, "$mcp-client/x", False, None),
    (HOUSE, "$queue/a", True, "$queue/#"),
    (HOUSE, "$Queue/a", False, None),
    # $share/ is never published to
    (HOUSE, "$share/g/exact/topic", False, None),
    (HOUSE, "$share/g/home/lights/x", False, None),
    (HOUSE, "$share/g/exact/x", False, None),  # even with a (refused) $share rule
    (HOUSE, "$share/", False, None),
    # Unicode forms and case
    (HOUSE, "café", True, "café"),
    (HOUSE, "cafe\u0301", False, None),
    (HOUSE, "CAFÉ", False, None),
    (HOUSE, "Case/x", True, "Case/x"),
    (HOUSE, "case/x", False, None),
    (HOUSE, "CASE/X", False, None),
    (HOUSE, "home/lights\u2215x", False, None),  # division slash is no level
    # empty levels and slashes
    (HOUSE, "/lead", True, "/lead"),
    (HOUSE, "lead", False, None),
    (HOUSE, "//lead", False, None),
    (HOUSE, "trail/", True, "trail/"),
    (HOUSE, "trail", False, None),
    (HOUSE, "e//mpty", True, "e//mpty"),
    (HOUSE, "e/mpty", False, None),
    (HOUSE, "x//y", True, "x/+/y"),
    (HOUSE, "x/z/y", True, "x/+/y"),
    (HOUSE, "x/y", False, None),
    (HOUSE, "x/z/z/y", False, None),
    # invalid rules grant nothing
    (HOUSE, "a/x/b", False, None),
    (HOUSE, "w/b+", False, None),
    (HOUSE, "w/bb", False, None),
    # invalid topic names
    (HOUSE, "", False, None),
    (HOUSE, "home/lights/\x00", False, None),
    (HOUSE, "home/lights/\x01", False, None),
    (HOUSE, "home/lights/\x1b[31m", False, None),
    (HOUSE, "home/lights/a\nb", False, None),
    (HOUSE, "home/lights/\x85", False, None),
    (HOUSE, "home/lights/\ud800", False, None),
    (HOUSE, "home/lights/\ufffe", False, None),
    # rule `#`: everything except `$` first levels and $share/
    (EVERYTHING, "a", True, "#"),
    (EVERYTHING, "/", True, "#"),
    (EVERYTHING, "a/$SYS", True, "#"),
    (EVERYTHING, "x$/a", True, "#"),
    (EVERYTHING, "$SYS/x", False, None),
    (EVERYTHING, "$SYS", False, None),
    (EVERYTHING, "$mcp-server/a", False, None),
    (EVERYTHING, "$mcp-rpc/c/s/n", False, None),
    (EVERYTHING, "$queue/a", False, None),
    (EVERYTHING, "$", False, None),
    (EVERYTHING, "$share/g/a", False, None),
    (EVERYTHING, "$share", False, None),
    (EVERYTHING, "a/+", False, None),
    (EVERYTHING, "a" * 65_535, True, "#"),
    (EVERYTHING, "a" * 65_536, False, None),
    (EVERYTHING, "é" * 32_767 + "a", True, "#"),  # 65,535 bytes
    (EVERYTHING, "é" * 32_768, False, None),  # 65,536 bytes
    (EVERYTHING, "a/" * 32_767 + "a", True, "#"),  # 32,768 levels
    (PLUS_HASH, "a", True, "+/#"),
    (PLUS_HASH, "$SYS/x", False, None),
    (A_PLUS, "a/", True, "a/+"),
    (A_PLUS, "a", False, None),
    (A_PLUS, "a//", False, None),
    (A_HASH, "a", True, "a/#"),
    (A_HASH, "ab", False, None),
    (A_PLUS_HASH, "a", False, None),
    (A_PLUS_HASH, "a/", True, "a/+/#"),
]


@pytest.mark.parametrize(
    ("acl", "topic", "allowed", "pattern"),
    PUBLISH,
    ids=[f"{i}-{row[1][:30]!r}" for i, row in enumerate(PUBLISH)],
)
def test_check_publish(
    acl: Acl, topic: str, allowed: bool, pattern: str | None
) -> None:
    decision = acl.check_publish(topic)
    assert decision.allowed is allowed
    assert decision.permission is W
    assert decision.topic == topic
    assert (decision.rule.pattern if decision.rule else None) == pattern


SUBSCRIBE = [
    (HOUSE, "home/+/temperature", True, "home/+/temperature"),
    (HOUSE, "home/kitchen/temperature", True, "home/+/temperature"),
    (HOUSE, "home//temperature", True, "home/+/temperature"),
    (HOUSE, "home/#", False, None),
    (HOUSE, "home/+/#", False, None),
    (HOUSE, "home/+/temperature/#", False, None),
    (HOUSE, "home/+/+", False, None),
    (HOUSE, "+/+/temperature", False, None),
    (HOUSE, "+/kitchen/temperature", False, None),
    (HOUSE, "#", False, None),
    (HOUSE, "+", False, None),
    (HOUSE, "home/Kitchen/Temperature", False, None),
    (HOUSE, "home/kitchen/temperature ", False, None),
    (HOUSE, "home/lights/#", False, None),  # write only
    (HOUSE, "home/lights/x", False, None),
    (HOUSE, "exact/topic", True, "exact/topic"),
    (HOUSE, "exact/#", False, None),
    (HOUSE, "exact/+", False, None),
    (HOUSE, "exact/topic/#", False, None),
    (HOUSE, "$SYS/#", True, "$SYS/#"),
    (HOUSE, "$SYS/broker/+", True, "$SYS/#"),
    (HOUSE, "$SYS", True, "$SYS/#"),
    (HOUSE, "$sys/#", False, None),
    (HOUSE, "+/broker/version", False, None),
    (HOUSE, "$mcp-server/#", True, "$mcp-server/#"),
    (HOUSE, "$queue/a", False, None),  # write only
    # shared subscriptions
    (HOUSE, "$share/g/home/+/temperature", True, "home/+/temperature"),
    (HOUSE, "$share/g/exact/topic", True, "exact/topic"),
    (HOUSE, "$share/group-1/$SYS/#", True, "$SYS/#"),
    (HOUSE, "$share/g/#", False, None),
    (HOUSE, "$share/g/home/#", False, None),
    (HOUSE, "$share/g/exact/x", False, None),  # `$share/g/exact/#` is refused
    (HOUSE, "$share//home/x/temperature", False, None),
    (HOUSE, "$share/g+/home/x/temperature", False, None),
    (HOUSE, "$share/+/home/x/temperature", False, None),
    (HOUSE, "$share/g#/home/x/temperature", False, None),
    (HOUSE, "$share/#/exact/topic", False, None),
    (HOUSE, "$share/g", False, None),
    (HOUSE, "$share/g/", False, None),
    (HOUSE, "$share/", False, None),
    (HOUSE, "$share/g/$share/h/exact/topic", False, None),  # nested: literal
    (HOUSE, "$SHARE/g/exact/topic", False, None),
    # invalid filters
    (HOUSE, "", False, None),
    (HOUSE, "home/#/temperature", False, None),
    (HOUSE, "home/+x/temperature", False, None),
    (HOUSE, "exact/topic\x00", False, None),
    (HOUSE, "exact/topic\x07", False, None),
    (HOUSE, "exact/\ud800", False, None),
    (HOUSE, "a/#/b", False, None),  # the invalid rule itself
    (HOUSE, "a/x/b", False, None),
    # rule `#`
    (EVERYTHING, "#", True, "#"),
    (EVERYTHING, "+/#", True, "#"),
    (EVERYTHING, "+", True, "#"),
    (EVERYTHING, "a/#", True, "#"),
    (EVERYTHING, "/", True, "#"),
    (EVERYTHING, "a/$SYS/#", True, "#"),
    (EVERYTHING, "$SYS/#", False, None),
    (EVERYTHING, "$SYS/x", False, None),
    (EVERYTHING, "$mcp-server/#", False, None),
    (EVERYTHING, "$mcp-rpc/+/+/+", False, None),
    (EVERYTHING, "$queue/a", False, None),
    (EVERYTHING, "$", False, None),
    (EVERYTHING, "$share/g/#", True, "#"),  # the filter after the group is `#`
    (EVERYTHING, "$share/g/+/x", True, "#"),
    (EVERYTHING, "$share/g/$SYS/#", False, None),
    (EVERYTHING, "$share/g", False, None),
    (EVERYTHING, "$share//a", False, None),
    (EVERYTHING, "$share/g+/a", False, None),
    (EVERYTHING, "$share", False, None),
    (EVERYTHING, "a/#/b", False, None),
    (EVERYTHING, "a/b+", False, None),
    (EVERYTHING, "+" + "/+" * 32_767, True, "#"),
    # rule `+/#`
    (PLUS_HASH, "#", False, None),  # the issue: `#` is not within `+/#`
    (PLUS_HASH, "$share/g/#", False, None),
    (PLUS_HASH, "+/#", True, "+/#"),
    (PLUS_HASH, "+", True, "+/#"),
    (PLUS_HASH, "a", True, "+/#"),
    (PLUS_HASH, "$SYS/x", False, None),
    (PLUS_HASH, "$x", False, None),
    # rule `a/+`
    (A_PLUS, "a/#", False, None),  # mcpMQTT's bypass
    (A_PLUS, "a/+/#", False, None),
    (A_PLUS, "a/+", True, "a/+"),
    (A_PLUS, "a/x", True, "a/+"),
    (A_PLUS, "a/", True, "a/+"),
    (A_PLUS, "a", False, None),
    (A_PLUS, "a//", False, None),
    (A_PLUS, "a/x/y", False, None),
    (A_PLUS, "+/x", False, None),
    (A_PLUS, "A/x", False, None),
    # rule `a/#`
    (A_HASH, "a", True, "a/#"),
    (A_HASH, "a/+/+", True, "a/#"),
    (A_HASH, "a/+/#", True, "a/#"),
    (A_HASH, "a/#", True, "a/#"),
    (A_HASH, "#", False, None),
    (A_HASH, "+/#", False, None),
    (A_HASH, "+", False, None),
    # rule `a/+/#`
    (A_PLUS_HASH, "a/#", False, None),
    (A_PLUS_HASH, "a/+", True, "a/+/#"),
    (A_PLUS_HASH, "a/x/y", True, "a/+/#"),
    (A_PLUS_HASH, "a", False, None),
]


@pytest.mark.parametrize(
    ("acl", "topic_filter", "allowed", "pattern"),
    SUBSCRIBE,
    ids=[f"{i}-{row[1][:30]!r}" for i, row in enumerate(SUBSCRIBE)],
)
def test_check_subscribe(
    acl: Acl, topic_filter: str, allowed: bool, pattern: str | None
) -> None:
    decision = acl.check_subscribe(topic_filter)
    assert decision.allowed is allowed
    assert decision.permission is R
    assert decision.topic == topic_filter
    assert (decision.rule.pattern if decision.rule else None) == pattern


READ_TOPIC = [
    (HOUSE, "home/kitchen/temperature", True, "home/+/temperature"),
    (HOUSE, "home//temperature", True, "home/+/temperature"),
    (HOUSE, "home/kitchen/temperature/x", False, None),
    (HOUSE, "home/kitchen", False, None),
    (HOUSE, "home/kitchen/Temperature", False, None),
    (HOUSE, "home/+/temperature", False, None),  # a filter is not a topic
    (HOUSE, "home/#", False, None),
    (HOUSE, "exact/topic", True, "exact/topic"),
    (HOUSE, "exact/topic/", False, None),
    (HOUSE, "$SYS/broker/version", True, "$SYS/#"),
    (HOUSE, "$SYS", True, "$SYS/#"),
    (HOUSE, "$sys/broker", False, None),
    (HOUSE, "home/lights/x", False, None),  # write only
    (HOUSE, "a/x/b", False, None),  # invalid rule
    (HOUSE, "$share/g/exact/topic", False, None),
    (HOUSE, "", False, None),
    (HOUSE, "exact/topic\x00", False, None),
    (HOUSE, "exact/topic\x01", False, None),
    (HOUSE, "exact/\udc80", False, None),
    (EVERYTHING, "a", True, "#"),
    (EVERYTHING, "/", True, "#"),
    (EVERYTHING, "a/$SYS", True, "#"),
    (EVERYTHING, "$SYS/broker/uptime", False, None),
    (EVERYTHING, "$mcp-rpc/c/s/n", False, None),
    (EVERYTHING, "$share/g/a", False, None),
    (EVERYTHING, "a" * 65_536, False, None),
    (PLUS_HASH, "$x/y", False, None),
    (PLUS_HASH, "x/y", True, "+/#"),
    (A_PLUS, "a/", True, "a/+"),
    (A_PLUS, "a", False, None),
    (A_HASH, "a", True, "a/#"),
    (A_PLUS_HASH, "a", False, None),
]


@pytest.mark.parametrize(
    ("acl", "topic", "allowed", "pattern"),
    READ_TOPIC,
    ids=[f"{i}-{row[1][:30]!r}" for i, row in enumerate(READ_TOPIC)],
)
def test_check_read_topic(
    acl: Acl, topic: str, allowed: bool, pattern: str | None
) -> None:
    decision = acl.check_read_topic(topic)
    assert decision.allowed is allowed
    assert decision.permission is R
    assert decision.topic == topic
    assert (decision.rule.pattern if decision.rule else None) == pattern


# --- union of rules, rule order, invalid rules ------------------------------

UNIONS = [
    # (rules, filter): covered by the rules together, by none alone
    (["a", "a/+/#"], "a/#"),
    (["+", "+/+/#"], "#"),
    (["+", "+/+/#"], "+/#"),
    (["a", "a/+", "a/+/+/#"], "a/#"),
    (["a/+", "a/+/+/#"], "a/+/#"),
    (["$SYS", "$SYS/+/#"], "$SYS/#"),
]


@pytest.mark.parametrize(("patterns", "topic_filter"), UNIONS)
def test_a_filter_covered_only_by_a_union_is_denied(
    patterns: list[str], topic_filter: str
) -> None:
    acl = Acl([rule(p, R) for p in patterns])
    # every topic the filter matches is readable through some rule ...
    for topic in [*UNIVERSE, "a/b", "a/b/x", "$SYS/b", "$SYS/b/c"]:
        if matches(topic_filter, topic):
            assert acl.check_read_topic(topic).allowed, topic
    # ... but the subscription needs one single rule
    assert not acl.check_subscribe(topic_filter).allowed
    # each part alone is fine
    for pattern in patterns:
        assert acl.check_subscribe(pattern).allowed


def test_first_granting_rule_is_reported() -> None:
    acl = Acl(
        [
            rule("a/#", R, description="first"),
            rule("a/+", R, W, description="second"),
        ]
    )
    assert acl.check_subscribe("a/x").rule == acl.rules[0]
    assert acl.check_read_topic("a/x").rule == acl.rules[0]
    assert acl.check_publish("a/x").rule == acl.rules[1]


def test_invalid_rules_are_kept_out_and_listed() -> None:
    invalid = [
        rule("a/#/b"),
        rule("a/b+"),
        rule("#/a"),
        rule(""),
        rule("a\x00"),
        rule("\ud800"),
        rule("a" * 65_536),
        rule("$share/g/a"),
        rule("$share/g"),
    ]
    good = rule("ok/#", R, description="fine")
    acl = Acl([invalid[0], good, *invalid[1:]])
    assert acl.rules == (good,)
    assert [r for r, _problem in acl.invalid] == invalid
    assert [problem for _rule, problem in acl.invalid] == [
        P.INVALID_WILDCARD,
        P.INVALID_WILDCARD,
        P.INVALID_WILDCARD,
        P.EMPTY,
        P.NULL_CHARACTER,
        P.SURROGATE,
        P.TOO_LONG,
        SHARE_RULE_PROBLEM,
        P.INVALID_SHARE,
    ]
    assert acl.patterns(R) == [good]
    assert acl.patterns(W) == []
    for topic in ("a/x/b", "a/b+", "$share/g/a", "a"):
        assert not acl.check_publish(topic).allowed
        assert not acl.check_subscribe(topic).allowed
    # an invalid rule is not offered to the model
    reason = acl.check_subscribe("a/x/b").reason
    assert "a/#/b" not in reason
    assert "ok/# (fine)" in reason


def test_patterns_by_permission_in_rule_order() -> None:
    assert [r.pattern for r in HOUSE.patterns(R)] == [
        "home/+/temperature",
        "exact/topic",
        "$SYS/#",
        "$mcp-server/#",
    ]
    assert [r.pattern for r in HOUSE.patterns(W)] == [
        "home/lights/#",
        "exact/topic",
        "a.b",
        "$mcp-server/#",
        "$queue/#",
        "café",
        "Case/x",
        "/lead",
        "trail/",
        "e//mpty",
        "x/+/y",
    ]


def test_a_rule_without_permissions_grants_nothing() -> None:
    acl = Acl([AclRule("#", frozenset())])
    assert acl.rules == (AclRule("#", frozenset()),)
    assert not acl.check_subscribe("a").allowed
    assert not acl.check_publish("a").allowed
    assert not acl.check_read_topic("a").allowed


def test_decisions_and_rules_are_immutable() -> None:
    decision = EVERYTHING.check_publish("a")
    with pytest.raises(FrozenInstanceError):
        decision.allowed = False  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        EVERYTHING.rules[0].pattern = "x"  # type: ignore[misc]


# --- reason texts -----------------------------------------------------------


A_PLUS_DESCRIBED = Acl(
    [
        rule("a/+", R, description="temperatures"),
        rule("c/#", W, description="commands"),
        rule("b", R),
    ]
)


def test_denied_subscribe_reason_names_permission_topic_and_readable_patterns() -> None:
    reason = A_PLUS_DESCRIBED.check_subscribe("a/#").reason
    assert reason.startswith("read denied on 'a/#': no single rule with read")
    assert reason.endswith("; readable: a/+ (temperatures), b")
    assert "c/#" not in reason  # write only: not listed for read


def test_denied_publish_reason_lists_writable_patterns() -> None:
    reason = A_PLUS_DESCRIBED.check_publish("a/x").reason
    assert reason == (
        "write denied on 'a/x': no rule grants write on this topic; "
        "writable: c/# (commands)"
    )


def test_denied_read_topic_reason() -> None:
    reason = A_PLUS_DESCRIBED.check_read_topic("c/x").reason
    assert reason.startswith("read denied on 'c/x': no rule grants read")
    assert "readable: a/+ (temperatures), b" in reason


def test_reason_without_rules() -> None:
    acl = Acl([])
    assert acl.check_publish("a").reason == (
        "write denied on 'a': no rule grants write on this topic; "
        "writable: none (no rule grants write)"
    )
    assert acl.check_subscribe("a").reason.endswith(
        "readable: none (no rule grants read)"
    )


@pytest.mark.parametrize(
    ("check", "topic", "words"),
    [
        (
            "publish",
            "a/+",
            ["write denied on 'a/+'", "not a valid topic name", "wildcard"],
        ),
        ("publish", "$share/g/a", ["write denied on '$share/g/a'", "never allowed"]),
        ("publish", "", ["write denied on ''", "is empty"]),
        ("publish", "a\x00", ["'a\\x00'", "U+0000"]),
        ("publish", "a\x1b", ["'a\\x1b'", "control character"]),
        ("publish", "\ud800", ["lone surrogate"]),
        ("subscribe", "a/#/b", ["read denied on 'a/#/b'", "not a valid topic filter"]),
        ("subscribe", "$share//a", ["$share/{group}/{filter}", "non-empty group"]),
        ("subscribe", "$share/g+/a", ["without '+' or '#'"]),
        ("read", "a/#", ["read denied on 'a/#'", "not a valid topic name"]),
    ],
)
def test_reason_for_invalid_topics(check: str, topic: str, words: list[str]) -> None:
    acl = Acl([rule("#", description="all")])
    decision = {
        "publish": acl.check_publish,
        "subscribe": acl.check_subscribe,
        "read": acl.check_read_topic,
    }[check](topic)
    assert not decision.allowed
    for word in words:
        assert word in decision.reason
    assert decision.reason.endswith(": # (all)")


def test_reason_cuts_a_long_topic_but_the_decision_keeps_it() -> None:
    topic = "x/" + "y" * 70_000
    decision = A_PLUS.check_publish(topic)
    assert decision.topic == topic
    assert len(decision.reason) < 400
    assert "(70002 characters)" in decision.reason


def test_allowed_reason_names_the_rule() -> None:
    decision = A_PLUS.check_subscribe("a/x")
    assert decision == AclDecision(
        True, R, "a/x", A_PLUS.rules[0], "read allowed on 'a/x' by rule 'a/+'"
    )


# --- rule_problem -----------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("a", None),
        ("#", None),
        ("+", None),
        ("+/#", None),
        ("a//b", None),
        ("/", None),
        ("$SYS/#", None),
        ("$share", None),
        ("$SHARE/g/a", None),
        ("a.b", None),
        ("(", None),
        ("", P.EMPTY),
        ("a/#/b", P.INVALID_WILDCARD),
        ("a/b+", P.INVALID_WILDCARD),
        ("a/+b", P.INVALID_WILDCARD),
        ("a#", P.INVALID_WILDCARD),
        ("#/", P.INVALID_WILDCARD),
        ("a\x00", P.NULL_CHARACTER),
        ("a\x01", P.CONTROL_CHARACTER),
        ("a\udfff", P.SURROGATE),
        ("a" * 65_536, P.TOO_LONG),
        ("$share/g/a", SHARE_RULE_PROBLEM),
        ("$share/g/#", SHARE_RULE_PROBLEM),
        ("$share/g", P.INVALID_SHARE),
        ("$share//a", P.INVALID_SHARE),
    ],
    ids=short,
)
def test_rule_problem(pattern: str, problem: str | None) -> None:
    assert rule_problem(pattern) == problem


def test_problem_text_covers_every_code() -> None:
    for code in [*TopicProblem, SHARE_RULE_PROBLEM]:
        text = problem_text(code)
        assert text
        assert text != code
    assert problem_text("something_else") == "something_else"


# --- import / export --------------------------------------------------------

MCPMQTT_TOPICS = """[
    {
      "pattern": "sensors/+/temperature",
      "permissions": ["read", "write"],
      "description": "Temperature sensor data from any location"
    },
    {
      "pattern": "actuators/#",
      "permissions": ["write"],
      "description": "All actuator control topics"
    },
    {
      "pattern": "status/system",
      "permissions": ["read"]
    },
    {
      "pattern": "logs/#",
      "permissions": ["read", "read"],
      "description": null
    }
]"""


def test_parse_mcpmqtt_topics_array() -> None:
    assert parse_rules(MCPMQTT_TOPICS) == [
        AclRule(
            "sensors/+/temperature",
            frozenset({R, W}),
            "Temperature sensor data from any location",
        ),
        AclRule("actuators/#", frozenset({W}), "All actuator control topics"),
        AclRule("status/system", frozenset({R}), ""),
        AclRule("logs/#", frozenset({R}), ""),
    ]


def test_parse_empty_list_means_no_access() -> None:
    assert parse_rules("[]") == []
    assert parse_rules("  \n[ ]\n") == []


ROUND_TRIP_RULES = [
    rule("sensors/+/temperature", R, description="temperatures"),
    rule("actuators/#", W),
    rule("both", W, R, description="Zürich 😀 “quoted” \\ back\nnewline"),
    rule("$SYS/#", R),
    rule("a//b/", R),
    rule("café/é", W, description="é"),
]


def test_export_format() -> None:
    text = rules_to_json(ROUND_TRIP_RULES[:2])
    assert text == (
        "[\n"
        "  {\n"
        '    "pattern": "sensors/+/temperature",\n'
        '    "permissions": [\n'
        '      "read"\n'
        "    ],\n"
        '    "description": "temperatures"\n'
        "  },\n"
        "  {\n"
        '    "pattern": "actuators/#",\n'
        '    "permissions": [\n'
        '      "write"\n'
        "    ],\n"
        '    "description": ""\n'
        "  }\n"
        "]"
    )
    assert rules_to_json([]) == "[]"


def test_export_keeps_unicode_readable_and_orders_permissions() -> None:
    text = rules_to_json(ROUND_TRIP_RULES)
    assert "Zürich 😀" in text
    assert "café/é" in text
    assert json.loads(text)[2]["permissions"] == ["read", "write"]
    assert [list(item) for item in json.loads(text)] == [list(RULE_KEYS)] * len(
        ROUND_TRIP_RULES
    )


def test_json_round_trip() -> None:
    assert parse_rules(rules_to_json(ROUND_TRIP_RULES)) == ROUND_TRIP_RULES
    text = rules_to_json(parse_rules(MCPMQTT_TOPICS))
    assert rules_to_json(parse_rules(text)) == text


def test_options_round_trip() -> None:
    options = rules_to_options(ROUND_TRIP_RULES)
    assert options[0] == {
        "pattern": "sensors/+/temperature",
        "permissions": ["read"],
        "description": "temperatures",
    }
    assert rules_from_options(options) == ROUND_TRIP_RULES
    assert json.loads(json.dumps(options)) == options


def test_rules_from_options_keeps_invalid_patterns_for_the_acl() -> None:
    stored = [
        {"pattern": "a/#/b", "permissions": ["read"], "description": "old"},
        {"pattern": "ok", "permissions": ("write",)},
        {"pattern": "ok", "permissions": ["read"]},
    ]
    rules = rules_from_options(stored)
    assert [r.pattern for r in rules] == ["a/#/b", "ok", "ok"]
    acl = Acl(rules)
    assert [r.pattern for r, _ in acl.invalid] == ["a/#/b"]
    assert acl.check_publish("ok").allowed
    assert acl.check_subscribe("ok").allowed


@pytest.mark.parametrize(
    ("data", "index", "problem"),
    [
        (None, None, "expected a list of rules, got null"),
        ({"topics": []}, None, 'value of its "topics" key'),
        ({1, 2}, None, "got set"),
        ([{"pattern": "a"}], 0, "'permissions' is missing"),
        ([{"pattern": "a", "permissions": ["read"]}, "x"], 1, "got a string"),
        ([{"pattern": 1, "permissions": ["read"]}], 0, "must be a string"),
    ],
)
def test_rules_from_options_errors(
    data: object, index: int | None, problem: str
) -> None:
    with pytest.raises(AclImportError) as caught:
        rules_from_options(data)  # type: ignore[arg-type]
    assert caught.value.index == index
    assert problem in caught.value.problem


def _rules_json(*items: object) -> str:
    return json.dumps(list(items))


GOOD = {"pattern": "a", "permissions": ["read"]}

IMPORT_ERRORS = [
    # (text, index, text in the problem)
    ("", None, "not valid JSON: Expecting value (line 1, column 1)"),
    ("[", None, "not valid JSON"),
    ("[{'pattern': 'a'}]", None, "not valid JSON"),
    ('[{"pattern": "a", "permissions": ["read"]},]', None, "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
    ('{"topics": []}', None, 'paste only the value of its "topics" key'),
    ('{"pattern": "a", "permissions": ["read"]}', None, "got an object"),
    ('"a/b"', None, "expected a JSON list of rules, got a string"),
    ("3", None, "got a number"),
    ("1.5", None, "got a number"),
    ("null", None, "got null"),
    ("true", None, "got a boolean"),
    # items
    ("[1]", 0, "expected an object with pattern, permissions and description"),
    ("[[]]", 0, "got a list"),
    ('["a"]', 0, "got a string"),
    ("[null]", 0, "got null"),
    (_rules_json(GOOD, GOOD | {"pattern": "b"}, 5), 2, "got a number"),
    (
        '[{"pattern": "a", "permissions": ["read"], "pattern": "b"}]',
        0,
        "key 'pattern' is given more than once",
    ),
    (_rules_json(GOOD | {"qos": 1}), 0, "unknown key 'qos'"),
    (
        _rules_json({"pattern": "a", "permission": ["read"]}),
        0,
        "unknown key 'permission'",
    ),
    (_rules_json(GOOD | {"Pattern": "a"}), 0, "unknown key 'Pattern'"),
    (_rules_json({"permissions": ["read"]}), 0, "'pattern' is missing"),
    (_rules_json({"pattern": "a"}), 0, "'permissions' is missing"),
    (_rules_json({}), 0, "'pattern' is missing"),
    # pattern
    (_rules_json(GOOD | {"pattern": 1}), 0, "'pattern' must be a string, got a number"),
    (_rules_json(GOOD | {"pattern": None}), 0, "got null"),
    (_rules_json(GOOD | {"pattern": ["a"]}), 0, "got a list"),
    (_rules_json(GOOD | {"pattern": {"a": 1}}), 0, "got an object"),
    (
        _rules_json(GOOD | {"pattern": ""}),
        0,
        "pattern '' is not a valid topic filter: it is empty",
    ),
    (_rules_json(GOOD | {"pattern": "a/#/b"}), 0, "uses a wildcard wrongly"),
    (_rules_json(GOOD | {"pattern": "a/b+"}), 0, "uses a wildcard wrongly"),
    (_rules_json(GOOD | {"pattern": "a/+b"}), 0, "uses a wildcard wrongly"),
    (_rules_json(GOOD | {"pattern": "#/a"}), 0, "uses a wildcard wrongly"),
    (_rules_json(GOOD | {"pattern": "a/##"}), 0, "uses a wildcard wrongly"),
    (_rules_json(GOOD | {"pattern": "a\x00"}), 0, "U+0000"),
    (_rules_json(GOOD | {"pattern": "a\n"}), 0, "control character"),
    ('[{"pattern": "\\ud800", "permissions": ["read"]}]', 0, "lone surrogate"),
    (_rules_json(GOOD | {"pattern": "a" * 65_536}), 0, "65,535 UTF-8 bytes"),
    (_rules_json(GOOD | {"pattern": "$share/g/a"}), 0, "starts with $share/"),
    (_rules_json(GOOD | {"pattern": "$share/g"}), 0, "not a valid shared subscription"),
    (
        _rules_json(GOOD | {"pattern": "$share//a"}),
        0,
        "not a valid shared subscription",
    ),
    # permissions
    (
        _rules_json(GOOD | {"permissions": "read"}),
        0,
        "must be a list of 'read', 'write', got a string",
    ),
    (_rules_json(GOOD | {"permissions": {"read": True}}), 0, "got an object"),
    (_rules_json(GOOD | {"permissions": None}), 0, "got null"),
    (_rules_json(GOOD | {"permissions": []}), 0, "'permissions' is empty"),
    (_rules_json(GOOD | {"permissions": ["READ"]}), 0, "unknown permission 'READ'"),
    (_rules_json(GOOD | {"permissions": ["Read"]}), 0, "unknown permission 'Read'"),
    (_rules_json(GOOD | {"permissions": ["read "]}), 0, "unknown permission 'read '"),
    (_rules_json(GOOD | {"permissions": ["admin"]}), 0, "unknown permission 'admin'"),
    (_rules_json(GOOD | {"permissions": ["read", "delete"]}), 0, "'delete'"),
    (_rules_json(GOOD | {"permissions": [1]}), 0, "unknown permission 1"),
    (_rules_json(GOOD | {"permissions": [None]}), 0, "unknown permission None"),
    (_rules_json(GOOD | {"permissions": [True]}), 0, "unknown permission True"),
    (_rules_json(GOOD | {"permissions": [["read"]]}), 0, "unknown permission"),
    # description
    (
        _rules_json(GOOD | {"description": 1}),
        0,
        "'description' must be a string, got a number",
    ),
    (_rules_json(GOOD | {"description": ["x"]}), 0, "got a list"),
    (_rules_json(GOOD | {"description": True}), 0, "got a boolean"),
    (
        '[{"pattern": "a", "permissions": ["read"], "description": "\\udc00"}]',
        0,
        "lone surrogate",
    ),
    # duplicate patterns: the later index, naming the earlier one
    (
        _rules_json(GOOD, GOOD | {"pattern": "b"}, GOOD | {"permissions": ["write"]}),
        2,
        "already used by rule 0",
    ),
    # the first problem wins
    (
        _rules_json(GOOD, {"pattern": "a/#/b"}, {"pattern": 1}),
        1,
        "'permissions' is missing",
    ),
]


@pytest.mark.parametrize(
    ("text", "index", "problem"),
    IMPORT_ERRORS,
    ids=[f"{i}-{row[2][:40]}" for i, row in enumerate(IMPORT_ERRORS)],
)
def test_parse_rules_errors(text: str, index: int | None, problem: str) -> None:
    with pytest.raises(AclImportError) as caught:
        parse_rules(text)
    err = caught.value
    assert err.index == index
    assert problem in err.problem
    if index is None:
        assert str(err) == err.problem
    else:
        assert str(err) == f"rule {index}: {err.problem}"
    assert isinstance(err, ValueError)


def test_duplicate_pattern_error_names_both_indices() -> None:
    with pytest.raises(AclImportError) as caught:
        parse_rules(
            _rules_json(GOOD | {"pattern": "x/#"}, GOOD, GOOD | {"pattern": "x/#"})
        )
    assert str(caught.value) == (
        "rule 2: pattern 'x/#' is already used by rule 0; give each pattern "
        "once with all its permissions"
    )


def test_patterns_differing_only_in_case_or_form_are_distinct_rules() -> None:
    rules = parse_rules(
        _rules_json(
            GOOD | {"pattern": "a/b"},
            GOOD | {"pattern": "A/b"},
            GOOD | {"pattern": "a/b/"},
            GOOD | {"pattern": "café"},
            GOOD | {"pattern": "cafe\u0301"},
        )
    )
    assert len(rules) == 5


def test_import_then_acl_end_to_end() -> None:
    acl = Acl(parse_rules(MCPMQTT_TOPICS))
    assert acl.check_subscribe("sensors/+/temperature").allowed
    assert not acl.check_subscribe("sensors/#").allowed
    assert acl.check_publish("actuators/lamp/on").allowed
    assert acl.check_publish("actuators").allowed
    assert not acl.check_publish("status/system").allowed
    assert acl.check_subscribe("logs/#").allowed
    assert not acl.check_subscribe("#").allowed
    reason = acl.check_subscribe("#").reason
    assert "sensors/+/temperature (Temperature sensor data from any location)" in reason
    assert "status/system, logs/#" in reason
