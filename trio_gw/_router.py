"""The hub's decisions: who is registered, who gets a message, who is closed, who waits.

This is the hub's one decision core, in the spirit of h11: synchronous, with no
trio and no I/O, so that it can be tested without sockets. The hub's Trio shell
turns each request into a command, calls ``Router.handle(command, now)``, and
carries out the effects it returns (offer a frame to sessions, close a session,
wake the producers waiting on one, publish to the backplane, subscribe or
unsubscribe a user). The actor loop and the senders' inline path call the same
``handle``; no other code changes the registry or the expiry heap.

Flow control (see the README's Design section):

* A session's queue has a hard cap (``outbound_queue_size`` messages,
  ``outbound_queue_bytes`` bytes). A frame that would pass it is not queued,
  and the session is closed as a slow consumer (4008). This bounds memory
  whatever the producers do.
* Above the high-water mark (half the cap) a session is *pressured*: a send
  that reaches it is queued, and then the sender waits (``pressured_for``)
  until the session drains below the low-water mark (a quarter of the cap),
  leaves, or is found stuck or lagging. Everyone else has had the frame by then.
* A pressured session is *stuck* when it has written nothing for
  ``stall_timeout``, and *lagging* when its oldest queued frame is older than
  ``max_lag``. Either closes it with 4008: no reader holds the producers
  longer than that, and the slowest reader they wait for reads at least
  ``high water / max_lag`` bytes per second.
* All sessions' queues together have a budget (``queued_bytes_budget``); a
  send that finds the hub over it waits until the queues drain to three
  quarters of it, and the sessions that stopped draining meanwhile are closed.

Sessions are reached through ``SessionHandle``, a narrow protocol: the router
reads their queue levels and lifecycle state, and sets only the two fields it
owns (``pressured``, ``expires_at``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

import attrs

from ._backplane import BackplaneClose, BackplaneDeliver, BackplaneMessage
from ._close_codes import CloseCode
from ._frames import Frame
from ._lifecycle import Lifecycle, Transition, advance
from ._registry import Registry, SessionAdded, SessionRemoved, UserJoined, UserLeft
from ._statistics import Counters
from ._targets import Target, ToAll, ToSession, ToUsers, is_local

__all__ = [
    "Close",
    "CloseSession",
    "Deliver",
    "Discard",
    "Drained",
    "Effect",
    "Expire",
    "FlowLimits",
    "Offer",
    "Publish",
    "QueueBudget",
    "Recheck",
    "Refresh",
    "Register",
    "Registered",
    "Router",
    "SessionHandle",
    "Subscribe",
    "Unregister",
    "Unregistered",
    "Unsubscribe",
    "WakeProducers",
]


class SessionHandle(Protocol):
    """What the router needs of a session."""

    @property
    def session_id(self) -> str:
        """The session's id."""
        ...

    @property
    def user_id(self) -> str:
        """The user it belongs to."""
        ...

    #: Lifecycle state; changed only through ``_lifecycle.advance``.
    state: Lifecycle
    #: Frames and bytes in its outbound queue now.
    queued_messages: int
    queued_bytes: int
    #: When its writer last finished a write, or its queue last became
    #: non-empty while the writer was idle (trio clock).
    last_progress: float
    #: Owned by the router: over the high-water mark and not yet drained.
    pressured: bool
    #: Owned by the router: when its credentials expire (trio clock), or None.
    expires_at: float | None

    def oldest_queued_at(self) -> float | None:
        """When its oldest queued frame was queued (to within a few ms), or None."""
        ...


H = TypeVar("H", bound=SessionHandle)


@attrs.define
class QueueBudget:
    """The bytes queued for every session together; sessions keep ``queued`` up to date."""

    queued: int = 0


@attrs.frozen
class FlowLimits:
    """The flow-control thresholds, derived from the hub's settings."""

    max_messages: int
    max_bytes: int
    stall_timeout: float
    max_lag: float
    budget_bytes: int

    @property
    def high_messages(self) -> int:
        """Pressured above this many queued messages."""
        return self.max_messages // 2

    @property
    def high_bytes(self) -> int:
        """Pressured above this many queued bytes."""
        return self.max_bytes // 2

    @property
    def low_messages(self) -> int:
        """Drained at or below this many queued messages."""
        return self.max_messages // 4

    @property
    def low_bytes(self) -> int:
        """Drained at or below this many queued bytes."""
        return self.max_bytes // 4

    @property
    def budget_resume(self) -> int:
        """Senders waiting on the budget resume at or below this many queued bytes."""
        return self.budget_bytes * 3 // 4


