"""Addressing: who a message or a close is for, and which hub node a session lives on.

Targets are plain values so that they can cross a backplane between hub nodes
unchanged. Session ids name their node (``"<node_id>:<random>"``), so a node
can tell without asking anyone whether a session is its own.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import attrs

__all__ = [
    "Target",
    "ToAll",
    "ToSession",
    "ToUsers",
    "is_local",
    "new_session_id",
    "node_of",
    "to_users",
]

_SEPARATOR = ":"


@attrs.frozen
class ToSession:
    """One session, on whichever node holds it."""

    session_id: str


@attrs.frozen
class ToUsers:
    """Every session of each of these users, on every node."""

    user_ids: frozenset[str]


@attrs.frozen
class ToAll:
    """Every session on every node."""


Target = ToSession | ToUsers | ToAll


def to_users(user_ids: Iterable[str]) -> ToUsers:
    """Build a ``ToUsers`` target, rejecting a bare string (a common slip).

    Raises:
        TypeError: ``user_ids`` is a str or bytes, or holds a non-str.
    """
    if isinstance(user_ids, str | bytes):
        raise TypeError("user_ids must be a list of user ids, not a single string")
    ids = frozenset(user_ids)
    for user_id in ids:
        if not isinstance(user_id, str):
            raise TypeError(f"user ids must be str, got {user_id!r}")
    return ToUsers(ids)


def new_session_id(node_id: str) -> str:
    """A fresh, unguessable session id that names ``node_id``."""
    return f"{node_id}{_SEPARATOR}{secrets.token_urlsafe(12)}"


def node_of(session_id: str) -> str | None:
    """The node a session id names, or None if it names none."""
    node, sep, _ = session_id.rpartition(_SEPARATOR)
    return node if sep else None


def is_local(target: Target, node_id: str) -> bool:
    """True if every recipient of ``target`` can only be on ``node_id``."""
    return isinstance(target, ToSession) and node_of(target.session_id) == node_id
