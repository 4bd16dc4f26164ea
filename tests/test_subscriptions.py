"""SubscriptionRegistry without a network: merging, refcounts, SUBACK state, fan-out."""

from __future__ import annotations

import asyncio
import logging

import pytest

from custom_components.mqtt_bridge.engine.mqtt_client import Message
from custom_components.mqtt_bridge.engine.subscriptions import (
    FilterState,
    RetainHandling,
    SubscribeOptions,
    SubscriptionRefusedError,
    SubscriptionRegistry,
)
from custom_components.mqtt_bridge.engine.topics import TopicError, matches
from tests.test_topics import MATCH_TABLE

RH = RetainHandling


class Recorder:
    """A registry with a counter of ``on_change`` calls."""

    def __init__(self) -> None:
        self.changes = 0
        self.registry = SubscriptionRegistry(self._changed)

    def _changed(self) -> None:
        self.changes += 1


def _sink() -> tuple[list[Message], object]:
    received: list[Message] = []
    return received, received.append


def _pending(registry: SubscriptionRegistry) -> list[tuple[str, SubscribeOptions]]:
    """``take_pending`` without the subscription identifiers."""
    return [(f, options) for f, options, _identifier in registry.take_pending()]


def _grant_all(registry: SubscriptionRegistry) -> list[str]:
    sent = [f for f, _ in _pending(registry)]
    for topic_filter in sent:
        registry.acknowledged(topic_filter, None)
    return sent


def test_add_asks_for_subscribe_then_tracks_suback() -> None:
    rec = Recorder()
    reg = rec.registry
    sub = reg.add("a/+", lambda _m: None, SubscribeOptions(qos=0))
    assert rec.changes == 1
    assert sub.active
    assert sub.state is FilterState.PENDING
    assert reg.filters == {"a/+"}
    assert reg.granted == frozenset()
    assert _pending(reg) == [("a/+", SubscribeOptions(qos=0))]
    assert sub.state is FilterState.SENT
    assert _pending(reg) == []  # sent once
    reg.acknowledged("a/+", None)
    assert sub.state is FilterState.GRANTED
    assert reg.granted == {"a/+"}
    assert reg.state_of("a/+") is FilterState.GRANTED
    assert reg.state_of("other") is None


def test_take_pending_is_sorted_by_filter() -> None:
    reg = SubscriptionRegistry()
    for topic_filter in ("c", "a/#", "b/+", "$share/g/z"):
        reg.add(topic_filter, lambda _m: None)
    assert [f for f, _ in _pending(reg)] == ["$share/g/z", "a/#", "b/+", "c"]


def test_options_merged_over_consumers() -> None:
    rec = Recorder()
    reg = rec.registry
    first = SubscribeOptions(
        qos=0, no_local=True, retain_as_published=False, retain_handling=RH.DONT_SEND
    )
    reg.add("t/#", lambda _m: None, first)
    assert _pending(reg) == [("t/#", first)]
    reg.acknowledged("t/#", None)
    second = SubscribeOptions(
        qos=1, no_local=False, retain_as_published=True, retain_handling=RH.SEND_IF_NEW
    )
    sub2 = reg.add("t/#", lambda _m: None, second)
    assert rec.changes == 2
    # Highest QoS, No Local only if all ask, RAP if any asks, most generous RH.
    assert _pending(reg) == [
        (
            "t/#",
            SubscribeOptions(
                qos=1,
                no_local=False,
                retain_as_published=True,
                retain_handling=RH.SEND_IF_NEW,
            ),
        )
    ]
    reg.acknowledged("t/#", None)
    # The second consumer leaves: back to the first one's options, resubscribed,
    # not unsubscribed.
    sub2.cancel()
    assert rec.changes == 3
    assert reg.take_removed() == []
    assert _pending(reg) == [("t/#", first)]
    assert reg.filters == {"t/#"}


def test_qos_two_wins_and_no_local_needs_everyone() -> None:
    reg = SubscriptionRegistry()
    reg.add("q", lambda _m: None, SubscribeOptions(qos=2, no_local=True))
    reg.add("q", lambda _m: None, SubscribeOptions(qos=0, no_local=True))
    ((_f, options),) = _pending(reg)
    assert (options.qos, options.no_local) == (2, True)


def test_same_options_without_retained_request_do_not_resubscribe() -> None:
    rec = Recorder()
    reg = rec.registry
    options = SubscribeOptions(retain_handling=RH.DONT_SEND)
    reg.add("t", lambda _m: None, options)
    _grant_all(reg)
    reg.add("t", lambda _m: None, options)
    assert rec.changes == 1
    assert reg.state_of("t") is FilterState.GRANTED
    assert _pending(reg) == []


