"""The close codes the hub sends, in one table.

======  ================  =========================================  ==================
code    name              when                                       client should
======  ================  =========================================  ==================
1000    NORMAL            closed by ``close*``/``unregister``        not reconnect
1001    GOING_AWAY        the hub is shutting down                   reconnect, backoff
1008    POLICY_VIOLATION  the client broke a protocol rule           not reconnect
1009    MESSAGE_TOO_BIG   a message exceeded ``max_message_size``    not resend it
1011    SERVER_ERROR      the hub failed on this connection (logged)  reconnect, backoff
4005    AUTH_EXPIRED      credentials expired, not refreshed          reconnect, new token
4008    SLOW_CONSUMER     its outbound queue overflowed              reconnect, read faster
4012    NO_PONG           no pong within ``heartbeat_timeout``       reconnect
======  ================  =========================================  ==================

The 4000-4999 range is reserved by RFC 6455 for private use, so these codes
cannot clash with registered ones.
"""

from __future__ import annotations

import enum

__all__ = ["CloseCode"]


class CloseCode(enum.IntEnum):
    """WebSocket close codes used by the hub (see the module docstring)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    SERVER_ERROR = 1011
    AUTH_EXPIRED = 4005
    SLOW_CONSUMER = 4008
    NO_PONG = 4012
