"""Reading a token's expiry, and when to refresh it (pure; no trio, no I/O)."""

from __future__ import annotations

import base64
import binascii
import math

import orjson

__all__ = ["refresh_delay", "token_expiry"]


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verifying it; None if there is none.

    The client never trusts this value: it only uses it to decide when to ask
    for a new token. A token that is not a JWT (dev mode's user ids, opaque
    tokens) has no expiry, and is never refreshed.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    body = parts[1]
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError):  # orjson.JSONDecodeError is a ValueError
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, int | float) or not math.isfinite(exp):
        return None
    return float(exp)


def refresh_delay(expiry: float, now: float, *, ratio: float, margin: float) -> float:
    """Seconds from ``now`` until a token expiring at ``expiry`` should be refreshed.

    The earlier of: ``ratio`` of the remaining lifetime, and ``margin`` seconds
    before ``expiry``; never negative.
    """
    remaining = expiry - now
    return max(0.0, min(remaining * ratio, remaining - margin))
