"""Checking clients' JSON Web Tokens with pyjwt: keys, claims, and the identity they give.

The keys come from ``[auth]``: a secret, a PEM file, a JWKS file, or a JWKS URL.
A JWKS URL is fetched by ``JwtVerifier.serve_jwks_refresh`` (at start, every
``jwks_refresh_interval``, and when a token names an unknown ``kid``, at most once
per ``jwks_min_refresh_interval``); checking a token whose key is known never
waits for the network.
"""

from __future__ import annotations

import logging
import math
import time
import unicodedata
from pathlib import Path
from typing import Any, NoReturn

import attrs
import httpx
import jwt
import orjson
import trio

from .._auth import Authorizer, Handshake, Identity, extract_token
from .._errors import AuthRefused, ConfigError
from ._config import AuthConfig

__all__ = ["JwksStatistics", "JwtVerifier", "jwt_authorizer"]

logger = logging.getLogger("trio_gw")

# 9999-12-31T23:59:59Z: the last NumericDate that date libraries (and people)
# can represent; a later ``exp`` is a bug or an attack, not a long-lived token.
_MAX_NUMERIC_DATE = 253_402_300_799

# A provider's JWKS is a few kilobytes; anything near this is not a key set.
_MAX_JWKS_BYTES = 1 << 20

# The first retry after a failed fetch; each next one waits twice as long, up
# to auth.jwks_min_refresh_interval.
_FIRST_RETRY = 1.0


class _JwksError(ValueError):
    """A JWKS document (or the response that should hold one) is unusable."""


class _UnknownKey(AuthRefused):
    """The token's ``kid`` is not in the key set (yet): a refetch may find it."""


def _parse_jwks(data: bytes, algorithm: str) -> dict[str, jwt.PyJWK]:
    """The signing keys for ``algorithm`` in a JWKS document, by ``kid``.

    Raises:
        _JwksError: not a JWKS document, or no key for ``algorithm`` in it.
    """
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise _JwksError(f"is not a JWKS document ({exc})") from None
    raw_keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(raw_keys, list):
        raise _JwksError('is not a JWKS document (no "keys" array)')
    # Key by key, so that one key this gateway cannot use (another algorithm,
    # "alg": "none", a malformed member) does not make the whole set unusable.
    by_kid: dict[str, jwt.PyJWK] = {}
    for raw in raw_keys:
        kid = raw.get("kid", "") if isinstance(raw, dict) else None
        if not isinstance(kid, str) or kid in by_kid:
            continue  # RFC 7517 4.5: a kid is a string; of two alike, the first stands
        try:
            key = jwt.PyJWK(raw)
        except (jwt.PyJWTError, NotImplementedError, ValueError, TypeError, KeyError):
            continue
        if key.algorithm_name == algorithm and key.public_key_use in (None, "sig"):
            by_kid[kid] = key
    if not by_kid:
        raise _JwksError(f"holds no {algorithm} key")
    return by_kid


@attrs.frozen
class JwksStatistics:
    """The JWKS URL's key set and its fetches, as ``JwtVerifier.jwks_statistics()`` reports.

    Attributes:
        keys: Keys in the set in use (0 until one was loaded).
        loaded_at: Unix time of the last successful fetch, or None if none succeeded yet.
        fetches: Fetches started.
        fetch_errors: Fetches that failed (the last good set stayed in use).
    """

    keys: int
    loaded_at: float | None
    fetches: int
    fetch_errors: int


