"""The hub's registry: who is connected, and which sessions a target reaches. Pure, no trio.

The router (``_router.py``) owns one ``Registry`` and is the only code that
calls its mutating methods. Each mutation returns the changes it implies (a
user's first session arrived, a user's last session left, ...), which the
router turns into its own effects. Because nothing here awaits, the registry
can be tested with plain synchronous and hypothesis stateful tests.

Invariants, checked by ``check_invariants``:

* every session id in a user's set is registered, under that user;
* every registered session is in its user's set;
* no user maps to an empty set.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

import attrs

from ._targets import Target, ToAll, ToSession, ToUsers

__all__ = [
    "Effect",
    "Registry",
    "SessionAdded",
    "SessionRemoved",
    "UserJoined",
    "UserLeft",
]

T = TypeVar("T")


@attrs.frozen
class SessionAdded:
    """A session was registered."""

    session_id: str
    user_id: str


@attrs.frozen
class UserJoined:
    """A user's first session on this node was registered."""

    user_id: str


@attrs.frozen
class SessionRemoved:
    """A session was unregistered."""

    session_id: str
    user_id: str


@attrs.frozen
class UserLeft:
    """A user's last session on this node was unregistered."""

    user_id: str


Effect = SessionAdded | UserJoined | SessionRemoved | UserLeft


@attrs.define
class Registry(Generic[T]):
    """Maps session ids to an item (the actor's handle on a session) and users to sessions.

    ``T`` is opaque here: the actor stores whatever it needs to reach a session.
    """

    _sessions: dict[str, tuple[str, T]] = attrs.field(factory=dict)
    _users: dict[str, set[str]] = attrs.field(factory=dict)

    def register(self, session_id: str, user_id: str, item: T) -> tuple[Effect, ...]:
        """Add a session.

        Returns:
            ``SessionAdded``, preceded by ``UserJoined`` if it is the user's first.

        Raises:
            KeyError: ``session_id`` is already registered (the caller's bug).
        """
        if session_id in self._sessions:
            raise KeyError(f"session {session_id!r} is already registered")
        self._sessions[session_id] = (user_id, item)
        sessions = self._users.get(user_id)
        if sessions is None:
            self._users[user_id] = {session_id}
            return (UserJoined(user_id), SessionAdded(session_id, user_id))
        sessions.add(session_id)
        return (SessionAdded(session_id, user_id),)

    def unregister(self, session_id: str) -> tuple[Effect, ...]:
        """Remove a session; removing an unknown one does nothing.

        Returns:
            ``SessionRemoved``, followed by ``UserLeft`` if it was the user's
            last; or nothing if the session was not registered.
        """
        entry = self._sessions.pop(session_id, None)
        if entry is None:
            return ()
        user_id = entry[0]
        sessions = self._users[user_id]
        sessions.discard(session_id)
        if sessions:
            return (SessionRemoved(session_id, user_id),)
        del self._users[user_id]
        return (SessionRemoved(session_id, user_id), UserLeft(user_id))

    def resolve(self, target: Target) -> list[tuple[str, T]]:
        """The local sessions ``target`` reaches, as ``(session_id, item)`` pairs.

        Each session appears at most once, even if named twice.
        """
        match target:
            case ToSession(session_id=session_id):
                entry = self._sessions.get(session_id)
                return [] if entry is None else [(session_id, entry[1])]
            case ToUsers(user_ids=user_ids):
                found = []
                for user_id in user_ids:
                    for session_id in self._users.get(user_id, ()):
                        found.append((session_id, self._sessions[session_id][1]))
                return found
            case ToAll():
                return [(sid, entry[1]) for sid, entry in self._sessions.items()]

    def get(self, session_id: str) -> T | None:
        """The item of a registered session, or None."""
        entry = self._sessions.get(session_id)
        return None if entry is None else entry[1]

    def user_of(self, session_id: str) -> str | None:
        """The user a registered session belongs to, or None."""
        entry = self._sessions.get(session_id)
        return None if entry is None else entry[0]

    def sessions_of(self, user_id: str) -> frozenset[str]:
        """The registered session ids of one user (empty if none)."""
        return frozenset(self._users.get(user_id, ()))

    def session_ids(self) -> Iterator[str]:
        """Every registered session id."""
        return iter(list(self._sessions))

    def user_ids(self) -> Iterator[str]:
        """Every user with at least one registered session."""
        return iter(list(self._users))

    @property
    def session_count(self) -> int:
        """Registered sessions."""
        return len(self._sessions)

    @property
    def user_count(self) -> int:
        """Users with at least one registered session."""
        return len(self._users)

    def check_invariants(self) -> None:
        """Raise AssertionError if the maps disagree (for tests)."""
        for user_id, sessions in self._users.items():
            if not sessions:
                raise AssertionError(f"user {user_id!r} maps to an empty set")
            for session_id in sessions:
                entry = self._sessions.get(session_id)
                if entry is None or entry[0] != user_id:
                    raise AssertionError(f"{session_id!r} in {user_id!r}'s set but not theirs")
        for session_id, (user_id, _) in self._sessions.items():
            if session_id not in self._users.get(user_id, ()):
                raise AssertionError(f"{session_id!r} missing from {user_id!r}'s set")
