"""The close codes the hub sends, in one table.

| code | name | when | should the client reconnect? |
|------|------|------|------------------------------|
| 1000 | NORMAL | closed by the application (``close``, ``close_user_ids``, ``close_all``) | no |
| 1001 | GOING_AWAY | the hub is shutting down | yes, with backoff |
| 1008 | POLICY_VIOLATION | the client broke a rule (e.g. a frame that is not allowed) | no |
| 1009 | MESSAGE_TOO_BIG | a client message exceeded ``max_message_size`` | no, not with that message |
| 1011 | SERVER_ERROR | the hub hit an unexpected error for this connection | yes, with backoff |
| 4005 | AUTH_EXPIRED | the client's credentials expired and were not refreshed | yes, with a fresh token |
| 4008 | SLOW_CONSUMER | the client did not read fast enough; its outbound queue overflowed | yes, and read faster |
| 4012 | NO_PONG | no pong arrived within ``heartbeat_timeout`` | yes |

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