class JwtVerifier:
    """Verifies tokens signed with the one algorithm and key(s) of an ``[auth]`` section.

    Only the configured algorithm is accepted, so ``alg: none`` and algorithm
    confusion (an HS256 token "signed" with an RSA public key as its secret)
    are refused by construction. ``exp`` and ``sub`` are required; ``sub``
    must not be blank or hold control characters, and ``exp`` must be a number
    no later than the year 9999.

    With ``jwks_url``, the key set starts empty: ``serve_jwks_refresh`` fetches
    it, and ``check`` (not ``verify``) waits for a refetch when a token names
    an unknown ``kid``.

    Args:
        config: The ``[auth]`` section; ``jwt_algorithm`` must be set.

    Raises:
        ConfigError: a key file is missing or does not hold a key for the
            algorithm; the message names the field. A JWKS URL is not fetched here.
    """

    def __init__(self, config: AuthConfig) -> None:
        if config.jwt_algorithm is None:
            raise ConfigError("auth.jwt_algorithm: required to check tokens")
        self._config = config
        self._algorithm = config.jwt_algorithm
        self._key: Any = None
        self._jwks: dict[str, jwt.PyJWK] = {}
        if config.jwt_secret is not None:
            self._key = config.jwt_secret.encode()
        elif config.jwt_public_key_file is not None:
            self._key = self._load_pem(config.jwt_public_key_file)
        elif config.jwks_file is not None:
            self._jwks = self._load_jwks(config.jwks_file)
        # The JWKS URL's fetch state, owned by serve_jwks_refresh.
        self._serving = False
        self._fetching = False
        self._last_on_demand = -math.inf  # trio.current_time() of the last unknown-kid fetch
        self._fetch_requested = trio.Event()  # an unknown kid asks for a fetch now
        self._next_fetch_done = trio.Event()  # set when the next (or current) fetch ends
        self._loaded_at: float | None = None
        self._failures = 0  # consecutive failed fetches
        self._fetches = 0
        self._fetch_errors = 0

    @property
    def jwks_url(self) -> str | None:
        """The URL the keys are fetched from, if they come from one."""
        return self._config.jwks_url

    @property
    def keys_loaded(self) -> bool:
        """False only while a JWKS URL's key set has never been fetched successfully."""
        return self._config.jwks_url is None or self._loaded_at is not None

    def jwks_statistics(self) -> JwksStatistics:
        """A snapshot of the JWKS URL's key set and fetches."""
        return JwksStatistics(len(self._jwks), self._loaded_at, self._fetches, self._fetch_errors)

    def _load_pem(self, path: str) -> Any:
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"auth.jwt_public_key_file: cannot read {path!r}: {exc}") from None
        try:
            return jwt.get_algorithm_by_name(self._algorithm).prepare_key(pem)
        except (jwt.InvalidKeyError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"auth.jwt_public_key_file: {path!r} is not a {self._algorithm} public key "
                f"in PEM form ({exc})"
            ) from None

    def _load_jwks(self, path: str) -> dict[str, jwt.PyJWK]:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"auth.jwks_file: cannot read {path!r}: {exc}") from None
        try:
            return _parse_jwks(data, self._algorithm)
        except _JwksError as exc:
            raise ConfigError(f"auth.jwks_file: {path!r} {exc}") from None

    def _key_for(self, token: str) -> Any:
        if self._key is not None:
            return self._key
        if not self._jwks:  # only a JWKS URL not fetched yet leaves it empty
            raise _UnknownKey(
                503, "signing keys not loaded yet (auth.jwks_url cannot be fetched); retry later"
            )
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        if not isinstance(kid, str):
            raise AuthRefused(401, "unknown signing key (kid)")
        key = self._jwks.get(kid)
        if key is None:
            raise _UnknownKey(401, "unknown signing key (kid)")
        return key

    def verify(self, token: str) -> Identity:
        """Check ``token`` and return whose it is.

        Returns:
            The identity: ``sub`` as user id, the ``username_claim`` claim as
            display name, every claim, and ``valid_until`` = ``exp`` + leeway +
            ``refresh_grace``.

        Raises:
            AuthRefused: 401 with the reason (expired, bad signature, wrong
                audience, ...); the token itself is never echoed.
        """
        config = self._config
        try:
            claims = jwt.decode(
                token,
                self._key_for(token),
                algorithms=[self._algorithm],
                audience=config.audience,
                issuer=config.issuer,
                leeway=config.leeway,
                options={
                    "require": ["exp", "sub"],
                    "verify_aud": config.audience is not None,
                    "verify_iss": config.issuer is not None,
                },
            )
        except jwt.ExpiredSignatureError:
            raise AuthRefused(401, "token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthRefused(401, "token not valid yet ('nbf' or 'iat' in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthRefused(401, "token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthRefused(401, "token issuer not accepted") from None
        except jwt.InvalidAlgorithmError:
            raise AuthRefused(
                401, f"token algorithm not accepted (expected {self._algorithm})"
            ) from None
        except jwt.InvalidSignatureError:
            raise AuthRefused(401, "token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthRefused(401, f"token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise AuthRefused(401, f"invalid token ({type(exc).__name__})") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise AuthRefused(401, "token 'sub' claim must be a non-blank string")
        if any(unicodedata.category(char) in ("Cc", "Cf") for char in subject):
            # No real user id holds one, and the user id is shown in log lines
            # and the dashboard, where a "\n" would pass for a line of its own
            # and a right-to-left override (Cf) would reverse what follows.
            raise AuthRefused(401, "token 'sub' claim must not contain control characters")
        username = claims.get(config.username_claim)
        exp = claims["exp"]
        # pyjwt accepts a numeric string ("exp": "1800000000") and integers of
        # any size; 10**400 has no float value, so it would fail below as a 500.
        if not isinstance(exp, int | float):
            raise AuthRefused(401, "token 'exp' claim must be a number")
        if exp > _MAX_NUMERIC_DATE:
            raise AuthRefused(401, "token 'exp' claim is out of range (after the year 9999)")
        return Identity(
            subject,
            username if isinstance(username, str) and username else subject,
            claims,
            valid_until=float(exp) + config.leeway + config.refresh_grace,
            credentials=token,
        )

    async def check(self, token: str) -> Identity:
        """``verify``, refetching the JWKS URL first if ``token`` names an unknown ``kid``.

        A known key is checked at once, as ``verify`` does. An unknown ``kid``
        (or no key set yet) waits for the fetch in flight, if there is one.
        Otherwise it starts a fetch, at most once per
        ``jwks_min_refresh_interval``; within that interval it is refused at
        once, so that made-up kids cannot make the gateway hammer the
        provider. Every token waiting shares the one fetch.

        Raises:
            AuthRefused: as ``verify``; 503 while no key set was ever loaded.
        """
        try:
            return self.verify(token)
        except _UnknownKey:
            if not await self._refetch():
                raise
        return self.verify(token)

    async def _refetch(self) -> bool:
        """Wait for a fetch of the key set; False if none may start now."""
        if not self._serving:
            return False
        # A fetch asked for but not started yet is shared like one in flight.
        if not (self._fetching or self._fetch_requested.is_set()):
            now = trio.current_time()
            if now < self._last_on_demand + self._config.jwks_min_refresh_interval:
                return False
            self._last_on_demand = now
            self._fetch_requested.set()
        await self._next_fetch_done.wait()
        return True

    async def serve_jwks_refresh(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Fetch ``auth.jwks_url`` now, then keep its key set fresh until cancelled.

        Reports started once the first fetch has ended, successfully or not.
        Then it fetches every ``jwks_refresh_interval``, or sooner when
        ``check`` asks (an unknown ``kid``). After a failed fetch it retries
        after 1 s, 2 s, 4 s, ... up to ``jwks_min_refresh_interval``.

        Resource handling:
            Owns an ``httpx.AsyncClient``, closed when this is cancelled. A
            fetch takes at most ``jwks_timeout`` and reads at most 1 MiB;
            redirects are not followed.

        Error handling:
            A failed fetch (unreachable, timed out, not 200, too large, not a
            JWKS, no key for the algorithm) keeps the last good set, counts in
            ``jwks_statistics().fetch_errors``, and is logged once per streak of
            failures, with a line when fetching works again. Nothing is raised:
            whatever goes wrong, the gateway keeps serving.
        """
        config = self._config
        assert config.jwks_url is not None, "serve_jwks_refresh needs auth.jwks_url"
        async with httpx.AsyncClient(
            timeout=config.jwks_timeout,
            follow_redirects=False,
            headers={"accept": "application/json, application/jwk-set+json"},
        ) as client:
            self._serving = True
            started = False
            try:
                while True:
                    done = self._next_fetch_done
                    self._fetching = True
                    self._fetch_requested = trio.Event()
                    try:
                        ok = await self._fetch(client, config.jwks_url)
                    finally:
                        self._fetching = False
                        self._next_fetch_done = trio.Event()
                        done.set()
                    if not started:
                        task_status.started()
                        started = True
                    if ok:
                        delay = config.jwks_refresh_interval
                    else:
                        backoff = _FIRST_RETRY * 2 ** min(self._failures - 1, 32)
                        delay = min(config.jwks_min_refresh_interval, backoff)
                    with trio.move_on_after(delay):
                        await self._fetch_requested.wait()
            finally:
                self._serving = False
                self._next_fetch_done.set()  # no fetch will come: waiters are refused

    async def _fetch(self, client: httpx.AsyncClient, url: str) -> bool:
        """Fetch the key set once and put it in use; False (logged, counted) if that failed."""
        self._fetches += 1
        try:
            with trio.fail_after(self._config.jwks_timeout):
                keys = await self._download(client, url)
            self._install(keys, url)
            return True
        except trio.TooSlowError:
            problem = f"no complete answer within {self._config.jwks_timeout:g}s"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        except _JwksError as exc:
            problem = f"the response {exc}"
        except Exception as exc:  # a bug here must not stop the refresh
            logger.exception("auth.jwks_url: fetching %s failed unexpectedly", url)
            problem = f"{type(exc).__name__}: {exc}"
        self._fetch_errors += 1
        self._failures += 1
        if self._failures == 1:
            keeping = (
                f"keeping the last good key set ({len(self._jwks)} keys)"
                if self._loaded_at is not None
                else "no keys yet: handshakes get 503"
            )
            logger.warning(
                "auth.jwks_url: cannot fetch %s: %s; %s, retrying", url, problem, keeping
            )
        else:
            logger.debug("auth.jwks_url: fetch %d in a row failed: %s", self._failures, problem)
        return False

    async def _download(self, client: httpx.AsyncClient, url: str) -> dict[str, jwt.PyJWK]:
        # Uncompressed only: the size bound must hold for what is decoded,
        # and a small gzip body can inflate to gigabytes.
        headers = {"accept-encoding": "identity"}
        async with client.stream("GET", url, headers=headers) as response:
            if response.status_code != 200:
                raise _JwksError(f"is HTTP {response.status_code}, not 200")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise _JwksError(f"is compressed ({encoding}); only identity is accepted")
            body = bytearray()
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > _MAX_JWKS_BYTES:
                    raise _JwksError(f"is larger than {_MAX_JWKS_BYTES} bytes")
        return _parse_jwks(bytes(body), self._algorithm)

    def _install(self, keys: dict[str, jwt.PyJWK], url: str) -> None:
        if self._failures:
            logger.info(
                "auth.jwks_url: fetching %s works again after %d failed attempt(s)",
                url,
                self._failures,
            )
            self._failures = 0
        if keys.keys() != self._jwks.keys():
            logger.info(
                "auth.jwks_url: %d %s key(s) in use from %s (kid %s)",
                len(keys),
                self._algorithm,
                url,
                ", ".join(sorted(keys)),
            )
        self._jwks = keys
        self._loaded_at = time.time()


def jwt_authorizer(verifier: JwtVerifier) -> Authorizer:
    """An authorizer that checks the bearer token (header, cookie or ``?token=``) as a JWT."""

    async def authorize(handshake: Handshake) -> Identity | None:
        token = extract_token(handshake)
        if token is None:
            raise AuthRefused(401, "no bearer token")
        return await verifier.check(token)

    return authorize