def test_consumer_asking_for_retained_resubscribes_granted_filter() -> None:
    rec = Recorder()
    reg = rec.registry
    options = SubscribeOptions(retain_handling=RH.DONT_SEND)
    reg.add("t", lambda _m: None, options)
    _grant_all(reg)
    late = reg.add("t", lambda _m: None, SubscribeOptions())  # SEND_ON_SUBSCRIBE
    assert rec.changes == 2
    assert late.state is FilterState.PENDING
    ((_f, merged),) = _pending(reg)
    assert merged.retain_handling is RH.SEND_ON_SUBSCRIBE
    # Even with identical merged options, another SEND_ON_SUBSCRIBE consumer
    # subscribes again (the broker sends the retained messages once more).
    reg.acknowledged("t", None)
    reg.add("t", lambda _m: None, SubscribeOptions())
    assert rec.changes == 3
    assert _pending(reg) == [("t", merged)]


def test_refcount_unsubscribes_with_last_consumer() -> None:
    rec = Recorder()
    reg = rec.registry
    one = reg.add(
        "t/+", lambda _m: None, SubscribeOptions(retain_handling=RH.DONT_SEND)
    )
    two = reg.add(
        "t/+", lambda _m: None, SubscribeOptions(retain_handling=RH.DONT_SEND)
    )
    _grant_all(reg)
    changes = rec.changes
    one.cancel()
    assert not one.active
    assert reg.filters == {"t/+"}
    assert reg.take_removed() == []
    assert rec.changes == changes  # same merged options: nothing to send
    one.cancel()  # idempotent
    two.cancel()
    assert reg.filters == frozenset()
    assert reg.take_removed() == ["t/+"]
    assert reg.take_removed() == []
    assert rec.changes == changes + 1
    assert reg.state_of("t/+") is None
    # The cancelled subscription's state is final.
    assert two.state is FilterState.REFUSED


def test_filter_never_sent_is_not_unsubscribed() -> None:
    rec = Recorder()
    reg = rec.registry
    sub = reg.add("t", lambda _m: None)
    sub.cancel()
    assert reg.take_removed() == []
    assert _pending(reg) == []
    assert rec.changes == 1  # the add only


def test_take_removed_sorted_and_readd_before_sync_cancels_unsubscribe() -> None:
    reg = SubscriptionRegistry()
    subs = {f: reg.add(f, lambda _m: None) for f in ("z", "a", "m")}
    _grant_all(reg)
    for sub in subs.values():
        sub.cancel()
    reg.add("m", lambda _m: None)  # wanted again before the client synced
    assert reg.take_removed() == ["a", "z"]
    assert _pending(reg) == [("m", SubscribeOptions())]


def test_acknowledged_refusal_and_retry_on_new_consumer(caplog) -> None:
    reg = SubscriptionRegistry()
    sub = reg.add("$SYS/x", lambda _m: None)
    _pending(reg)
    with caplog.at_level(logging.WARNING):
        reg.acknowledged("$SYS/x", "Not authorized")
    assert sub.state is FilterState.REFUSED
    assert reg.refused() == {"$SYS/x": "Not authorized"}
    assert reg.stats.refused == 1
    assert reg.granted == frozenset()
    assert "refused subscription" in caplog.text
    # A new consumer of a refused filter tries again.
    reg.add("$SYS/x", lambda _m: None, SubscribeOptions(retain_handling=RH.DONT_SEND))
    assert sub.state is FilterState.PENDING
    assert reg.refused() == {}
    assert [f for f, _ in _pending(reg)] == ["$SYS/x"]


def test_stale_suback_is_ignored() -> None:
    reg = SubscriptionRegistry()
    reg.add("t", lambda _m: None, SubscribeOptions(qos=0, retain_handling=RH.DONT_SEND))
    _pending(reg)  # SUBSCRIBE #1 in flight
    reg.add("t", lambda _m: None, SubscribeOptions(qos=1, retain_handling=RH.DONT_SEND))
    reg.acknowledged("t", "refused")  # the SUBACK of #1 arrives: options changed since
    assert reg.state_of("t") is FilterState.PENDING
    assert reg.stats.refused == 0
    reg.acknowledged("unknown", None)  # a filter nobody wants: ignored
    assert reg.filters == {"t"}