# --- commands ------------------------------------------------------------------


@attrs.frozen
class Register(Generic[H]):
    """Add an accepted session to the registry."""

    session: H
    expires_at: float | None = None


@attrs.frozen
class Unregister(Generic[H]):
    """Remove a session: closing it gracefully (``close``), or because its connection ended."""

    session: H
    close: bool


@attrs.frozen
class Deliver(Generic[H]):
    """Queue ``frame`` for whoever ``target`` names."""

    target: Target
    frame: Frame
    remote: bool = False  # came from another node: do not publish it again
    # A reply: the session that asked, reached even while it drains (unregistered).
    reply_to: H | None = None


@attrs.frozen
class Close:
    """Close whoever ``target`` names."""

    target: Target
    code: int
    reason: str
    drain: bool = True
    remote: bool = False


@attrs.frozen
class Refresh(Generic[H]):
    """A session's credentials now expire at ``expires_at`` (trio clock), or never."""

    session: H
    expires_at: float | None


@attrs.frozen
class Expire:
    """Close every session whose credentials have expired by now."""


@attrs.frozen
class Recheck(Generic[H]):
    """Close those of ``sessions`` (or of every session, if None) that are stuck or lagging."""

    sessions: Sequence[H] | None = None


@attrs.frozen
class Drained(Generic[H]):
    """A pressured session's writer made progress; it may be below the low-water mark."""

    session: H


Command = (
    Register[H] | Unregister[H] | Deliver[H] | Close | Refresh[H] | Expire | Recheck[H] | Drained[H]
)


# --- effects -------------------------------------------------------------------


@attrs.frozen
class Offer(Generic[H]):
    """Queue ``frame`` on each of ``sessions`` (the router checked that it fits)."""

    frame: Frame
    sessions: list[H]


@attrs.frozen
class CloseSession(Generic[H]):
    """Start closing ``session``; ``why`` is set for the closes worth a log line."""

    session: H
    code: int
    reason: str
    drain: bool
    why: str | None = None


@attrs.frozen
class Discard(Generic[H]):
    """The session's connection ended: drop (and count) what is still queued."""

    session: H


@attrs.frozen
class WakeProducers(Generic[H]):
    """Wake the senders waiting for ``session`` to drain."""

    session: H


@attrs.frozen
class Publish:
    """Hand ``message`` to the backplane for the other nodes."""

    message: BackplaneMessage


@attrs.frozen
class Subscribe:
    """This node now holds a session of ``user_id``: listen for the user's messages."""

    user_id: str


@attrs.frozen
class Unsubscribe:
    """This node's last session of ``user_id`` left."""

    user_id: str


@attrs.frozen
class Registered(Generic[H]):
    """``session`` joined the registry (the shell greets it and logs it)."""

    session: H


@attrs.frozen
class Unregistered(Generic[H]):
    """``session`` left the registry."""

    session: H


Effect = (
    Offer[H]
    | CloseSession[H]
    | Discard[H]
    | WakeProducers[H]
    | Publish
    | Subscribe
    | Unsubscribe
    | Registered[H]
    | Unregistered[H]
)


