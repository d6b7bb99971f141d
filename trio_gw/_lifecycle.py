"""A session's lifecycle: its states and the only transitions between them, as data.

Pure: no trio, no I/O. ``advance`` is how every state change is made, by the
router and by the session itself, so that a transition not in the table (a
second close, a register after the end) is refused in one place.
"""

from __future__ import annotations

import enum
from typing import Protocol

__all__ = ["Lifecycle", "Transition", "TRANSITIONS", "advance"]


class Lifecycle(enum.Enum):
    """Where a session is in its life."""

    #: Accepted and authorized, not yet in the registry.
    CONNECTING = "connecting"
    #: Registered: it can be addressed, and takes and sends messages.
    OPEN = "open"
    #: Asked to close, and out of the registry. With a drain, what is queued
    #: and the replies to what its client sent before are still written.
    CLOSING = "closing"
    #: The connection has ended; nothing more is written or read.
    ENDED = "ended"


class Transition(enum.Enum):
    """What can happen to a session."""

    REGISTER = "register"
    CLOSE = "close"  # the hub (or the session's own failure) asks it to close
    END = "end"  # the connection is gone, whatever ended it


#: (state, transition) -> next state. Anything missing is refused.
TRANSITIONS: dict[tuple[Lifecycle, Transition], Lifecycle] = {
    (Lifecycle.CONNECTING, Transition.REGISTER): Lifecycle.OPEN,
    (Lifecycle.CONNECTING, Transition.CLOSE): Lifecycle.CLOSING,
    (Lifecycle.OPEN, Transition.CLOSE): Lifecycle.CLOSING,
    (Lifecycle.CONNECTING, Transition.END): Lifecycle.ENDED,
    (Lifecycle.OPEN, Transition.END): Lifecycle.ENDED,
    (Lifecycle.CLOSING, Transition.END): Lifecycle.ENDED,
}


class HasLifecycle(Protocol):
    """Anything with a lifecycle state."""

    state: Lifecycle


def advance(subject: HasLifecycle, transition: Transition) -> bool:
    """Apply ``transition`` to ``subject`` if the table allows it.

    Returns:
        True if the state changed; False if the table refuses the transition
        (for example a second close), in which case nothing changes.
    """
    new = TRANSITIONS.get((subject.state, transition))
    if new is None:
        return False
    subject.state = new
    return True
