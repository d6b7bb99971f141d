"""Who is connecting: the handshake as authorizers see it, identities, and built-in authorizers."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeAlias
from urllib.parse import parse_qs, urlsplit

import attrs

__all__ = [
    "Authorizer",
    "Handshake",
    "Identity",
    "TokenChecker",
    "bearer_token_authorizer",
    "extract_token",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})

# nuropb_gw accepts "Bearer x", "Bearer:x" and "Bearer :x"; a separator is required
# so that a header of "Bearerx" is not read as the token "x".
_BEARER = re.compile(r"^\s*bearer(?:\s*:\s*|\s+)(\S+)\s*$", re.IGNORECASE)


def _readonly(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy, so that frozen values stay frozen."""
    return MappingProxyType(dict(value))


@attrs.frozen
class Identity:
    """Who a connection belongs to, as decided by the authorizer.

    Attributes:
        user_id: The user; one user may hold many sessions.
        username: A display name (defaults to ``user_id``).
        claims: Anything else the authorizer learned (e.g. decoded token claims).
        valid_until: Unix time after which the hub closes the session with
            4005 (``CloseCode.AUTH_EXPIRED``) unless ``HandlerManager.refresh_identity``
            gives it a later one first; None means it never expires.
        credentials: The raw credential the client presented (e.g. its bearer
            token), kept so that it can be forwarded to a backend; never logged.
    """

    user_id: str = attrs.field(validator=attrs.validators.instance_of(str))
    username: str = attrs.field(
        default=attrs.Factory(lambda self: self.user_id, takes_self=True),
        validator=attrs.validators.instance_of(str),
    )
    claims: Mapping[str, Any] = attrs.field(default=_EMPTY, converter=_readonly)
    valid_until: float | None = attrs.field(default=None, kw_only=True)
    credentials: str | None = attrs.field(default=None, kw_only=True, repr=False)

    def __attrs_post_init__(self) -> None:
        if not self.user_id:
            raise ValueError("Identity.user_id must not be empty")


@attrs.frozen
class Handshake:
    """The opening HTTP request of a WebSocket connection, before the upgrade.

    Attributes:
        path: The request target without its query string.
        query: Query parameters; each name maps to all its values.
        headers: Request headers, names lower-cased; repeated headers are joined with ", ".
        cookies: Cookies sent with the request.
        remote: The peer's ``(address, port)``, or None when unknown.
    """

    path: str
    query: Mapping[str, tuple[str, ...]] = attrs.field(default=_EMPTY, converter=_readonly)
    headers: Mapping[str, str] = attrs.field(default=_EMPTY, converter=_readonly)
    cookies: Mapping[str, str] = attrs.field(default=_EMPTY, converter=_readonly)
    remote: tuple[str, int] | None = None

    @classmethod
    def from_request(
        cls,
        target: str,
        raw_headers: list[tuple[bytes, bytes]],
        remote: tuple[str, int] | None = None,
    ) -> Handshake:
        """Build a handshake from a request target and raw header pairs."""
        split = urlsplit(target)
        query = {k: tuple(v) for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        headers: dict[str, str] = {}
        for raw_name, raw_value in raw_headers:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        cookies = _parse_cookies(headers.get("cookie", ""))
        return cls(split.path or "/", query, headers, cookies, remote)

    def first_query(self, name: str) -> str | None:
        """The first value of query parameter ``name``, or None."""
        values = self.query.get(name)
        return values[0] if values else None


def _parse_cookies(header: str) -> dict[str, str]:
    """Parse a Cookie header the lenient way browsers send it.

    ``http.cookies.SimpleCookie`` drops the whole header at the first value it
    finds invalid, such as ``Authorization=Bearer x`` (a space), which is exactly
    the cookie nuropb_gw clients send; so pairs are split by hand: ``;`` between
    pairs, the first ``=`` inside one, optional double quotes around a value.
    """
    cookies: dict[str, str] = {}
    for pair in header.split(";"):
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            continue
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        cookies.setdefault(name, value)
    return cookies


#: An authorizer turns a handshake into an identity, or refuses it by returning
#: None (HTTP 401) or raising ``AuthRefused`` (any status).
Authorizer: TypeAlias = Callable[[Handshake], Awaitable[Identity | None]]

#: Checks a token; may be sync or async. Returns the identity, or None to refuse.
TokenChecker: TypeAlias = Callable[[str], "Identity | Awaitable[Identity | None] | None"]


def extract_token(handshake: Handshake) -> str | None:
    """Find the client's bearer token, as nuropb_gw does, plus the query string.

    Looked for, in order: the ``Authorization`` header (``Bearer x``,
    ``Bearer:x`` or ``Bearer :x``), an ``Authorization`` cookie (with or without
    the ``Bearer`` prefix), and a ``token`` query parameter, which is the only
    one a browser can set on a WebSocket.

    Returns:
        The token, or None if none of the three carries one (a malformed
        ``Authorization`` header also gives None rather than falling through).
    """
    header = handshake.headers.get("authorization")
    if header is not None:
        match = _BEARER.match(header)
        return match.group(1) if match else None
    cookie = handshake.cookies.get("Authorization")
    if cookie:
        match = _BEARER.match(cookie)
        return match.group(1) if match else cookie.strip() or None
    return handshake.first_query("token") or None


def bearer_token_authorizer(check_token: TokenChecker) -> Authorizer:
    """Build an authorizer that checks the client's bearer token.

    Args:
        check_token: Called with the token found by ``extract_token``; returns
            the identity, or None to refuse. May be a plain or an async function.

    Returns:
        An authorizer that refuses (HTTP 401) when there is no token or
        ``check_token`` returns None.
    """

    async def authorize(handshake: Handshake) -> Identity | None:
        token = extract_token(handshake)
        if token is None:
            return None
        result = check_token(token)
        if inspect.isawaitable(result):
            result = await result
        if result is not None and not isinstance(result, Identity):
            raise TypeError(f"check_token must return Identity or None, not {type(result)!r}")
        return result

    return authorize
