"""The client's decisions, as data and pure functions (no trio, no I/O).

What the client does after a connection ends, or after a refused handshake,
and how long it waits before the next attempt. ``_client.py`` carries the
decisions out.

After a close code (``after_close``):

======================  ===========================================================
code                    action
======================  ===========================================================
1000, 1008              ``STOP`` (unless listed in ``reconnect_on``)
1002, 1003, 1007        ``STOP``: the client sent something the hub refused; a new
                        connection would do the same (unless in ``reconnect_on``)
4005                    ``NEW_TOKEN``: ask the token provider, reconnect at once
                        (without a provider: ``BACKOFF``, with the same token)
anything else           ``BACKOFF``: 1001, 1006 (no close frame, network error),
                        1009, 1011, 4008, 4012, unknown codes
======================  ===========================================================

After an HTTP refusal of the handshake (``after_refusal``):

======================  ===========================================================
status                  action
======================  ===========================================================
401                     ``NEW_TOKEN`` once, if there is a token provider and the
                        refused token was not fetched for this very attempt;
                        otherwise ``GIVE_UP``
429, 5xx                ``BACKOFF`` (503: the hub is full or shutting down)
anything else           ``GIVE_UP`` (403: origin or policy; 400: a bad request)
======================  ===========================================================
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Collection

import attrs

__all__ = ["Action", "Backoff", "after_close", "after_refusal"]


class Action(enum.Enum):
    """What the client does next."""

    STOP = "stop"  # close for good; a normal end
    GIVE_UP = "give_up"  # close for good; an error
    BACKOFF = "backoff"  # wait (full jitter), then reconnect
    NEW_TOKEN = "new_token"  # fetch a new token, then reconnect at once


_STOP_CODES = frozenset({1000, 1002, 1003, 1007, 1008})


def after_close(code: int, *, reconnect_on: Collection[int], has_provider: bool) -> Action:
    """The action after a connection that was open ended with close ``code``."""
    if code == 4005:
        return Action.NEW_TOKEN if has_provider else Action.BACKOFF
    if code in _STOP_CODES and code not in reconnect_on:
        return Action.STOP
    return Action.BACKOFF


def after_refusal(status: int, *, has_provider: bool, token_is_fresh: bool) -> Action:
    """The action after the hub refused a handshake with HTTP ``status``."""
    if status == 401:
        return Action.NEW_TOKEN if has_provider and not token_is_fresh else Action.GIVE_UP
    if status == 429 or 500 <= status <= 599:
        return Action.BACKOFF
    return Action.GIVE_UP


def _non_negative(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ValueError(f"Backoff.{attribute.name} must be a finite number >= 0, got {value!r}")


@attrs.frozen
class Backoff:
    """Exponential backoff with full jitter between connection attempts.

    The n-th wait in a row (n = 0, 1, ...) is a uniformly random time between 0
    and ``min(maximum, initial * multiplier ** n)`` ("full jitter"), so that
    clients cut off together do not come back together. The count starts
    again once a connection is open (its hello received).

    Attributes:
        initial: The first ceiling, in seconds.
        maximum: The largest ceiling, in seconds.
        multiplier: How much the ceiling grows per failed attempt (>= 1).
        max_attempts: Connection attempts that may fail in a row before the
            client gives up with ``ConnectFailedError``; None: never give up.
    """

    initial: float = attrs.field(default=0.5, validator=_non_negative)
    maximum: float = attrs.field(default=30.0, validator=_non_negative)
    multiplier: float = attrs.field(default=2.0, validator=_non_negative)
    max_attempts: int | None = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.maximum < self.initial:
            raise ValueError(f"Backoff.maximum ({self.maximum}) is below initial ({self.initial})")
        if self.multiplier < 1:
            raise ValueError(f"Backoff.multiplier must be >= 1, got {self.multiplier}")
        if self.max_attempts is not None and (
            not isinstance(self.max_attempts, int) or self.max_attempts < 1
        ):
            raise ValueError(f"Backoff.max_attempts must be None or >= 1, got {self.max_attempts}")

    def ceiling(self, failures: int) -> float:
        """The longest wait after ``failures`` failed attempts in a row."""
        try:
            return min(self.maximum, self.initial * self.multiplier**failures)
        except OverflowError:
            return self.maximum

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """A full-jitter wait: uniform between 0 and ``ceiling(failures)``."""
        return self.ceiling(failures) * rng()

    def exhausted(self, failures: int) -> bool:
        """Whether ``failures`` failed attempts in a row mean giving up."""
        return self.max_attempts is not None and failures >= self.max_attempts