class Router(Generic[H]):
    """The registry, the expiry heap and the delivery policy of one hub node.

    Args:
        node_id: This node's id (session ids name it).
        limits: The flow-control thresholds.
        counters: The hub's counters; the router counts what it decides
            (registrations, drops, slow-consumer closes).
    """

    def __init__(self, node_id: str, limits: FlowLimits, counters: Counters) -> None:
        self.node_id = node_id
        self.limits = limits
        self.counters = counters
        self.registry: Registry[H] = Registry()
        self.budget = QueueBudget()
        #: False once the hub is shutting down: registrations are refused.
        self.accepting = True
        self._pressured: dict[str, H] = {}
        # (deadline, tie-breaker, session id); stale entries are skipped when
        # they come up, and swept when they outnumber the live sessions.
        self._expiries: list[tuple[float, int, str]] = []
        self._expiry_seq = itertools.count()

    # --- queries -----------------------------------------------------------------

    def pressured_for(self, target: Target) -> list[H]:
        """The pressured sessions ``target`` reaches: a sender to it waits for these."""
        pressured = self._pressured
        if not pressured:
            return []
        match target:
            case ToSession(session_id=session_id):
                found = pressured.get(session_id)
                return [] if found is None else [found]
            case ToUsers(user_ids=user_ids):
                return [s for s in pressured.values() if s.user_id in user_ids]
            case ToAll():
                return list(pressured.values())

    def over_budget(self) -> bool:
        """True while the queues together hold more than the budget."""
        return self.budget.queued > self.limits.budget_bytes

    def flow_deadline(self, sessions: Iterable[H]) -> float:
        """The earliest time one of ``sessions`` can become stuck or lagging."""
        limits = self.limits
        deadline = float("inf")
        for session in sessions:
            deadline = min(deadline, session.last_progress + limits.stall_timeout)
            oldest = session.oldest_queued_at()
            if oldest is not None:
                deadline = min(deadline, oldest + limits.max_lag)
        return deadline

    def next_expiry(self) -> float | None:
        """When the earliest scheduled expiry is due (it may be stale), or None."""
        return self._expiries[0][0] if self._expiries else None

    # --- the one entry point ---------------------------------------------------

    def handle(self, command: Command[H], now: float) -> list[Effect[H]]:
        """Decide what ``command`` means now; return the effects to carry out, in order."""
        match command:
            case Deliver(target=target, frame=frame, remote=remote, reply_to=reply_to):
                return self._deliver(target, frame, remote, reply_to, now)
            case Register(session=session, expires_at=expires_at):
                return self._register(session, expires_at)
            case Unregister(session=session, close=close):
                return self._unregister(session, close)
            case Close(target=target, code=code, reason=reason, drain=drain, remote=remote):
                return self._close(target, code, reason, drain, remote)
            case Refresh(session=session, expires_at=expires_at):
                self._refresh(session, expires_at)
                return []
            case Expire():
                return self._expire(now)
            case Recheck(sessions=sessions):
                return self._recheck(sessions, now)
            case Drained(session=session):
                return self._drained(session)
        raise TypeError(f"not a router command: {command!r}")  # pragma: no cover

    # --- deliveries ----------------------------------------------------------------

    def _deliver(
        self, target: Target, frame: Frame, remote: bool, reply_to: H | None, now: float
    ) -> list[Effect[H]]:
        effects: list[Effect[H]] = []
        limits, counters = self.limits, self.counters
        size = len(frame.wire)
        recipients = self.registry.resolve(target)
        if not recipients and reply_to is not None and reply_to.state is Lifecycle.CLOSING:
            # Unregistered because it is closing: a draining session still
            # takes the replies to what its client sent.
            recipients = [(reply_to.session_id, reply_to)]
        offered: list[H] = []
        max_messages, max_bytes = limits.max_messages, limits.max_bytes
        high_messages, high_bytes = limits.high_messages, limits.high_bytes
        for _, session in recipients:
            messages = session.queued_messages + 1
            queued = session.queued_bytes + size
            if messages > max_messages or queued > max_bytes:
                counters.drops += 1
                if session.state is Lifecycle.OPEN:
                    effects += self._close_slow(session, "its queue is full")
                continue
            if session.pressured:
                why = self._stuck_or_lagging(session, now)
                if why is not None:
                    counters.drops += 1
                    effects += self._close_slow(session, why)
                    continue
            elif (messages > high_messages or queued > high_bytes) and (
                session.state is Lifecycle.OPEN
            ):
                session.pressured = True
                self._pressured[session.session_id] = session
            offered.append(session)
        if offered:
            effects.insert(0, Offer(frame, offered))
        if not recipients and isinstance(target, ToSession) and is_local(target, self.node_id):
            counters.drops += 1  # a session that is not (or no longer) here
        if not remote and not is_local(target, self.node_id):
            effects.append(Publish(BackplaneDeliver(target, frame)))
        return effects

    def _stuck_or_lagging(self, session: H, now: float, *, lag: bool = True) -> str | None:
        limits = self.limits
        if now - session.last_progress >= limits.stall_timeout:
            return f"it wrote nothing for {limits.stall_timeout}s with messages queued"
        if not lag:
            return None
        oldest = session.oldest_queued_at()
        if oldest is not None and now - oldest >= limits.max_lag:
            return f"its oldest queued message waited more than max_lag ({limits.max_lag}s)"
        return None

    def _close_slow(self, session: H, why: str) -> list[Effect[H]]:
        self.counters.slow_consumer_closes += 1
        effects = self._remove(session)
        advance(session, Transition.CLOSE)
        effects.append(
            CloseSession(session, CloseCode.SLOW_CONSUMER, "slow consumer", drain=False, why=why)
        )
        return effects

    def _recheck(self, sessions: Sequence[H] | None, now: float) -> list[Effect[H]]:
        effects: list[Effect[H]] = []
        if sessions is None:
            candidates = [s for _, s in self.registry.resolve(ToAll()) if s.queued_messages]
        else:
            candidates = [s for s in sessions if s.pressured]
        for session in candidates:
            if self.registry.get(session.session_id) is not session:
                continue
            # Over the budget, a session that still drains is left alone
            # unless it is pressured: only those hold a sender back.
            why = self._stuck_or_lagging(session, now, lag=session.pressured)
            if why is not None:
                effects += self._close_slow(session, why)
        return effects

    def _drained(self, session: H) -> list[Effect[H]]:
        limits = self.limits
        if not session.pressured or (
            session.queued_messages > limits.low_messages or session.queued_bytes > limits.low_bytes
        ):
            return []
        session.pressured = False
        del self._pressured[session.session_id]
        return [WakeProducers(session)]

    # --- registry ----------------------------------------------------------------------

    def _register(self, session: H, expires_at: float | None) -> list[Effect[H]]:
        if session.state is not Lifecycle.CONNECTING:
            return []  # closing or ended before the hub got to it
        if not self.accepting:
            advance(session, Transition.CLOSE)
            return [CloseSession(session, CloseCode.GOING_AWAY, "hub is shutting down", False)]
        advance(session, Transition.REGISTER)
        effects: list[Effect[H]] = []
        counters = self.counters
        for change in self.registry.register(session.session_id, session.user_id, session):
            match change:
                case UserJoined(user_id=user_id):
                    effects.append(Subscribe(user_id))
                case SessionAdded():
                    counters.sessions_opened += 1
                    counters.peak_connections = max(
                        counters.peak_connections, self.registry.session_count
                    )
                    effects.append(Registered(session))
        self._refresh(session, expires_at)
        return effects

    def _unregister(self, session: H, close: bool) -> list[Effect[H]]:
        effects = self._remove(session)
        if close:
            if advance(session, Transition.CLOSE):
                effects.append(CloseSession(session, CloseCode.NORMAL, "unregistered", True))
        else:
            # The connection has ended: nothing more is written, and what is
            # still queued never will be.
            advance(session, Transition.END)
            effects.append(Discard(session))
        return effects

    def _close(
        self, target: Target, code: int, reason: str, drain: bool, remote: bool
    ) -> list[Effect[H]]:
        effects: list[Effect[H]] = []
        for _, session in self.registry.resolve(target):
            effects += self._remove(session)
            advance(session, Transition.CLOSE)
            effects.append(CloseSession(session, code, reason, drain))
        if not remote and not is_local(target, self.node_id):
            effects.append(Publish(BackplaneClose(target, code, reason)))
        return effects

    def _remove(self, session: H) -> list[Effect[H]]:
        """Take ``session`` out of the registry (if it is in it) and out of flow control."""
        effects: list[Effect[H]] = []
        if session.pressured:
            session.pressured = False
            self._pressured.pop(session.session_id, None)
            effects.append(WakeProducers(session))
        if self.registry.get(session.session_id) is not session:
            return effects
        for change in self.registry.unregister(session.session_id):
            match change:
                case SessionRemoved():
                    self.counters.sessions_closed += 1
                    effects.append(Unregistered(session))
                case UserLeft(user_id=user_id):
                    effects.append(Unsubscribe(user_id))
        return effects

    # --- expiry ---------------------------------------------------------------------------

    def _refresh(self, session: H, expires_at: float | None) -> None:
        if session.state not in (Lifecycle.CONNECTING, Lifecycle.OPEN):
            return
        session.expires_at = expires_at
        if expires_at is None or session.state is not Lifecycle.OPEN:
            return
        expiries = self._expiries
        if len(expiries) > 2 * self.registry.session_count + 1024:
            expiries[:] = [
                entry
                for entry in expiries
                if (live := self.registry.get(entry[2])) is not None and live.expires_at == entry[0]
            ]
            heapq.heapify(expiries)
        heapq.heappush(expiries, (expires_at, next(self._expiry_seq), session.session_id))

    def _expire(self, now: float) -> list[Effect[H]]:
        effects: list[Effect[H]] = []
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            deadline, _, session_id = heapq.heappop(expiries)
            session = self.registry.get(session_id)
            if session is None or session.expires_at != deadline:
                continue  # refreshed, or gone
            effects += self._remove(session)
            advance(session, Transition.CLOSE)
            effects.append(
                CloseSession(
                    session,
                    CloseCode.AUTH_EXPIRED,
                    "authentication expired",
                    drain=True,
                    why="credentials expired",
                )
            )
        return effects
