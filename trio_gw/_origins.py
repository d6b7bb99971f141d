"""Origin checks for browser clients: exact origins or explicit leading wildcards."""

from __future__ import annotations

from collections.abc import Iterable

import attrs

__all__ = ["OriginPolicy"]

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def _split(origin: str) -> tuple[str, str, int]:
    """Split ``scheme://host[:port]`` into normalised parts.

    Raises:
        ValueError: not an origin (a path, user info or an unknown scheme).
    """
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or scheme not in _DEFAULT_PORTS or not rest:
        raise ValueError(f"not an origin: {origin!r}")
    if any(c in rest for c in "/?#@"):
        raise ValueError(f"not an origin (path, query or user info): {origin!r}")
    host, port = rest, _DEFAULT_PORTS[scheme]
    head, colon, port_text = rest.rpartition(":")
    # An IPv6 literal holds colons too; only a colon after "]" (or in a name) starts a port.
    if colon and port_text.isdigit() and (head.endswith("]") or "[" not in head):
        host, port = head, int(port_text)
    if not host:
        raise ValueError(f"not an origin: {origin!r}")
    return scheme, host, port


@attrs.frozen
class _Pattern:
    scheme: str
    host: str  # without the "*." when wildcard
    port: int
    wildcard: bool

    def matches(self, scheme: str, host: str, port: int) -> bool:
        if scheme != self.scheme or port != self.port:
            return False
        if self.wildcard:
            # "*." stands for one or more whole labels, never a bare suffix:
            # "https://*.example.com" admits "a.example.com", not "badexample.com".
            return host.endswith("." + self.host)
        return host == self.host


@attrs.frozen(init=False)
class OriginPolicy:
    """Which ``Origin`` header values a handshake may carry.

    Args:
        allowed: Exact origins (``https://app.example.com``, port optional) or
            patterns with a leading wildcard label (``https://*.example.com``).
            Empty allows every origin.

    Raises:
        ValueError: an entry is not an origin, or has a wildcard anywhere but
            as the whole first label.
    """

    _patterns: tuple[_Pattern, ...]

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        patterns = []
        for entry in allowed:
            if not isinstance(entry, str):
                raise ValueError(f"origin must be a string, got {entry!r}")
            scheme, host, port = _split(entry)
            wildcard = host.startswith("*.")
            if wildcard:
                host = host[2:]
            if "*" in host or not host:
                raise ValueError(f"wildcard must be the whole first label: {entry!r}")
            patterns.append(_Pattern(scheme, host, port, wildcard))
        self.__attrs_init__(tuple(patterns))

    @property
    def allows_any(self) -> bool:
        """True when no origins are configured, so every origin is allowed."""
        return not self._patterns

    def allows(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header (None: absent) may proceed."""
        if origin is None or not self._patterns:
            return True
        try:
            parts = _split(origin)
        except ValueError:
            return False
        return any(p.matches(*parts) for p in self._patterns)
