"""The Redis backplane's pure core (trio_gw/_backplane_core.py): no trio, no sockets, no Redis."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_gw._backplane import BackplaneClose, BackplaneDeliver
from trio_gw._backplane_core import (
    Backoff,
    ChannelNames,
    EnvelopeError,
    PublishQueue,
    SentinelUrl,
    Subscriptions,
    decode_envelope,
    encode_envelope,
    envelope_origin,
    route,
    with_tls_defaults,
)
from trio_gw._frames import encode_frame
from trio_gw._targets import ToAll, ToSession, ToUsers

NAMES = ChannelNames("t")
ids = st.text(min_size=1, max_size=20)
targets = st.one_of(
    st.builds(ToSession, ids),
    st.builds(ToUsers, st.frozensets(ids, max_size=5)),
    st.just(ToAll()),
)
messages = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=70_000),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**31), 2**31), max_size=3),
)


@given(origin=ids, target=targets, message=messages)
def test_a_delivery_crosses_with_the_same_wire_bytes(origin, target, message) -> None:
    frame = encode_frame(message)
    decoded_origin, decoded = decode_envelope(
        encode_envelope(origin, BackplaneDeliver(target, frame))
    )
    assert decoded_origin == origin
    assert isinstance(decoded, BackplaneDeliver)
    assert decoded.target == target
    assert decoded.frame.wire == frame.wire
    assert decoded.frame.data == frame.data
    assert decoded.frame.is_text == frame.is_text


@given(origin=ids, target=targets, message=messages)
def test_the_origin_is_read_without_decoding(origin, target, message) -> None:
    data = encode_envelope(origin, BackplaneDeliver(target, encode_frame(message)))
    assert envelope_origin(data) == origin
    assert envelope_origin(data[:5]) is None
    assert envelope_origin(b"nope") is None


@given(origin=ids, target=targets, code=st.integers(1000, 4999), reason=st.text(max_size=100))
def test_a_close_crosses(origin, target, code, reason) -> None:
    message = BackplaneClose(target, code, reason)
    assert decode_envelope(encode_envelope(origin, message)) == (origin, message)


@given(st.binary(max_size=200))
def test_garbage_is_an_envelope_error_never_a_crash(data) -> None:
    with contextlib.suppress(EnvelopeError):
        decode_envelope(data)


def test_truncated_and_foreign_envelopes_are_refused() -> None:
    data = encode_envelope("n1", BackplaneDeliver(ToSession("n2:x"), encode_frame("hi")))
    with pytest.raises(EnvelopeError, match="not a trio-gw envelope"):
        decode_envelope(b"hello")
    with pytest.raises(EnvelopeError, match="truncated"):
        decode_envelope(data[:8])


def test_routing_by_interest() -> None:
    frame = encode_frame({"x": 1})
    to_session = route(BackplaneDeliver(ToSession("n2:abc"), frame), "n1", NAMES)
    assert [channel for channel, _ in to_session] == [b"t:n:n2"]
    # A session id naming no node, or this node, goes nowhere.
    assert route(BackplaneDeliver(ToSession("abc"), frame), "n1", NAMES) == []
    assert route(BackplaneDeliver(ToSession("n1:abc"), frame), "n1", NAMES) == []
    # One envelope per user channel, each naming only its user.
    to_users = route(BackplaneDeliver(ToUsers(frozenset({"b", "a"})), frame), "n1", NAMES)
    assert [channel for channel, _ in to_users] == [b"t:u:a", b"t:u:b"]
    assert [decode_envelope(payload)[1].target for _, payload in to_users] == [
        ToUsers(frozenset({"a"})),
        ToUsers(frozenset({"b"})),
    ]
    # Many users: once, on the broadcast channel, with the whole list.
    many = ToUsers(frozenset(str(i) for i in range(5)))
    wide = route(BackplaneDeliver(many, frame), "n1", NAMES, fanout_threshold=4)
    assert [channel for channel, _ in wide] == [b"t:all"]
    assert decode_envelope(wide[0][1])[1].target == many
    to_all = route(BackplaneClose(ToAll(), 1000, "bye"), "n1", NAMES)
    assert [channel for channel, _ in to_all] == [b"t:all"]


def test_a_message_to_as_many_users_as_listening_nodes_is_broadcast() -> None:
    frame = encode_frame("x")
    two = BackplaneDeliver(ToUsers(frozenset({"a", "b"})), frame)
    one = BackplaneDeliver(ToUsers(frozenset({"a"})), frame)

    def channels(message: BackplaneDeliver, listening: int | None) -> list[bytes]:
        return [c for c, _ in route(message, "n1", NAMES, listening_nodes=listening)]

    # Two nodes listening: a broadcast is one publish reaching both, per user two.
    assert channels(two, 2) == [b"t:all"]
    assert channels(one, 2) == [b"t:u:a"]
    # Three nodes: per user is cheaper for two users.
    assert channels(two, 3) == [b"t:u:a", b"t:u:b"]
    # Unknown (a Cluster, or not counted yet): by interest.
    assert channels(two, None) == [b"t:u:a", b"t:u:b"]
    (payload,) = [p for _, p in route(two, "n1", NAMES, listening_nodes=2)]
    assert decode_envelope(payload)[1].target == two.target


@given(
    users=st.frozensets(st.text("ab:é", min_size=1, max_size=3), min_size=1, max_size=8),
    listening=st.none() | st.integers(min_value=1, max_value=10),
    threshold=st.integers(min_value=1, max_value=10),
)
def test_every_route_names_each_user_once(
    users: frozenset[str], listening: int | None, threshold: int
) -> None:
    message = BackplaneDeliver(ToUsers(users), encode_frame("x"))
    items = route(message, "n1", NAMES, fanout_threshold=threshold, listening_nodes=listening)
    named: list[str] = []
    for channel, payload in items:
        target = decode_envelope(payload)[1].target
        assert isinstance(target, ToUsers)
        if channel != NAMES.broadcast:
            assert target.user_ids == {channel.removeprefix(b"t:u:").decode()}
        named += target.user_ids
    assert sorted(named) == sorted(users)
    broadcast = len(users) > threshold or (listening is not None and len(users) >= listening)
    assert (len(items) == 1 and items[0][0] == NAMES.broadcast) == broadcast


def test_tls_urls_check_the_host_name_unless_they_say_otherwise() -> None:
    check = "ssl_check_hostname=true"
    assert with_tls_defaults("rediss://h:6380") == f"rediss://h:6380?{check}"
    assert (
        with_tls_defaults("rediss://u:p%40w@h:6380/0?ssl_ca_certs=/ca.pem")
        == f"rediss://u:p%40w@h:6380/0?ssl_ca_certs=/ca.pem&{check}"
    )
    # Said in the URL, or verification turned off: left as it is.
    # As coredis reads the query: the first non-empty value counts.
    assert with_tls_defaults("rediss://h/?ssl_cert_reqs=required&ssl_cert_reqs=none") == (
        f"rediss://h/?ssl_cert_reqs=required&ssl_cert_reqs=none&{check}"
    )
    assert with_tls_defaults("rediss://h/?ssl_check_hostname=") == (
        f"rediss://h/?ssl_check_hostname=&{check}"
    )
    for url in (
        "rediss://h/?ssl_check_hostname=false",
        "rediss://h/?ssl_cert_reqs=none",
        "rediss://h/?ssl_cert_reqs=&ssl_cert_reqs=none&ssl_cert_reqs=required",
        "REDISS://h/?ssl_cert_reqs=none",
        "redis://h:6379/0",
        "unix:///run/redis.sock",
        "redis+sentinel://s1:26379/primary",
    ):
        assert with_tls_defaults(url) == url


def test_the_publish_queue_is_bounded_and_batches_in_order() -> None:
    queue = PublishQueue(max_messages=3, max_bytes=10)
    assert queue.offer([(b"c", b"1234")])
    assert queue.offer([(b"c", b"5678")])
    assert not queue.offer([(b"c", b"abc")])  # 11 bytes
    # One message of two publishes (two user channels) counts once.
    assert queue.offer([(b"c", b"a"), (b"d", b"a")])
    assert not queue.offer([(b"c", b"z")])  # a fourth message
    assert len(queue) == 4 and queue.queued_messages == 3 and queue.queued_bytes == 10
    assert queue.take(max_messages=10, max_bytes=8) == [(b"c", b"1234"), (b"c", b"5678")]
    assert queue.queued_messages == 1
    assert queue.take(max_messages=1, max_bytes=8) == [(b"c", b"a")]
    assert queue.queued_messages == 1  # half of it is still queued
    assert queue.take(max_messages=10, max_bytes=8) == [(b"d", b"a")]
    assert queue.take(max_messages=10, max_bytes=8) == []
    assert queue.queued_bytes == 0 and queue.queued_messages == 0
    # A publish larger than a batch still goes, alone.
    assert queue.offer([(b"c", b"0123456789")])
    assert queue.take(max_messages=10, max_bytes=1) == [(b"c", b"0123456789")]
    queue.offer([(b"c", b"x"), (b"c", b"y")])
    assert queue.clear() == 2 and len(queue) == 0 and queue.queued_bytes == 0


class SubscriptionMachine(RuleBasedStateMachine):
    """Whatever the order of wants, partial reconciliations and reconnects, reconciling to
    the end leaves the server holding exactly the wanted channels, fixed ones included."""

    def __init__(self) -> None:
        super().__init__()
        self.subs = Subscriptions(frozenset({b"n", b"all"}))
        self.model: set[bytes] = {b"n", b"all"}

    @rule(channel=st.sampled_from([b"u1", b"u2", b"u3", b"n"]))
    def want(self, channel: bytes) -> None:
        self.subs.want(channel)
        self.model.add(channel)

    @rule(channel=st.sampled_from([b"u1", b"u2", b"u3", b"n"]))
    def unwant(self, channel: bytes) -> None:
        self.subs.unwant(channel)
        if channel not in (b"n", b"all"):
            self.model.discard(channel)

    @rule(n=st.integers(1, 3))
    def reconcile_some(self, n: int) -> None:
        subscribe, unsubscribe = self.subs.pending(n)
        assert len(subscribe) <= n and len(unsubscribe) <= n
        self.subs.confirmed(subscribe, unsubscribe)

    @rule(kept=st.sets(st.sampled_from([b"u1", b"u2", b"u3", b"n", b"all"])))
    def server_drops_some(self, kept: set[bytes]) -> None:
        before = self.subs.active
        gone = self.subs.lost(kept)
        assert set(gone) == before - kept
        assert self.subs.active == before & kept

    @rule()
    def reconnect(self) -> None:
        self.subs.reset()
        assert self.subs.active == frozenset()

    @precondition(lambda self: True)
    @rule()
    def reconcile_all(self) -> None:
        while not self.subs.in_sync:
            self.subs.confirmed(*self.subs.pending(2))
        assert self.subs.active == self.model

    @invariant()
    def wanted_matches_the_model(self) -> None:
        assert self.subs.wanted == self.model


TestSubscriptions = SubscriptionMachine.TestCase


def test_backoff_doubles_up_to_its_maximum_and_resets() -> None:
    backoff = Backoff(0.1, 0.5)
    assert [backoff.delay() for _ in range(5)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    backoff.reset()
    assert backoff.delay() == 0.1
    assert Backoff(1, 8, jitter=lambda d: d / 2).delay() == 0.5


def test_sentinel_urls() -> None:
    parsed = SentinelUrl.parse("redis+sentinel://:s%40cret@h1:26379,[::1]:26380/my%20primary")
    assert parsed.sentinels == (("h1", 26379), ("::1", 26380))
    assert parsed.service_name == "my primary"
    assert parsed.username is None and parsed.password == "s@cret"
    assert "s@cret" not in repr(parsed)
    assert SentinelUrl.parse("redis+sentinel://u:p@h:1/x").username == "u"
    for bad in (
        "redis://h:1/x",
        "redis+sentinel://h:1",
        "redis+sentinel://h/x",
        "redis+sentinel://h:99999/x",
        "redis+sentinel://h:1,/x",
    ):
        with pytest.raises(ValueError, match="expected"):
            SentinelUrl.parse(bad)
