"""Arguments of the MQTT tools: checked against the tool's JSON Schema, then MQTT rules.

:func:`validate_arguments` validates an argument object with ``jsonschema``
(draft 2020-12) against the very schema the tool publishes
(:attr:`~.tool_specs.ToolSpec.input_schema`) and fills in the defaults;
:func:`topic_name_argument`, :func:`topic_filter_argument` and
:func:`decode_payload` check what a schema cannot say (MQTT topic syntax,
payload encoding and size). Every problem is an :class:`ArgumentError` whose
message names the argument and the problem, for the model to correct its call.

This module imports nothing from Home Assistant.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
import json
import math
from typing import Any, Final

from jsonschema import Draft202012Validator
from jsonschema.validators import extend

from .topics import topic_filter_problem, topic_name_problem


class ArgumentError(ValueError):
    """An argument is invalid; the message is shown to the agent."""


def _is_finite_number(_checker: Any, value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_integer(checker: Any, value: Any) -> bool:
    # 2.0 is an integer (JSON Schema since draft 6); NaN and infinities are not.
    return _is_finite_number(checker, value) and float(value).is_integer()


# Draft 2020-12, but NaN and infinities are no numbers (Python's json reads them).
_Validator: Final = extend(
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
        {"number": _is_finite_number, "integer": _is_integer}
    ),
)


def _kind(expected: Any) -> str:
    kinds = [expected] if isinstance(expected, str) else list(expected)
    return " or ".join(f"{'an' if k[0] in 'aeiou' else 'a'} {k}" for k in kinds)


# What a failed keyword says about an argument: (keyword value, argument) -> text.
_PROBLEMS: Final[dict[str, Callable[[Any, Any], str]]] = {
    "type": lambda kind, value: (
        f"must be {_kind(kind)}, not {type(value).__name__} {value!r:.40}"
    ),
    "enum": lambda choices, value: (
        f"must be one of {', '.join(json.dumps(c) for c in choices)}, not {value!r:.40}"
    ),
    "minimum": lambda bound, _value: f"must be at least {bound}",
    "exclusiveMinimum": lambda bound, _value: f"must be greater than {bound}",
    "maximum": lambda bound, _value: f"must be at most {bound}",
    "exclusiveMaximum": lambda bound, _value: f"must be less than {bound}",
    "minLength": lambda n, _value: (
        "must not be empty" if n == 1 else f"must be at least {n} characters long"
    ),
    "maxLength": lambda n, _value: f"must be at most {n} characters long",
}


def _problems(schema: Mapping[str, Any], instance: dict[str, Any]) -> list[str]:
    """Return one message per invalid argument, in a fixed order.

    Unknown arguments come first, then the arguments in the schema's order;
    of several problems with one argument only the first is told (a wrong
    type before anything else): fixing it usually fixes the rest.
    """
    properties: Mapping[str, Any] = schema["properties"]
    order = {name: index for index, name in enumerate(properties)}
    found: dict[str, tuple[int, bool, str]] = {}

    def note(argument: str, position: int, secondary: bool, message: str) -> None:
        entry = (position, secondary, message)
        if argument not in found or entry < found[argument]:
            found[argument] = entry

    for error in _Validator(schema).iter_errors(instance):
        keyword = error.validator
        if error.path:
            argument = ".".join(str(part) for part in error.path)
            problem = _PROBLEMS.get(keyword)
            text = (
                error.message
                if problem is None
                else problem(error.validator_value, error.instance)
            )
            position = order.get(error.path[0], len(order))
            note(argument, position, keyword != "type", f"'{argument}' {text}")
        elif keyword == "required":
            for name in error.validator_value:
                if name not in instance:
                    note(
                        name,
                        order.get(name, len(order)),
                        False,
                        f"'{name}' is required",
                    )
        else:
            unknown = sorted(str(key) for key in instance if key not in properties)
            note(
                "",
                -1,
                False,
                f"unknown argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(repr(u) for u in unknown)}; "
                f"accepted: {', '.join(properties)}"
                if keyword == "additionalProperties"
                else error.message,
            )
    return [message for _position, _secondary, message in sorted(found.values())]


def validate_arguments(
    schema: Mapping[str, Any], arguments: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Return ``arguments`` checked against ``schema``, with defaults filled in.

    ``schema`` is a :attr:`~.tool_specs.ToolSpec.input_schema` (an object
    schema with ``properties``). ``None`` arguments mean ``{}``; ``null`` for
    a property means it was not given (its default, or missing if required).
    Integers given as floats (``2.0``) come back as ``int``; a property
    without a default that was not given comes back as ``None``.

    Raises:
        ArgumentError: not an object, or not valid: every invalid argument is
            named with its problem (missing, unknown, wrong type, not one of
            the choices, out of range, empty).

    """
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, Mapping):
        raise ArgumentError(
            f"arguments must be an object, not {type(arguments).__name__}"
        )
    properties: Mapping[str, Any] = schema["properties"]
    instance = {
        key: value
        for key, value in arguments.items()
        if value is not None or key not in properties
    }
    if problems := _problems(schema, instance):
        raise ArgumentError("; ".join(problems))
    result: dict[str, Any] = {}
    for name, prop in properties.items():
        value = instance.get(name, prop.get("default"))
        if prop.get("type") == "integer" and isinstance(value, float):
            value = int(value)
        result[name] = value
    return result


def topic_name_argument(name: str, value: str) -> str:
    """Return ``value`` if it is a valid MQTT topic name (no wildcards).

    Raises:
        ArgumentError: it is not; the message names argument ``name``.

    """
    if (problem := topic_name_problem(value)) is not None:
        raise ArgumentError(
            f"'{name}' {value!r:.80} is not a valid MQTT topic name ({problem.value}): "
            "publishing needs a concrete topic without + or #"
        )
    return value


def topic_filter_argument(name: str, value: str) -> str:
    """Return ``value`` if it is a valid MQTT topic filter.

    Raises:
        ArgumentError: it is not; the message names argument ``name``.

    """
    if (problem := topic_filter_problem(value)) is not None:
        raise ArgumentError(
            f"'{name}' {value!r:.80} is not a valid MQTT topic filter ({problem.value}): "
            "+ must fill a whole level and # must be the whole last level"
        )
    return value


def decode_payload(payload: str, encoding: str, limit: int) -> bytes:
    """Return the bytes of ``payload`` given as ``text`` or ``base64``.

    Raises:
        ArgumentError: invalid base64, unencodable text, or more than
            ``limit`` bytes.

    """
    if encoding == "base64":
        try:
            data = base64.b64decode(payload.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError) as err:
            raise ArgumentError(f"'payload' is not valid base64: {err}") from err
    else:
        try:
            data = payload.encode()
        except UnicodeEncodeError as err:
            raise ArgumentError(
                f"'payload' cannot be encoded as UTF-8 ({err.reason}); "
                "send binary data with payload_encoding='base64'"
            ) from err
    if len(data) > limit:
        raise ArgumentError(
            f"'payload' is {len(data)} bytes; the limit is {limit} bytes"
        )
    return data
