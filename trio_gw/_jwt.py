"""Checking clients' JSON Web Tokens with pyjwt: keys, claims, and the identity they give."""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

import jwt
import orjson

from ._auth import Authorizer, Handshake, Identity, extract_token
from ._errors import AuthRefused, ConfigError
from ._gateway_config import AuthConfig

__all__ = ["JwtVerifier", "jwt_authorizer"]

# 9999-12-31T23:59:59Z: the last NumericDate that date libraries (and people)
# can represent; a later ``exp`` is a bug or an attack, not a long-lived token.
_MAX_NUMERIC_DATE = 253_402_300_799


class JwtVerifier:
    """Verifies tokens signed with the one algorithm and key(s) of an ``[auth]`` section.

    Only the configured algorithm is accepted, so ``alg: none`` and algorithm
    confusion (an HS256 token "signed" with an RSA public key as its secret)
    are refused by construction. ``exp`` and ``sub`` are required; ``sub``
    must not be blank or hold control characters, and ``exp`` must be a number
    no later than the year 9999.

    Args:
        config: The ``[auth]`` section; ``jwt_algorithm`` must be set.

    Raises:
        ConfigError: a key file is missing or does not hold a key for the
            algorithm; the message names the field.
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
            data = orjson.loads(Path(path).read_bytes())
            keys = jwt.PyJWKSet.from_dict(data)
        except OSError as exc:
            raise ConfigError(f"auth.jwks_file: cannot read {path!r}: {exc}") from None
        except (orjson.JSONDecodeError, jwt.PyJWKSetError, jwt.PyJWKError, TypeError) as exc:
            raise ConfigError(f"auth.jwks_file: {path!r} is not a JWKS document ({exc})") from None
        by_kid: dict[str, jwt.PyJWK] = {}
        for key in keys:
            if key.algorithm_name != self._algorithm:
                continue
            by_kid[key.key_id or ""] = key
        if not by_kid:
            raise ConfigError(f"auth.jwks_file: {path!r} holds no {self._algorithm} key")
        return by_kid

    def _key_for(self, token: str) -> Any:
        if not self._jwks:
            return self._key
        kid = jwt.get_unverified_header(token).get("kid")
        if kid is None and len(self._jwks) == 1:
            return next(iter(self._jwks.values()))
        key = self._jwks.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthRefused(401, "unknown signing key (kid)")
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
        if any(unicodedata.category(char) == "Cc" for char in subject):
            # No real user id holds one, and the user id is shown in log lines
            # and the dashboard, where a "\n" would pass for a line of its own.
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


def jwt_authorizer(verifier: JwtVerifier) -> Authorizer:
    """An authorizer that checks the bearer token (header, cookie or ``?token=``) as a JWT."""

    async def authorize(handshake: Handshake) -> Identity | None:
        token = extract_token(handshake)
        if token is None:
            raise AuthRefused(401, "no bearer token")
        return verifier.verify(token)

    return authorize
