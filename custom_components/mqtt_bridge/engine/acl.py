"""Topic ACL for the MQTT tools: which topics an agent may publish to and read.

Pure module, no I/O, no Home Assistant import. Built on :mod:`.topics`.

A rule is an MQTT topic filter (the *pattern*) with the permissions ``read``
and/or ``write`` and a description shown to the model. No rule means no access.

Semantics (MQTT 3.1.1 / 5.0 §4.7, shared subscriptions MQTT 5 §4.8.2):

* Levels are split on ``/``; empty levels are legal (``a//b``, ``/a``, ``a/``).
  ``+`` matches exactly one level, which may be empty. ``#`` is only valid as the
  whole last level and matches the parent level and any number of children
  (``a/#`` matches ``a``, ``a/b``, ``a/b/c``) (§4.7.1.2, §4.7.1.3).
* Nothing is normalised: case, spaces, Unicode forms (NFC/NFD, look-alike
  characters), ``.``/``..`` and regular-expression metacharacters are literal
  (§4.7.3: topics are compared character by character).
* A pattern or filter whose first level is ``+`` or ``#`` never matches a topic
  whose first level starts with ``$`` (§4.7.2): rule ``#`` grants neither
  ``$SYS/…`` nor ``$mcp-…``. A rule that starts with the literal ``$`` level
  (``$SYS/#``) grants those topics: ``$SYS/``, ``$queue/`` and every other ``$``
  prefix except ``$share/`` are ordinary literal topics here.
* **Publish** (:meth:`Acl.check_publish`): the topic is a valid topic name
  (:func:`.topics.topic_name_problem`: non-empty, at most 65,535 UTF-8 bytes,
  no U+0000, no lone surrogate, no control character, no ``+``/``#``, §1.5.4,
  §4.7.1) and matches a rule with ``write``. ``$share/…`` is never a topic to
  publish to (§4.8.2: it is a subscription prefix).
* **Subscribe/read** (:meth:`Acl.check_subscribe`): the filter is valid and is a
  subset of **one single** rule with ``read`` (:func:`filter_within`). A filter
  covered only by the union of two rules is denied; read on ``a/+`` does not
  allow ``a/#``; ``#`` is not treated as a subset of ``+/#`` (the issue; see
  :func:`filter_within` for the three cases where the check is stricter than
  set inclusion).
* ``$share/{group}/{filter}`` may be subscribed when the group is non-empty and
  wildcard-free and ``{filter}`` alone would be allowed (§4.8.2). A rule itself
  cannot start with ``$share/``.
* **Deliveries** (:meth:`Acl.check_read_topic`): a received concrete topic is
  passed on only if it matches a rule with ``read``.
* A rule whose pattern is not a valid filter (``a/#/b``, ``a/b+``) grants
  nothing; :class:`Acl` lists it in :attr:`Acl.invalid`.

Import/export format: mcpMQTT's ``topics`` array,
``[{"pattern": "sensors/+/temperature", "permissions": ["read"], "description": "…"}]``
(:func:`parse_rules`, :func:`rules_to_json`).

mcpMQTT's defects that this module avoids (reference ``mcp-over-mqtt.md`` §2.1):
a filter checked as if it were a topic (``sensors/#`` allowed by ``sensors/+``),
``x/#`` not matching ``x``, ``+`` not matching an empty level, ``#`` granting
``$SYS``, and regular-expression metacharacters in patterns (``a.b`` matching
``aXb``). Matching here is level by level string equality, never a regex.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
import enum
import json
from typing import Any

from .topics import (
    SHARE_PREFIX,
    TopicProblem,
    split_shared,
    topic_filter_problem,
    topic_name_problem,
)

#: :func:`rule_problem` code for a pattern that starts with ``$share/``.
SHARE_RULE_PROBLEM = "shared_subscription_rule"

#: The keys of one rule in mcpMQTT's ``topics`` format (and in the options).
RULE_KEYS = ("pattern", "permissions", "description")

# The longest topic shown in a reason text; longer ones are cut (the full
# topic stays in AclDecision.topic).
_SHOWN_TOPIC_CHARS = 120

_PROBLEM_TEXT: dict[str, str] = {
    TopicProblem.EMPTY: "is empty",
    TopicProblem.TOO_LONG: "is longer than 65,535 UTF-8 bytes",
    TopicProblem.NULL_CHARACTER: "contains the character U+0000",
    TopicProblem.SURROGATE: "contains a lone surrogate (not valid UTF-8)",
    TopicProblem.CONTROL_CHARACTER: (
        "contains a control character or a Unicode non-character"
    ),
    TopicProblem.WILDCARD: (
        "contains a wildcard ('+' or '#'); a topic to publish to must be a "
        "concrete topic name"
    ),
    TopicProblem.INVALID_WILDCARD: (
        "uses a wildcard wrongly: '+' must be a whole level and '#' the whole "
        "last level"
    ),
    TopicProblem.INVALID_SHARE: (
        "is not a valid shared subscription: it must be "
        "$share/{group}/{filter} with a non-empty group without '+' or '#'"
    ),
    SHARE_RULE_PROBLEM: (
        "starts with $share/; write the rule for the filter after "
        "$share/{group}/ (shared subscriptions of an allowed filter are allowed)"
    ),
}


class Permission(enum.StrEnum):
    """What a rule grants: ``read`` (subscribe, receive) or ``write`` (publish)."""

    READ = "read"
    WRITE = "write"


_LABEL = {Permission.READ: "readable", Permission.WRITE: "writable"}


@dataclass(frozen=True, slots=True)
class AclRule:
    """One ACL rule.

    ``pattern`` is an MQTT topic filter (valid when :func:`rule_problem` returns
    ``None``: :func:`.topics.topic_filter_problem` is ``None`` and it does not
    start with ``$share/``); ``permissions`` what it grants; ``description`` is
    shown to the model next to the pattern.
    """

    pattern: str
    permissions: frozenset[Permission]
    description: str = ""


@dataclass(frozen=True, slots=True)
class AclDecision:
    """The answer to one ACL question.

    ``topic`` is the topic name or filter asked about, exactly as given.
    ``rule`` is the granting rule when ``allowed`` (the first in rule order),
    else ``None``. ``reason`` is text for the model: when denied it names the
    missing permission and the topic, says why, and lists the patterns that
    are allowed for that permission with their descriptions; when allowed it
    names the granting pattern.
    """

    allowed: bool
    permission: Permission
    topic: str
    rule: AclRule | None
    reason: str


class AclImportError(ValueError):
    """A rule list cannot be imported.

    ``index`` is the 0-based position of the offending rule in the list, or
    ``None`` when the problem is not one rule's (not JSON, not a list); the
    message is ``"rule {index}: {problem}"`` or just ``problem``.
    """

    def __init__(self, index: int | None, problem: str) -> None:
        """Name the rule at ``index`` (if any) and the problem."""
        super().__init__(problem if index is None else f"rule {index}: {problem}")
        self.index = index
        self.problem = problem


def problem_text(problem: str) -> str:
    """Return the human text for a :func:`rule_problem` / ``TopicProblem`` code.

    The text completes a sentence whose subject is the pattern or topic, e.g.
    ``"uses a wildcard wrongly: …"``. Unknown codes are returned unchanged.
    """
    return _PROBLEM_TEXT.get(problem, problem)


def rule_problem(pattern: str) -> str | None:
    """Return why ``pattern`` cannot be a rule's pattern, or ``None`` if it can.

    The result is a stable code for translations: a
    :class:`.topics.TopicProblem` (the pattern is not a valid topic filter,
    §1.5.4, §4.7.1, §4.7.3) or :data:`SHARE_RULE_PROBLEM` (the pattern starts
    with ``$share/``, a subscription prefix, MQTT 5 §4.8.2).
    :func:`problem_text` turns it into a sentence.
    """
    problem = topic_filter_problem(pattern)
    if problem is not None:
        return problem
    if pattern.startswith(SHARE_PREFIX):
        return SHARE_RULE_PROBLEM
    return None


def _first_level_is_dollar(levels: Sequence[str]) -> bool:
    return levels[0].startswith("$")


def _matches(pattern: Sequence[str], topic: Sequence[str]) -> bool:
    """Whether the levels of a valid filter match the levels of a topic name.

    §4.7: ``+`` one level (possibly empty), ``#`` the rest including nothing
    (the parent), literals by string equality, and the §4.7.2 ``$`` rule.
    """
    if pattern[0] in ("+", "#") and _first_level_is_dollar(topic):
        return False
    for index, level in enumerate(pattern):
        if level == "#":
            return True
        if index == len(topic) or (level not in ("+", topic[index])):
            return False
    return len(pattern) == len(topic)


def _within(topic_filter: Sequence[str], pattern: Sequence[str]) -> bool:
    """Whether every topic the filter's levels match is matched by the pattern's.

    Level by level (reference ``mqtt-broker.md`` §6): pattern ``#`` accepts the
    rest (a first-level pattern ``#`` only if the filter's first level is not a
    literal starting with ``$``); filter ``#`` requires pattern ``#``; filter
    ``+`` requires pattern ``+``; a literal requires the same literal or ``+``
    (pattern ``+`` at the first level never covers a ``$`` literal); the
    lengths agree unless the pattern ends in ``#``.
    """
    for index, level in enumerate(pattern):
        if level == "#":
            return index > 0 or not _first_level_is_dollar(topic_filter)
        if index == len(topic_filter):
            # The filter matches topics of exactly `index` levels; the
            # pattern needs at least one more.
            return False
        wanted = topic_filter[index]
        if wanted == "#":
            # The filter matches the parent and every depth below it; only a
            # pattern `#` at this level covers that (see filter_within for
            # the one case where this is stricter than set inclusion).
            return False
        if level == "+":
            if wanted != "+" and index == 0 and wanted.startswith("$"):
                return False
        elif wanted != level:
            return False
    return len(topic_filter) == len(pattern)


def filter_within(topic_filter: str, pattern: str) -> bool:
    """Whether every topic name ``topic_filter`` can match is matched by ``pattern``.

    Both are MQTT topic filters (§4.7). ``topic_filter`` may be a shared
    subscription ``$share/{group}/{filter}`` (MQTT 5 §4.8.2): it matches what
    ``{filter}`` matches. Returns ``False`` (never raises) when
    ``topic_filter`` is not a valid filter or ``pattern`` cannot be a rule
    (:func:`rule_problem`).

    Exact set inclusion over valid topic names, with the §4.7.2 ``$`` rule
    (a first level ``+``/``#`` matches no topic whose first level starts with
    ``$``: ``$SYS/#`` is not within ``#``, ``+/x`` is within ``+/#``), except
    for one deliberate rule: a filter ``#`` at some level needs a pattern
    ``#`` at that same level (``x/#`` matches the parent ``x``, which a
    pattern ``x/+/#`` does not). That rule is stricter than set inclusion in
    exactly three cases, all answered ``False``:

    * ``#`` within ``+/#``: the issue requires "``#`` is not treated as a
      subset of ``+/#``", although as sets of topic names the two are equal
      (every topic name has at least one level, which ``+`` matches, empty or
      not, with ``#`` matching the parent; both exclude ``$`` first levels;
      even the empty string, not a topic name, would be matched by both);
    * ``/#`` within ``/+/#`` and within ``+/+/#``: they differ only on the
      parent of ``/#``, the empty string, which is not a topic name (§4.7.3:
      at least one character).

    The difference is on the safe side (a denial, never a grant; an agent
    allowed ``+/#`` subscribes ``+/#``) and keeps the check one level-by-level
    comparison. ``tests/test_acl.py`` checks exactness against paho-mqtt's
    matcher over a generated universe of topics and filters.
    """
    if topic_filter_problem(topic_filter) is not None:
        return False
    if rule_problem(pattern) is not None:
        return False
    _group, inner = split_shared(topic_filter)
    return _within(inner.split("/"), pattern.split("/"))


def _show(topic: str) -> str:
    """Quote a topic for a reason text (``repr``, so control characters show)."""
    if len(topic) <= _SHOWN_TOPIC_CHARS:
        return repr(topic)
    return f"{topic[:_SHOWN_TOPIC_CHARS]!r}… ({len(topic)} characters)"


class Acl:
    """An immutable set of rules and the checks every tool call goes through.

    ``rules`` are the rules with a valid pattern, in the given order (the
    first granting rule is reported); ``invalid`` pairs each rule whose
    pattern cannot be a rule with its :func:`rule_problem` code: those grant
    nothing. An ``Acl`` without rules denies everything.
    """

    __slots__ = ("_compiled", "invalid", "rules")

    rules: tuple[AclRule, ...]
    invalid: tuple[tuple[AclRule, TopicProblem | str], ...]

    def __init__(self, rules: Iterable[AclRule]) -> None:
        """Sort ``rules`` into valid and invalid ones (invalid grant nothing)."""
        valid: list[AclRule] = []
        invalid: list[tuple[AclRule, TopicProblem | str]] = []
        for rule in rules:
            problem = rule_problem(rule.pattern)
            if problem is None:
                valid.append(rule)
            else:
                invalid.append((rule, problem))
        self.rules = tuple(valid)
        self.invalid = tuple(invalid)
        self._compiled = tuple(
            (rule, tuple(rule.pattern.split("/"))) for rule in self.rules
        )

    def patterns(self, permission: Permission) -> list[AclRule]:
        """Return the valid rules that grant ``permission``, in rule order."""
        return [rule for rule in self.rules if permission in rule.permissions]

    def _allowed_list(self, permission: Permission) -> str:
        rules = self.patterns(permission)
        if not rules:
            return f"{_LABEL[permission]}: none (no rule grants {permission})"
        shown = [
            f"{rule.pattern} ({rule.description})" if rule.description else rule.pattern
            for rule in rules
        ]
        return f"{_LABEL[permission]}: " + ", ".join(shown)

    def _deny(self, permission: Permission, topic: str, why: str) -> AclDecision:
        allowed = self._allowed_list(permission)
        reason = f"{permission} denied on {_show(topic)}: {why}; {allowed}"
        return AclDecision(False, permission, topic, None, reason)

    @staticmethod
    def _allow(permission: Permission, topic: str, rule: AclRule) -> AclDecision:
        reason = f"{permission} allowed on {_show(topic)} by rule {rule.pattern!r}"
        return AclDecision(True, permission, topic, rule, reason)

    def check_publish(self, topic: str) -> AclDecision:
        """Decide whether ``topic`` may be published to.

        Allowed when ``topic`` is a valid topic name
        (:func:`.topics.topic_name_problem`, §1.5.4, §4.7.1, §4.7.3) and
        matches (§4.7, ``$`` rule §4.7.2) a rule with ``write``. A topic that
        starts with ``$share/`` is always denied (MQTT 5 §4.8.2: a subscription
        prefix, not a topic). Never raises.
        """
        permission = Permission.WRITE
        if topic.startswith(SHARE_PREFIX):
            return self._deny(
                permission,
                topic,
                "$share/ is a prefix for shared subscriptions; publishing to "
                "$share/… is never allowed",
            )
        return self._check_topic(permission, topic)

    def check_subscribe(self, topic_filter: str) -> AclDecision:
        """Decide whether ``topic_filter`` may be subscribed to (read).

        Allowed when it is a valid topic filter (§4.7.1, §4.7.3) and
        :func:`filter_within` one single rule with ``read``: a filter covered
        only by several rules together is denied. ``$share/{group}/{filter}``
        (MQTT 5 §4.8.2) is allowed when the group is non-empty and
        wildcard-free and ``{filter}`` alone is allowed. Never raises.
        """
        permission = Permission.READ
        problem = topic_filter_problem(topic_filter)
        if problem is not None:
            return self._deny(
                permission,
                topic_filter,
                f"not a valid topic filter: it {problem_text(problem)}",
            )
        _group, inner = split_shared(topic_filter)
        levels = inner.split("/")
        for rule, pattern in self._compiled:
            if permission in rule.permissions and _within(levels, pattern):
                return self._allow(permission, topic_filter, rule)
        return self._deny(
            permission,
            topic_filter,
            "no single rule with read covers every topic this filter can match "
            "(subscribe to a filter inside one readable pattern)",
        )

    def check_read_topic(self, topic: str) -> AclDecision:
        """Decide whether a received message on the concrete ``topic`` is passed on.

        Allowed when ``topic`` is a valid topic name and matches (§4.7, ``$``
        rule §4.7.2) a rule with ``read``. Used to filter deliveries. Never
        raises.
        """
        return self._check_topic(Permission.READ, topic)

    def _check_topic(self, permission: Permission, topic: str) -> AclDecision:
        """Allow a valid topic name that matches a rule with ``permission``."""
        problem = topic_name_problem(topic)
        if problem is not None:
            return self._deny(
                permission,
                topic,
                f"not a valid topic name: it {problem_text(problem)}",
            )
        levels = topic.split("/")
        for rule, pattern in self._compiled:
            if permission in rule.permissions and _matches(pattern, levels):
                return self._allow(permission, topic, rule)
        return self._deny(
            permission, topic, f"no rule grants {permission.value} on this topic"
        )


# --- import / export -------------------------------------------------------


class _JsonObject(dict[str, Any]):
    """A decoded JSON object that remembers keys given more than once."""

    duplicates: tuple[str, ...] = ()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicates: list[str] = []
        for key, _value in pairs:
            if key in seen and key not in duplicates:
                duplicates.append(key)
            seen.add(key)
        obj.duplicates = tuple(duplicates)
    return obj


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


_PERMISSION_ORDER = (Permission.READ, Permission.WRITE)
_PERMISSION_STRINGS = frozenset(p.value for p in Permission)
_PERMISSION_VALUES = ", ".join(repr(p.value) for p in _PERMISSION_ORDER)


def _rule_from_item(index: int, item: Any, *, check_pattern: bool) -> AclRule:
    if not isinstance(item, Mapping):
        raise AclImportError(
            index,
            "expected an object with pattern, permissions and description, "
            f"got {_json_type(item)}",
        )
    duplicates = getattr(item, "duplicates", ())
    if duplicates:
        raise AclImportError(index, f"key {duplicates[0]!r} is given more than once")
    unknown = [key for key in item if key not in RULE_KEYS]
    if unknown:
        raise AclImportError(
            index,
            f"unknown key {unknown[0]!r} (a rule has only pattern, permissions "
            "and description)",
        )
    for key in ("pattern", "permissions"):
        if key not in item:
            raise AclImportError(index, f"{key!r} is missing")

    pattern = item["pattern"]
    if not isinstance(pattern, str):
        raise AclImportError(
            index, f"'pattern' must be a string, got {_json_type(pattern)}"
        )
    if check_pattern and (problem := rule_problem(pattern)) is not None:
        raise AclImportError(
            index,
            f"pattern {_show(pattern)} is not a valid topic filter: it "
            + problem_text(problem),
        )

    values = item["permissions"]
    if not isinstance(values, list | tuple):
        raise AclImportError(
            index,
            f"'permissions' must be a list of {_PERMISSION_VALUES}, got "
            + _json_type(values),
        )
    if not values:
        raise AclImportError(
            index, f"'permissions' is empty; give {_PERMISSION_VALUES} or both"
        )
    permissions: set[Permission] = set()
    for value in values:
        if not isinstance(value, str) or value not in _PERMISSION_STRINGS:
            raise AclImportError(
                index,
                f"unknown permission {value!r} (allowed: {_PERMISSION_VALUES})",
            )
        permissions.add(Permission(value))

    description = item.get("description")
    if description is None:
        description = ""
    elif not isinstance(description, str):
        raise AclImportError(
            index, f"'description' must be a string, got {_json_type(description)}"
        )
    else:
        try:
            description.encode()
        except UnicodeEncodeError:
            raise AclImportError(
                index, "'description' contains a lone surrogate (not valid UTF-8)"
            ) from None
    return AclRule(pattern, frozenset(permissions), description)


def _rules_from_items(
    items: Any, *, what: str, check_pattern: bool, unique: bool
) -> list[AclRule]:
    if isinstance(items, Mapping) and "topics" in items:
        raise AclImportError(
            None,
            f"expected {what}, got an object; paste only the value of its "
            '"topics" key (the list in square brackets)',
        )
    if not isinstance(items, list | tuple):
        raise AclImportError(None, f"expected {what}, got {_json_type(items)}")
    rules: list[AclRule] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        rule = _rule_from_item(index, item, check_pattern=check_pattern)
        if unique:
            earlier = first_index.setdefault(rule.pattern, index)
            if earlier != index:
                raise AclImportError(
                    index,
                    f"pattern {_show(rule.pattern)} is already used by rule "
                    f"{earlier}; give each pattern once with all its permissions",
                )
        rules.append(rule)
    return rules


def parse_rules(text: str) -> list[AclRule]:
    """Parse a rule list in mcpMQTT's ``topics`` format.

    ``text`` is a JSON list of objects
    ``{"pattern": str, "permissions": ["read" | "write", …], "description": str}``
    (``description`` optional, ``null`` accepted as empty, as in mcpMQTT; no
    other keys). An empty list is valid and means no access. Every pattern
    must be able to be a rule (:func:`rule_problem`: a valid topic filter,
    §4.7, not ``$share/…``, §4.8.2), each pattern may appear only once,
    and a repeated permission counts once.

    Returns the rules in order. Raises :class:`AclImportError` for the first
    problem, with ``index`` the 0-based rule position (``None`` when the text
    is not JSON or not a list); nothing is returned partially.
    """
    try:
        data = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as err:
        raise AclImportError(
            None,
            f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})",
        ) from None
    except RecursionError:
        raise AclImportError(None, "not valid JSON: nested too deeply") from None
    return _rules_from_items(
        data,
        what="a JSON list of rules",
        check_pattern=True,
        unique=True,
    )


def rules_to_options(rules: Iterable[AclRule]) -> list[dict[str, Any]]:
    """Return ``rules`` as the config entry options store them.

    One ``{"pattern": str, "permissions": ["read", "write"], "description": str}``
    per rule, permissions in the order read, write.
    """
    return [
        {
            "pattern": rule.pattern,
            "permissions": [
                p.value for p in _PERMISSION_ORDER if p in rule.permissions
            ],
            "description": rule.description,
        }
        for rule in rules
    ]


def rules_from_options(data: Sequence[Mapping[str, Any]]) -> list[AclRule]:
    """Return the rules stored in the options by :func:`rules_to_options`.

    The shape is checked as in :func:`parse_rules` (raises
    :class:`AclImportError` naming the index), but a pattern that is not
    valid (e.g. stored by an older version) is kept: :class:`Acl` lists it in
    :attr:`Acl.invalid` and it grants nothing.
    """
    return _rules_from_items(
        data,
        what="a list of rules",
        check_pattern=False,
        unique=False,
    )


def rules_to_json(rules: Iterable[AclRule]) -> str:
    """Return ``rules`` in mcpMQTT's ``topics`` format, indented by 2.

    Non-ASCII characters are written as they are; :func:`parse_rules` reads
    the result back to equal rules.
    """
    return json.dumps(rules_to_options(rules), indent=2, ensure_ascii=False)
