"""The five MQTT tools for AI agents, with the topic ACL enforced in every call.

:class:`MqttTools` serves ``mqtt_publish``, ``mqtt_read``, ``mqtt_subscribe``,
``mqtt_query`` and ``mqtt_topics`` (names and arguments as mcpMQTT's, extra
arguments optional) over the project's one :class:`~.mqtt_client.MqttClient`.
It knows nothing of MCP or Home Assistant: the MCP server
(:mod:`.mcp_server`) and the Assist LLM API turn :meth:`MqttTools.specs` into
their tool lists and hand every call to :meth:`MqttTools.call`. What the
tools look like (names, limits, schemas, descriptions) is :mod:`.tool_specs`;
argument checks are :mod:`.tool_arguments`; how results show messages within
the byte budget is :mod:`.tool_output`; the topics ``mqtt_topics`` lists are
kept in :mod:`.topic_store`.

Every call, in this order:

1. the arguments are validated (``jsonschema``) against the tool's JSON Schema
   (:attr:`~.tool_specs.ToolSpec.input_schema`: types, ranges, enums,
   ``required``, ``additionalProperties: false``; ``null`` for an optional
   argument means its default), then topic syntax, payload encoding and size;
2. the ACL (:class:`~.acl.Acl`, fetched afresh for every call, so rule changes
   apply to the next call without reconnecting) is asked; a denied call
   touches the broker in no way and returns ``is_error=True, allowed=False``
   with the missing permission, the topic and the allowed patterns;
3. the broker is used under a deadline (``timeout`` arguments are capped at
   :attr:`~.tool_specs.ToolLimits.max_timeout`); every subscription the call
   made is cancelled (unsubscribed) when it ends, whatever the outcome, except
   the response topics ``mqtt_query`` generates itself: those stay subscribed
   for the next query (at most :data:`MAX_INBOXES`, dropped by
   :meth:`MqttTools.refresh_acl` and :meth:`MqttTools.stop`), which saves a
   SUBSCRIBE/UNSUBSCRIBE round trip per query;
4. the result is bounded by :attr:`~.tool_specs.ToolLimits.max_result_bytes`
   (the JSON of ``structured``); payloads that are not UTF-8 come back
   base64-encoded.

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
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
import functools
import logging
import time
from typing import Any, Final
import uuid

from .acl import Acl, AclDecision, Permission
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
from .tool_arguments import (
    ArgumentError,
    decode_payload,
    topic_filter_argument,
    topic_name_argument,
    validate_arguments,
)
from .tool_output import (
    ReceivedMessage,
    fit_collection,
    fit_rows,
    iso_time,
    json_size,
    payload_fields,
    render_fitting,
    to_json,
)
from .tool_specs import (
    MAX_SCAN_SECONDS,
    RESPONSE_LEVEL,
    TOOL_NAMES,
    TOOL_PUBLISH,
    TOOL_QUERY,
    TOOL_READ,
    TOOL_SUBSCRIBE,
    TOOL_TOPICS,
    ToolLimits,
    ToolSpec,
    build_specs,
    input_schemas,
)
from .topic_store import TopicStore
from .topics import TopicError, matches, topic_name_problem

_LOGGER = logging.getLogger(__name__)

# Longest wait for a QoS >= 1 acknowledgement of mqtt_publish / mqtt_query, in seconds.
PUBLISH_TIMEOUT: Final = 10.0
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


# -- response topics kept by mqtt_query --------------------------------------------


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
        self.waiters: dict[bytes, asyncio.Future[ReceivedMessage]] = {}
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
            waiter.set_result(ReceivedMessage(message, self.cap))

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

    messages: list[ReceivedMessage] = field(default_factory=list)
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
        self._schemas = input_schemas(self.limits)
        self._handlers: dict[str, _Handler] = {
            TOOL_PUBLISH: self._publish,
            TOOL_READ: self._read,
            TOOL_SUBSCRIBE: self._subscribe,
            TOOL_QUERY: self._query,
            TOOL_TOPICS: self._topics,
        }
        self._store = TopicStore(
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
        return build_specs(self._acl(), self.limits, self._schemas)

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
        except ArgumentError as err:
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
            f"{summary}\n{to_json(structured)}",
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
            outcome.messages.append(ReceivedMessage(message, cap))
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
        topic = topic_name_argument("topic", args["topic"])
        payload = decode_payload(
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
        topic_filter = topic_filter_argument("topic", args["topic"])
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
        structured = render_fitting(
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
        topic_filter = topic_filter_argument("topic", args["topic"])
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
        structured = fit_collection(
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
        request_topic = topic_name_argument("request_topic", args["request_topic"])
        given: str | None = args["response_topic"]
        if given is not None:
            topic_name_argument("response_topic", given)
            if given == request_topic:
                raise ArgumentError(
                    "'response_topic' must differ from 'request_topic' "
                    "(the request itself would be taken as the answer)"
                )
        payload = decode_payload(
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
        answer: asyncio.Future[ReceivedMessage] = loop.create_future()
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
                answer.set_result(ReceivedMessage(message, cap))

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
                    received: ReceivedMessage | None = await answer
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
        structured = render_fitting(
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
        topic_filter = topic_filter_argument("topic", args["topic"])
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
                "last_seen": iso_time(entry.last),
                "retained": entry.retained,
            }
            | payload_fields(
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
        if json_size(structured) > budget:
            structured["truncated"] = True
            structured["topics"] = fit_rows(structured, rows, budget)
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
