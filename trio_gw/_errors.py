"""Exceptions raised by trio_gw.

The tree, and whose fault each one is::

    GatewayError                 base of everything trio_gw raises on purpose
    ├── ConfigError              the operator's: a setting has a bad value (names the field)
    ├── HubClosedError           the caller's: the hub is not running (not started, or shut down)
    ├── HubOverloadedError       load: the hub's command queue is full; retry later
    ├── BackplaneUnavailable     the environment's: the backplane (Redis) cannot answer now
    └── AuthRefused              the remote side's: a handshake was refused (with HTTP status)

Errors caused by a client (bad JSON, a raising backend callback, an oversized
message, a slow reader) are never raised into the hub: they are answered with an
error frame or a close code on that one connection (see ``CloseCode``).
"""

from __future__ import annotations

__all__ = [
    "AuthRefused",
    "BackplaneUnavailable",
    "ConfigError",
    "GatewayError",
    "HubClosedError",
    "HubOverloadedError",
]


class GatewayError(Exception):
    """Base class for the errors trio_gw raises on purpose."""


class ConfigError(GatewayError, ValueError):
    """A configuration value is invalid.

    The message names the field, the value given and what is allowed.
    """


class HubClosedError(GatewayError, RuntimeError):
    """The hub is not running: it was never started, or it has shut down."""


class HubOverloadedError(GatewayError, RuntimeError):
    """The hub's command queue is full.

    Only the synchronous methods (``register``, ``unregister``, ``close*``) raise
    this; the ``async`` methods wait for room instead.
    """


class BackplaneUnavailable(GatewayError, RuntimeError):
    """The backplane cannot answer now (its connection is down); a cluster-wide view is missing.

    Messages are not affected by it: while the backplane is down, publishes to
    other nodes are dropped and counted, and local delivery carries on.
    """


class AuthRefused(GatewayError):
    """An authorizer refused a handshake.

    Raise it from a custom authorizer to choose the HTTP status the client sees;
    returning ``None`` from an authorizer means ``AuthRefused(401, ...)``.

    Args:
        status: The HTTP status answered before the upgrade (401, 403, ...).
        reason: A short human-readable reason, sent as the response body.
    """

    def __init__(self, status: int = 401, reason: str = "unauthorized") -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"