def test_session_lost_resubscribes_everything() -> None:
    reg = SubscriptionRegistry()
    kept = reg.add("a", lambda _m: None)
    gone = reg.add("b", lambda _m: None)
    refused = reg.add("c", lambda _m: None)
    _pending(reg)
    reg.acknowledged("a", None)
    reg.acknowledged("c", "Not authorized")
    gone.cancel()
    reg.session_lost()
    assert reg.take_removed() == []  # the new session has no subscriptions
    assert reg.granted == frozenset()
    assert kept.state is FilterState.PENDING
    assert refused.state is FilterState.PENDING
    assert reg.refused() == {}
    assert [f for f, _ in _pending(reg)] == ["a", "c"]


def test_invalid_filter_adds_nothing() -> None:
    rec = Recorder()
    for bad in ("a/#/b", "", "a\x01", "$share/g", "x+"):
        with pytest.raises(TopicError):
            rec.registry.add(bad, lambda _m: None)
    assert rec.registry.filters == frozenset()
    assert rec.changes == 0


def test_dispatch_to_every_overlapping_filter() -> None:
    reg = SubscriptionRegistry()
    sinks: dict[str, list[Message]] = {}
    for topic_filter in ("a/#", "a/+/c", "a/b/c", "+/b/#", "#", "x/#", "a/+"):
        received, callback = _sink()
        sinks[topic_filter] = received
        reg.add(topic_filter, callback)
    message = Message("a/b/c", b"1", qos=1)
    assert reg.dispatch(message) == 5
    assert {f for f, got in sinks.items() if got} == {
        "a/#",
        "a/+/c",
        "a/b/c",
        "+/b/#",
        "#",
    }
    assert all(got == [message] for f, got in sinks.items() if got)
    assert reg.stats.delivered == 5
    # Two consumers of one filter both get it.
    received, callback = _sink()
    reg.add("a/b/c", callback)
    assert reg.dispatch(Message("a/b/c", b"2")) == 6
    assert [m.payload for m in received] == [b"2"]
    assert len(sinks["a/b/c"]) == 2


def test_dispatch_counts_unmatched_and_respects_dollar_rule() -> None:
    reg = SubscriptionRegistry()
    received, callback = _sink()
    reg.add("#", callback)
    reg.add("+/x", callback)
    assert reg.dispatch(Message("$SYS/x", b"")) == 0
    assert reg.stats.unmatched == 1
    assert received == []
    reg.add("$SYS/#", callback)
    assert reg.dispatch(Message("$SYS/x", b"")) == 1


def test_cancelled_consumer_gets_nothing() -> None:
    reg = SubscriptionRegistry()
    received, callback = _sink()
    sub = reg.add("a/+", callback)
    sub.cancel()
    assert reg.dispatch(Message("a/b", b"")) == 0
    assert received == []


def test_raising_consumer_counted_others_still_receive(caplog) -> None:
    reg = SubscriptionRegistry()
    before, first = _sink()
    after, last = _sink()

    def broken(_message: Message) -> None:
        raise RuntimeError("consumer bug")

    reg.add("a/#", first)
    reg.add("a/#", broken)
    reg.add("a/+", broken)
    reg.add("a/+", last)
    with caplog.at_level(logging.ERROR):
        assert reg.dispatch(Message("a/b", b"x")) == 4
        assert reg.dispatch(Message("a/c", b"y")) == 4
    assert [m.payload for m in before] == [b"x", b"y"]
    assert [m.payload for m in after] == [b"x", b"y"]
    assert reg.stats.consumer_errors == 4
    assert reg.stats.delivered == 8
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in errors)
    assert "consumer bug" in caplog.text


def test_shared_subscription_fan_out_key() -> None:
    reg = SubscriptionRegistry()
    shared, shared_cb = _sink()
    plain, plain_cb = _sink()
    other_group, other_cb = _sink()
    reg.add("$share/g/a/+", shared_cb)
    reg.add("a/+", plain_cb)
    reg.add("$share/h/a/+", other_cb)
    # Three broker subscriptions: the group is part of the filter's identity.
    assert reg.filters == {"$share/g/a/+", "a/+", "$share/h/a/+"}
    assert [f for f, _ in _pending(reg)] == ["$share/g/a/+", "$share/h/a/+", "a/+"]
    # A delivery carries the concrete topic: matched by the filter after the group.
    assert reg.dispatch(Message("a/b", b"1")) == 3
    assert [len(shared), len(plain), len(other_group)] == [1, 1, 1]
    assert reg.dispatch(Message("$share/g/a/b", b"2")) == 0
    # Removing one shared filter leaves the others matching.
    reg.add("$share/g/a/+", lambda _m: None).cancel()
    assert reg.filters == {"$share/g/a/+", "a/+", "$share/h/a/+"}


