"""The hub's pure decision core (trio_gw/_router.py), without sockets or trio.

Sessions are fakes (``FakeSession``) that implement the router's
``SessionHandle`` protocol over a modelled queue, and ``Shell`` carries out the
router's effects the way the hub's ``_execute`` does, minimally: an ``Offer``
appends to each session's queue (and to the hub-wide budget), a slow close or a
``Discard`` empties it, and a writer, driven by the tests, takes frames off and
reports progress with ``Drained`` while the session is pressured. The clock is a
number the tests move.

The plain tests walk each effect path once, so that a failure reads clearly;
``RouterMachine`` then drives random command sequences and checks, after every
command, what the router promises (see its docstring).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from trio_gw._backplane import BackplaneClose, BackplaneDeliver
from trio_gw._close_codes import CloseCode
from trio_gw._frames import Frame, encode_frame
from trio_gw._lifecycle import Lifecycle
from trio_gw._router import (
    Close,
    CloseSession,
    Deliver,
    Discard,
    Drained,
    Expire,
    FlowLimits,
    Offer,
    Publish,
    QueueBudget,
    Recheck,
    Refresh,
    Register,
    Registered,
    Router,
    Subscribe,
    Unregister,
    Unregistered,
    Unsubscribe,
    WakeProducers,
)
from trio_gw._statistics import Counters
from trio_gw._targets import Target, ToAll, ToSession, ToUsers, is_local

NODE = "n1"
OTHER_NODE = "n2"

# Pressured above 3 messages or 300 bytes, drained at 1 message and 150 bytes,
# closed past 6 messages or 600 bytes.
LIMITS = FlowLimits(
    max_messages=6, max_bytes=600, stall_timeout=1.0, max_lag=2.5, budget_bytes=2000
)


def frame_of(size: int) -> Frame:
    """A text frame whose wire size is exactly ``size`` bytes (2 < size < 128, or 129 < size)."""
    header = 2 if size < 128 else 4  # a payload over 125 bytes takes a 16-bit length
    frame = encode_frame("x" * (size - header))
    assert len(frame.wire) == size
    return frame


# --- the fakes -----------------------------------------------------------------------


@attrs.define(eq=False)
class FakeSession:
    """A ``SessionHandle`` whose queue is a list of (size, queued at)."""

    session_id: str
    user_id: str
    budget: QueueBudget
    state: Lifecycle = Lifecycle.CONNECTING
    queued_messages: int = 0
    queued_bytes: int = 0
    last_progress: float = 0.0
    pressured: bool = False
    expires_at: float | None = None
    queue: list[tuple[int, float]] = attrs.Factory(list)
    #: False once the shell closed the queue (closed without a drain, or ended).
    accepts: bool = True
    closed: CloseSession[Any] | None = None
    #: Offers the shell could not queue because the queue was closed.
    refused: int = 0

    def __repr__(self) -> str:
        return f"<Fake {self.session_id} {self.user_id} {self.state.name}>"

    def oldest_queued_at(self) -> float | None:
        return self.queue[0][1] if self.queue else None

    def offer(self, size: int, now: float) -> None:
        if not self.accepts:
            self.refused += 1
            return
        if not self.queue:
            self.last_progress = now  # the stall clock starts with the work (as Session does)
        self.queue.append((size, now))
        self.queued_messages += 1
        self.queued_bytes += size
        self.budget.queued += size

    def take(self, count: int, now: float) -> bool:
        """The writer takes up to ``count`` frames and writes them; False if nothing was queued."""
        if not self.queue:
            return False
        taken, self.queue = self.queue[:count], self.queue[count:]
        size = sum(s for s, _ in taken)
        self.queued_messages -= len(taken)
        self.queued_bytes -= size
        self.budget.queued -= size
        self.last_progress = now
        return True

    def drop_queue(self) -> None:
        self.budget.queued -= self.queued_bytes
        self.queue.clear()
        self.queued_messages = self.queued_bytes = 0


class Shell:
    """A router and the minimal shell around it; ``now`` is the clock."""

    def __init__(self, limits: FlowLimits = LIMITS, node_id: str = NODE) -> None:
        self.counters = Counters()
        self.router: Router[FakeSession] = Router(node_id, limits, self.counters)
        self.now = 0.0
        self.sessions: list[FakeSession] = []
        self._ids = 0

    def session(self, user: str = "u1") -> FakeSession:
        """A new, unregistered session."""
        self._ids += 1
        fake = FakeSession(
            f"{self.router.node_id}:s{self._ids}", user, self.router.budget, last_progress=self.now
        )
        self.sessions.append(fake)
        return fake

    def registered(self, user: str = "u1", expires_at: float | None = None) -> FakeSession:
        fake = self.session(user)
        self.run(Register(fake, expires_at))
        assert fake.state is Lifecycle.OPEN
        return fake

    def run(self, command: Any) -> list[Any]:
        """Have the router decide ``command`` now, carry out its effects, return them."""
        effects = self.router.handle(command, self.now)
        for effect in effects:
            self.apply(effect)
        return effects

    def apply(self, effect: Any) -> None:
        match effect:
            case Offer(frame=frame, sessions=sessions):
                for fake in sessions:
                    fake.offer(len(frame.wire), self.now)
            case CloseSession(session=fake, drain=drain):
                fake.closed = effect
                if not drain:
                    fake.accepts = False
                    fake.drop_queue()
            case Discard(session=fake):
                fake.accepts = False
                fake.drop_queue()

    def send(self, target: Target, size: int = 100, **kwargs: Any) -> list[Any]:
        return self.run(Deliver(target, frame_of(size), **kwargs))

    def write(self, fake: FakeSession, count: int = 1) -> list[Any]:
        """The writer takes ``count`` frames; if it made progress while pressured, Drained."""
        if fake.take(count, self.now) and fake.pressured:
            return self.run(Drained(fake))
        return []

    def fill(self, fake: FakeSession, messages: int, size: int = 50) -> None:
        """Deliver ``messages`` frames to ``fake`` alone, checking none is refused."""
        for _ in range(messages):
            effects = self.send(ToSession(fake.session_id), size)
            assert effects == [Offer(effects[0].frame, [fake])]


def kinds(effects: list[Any]) -> list[str]:
    return [type(effect).__name__ for effect in effects]


def slow_closes(effects: list[Any]) -> list[FakeSession]:
    return [
        e.session
        for e in effects
        if isinstance(e, CloseSession) and e.code == CloseCode.SLOW_CONSUMER
    ]


# --- limits --------------------------------------------------------------------------


def test_flow_limits_water_marks() -> None:
    limits = FlowLimits(
        max_messages=1024, max_bytes=1 << 20, stall_timeout=5, max_lag=10, budget_bytes=4000
    )
    assert (limits.high_messages, limits.low_messages) == (512, 256)
    assert (limits.high_bytes, limits.low_bytes) == (1 << 19, 1 << 18)
    assert limits.budget_resume == 3000


def test_over_budget_reads_what_sessions_queue() -> None:
    shell = Shell()
    a, b = shell.registered("a"), shell.registered("b")
    shell.fill(a, 5, 100)  # 500 bytes each: 1000 of the 2000 budget
    shell.fill(b, 5, 100)
    assert shell.router.budget.queued == 1000 and not shell.router.over_budget()
    for fake in (shell.registered("c"), shell.registered("d")):
        shell.fill(fake, 5, 100)
    assert shell.router.budget.queued == 2000 and not shell.router.over_budget()
    shell.fill(shell.registered("e"), 1, 10)
    assert shell.router.over_budget()
    shell.write(a, 5)
    assert not shell.router.over_budget()


# --- registration --------------------------------------------------------------------


def test_register_subscribes_a_users_first_session_only() -> None:
    shell = Shell()
    first, second = shell.session("alice"), shell.session("alice")
    assert shell.run(Register(first)) == [Subscribe("alice"), Registered(first)]
    assert shell.run(Register(second)) == [Registered(second)]
    assert first.state is second.state is Lifecycle.OPEN
    assert shell.counters.sessions_opened == 2 and shell.counters.peak_connections == 2
    # A second Register of the same session, or one of a session that closed, does nothing.
    assert shell.run(Register(first)) == []
    closing = shell.session("bob")
    shell.run(Unregister(closing, close=True))
    assert shell.run(Register(closing)) == []
    assert closing.state is Lifecycle.CLOSING
    assert sorted(shell.router.registry.user_ids()) == ["alice"]


def test_register_while_shutting_down_closes_with_1001_and_never_registers() -> None:
    shell = Shell()
    shell.router.accepting = False
    late = shell.session()
    effects = shell.run(Register(late))
    assert effects == [CloseSession(late, CloseCode.GOING_AWAY, "hub is shutting down", False)]
    assert late.state is Lifecycle.CLOSING
    # Its connection ends: nothing to unregister, its queue is discarded.
    assert shell.run(Unregister(late, close=False)) == [Discard(late)]
    assert late.state is Lifecycle.ENDED
    assert shell.counters.sessions_opened == shell.counters.sessions_closed == 0


def test_unregister_with_close_closes_1000_with_a_drain_once() -> None:
    shell = Shell()
    fake = shell.registered("alice")
    assert shell.run(Unregister(fake, close=True)) == [
        Unregistered(fake),
        Unsubscribe("alice"),
        CloseSession(fake, CloseCode.NORMAL, "unregistered", True),
    ]
    assert fake.state is Lifecycle.CLOSING
    assert shell.run(Unregister(fake, close=True)) == []
    # Then the connection ends: its queue is discarded; it is not unregistered again.
    assert shell.run(Unregister(fake, close=False)) == [Discard(fake)]
    assert fake.state is Lifecycle.ENDED
    assert shell.counters.sessions_closed == 1


def test_connection_end_unregisters_and_discards() -> None:
    shell = Shell()
    keep, gone = shell.registered("alice"), shell.registered("alice")
    shell.fill(gone, 2)
    assert shell.run(Unregister(gone, close=False)) == [Unregistered(gone), Discard(gone)]
    assert gone.state is Lifecycle.ENDED and gone.queued_messages == 0
    assert shell.router.budget.queued == 0
    assert shell.run(Unregister(keep, close=False)) == [
        Unregistered(keep),
        Unsubscribe("alice"),
        Discard(keep),
    ]
    assert shell.router.registry.session_count == 0


def test_unregister_of_a_never_registered_session_unregisters_nothing() -> None:
    shell = Shell()
    fake = shell.session()
    assert shell.run(Unregister(fake, close=True)) == [
        CloseSession(fake, CloseCode.NORMAL, "unregistered", True)
    ]
    assert shell.run(Unregister(fake, close=False)) == [Discard(fake)]


# --- delivery and the backplane ------------------------------------------------------


def test_deliver_to_all_offers_once_to_each_and_publishes() -> None:
    shell = Shell()
    a, b, c = shell.registered("u1"), shell.registered("u1"), shell.registered("u2")
    frame = frame_of(40)
    effects = shell.run(Deliver(ToAll(), frame))
    assert effects[0] == Offer(frame, [a, b, c])
    assert effects[1:] == [Publish(BackplaneDeliver(ToAll(), frame))]
    assert shell.run(Deliver(ToAll(), frame, remote=True)) == [Offer(frame, [a, b, c])]
    assert shell.router.budget.queued == 6 * 40


def test_deliver_to_users_reaches_their_sessions_and_publishes() -> None:
    shell = Shell()
    a, _, c = shell.registered("u1"), shell.registered("u2"), shell.registered("u3")
    frame = frame_of(40)
    target = ToUsers(frozenset({"u1", "u3", "elsewhere"}))
    effects = shell.run(Deliver(target, frame))
    assert len(effects) == 2
    assert isinstance(effects[0], Offer) and set(effects[0].sessions) == {a, c}
    assert effects[1] == Publish(BackplaneDeliver(target, frame))
    # Nobody here: still published, and not a drop (the users may be elsewhere).
    nobody = ToUsers(frozenset({"elsewhere"}))
    assert shell.run(Deliver(nobody, frame)) == [Publish(BackplaneDeliver(nobody, frame))]
    assert shell.run(Deliver(nobody, frame, remote=True)) == []
    assert shell.counters.drops == 0


def test_deliver_to_a_session_id() -> None:
    shell = Shell()
    fake = shell.registered()
    frame = frame_of(40)
    # A local session: offered, never published.
    assert shell.run(Deliver(ToSession(fake.session_id), frame)) == [Offer(frame, [fake])]
    # A session of another node: published once, not a drop here.
    remote = ToSession(f"{OTHER_NODE}:abc")
    assert shell.run(Deliver(remote, frame)) == [Publish(BackplaneDeliver(remote, frame))]
    assert shell.run(Deliver(remote, frame, remote=True)) == []
    assert shell.counters.drops == 0
    # A local id that is not (or no longer) here: a drop, never published.
    assert shell.run(Deliver(ToSession(f"{NODE}:ghost"), frame)) == []
    assert shell.counters.drops == 1


def test_deliver_to_a_closing_session_is_a_drop_unless_it_is_a_reply_while_draining() -> None:
    shell = Shell()
    fake = shell.registered()
    shell.run(Close(ToSession(fake.session_id), CloseCode.NORMAL, "bye", drain=True))
    assert fake.state is Lifecycle.CLOSING
    frame = frame_of(40)
    assert shell.run(Deliver(ToSession(fake.session_id), frame)) == []
    assert shell.counters.drops == 1
    # The reply to what its client sent before is still offered: it drains.
    assert shell.run(Deliver(ToSession(fake.session_id), frame, reply_to=fake)) == [
        Offer(frame, [fake])
    ]
    assert shell.counters.drops == 1 and fake.queued_messages == 1
    # Once ended, a reply is a drop too.
    shell.run(Unregister(fake, close=False))
    assert shell.run(Deliver(ToSession(fake.session_id), frame, reply_to=fake)) == []
    assert shell.counters.drops == 2


def test_a_reply_to_an_open_session_is_an_ordinary_delivery() -> None:
    shell = Shell()
    fake = shell.registered()
    frame = frame_of(40)
    assert shell.run(Deliver(ToSession(fake.session_id), frame, reply_to=fake)) == [
        Offer(frame, [fake])
    ]


# --- the hard cap -------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["messages", "bytes"])
def test_a_frame_past_the_hard_cap_closes_the_session_4008_without_drain(limit: str) -> None:
    shell = Shell()
    slow, other = shell.registered("slow"), shell.registered("other")
    size = 100 if limit == "messages" else 120  # 6 x 100 fit; 5 x 120 fit, a 6th does not
    fits = 6 if limit == "messages" else 5
    for _ in range(fits):
        shell.send(ToAll(), size, remote=True)
        shell.write(other, 10)
    assert slow.queued_messages == fits and slow.pressured
    frame = frame_of(size)
    effects = shell.run(Deliver(ToAll(), frame, remote=True))
    assert effects == [
        Offer(frame, [other]),
        WakeProducers(slow),
        Unregistered(slow),
        Unsubscribe("slow"),
        CloseSession(
            slow, CloseCode.SLOW_CONSUMER, "slow consumer", drain=False, why="its queue is full"
        ),
    ]
    assert slow.state is Lifecycle.CLOSING and not slow.pressured
    assert shell.counters.slow_consumer_closes == 1 and shell.counters.drops == 1
    assert slow.queued_messages == 0  # the shell dropped its queue
    assert shell.router.budget.queued == other.queued_bytes == size


def test_a_full_queue_of_a_draining_session_drops_the_reply_without_a_second_close() -> None:
    shell = Shell()
    fake = shell.registered()
    shell.fill(fake, 6, 100)
    shell.run(Close(ToSession(fake.session_id), CloseCode.NORMAL, "bye", drain=True))
    effects = shell.send(ToSession(fake.session_id), 100, reply_to=fake)
    assert effects == []
    assert shell.counters.drops == 1 and shell.counters.slow_consumer_closes == 0


# --- pressure, wake-ups, stuck and lagging sessions -------------------------------


def test_pressured_above_half_and_drained_at_a_quarter() -> None:
    shell = Shell()
    fake, other = shell.registered("u1"), shell.registered("u2")
    shell.fill(fake, 3, 50)
    assert not fake.pressured  # 3 messages: at the high-water mark, not above
    shell.fill(fake, 1, 50)
    assert fake.pressured and shell.router._pressured == {fake.session_id: fake}
    assert shell.router.pressured_for(ToAll()) == [fake]
    assert shell.router.pressured_for(ToUsers(frozenset({"u1"}))) == [fake]
    assert shell.router.pressured_for(ToUsers(frozenset({"u2"}))) == []
    assert shell.router.pressured_for(ToSession(fake.session_id)) == [fake]
    assert shell.router.pressured_for(ToSession(other.session_id)) == []
    assert shell.write(fake, 2) == []  # 2 left: above a quarter
    assert fake.pressured
    assert shell.write(fake, 1) == [WakeProducers(fake)]  # 1 left: drained
    assert not fake.pressured and shell.router._pressured == {}
    assert shell.run(Drained(fake)) == []  # a second report changes nothing


def test_pressure_by_bytes() -> None:
    shell = Shell()
    fake = shell.registered()
    shell.fill(fake, 2, 120)
    assert not fake.pressured
    shell.fill(fake, 1, 120)  # 360 bytes > 300
    assert fake.pressured
    shell.write(fake, 1)  # 240 bytes, 2 messages: not drained (150 bytes, 1 message)
    assert fake.pressured
    assert shell.write(fake, 1) == [WakeProducers(fake)]


@pytest.mark.parametrize(
    "command",
    [
        Close(ToAll(), CloseCode.NORMAL, "bye"),
        "unregister",
        "end",
        "expire",
    ],
)
def test_leaving_wakes_the_producers_waiting_for_a_pressured_session(command: Any) -> None:
    shell = Shell()
    fake = shell.registered(expires_at=5.0)
    shell.fill(fake, 4)
    assert fake.pressured
    if command == "unregister":
        command = Unregister(fake, close=True)
    elif command == "end":
        command = Unregister(fake, close=False)
    elif command == "expire":
        shell.now = 5.0
        command = Expire()
    effects = shell.run(command)
    assert WakeProducers(fake) in effects
    assert not fake.pressured and shell.router._pressured == {}
    assert shell.router.pressured_for(ToAll()) == []


def test_a_pressured_session_that_writes_nothing_for_stall_timeout_is_closed_by_recheck() -> None:
    shell = Shell()
    stuck, fine = shell.registered("stuck"), shell.registered("fine")
    shell.fill(stuck, 4)
    assert stuck.pressured and stuck.last_progress == 0.0
    shell.now = 0.99
    assert shell.run(Recheck([stuck])) == []
    assert shell.run(Recheck(None)) == []
    shell.now = 1.0
    effects = shell.run(Recheck([stuck, fine]))
    assert slow_closes(effects) == [stuck]
    (close,) = [e for e in effects if isinstance(e, CloseSession)]
    assert close.drain is False and close.why is not None and "wrote nothing" in close.why
    assert kinds(effects) == [
        "WakeProducers",
        "Unregistered",
        "Unsubscribe",
        "CloseSession",
    ]
    assert fine.state is Lifecycle.OPEN
    assert shell.counters.slow_consumer_closes == 1


def test_a_stuck_pressured_session_is_closed_by_the_next_deliver_that_reaches_it() -> None:
    shell = Shell()
    stuck, fine = shell.registered("stuck"), shell.registered("fine")
    shell.fill(stuck, 4)
    shell.now = 2.0
    frame = frame_of(50)
    effects = shell.run(Deliver(ToAll(), frame, remote=True))
    assert effects[0] == Offer(frame, [fine])
    assert slow_closes(effects) == [stuck]
    assert shell.counters.drops == 1  # the frame it did not get


def test_a_pressured_session_whose_oldest_frame_is_older_than_max_lag_is_closed() -> None:
    shell = Shell()
    lagging = shell.registered()
    shell.fill(lagging, 4)  # queued at 0.0
    # It keeps writing (so it is not stuck), but slower than frames come in.
    for step in range(1, 5):
        shell.now = step * 0.6
        shell.write(lagging, 1)
        shell.fill(lagging, 1)
        assert lagging.pressured and lagging.state is Lifecycle.OPEN
        assert shell.run(Recheck([lagging])) == []
    assert lagging.oldest_queued_at() == 0.6  # written at 0.6 * 4 = 2.4: 1.8s behind
    shell.now = 0.6 + LIMITS.max_lag + 0.01  # its oldest frame has now waited max_lag
    assert shell.now - lagging.last_progress < LIMITS.stall_timeout
    effects = shell.run(Recheck([lagging]))
    assert slow_closes(effects) == [lagging]
    (close,) = [e for e in effects if isinstance(e, CloseSession)]
    assert close.drain is False and close.why is not None and "max_lag" in close.why


def test_the_stall_clock_starts_with_the_work() -> None:
    """An idle session that is suddenly pressured is not stuck: its clock starts at the offer."""
    shell = Shell()
    fake = shell.registered()
    shell.now = 100.0
    shell.fill(fake, 4)
    assert fake.pressured
    assert shell.run(Recheck([fake])) == []
    assert shell.router.flow_deadline([fake]) == 100.0 + LIMITS.stall_timeout


def test_flow_deadline_is_the_earliest_stall_or_lag() -> None:
    shell = Shell()
    a, b = shell.registered(), shell.registered()
    assert shell.router.flow_deadline([]) == float("inf")
    shell.fill(a, 2)  # queued at 0.0, progress at 0.0
    shell.now = 5.0
    shell.fill(b, 1)  # queued at 5.0
    shell.now = 5.5
    shell.write(a, 1)  # progress at 5.5, oldest still 0.0
    assert shell.router.flow_deadline([a]) == min(5.5 + 1.0, 0.0 + 2.5)
    assert shell.router.flow_deadline([b]) == min(5.0 + 1.0, 5.0 + 2.5)
    assert shell.router.flow_deadline([a, b]) == 2.5


def test_recheck_spares_a_session_that_keeps_writing_under_high_water() -> None:
    """``Recheck(None)`` (a sender over the hub's budget) closes the sessions that stopped
    writing. One that keeps writing, with its queue never above half full, is not a slow
    consumer, whatever the age of its oldest frame: only a *pressured* session can be
    lagging (the module docstring), and the budget closes "the sessions that stopped
    draining".
    """
    shell = Shell()
    steady, stalled = shell.registered("steady"), shell.registered("stalled")
    shell.fill(steady, 3)  # at the high-water mark, not above it
    shell.fill(stalled, 1)  # and never written
    closed: list[FakeSession] = []
    for step in range(1, 6):
        shell.now = step * 0.9  # steady writes a frame every 0.9s (< stall_timeout)
        closed += slow_closes(shell.run(Recheck(None)))
        oldest = steady.oldest_queued_at()
        assert steady.state is Lifecycle.OPEN, (shell.now, shell.now - (oldest or 0))
        shell.write(steady, 1)
        shell.fill(steady, 1)
        assert not steady.pressured
    assert closed == [stalled]


# --- close --------------------------------------------------------------------------


@pytest.mark.parametrize("drain", [True, False])
def test_close_propagates_code_reason_and_drain(drain: bool) -> None:
    shell = Shell()
    a, b, c = shell.registered("u1"), shell.registered("u1"), shell.registered("u2")
    target = ToUsers(frozenset({"u1"}))
    effects = shell.run(Close(target, 4321, "go", drain=drain))
    closes = [e for e in effects if isinstance(e, CloseSession)]
    assert {e.session for e in closes} == {a, b}
    assert all((e.code, e.reason, e.drain, e.why) == (4321, "go", drain, None) for e in closes)
    assert effects.count(Unsubscribe("u1")) == 1
    assert effects[-1] == Publish(BackplaneClose(target, 4321, "go"))
    assert a.state is b.state is Lifecycle.CLOSING and c.state is Lifecycle.OPEN
    # Nobody left to close here: it is still published, unless it came from the backplane.
    assert shell.run(Close(target, 4321, "go", drain=drain)) == [
        Publish(BackplaneClose(target, 4321, "go"))
    ]
    assert shell.run(Close(target, 4321, "go", drain=drain, remote=True)) == []


def test_close_of_a_session_id_publishes_only_if_it_is_elsewhere() -> None:
    shell = Shell()
    fake = shell.registered()
    assert kinds(shell.run(Close(ToSession(fake.session_id), 1000, "x"))) == [
        "Unregistered",
        "Unsubscribe",
        "CloseSession",
    ]
    assert shell.run(Close(ToSession(fake.session_id), 1000, "x")) == []
    remote = ToSession(f"{OTHER_NODE}:s1")
    assert shell.run(Close(remote, 1000, "x")) == [Publish(BackplaneClose(remote, 1000, "x"))]
    assert shell.run(Close(remote, 1000, "x", remote=True)) == []
    assert shell.run(Close(ToAll(), 1000, "x", remote=True)) == []


# --- expiry ----------------------------------------------------------------------------


def test_expire_closes_4005_with_a_drain_at_the_deadline() -> None:
    shell = Shell()
    fake = shell.registered(expires_at=10.0)
    assert fake.expires_at == 10.0 and shell.router.next_expiry() == 10.0
    shell.now = 9.99
    assert shell.run(Expire()) == []
    shell.now = 10.0
    assert shell.run(Expire()) == [
        Unregistered(fake),
        Unsubscribe("u1"),
        CloseSession(
            fake,
            CloseCode.AUTH_EXPIRED,
            "authentication expired",
            drain=True,
            why="credentials expired",
        ),
    ]
    assert shell.router.next_expiry() is None
    assert shell.run(Expire()) == []


def test_refresh_to_a_later_deadline_before_it_passes() -> None:
    shell = Shell()
    fake = shell.registered(expires_at=10.0)
    shell.now = 5.0
    assert shell.run(Refresh(fake, 20.0)) == []
    shell.now = 15.0
    assert shell.run(Expire()) == []  # the stale entry for 10.0 is skipped
    assert fake.state is Lifecycle.OPEN
    shell.now = 20.0
    assert CloseSession in map(type, shell.run(Expire()))


def test_refresh_after_the_deadline_passed_but_before_expire_wins() -> None:
    """The router decides at ``Expire``, with the latest deadline it was given.

    A refresh that arrives after the deadline passed, but before the hub got
    round to ``Expire``, keeps the session: the latest ``Refresh`` wins,
    whether it moves the deadline later, earlier, or removes it.
    """
    shell = Shell()
    later, never, earlier = (shell.registered(expires_at=10.0) for _ in range(3))
    shell.now = 12.0
    shell.run(Refresh(later, 30.0))
    shell.run(Refresh(never, None))
    shell.run(Refresh(earlier, 11.0))  # already past: it goes at the next Expire
    effects = shell.run(Expire())
    assert [e.session for e in effects if isinstance(e, CloseSession)] == [earlier]
    assert later.state is never.state is Lifecycle.OPEN
    shell.now = 1e9
    assert [e.session for e in shell.run(Expire()) if isinstance(e, CloseSession)] == [later]
    assert never.state is Lifecycle.OPEN and shell.router.next_expiry() is None


def test_refresh_of_a_closing_or_ended_session_does_nothing() -> None:
    shell = Shell()
    closing, ended = shell.registered(expires_at=10.0), shell.registered(expires_at=10.0)
    shell.run(Close(ToSession(closing.session_id), 1000, "bye"))
    shell.run(Unregister(ended, close=False))
    for fake in (closing, ended):
        assert shell.run(Refresh(fake, 50.0)) == []
        assert fake.expires_at == 10.0
    shell.now = 60.0
    assert shell.run(Expire()) == []


def test_the_expiry_heap_stays_bounded_under_many_refreshes() -> None:
    shell = Shell()
    fake = shell.registered(expires_at=1.0)
    for step in range(5000):
        shell.run(Refresh(fake, 2.0 + step))
    assert len(shell.router._expiries) <= 2 * 1 + 1024 + 1
    shell.now = 5000.0
    assert shell.run(Expire()) == []  # every stale entry comes up, none closes
    shell.now = 5001.0
    assert CloseSession in map(type, shell.run(Expire()))


# --- the state machine ------------------------------------------------------------


USERS = ["u1", "u2", "u3"]
SIZES = [20, 60, 150]  # wire sizes: either cap can be reached exactly (6 x 20, 4 x 150)


@settings(max_examples=150, stateful_step_count=60, deadline=None)
class RouterMachine(RuleBasedStateMachine):
    """Random commands against a Router and a model of the shell.

    Checked after every command (``run``) or step (the invariants):

    * the registry's own invariants; a session is registered iff it is OPEN;
    * ``Registered`` at most once per session, ``Unregistered`` exactly once
      for a session that was registered and has left, never otherwise;
    * ``Subscribe``/``Unsubscribe`` pair up: the users subscribed are the
      users with a registered session;
    * no queue passes the hard cap; the hub-wide budget is the sum of the queues;
    * pressure: ``router._pressured`` holds exactly the sessions flagged
      pressured, all OPEN, all above the low-water mark (the writer reports
      progress); a registered session above the high-water mark is pressured;
      ``WakeProducers`` comes exactly when a session stops being pressured;
    * offers reach OPEN sessions only, or a CLOSING one as the reply it asked for;
    * every slow-consumer close (4008, no drain) is explained: its queue was
      full, or it was stuck (no write for ``stall_timeout`` with frames queued)
      or pressured and lagging (oldest frame older than ``max_lag``);
      ``Recheck`` and ``Deliver`` close exactly those;
    * ``Close`` passes its code, reason and drain on; ``Expire`` closes exactly
      the sessions past their latest deadline, with 4005 and a drain;
    * one ``Publish`` exactly for a non-remote Deliver or Close whose target
      may be elsewhere, none otherwise; drops are counted as the router says.
    """

    sessions = Bundle("sessions")

    def __init__(self) -> None:
        super().__init__()
        self.shell = Shell()
        self.router = self.shell.router
        self.registered_effects: Counter[str] = Counter()
        self.unregistered_effects: Counter[str] = Counter()
        self.close_effects: Counter[str] = Counter()
        self.subscribed: set[str] = set()
        self.commands = 0

    # --- helpers ---

    @property
    def now(self) -> float:
        return self.shell.now

    def stuck_or_lagging(self, fake: FakeSession, *, lag: bool = True) -> bool:
        if self.now - fake.last_progress >= LIMITS.stall_timeout:
            return True
        oldest = fake.oldest_queued_at()
        return lag and oldest is not None and self.now - oldest >= LIMITS.max_lag

    def over_cap(self, fake: FakeSession, size: int) -> bool:
        return (
            fake.queued_messages + 1 > LIMITS.max_messages
            or fake.queued_bytes + size > LIMITS.max_bytes
        )

    def run(self, command: Any) -> list[Any]:
        """Run ``command`` through the shell and check what its effects must be."""
        self.commands += 1
        router, counters = self.router, self.shell.counters
        fakes = self.shell.sessions
        state_before = {f.session_id: f.state for f in fakes}
        pressured_before = {f.session_id for f in fakes if f.pressured}
        drops_before = counters.drops
        slow_before = counters.slow_consumer_closes
        expected_slow: set[str] | None = None
        expected_drops: int | None = None
        expected_closes: set[str] | None = None
        match command:
            case Deliver(target=target, frame=frame, reply_to=reply_to):
                recipients = [f for _, f in router.registry.resolve(target)]
                if not recipients and reply_to is not None and reply_to.state is Lifecycle.CLOSING:
                    recipients = [reply_to]
                expected_slow, expected_drops, offered = set(), 0, []
                for fake in recipients:
                    if self.over_cap(fake, len(frame.wire)):
                        expected_drops += 1
                        if fake.state is Lifecycle.OPEN:
                            expected_slow.add(fake.session_id)
                    elif fake.pressured and self.stuck_or_lagging(fake):
                        expected_drops += 1
                        expected_slow.add(fake.session_id)
                    else:
                        offered.append(fake)
                if not recipients and isinstance(target, ToSession) and is_local(target, NODE):
                    expected_drops += 1
                expected_closes = expected_slow
            case Recheck(sessions=None):
                expected_slow = {
                    f.session_id
                    for _, f in router.registry.resolve(ToAll())
                    if f.queued_messages and self.stuck_or_lagging(f, lag=f.pressured)
                }
                expected_closes = expected_slow
            case Recheck(sessions=listed):
                expected_slow = {
                    f.session_id
                    for f in listed
                    if f.pressured and f.state is Lifecycle.OPEN and self.stuck_or_lagging(f)
                }
                expected_closes = expected_slow
            case Close(target=target):
                expected_slow = set()
                expected_closes = {f.session_id for _, f in router.registry.resolve(target)}
            case Expire():
                expected_slow = set()
                expected_closes = {
                    f.session_id
                    for _, f in router.registry.resolve(ToAll())
                    if f.expires_at is not None and f.expires_at <= self.now
                }

        effects = self.shell.run(command)

        woken: list[str] = []
        offered_to: list[FakeSession] = []
        publishes = 0
        closed_now: list[CloseSession[FakeSession]] = []
        for effect in effects:
            match effect:
                case Registered(session=fake):
                    self.registered_effects[fake.session_id] += 1
                    assert self.registered_effects[fake.session_id] == 1, effect
                case Unregistered(session=fake):
                    self.unregistered_effects[fake.session_id] += 1
                    assert self.unregistered_effects[fake.session_id] == 1, effect
                    assert self.registered_effects[fake.session_id] == 1, effect
                case Subscribe(user_id=user):
                    assert user not in self.subscribed, effect
                    self.subscribed.add(user)
                case Unsubscribe(user_id=user):
                    assert user in self.subscribed, effect
                    self.subscribed.remove(user)
                case WakeProducers(session=fake):
                    woken.append(fake.session_id)
                case Publish(message=message):
                    publishes += 1
                    if isinstance(command, Deliver):
                        assert message == BackplaneDeliver(command.target, command.frame)
                    else:
                        assert isinstance(command, Close)
                        assert message == BackplaneClose(
                            command.target, command.code, command.reason
                        )
                case CloseSession(session=fake):
                    closed_now.append(effect)
                    self.close_effects[fake.session_id] += 1
                    assert self.close_effects[fake.session_id] == 1, effect
                    assert state_before[fake.session_id] in (
                        Lifecycle.CONNECTING,
                        Lifecycle.OPEN,
                    ), effect
                    assert fake.state is Lifecycle.CLOSING, effect
                case Offer(sessions=sessions):
                    assert isinstance(command, Deliver) and not offered_to and sessions
                    offered_to = sessions
                    for fake in offered_to:
                        before = state_before[fake.session_id]
                        assert before is Lifecycle.OPEN or (
                            before is Lifecycle.CLOSING and command.reply_to is fake
                        ), (fake, before, command)
                        assert fake.state is before, fake

        # WakeProducers exactly for the sessions that stopped being pressured.
        pressured_after = {f.session_id for f in fakes if f.pressured}
        assert sorted(woken) == sorted(pressured_before - pressured_after), (woken, effects)

        # Slow-consumer closes: no drain, counted, and exactly the expected ones.
        slow = [c for c in closed_now if c.code == CloseCode.SLOW_CONSUMER]
        assert all(c.drain is False and c.reason == "slow consumer" for c in slow), slow
        assert counters.slow_consumer_closes - slow_before == len(slow)
        if expected_slow is not None:
            assert {c.session.session_id for c in slow} == expected_slow, (command, effects)
        else:
            assert not slow, (command, effects)
        if expected_closes is not None:
            assert {c.session.session_id for c in closed_now} == expected_closes, effects

        match command:
            case Deliver(target=target, remote=remote):
                assert publishes == (0 if remote or is_local(target, NODE) else 1), effects
                assert counters.drops - drops_before == expected_drops, effects
                assert offered_to == offered, effects
                for fake in offered:
                    # Newly pressured exactly when an offer takes it above high water.
                    above_high = (
                        fake.queued_messages > LIMITS.high_messages
                        or fake.queued_bytes > LIMITS.high_bytes
                    )
                    if fake.session_id not in pressured_before and fake.state is Lifecycle.OPEN:
                        assert fake.pressured == above_high, fake
            case Close(target=target, code=code, reason=reason, drain=drain, remote=remote):
                assert publishes == (0 if remote or is_local(target, NODE) else 1), effects
                assert all((c.code, c.reason, c.drain) == (code, reason, drain) for c in closed_now)
            case Expire():
                assert all(
                    (c.code, c.drain) == (CloseCode.AUTH_EXPIRED, True) for c in closed_now
                ), closed_now
            case _:
                assert publishes == 0, effects
        if not isinstance(command, Deliver):
            assert counters.drops == drops_before, (command, effects)
        return effects

    # --- rules: sessions ---

    @initialize(
        target=sessions,
        users=st.lists(st.sampled_from(USERS), min_size=1, max_size=4),
        ttl=st.one_of(st.none(), st.sampled_from([1.0, 4.0])),
    )
    def open_sessions(self, users: list[str], ttl: float | None) -> Any:
        fakes = [self.shell.session(user) for user in users]
        for fake in fakes:
            self.run(Register(fake, None if ttl is None else self.now + ttl))
        return multiple(*fakes)

    @rule(target=sessions, user=st.sampled_from(USERS))
    def new_session(self, user: str) -> FakeSession:
        return self.shell.session(user)

    @rule(fake=sessions, ttl=st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 0.5, 2.0, 5.0])))
    def register(self, fake: FakeSession, ttl: float | None) -> None:
        state, accepting = fake.state, self.router.accepting
        effects = self.run(Register(fake, None if ttl is None else self.now + ttl))
        if state is not Lifecycle.CONNECTING:
            assert effects == []
        elif accepting:
            assert fake.state is Lifecycle.OPEN and Registered(fake) in effects
        else:
            assert effects == [
                CloseSession(fake, CloseCode.GOING_AWAY, "hub is shutting down", False)
            ]

    @rule(fake=sessions, close=st.booleans())
    def unregister(self, fake: FakeSession, close: bool) -> None:
        state = fake.state
        effects = self.run(Unregister(fake, close))
        if close:
            assert (CloseSession in map(type, effects)) == (
                state in (Lifecycle.CONNECTING, Lifecycle.OPEN)
            )
        else:
            assert fake.state is Lifecycle.ENDED and effects[-1] == Discard(fake)

    # --- rules: messages ---

    @rule(size=st.sampled_from(SIZES), remote=st.booleans())
    def deliver_to_all(self, size: int, remote: bool) -> None:
        self.run(Deliver(ToAll(), frame_of(size), remote=remote))

    @rule(
        count=st.integers(1, 6),
        to_all=st.booleans(),
        user=st.sampled_from(USERS),
        size=st.sampled_from(SIZES),
        drain_to=st.one_of(st.none(), st.integers(0, 3)),
    )
    def burst(self, count: int, to_all: bool, user: str, size: int, drain_to: int | None) -> None:
        """Several sends in a row, as a producer that does not wait would make them; then,
        unless ``drain_to`` is None, each writer writes all but ``drain_to`` frames."""
        target = ToAll() if to_all else ToUsers(frozenset({user}))
        for _ in range(count):
            self.run(Deliver(target, frame_of(size), remote=True))
        if drain_to is not None:
            for _, fake in self.router.registry.resolve(target):
                self.writer_drains_to(fake, drain_to)

    @rule(
        users=st.frozensets(st.sampled_from([*USERS, "elsewhere"]), max_size=3),
        size=st.sampled_from(SIZES),
        remote=st.booleans(),
    )
    def deliver_to_users(self, users: frozenset[str], size: int, remote: bool) -> None:
        self.run(Deliver(ToUsers(users), frame_of(size), remote=remote))

    @rule(
        fake=sessions,
        where=st.sampled_from(["it", "reply", "other node", "ghost"]),
        size=st.sampled_from(SIZES),
        remote=st.booleans(),
    )
    def deliver_to_session(self, fake: FakeSession, where: str, size: int, remote: bool) -> None:
        frame = frame_of(size)
        if where == "reply":
            # What the hub does for a callback's answer: to the session, on its behalf.
            self.run(Deliver(ToSession(fake.session_id), frame, reply_to=fake))
        elif where == "it":
            self.run(Deliver(ToSession(fake.session_id), frame, remote=remote))
        elif where == "other node":
            self.run(Deliver(ToSession(f"{OTHER_NODE}:x"), frame, remote=remote))
        else:
            self.run(Deliver(ToSession(f"{NODE}:ghost"), frame, remote=remote))

    @rule(
        fake=sessions,
        kind=st.sampled_from(["session", "users", "all", "other node"]),
        code=st.sampled_from([CloseCode.NORMAL, 4444]),
        drain=st.booleans(),
        remote=st.booleans(),
    )
    def close(self, fake: FakeSession, kind: str, code: int, drain: bool, remote: bool) -> None:
        target: Target = {
            "session": ToSession(fake.session_id),
            "users": ToUsers(frozenset({fake.user_id})),
            "all": ToAll(),
            "other node": ToSession(f"{OTHER_NODE}:y"),
        }[kind]
        self.run(Close(target, code, "closed", drain=drain, remote=remote))

    # --- rules: the writer, time, flow-control checks ---

    @rule(fake=sessions, count=st.integers(1, 4))
    def writer_takes(self, fake: FakeSession, count: int) -> None:
        if fake.take(count, self.now) and fake.pressured:
            self.run(Drained(fake))

    @rule(fake=sessions, left=st.integers(0, 3))
    def writer_drains_to(self, fake: FakeSession, left: int) -> None:
        """One write that leaves ``left`` frames queued: around the low-water mark."""
        if fake.queued_messages > left:
            self.writer_takes(fake, fake.queued_messages - left)

    @rule(
        fake=sessions,
        backlog=st.integers(2, 5),
        arrivals=st.lists(st.sampled_from([0, 1, 1, 1, 2]), min_size=1, max_size=8),
        size=st.sampled_from(SIZES),
    )
    def slow_reader(self, fake: FakeSession, backlog: int, arrivals: list[int], size: int) -> None:
        """A reader ``backlog`` frames behind that writes one frame every 0.7s (never stuck)
        while frames arrive about as fast: its queue wanders around that depth, and its
        oldest frame can grow older than max_lag. Each sender first rechecks the pressured
        sessions it reaches, as the hub's do."""
        target = ToSession(fake.session_id)
        for _ in range(backlog):
            self.run(Deliver(target, frame_of(size)))
        for count in arrivals:
            self.shell.now += 0.7
            self.run(Recheck(self.router.pressured_for(target)))
            self.writer_takes(fake, 1)
            for _ in range(count):
                self.run(Deliver(target, frame_of(size)))

    @rule(fake=sessions)
    def spurious_drained(self, fake: FakeSession) -> None:
        self.run(Drained(fake))

    @rule(dt=st.sampled_from([0.1, 0.4, 1.0, 3.0]))
    def time_passes(self, dt: float) -> None:
        self.shell.now += dt

    @rule()
    def recheck_pressured(self) -> None:
        # What a waiting sender does: recheck the pressured sessions its target reaches.
        self.run(Recheck(self.router.pressured_for(ToAll())))

    @rule(listed=st.lists(sessions, max_size=3))
    def recheck_listed(self, listed: list[FakeSession]) -> None:
        self.run(Recheck(listed))

    @rule()
    def recheck_all(self) -> None:
        self.run(Recheck(None))

    # --- rules: expiry and shutdown ---

    @rule(fake=sessions, ttl=st.one_of(st.none(), st.sampled_from([-1.0, 0.0, 0.5, 3.0])))
    def refresh(self, fake: FakeSession, ttl: float | None) -> None:
        state, before = fake.state, fake.expires_at
        expires_at = None if ttl is None else self.now + ttl
        assert self.run(Refresh(fake, expires_at)) == []
        if state in (Lifecycle.CONNECTING, Lifecycle.OPEN):
            assert fake.expires_at == expires_at
        else:
            assert fake.expires_at == before

    @rule()
    def expire(self) -> None:
        self.run(Expire())

    @rule(fake=sessions, ttl=st.sampled_from([None, 0.5, 3.0]), late=st.booleans())
    def refresh_races_expiry(self, fake: FakeSession, ttl: float | None, late: bool) -> None:
        """A refresh just before the deadline, or (``late``) after it passed but before the
        hub handled ``Expire``; then the deadline passes and the hub handles ``Expire``."""
        deadline = fake.expires_at
        if deadline is None:
            return
        if late:
            self.shell.now = max(self.now, deadline)
        self.refresh(fake, ttl)
        self.shell.now = max(self.now, deadline)
        self.run(Expire())  # closes it only if the refresh came too late to count

    @precondition(lambda self: self.router.accepting and self.commands > 30)
    @rule()
    def shutdown(self) -> None:
        # What the hub does on shutdown: refuse registrations, close everyone with a drain.
        self.router.accepting = False
        self.run(Close(ToAll(), CloseCode.GOING_AWAY, "hub is shutting down", remote=True))

    # --- invariants ---

    @invariant()
    def registry_matches_lifecycle(self) -> None:
        registry = self.router.registry
        registry.check_invariants()
        assert set(registry.session_ids()) == {
            f.session_id for f in self.shell.sessions if f.state is Lifecycle.OPEN
        }
        for fake in self.shell.sessions:
            assert registry.get(fake.session_id) in (None, fake)

    @invariant()
    def unregistered_exactly_once(self) -> None:
        for fake in self.shell.sessions:
            registered = self.registered_effects[fake.session_id]
            unregistered = self.unregistered_effects[fake.session_id]
            if fake.state is Lifecycle.OPEN:
                assert (registered, unregistered) == (1, 0), fake
            else:
                assert unregistered == registered <= 1, fake
        counters = self.shell.counters
        assert counters.sessions_opened == sum(self.registered_effects.values())
        assert counters.sessions_closed == sum(self.unregistered_effects.values())

    @invariant()
    def subscriptions_pair_up(self) -> None:
        assert self.subscribed == set(self.router.registry.user_ids())

    @invariant()
    def queues_within_the_hard_cap(self) -> None:
        for fake in self.shell.sessions:
            assert fake.queued_messages <= LIMITS.max_messages, fake
            assert fake.queued_bytes <= LIMITS.max_bytes, fake
            assert fake.queued_messages == len(fake.queue)
            assert fake.queued_bytes == sum(size for size, _ in fake.queue)
        assert self.router.budget.queued == sum(f.queued_bytes for f in self.shell.sessions)

    @invariant()
    def pressure_is_consistent(self) -> None:
        flagged = {f.session_id: f for f in self.shell.sessions if f.pressured}
        assert self.router._pressured == flagged
        for fake in self.shell.sessions:
            above_high = (
                fake.queued_messages > LIMITS.high_messages or fake.queued_bytes > LIMITS.high_bytes
            )
            above_low = (
                fake.queued_messages > LIMITS.low_messages or fake.queued_bytes > LIMITS.low_bytes
            )
            if fake.pressured:
                assert fake.state is Lifecycle.OPEN, fake
                assert above_low, fake  # else a Drained would have woken its producers
            elif fake.state is Lifecycle.OPEN:
                assert not above_high, fake

    @invariant()
    def closed_sessions_stay_closed(self) -> None:
        for fake in self.shell.sessions:
            if fake.closed is not None:  # the shell was told to close it: it never reopens
                assert fake.state in (Lifecycle.CLOSING, Lifecycle.ENDED), fake
            if fake.state is Lifecycle.OPEN:
                # Nothing ever offered to an open session was refused by its queue.
                assert fake.accepts and fake.refused == 0, fake
            if not fake.accepts:
                assert fake.queued_messages == 0, fake


TestRouterMachine = RouterMachine.TestCase