def test_dispatch_agrees_with_topic_matching_table() -> None:
    """The registry's trie and ``topics.matches`` give the same answers."""
    disagreements = []
    for topic_filter, topic, expected in MATCH_TABLE:
        reg = SubscriptionRegistry()
        reg.add(topic_filter, lambda _m: None)
        delivered = reg.dispatch(Message(topic, b"")) == 1
        if delivered is not expected or matches(topic_filter, topic) is not expected:
            disagreements.append((topic_filter, topic, expected, delivered))
    assert len(MATCH_TABLE) > 50
    assert disagreements == []


async def test_wait_granted() -> None:
    reg = SubscriptionRegistry()
    sub = reg.add("t", lambda _m: None)
    waiter = asyncio.create_task(sub.wait_granted())
    await asyncio.sleep(0)
    assert not waiter.done()
    _pending(reg)
    await asyncio.sleep(0)
    assert not waiter.done()  # SENT is not granted
    reg.acknowledged("t", None)
    async with asyncio.timeout(1):
        await waiter
    await sub.wait_granted()  # already granted: returns at once


async def test_wait_granted_raises_on_refusal() -> None:
    reg = SubscriptionRegistry()
    sub = reg.add("$SYS/x", lambda _m: None)
    waiter = asyncio.create_task(sub.wait_granted())
    await asyncio.sleep(0)
    _pending(reg)
    reg.acknowledged("$SYS/x", "Not authorized")
    with pytest.raises(SubscriptionRefusedError, match="Not authorized"):
        async with asyncio.timeout(1):
            await waiter
    with pytest.raises(SubscriptionRefusedError):
        await sub.wait_granted()


async def test_wait_granted_survives_session_loss_and_ends_on_cancel() -> None:
    reg = SubscriptionRegistry()
    sub = reg.add("t", lambda _m: None)
    waiter = asyncio.create_task(sub.wait_granted())
    _pending(reg)
    await asyncio.sleep(0)
    reg.session_lost()  # no SUBACK on the old session
    await asyncio.sleep(0)
    assert not waiter.done()
    _pending(reg)
    reg.acknowledged("t", None)
    async with asyncio.timeout(1):
        await waiter
    other = reg.add("u", lambda _m: None)
    pending = asyncio.create_task(other.wait_granted())
    await asyncio.sleep(0)
    other.cancel()
    with pytest.raises(SubscriptionRefusedError, match="unsubscribed"):
        async with asyncio.timeout(1):
            await pending


def test_each_filter_has_its_own_subscription_identifier() -> None:
    reg = SubscriptionRegistry()
    wide, wide_cb = _sink()
    narrow, narrow_cb = _sink()
    reg.add("a/#", wide_cb)
    reg.add("a/+/c", narrow_cb)
    reg.add("a/+/c", narrow_cb)  # second consumer of the same filter
    pending = {f: identifier for f, _options, identifier in reg.take_pending()}
    assert len(set(pending.values())) == 2
    assert all(1 <= i <= 268_435_455 for i in pending.values())
    # A copy that carries one filter's identifier reaches that filter's consumers only.
    message = Message("a/b/c", b"x")
    assert reg.dispatch(message, [pending["a/#"]]) == 1
    assert wide == [message]
    assert narrow == []
    assert reg.dispatch(message, [pending["a/+/c"]]) == 2
    assert narrow == [message, message]
    # One copy for both subscriptions (allowed by MQTT 5): each consumer once.
    assert reg.dispatch(message, list(pending.values())) == 3
    # An identifier of a filter that is gone delivers nothing (counted unmatched).
    assert reg.dispatch(message, [999]) == 0
    assert reg.stats.unmatched == 1


def test_identifiers_are_not_reused_while_in_use() -> None:
    reg = SubscriptionRegistry()
    reg._next_identifier = 268_435_455
    first = reg.add("last", lambda _m: None)
    reg.add("wrapped", lambda _m: None)
    ids = {f: i for f, _o, i in reg.take_pending()}
    assert ids == {"last": 268_435_455, "wrapped": 1}
    first.cancel()
    reg._next_identifier = 1
    reg.add("again", lambda _m: None)
    assert {f: i for f, _o, i in reg.take_pending()}["again"] == 2  # 1 is taken
