"""JWT authentication of the real ``trio-gw serve`` process: handshakes, refresh, expiry."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_gw import ConfigError, GatewayConfig
from trio_gw.gateway._jwt import JwtVerifier

from ._gateway_support import (
    API_KEY,
    HS_SECRET,
    GatewayProcess,
    gateway_process,
    make_keys,
    token,
    unsigned_token,
    write_config,
)
from .conftest import TIMEOUT, client, receive_json


def _handshake_status(url: str, credential: str, via: str = "query") -> tuple[int, str]:
    # The websockets client, because trio-websocket 0.12.2's client leaks its
    # socket when a handshake is refused.
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    headers = {
        "query": {},
        "header": {"Authorization": f"Bearer {credential}"},
        "cookie": {"Cookie": f"Authorization=Bearer {credential}"},
    }[via]
    target = f"{url}/?token={credential}" if via == "query" else f"{url}/"
    try:
        with connect(target, open_timeout=5, additional_headers=headers) as ws:
            hello = orjson.loads(ws.recv(timeout=5))
            assert hello["payload"]["topic"] == "hello"
            return 101, hello["payload"]["event"]["user_id"]
    except InvalidStatus as exc:
        return exc.response.status_code, exc.response.body.decode() if exc.response.body else ""


async def handshake_status(url: str, credential: str, via: str = "query") -> tuple[int, str]:
    """Connect with ``credential``; 101 and the user id if accepted, else the refusal."""
    return await trio.to_thread.run_sync(_handshake_status, url, credential, via)


CLAIMS = {"aud": "trio-gw-tests", "iss": "https://issuer.test"}


class Issuer(Protocol):
    def __call__(self, lifetime: float = ..., sub: str = ..., *, forged: bool = ...) -> str: ...


def rs256_config(tmp_path: Path, keys: Any, **auth: Any) -> Path:
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in auth.items())
    return write_config(
        tmp_path,
        f"""
[auth]
jwt_algorithm = "RS256"
jwt_public_key_file = "{keys.rsa_public_pem}"
audience = "trio-gw-tests"
issuer = "https://issuer.test"
leeway = 0
{extra}
[admin]
api_key = "{API_KEY}"
""",
    )


async def test_rs256_handshakes_accept_only_valid_tokens(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    config = rs256_config(tmp_path, keys)
    claims = CLAIMS
    public_pem = keys.rsa_public_pem.read_bytes()
    cases = {
        "valid": (token(keys.rsa_private, name="Alice", **claims), 101, "alice"),
        "expired": (token(keys.rsa_private, lifetime=-60, **claims), 401, "token expired"),
        "wrong key": (token(keys.other_rsa_private, **claims), 401, "signature"),
        "alg none": (unsigned_token(), 401, "algorithm not accepted"),
        # Algorithm confusion: HS256 "signed" with the RSA public key as the secret.
        "HS/RS confusion": (_hs256_with_secret(public_pem, claims), 401, "algorithm not accepted"),
        "wrong audience": (
            token(keys.rsa_private, aud="someone-else", iss="https://issuer.test"),
            401,
            "audience",
        ),
        "wrong issuer": (
            token(keys.rsa_private, aud="trio-gw-tests", iss="https://evil.test"),
            401,
            "issuer",
        ),
        "no exp": (token(keys.rsa_private, exp=None, **claims), 401, "'exp'"),
        "not a JWT": ("not-a-token", 401, "invalid token"),
    }
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--config", str(config)) as gateway:
            results = {
                name: await handshake_status(gateway.ws_url, credential)
                for name, (credential, _, _) in cases.items()
            }
            async with gateway.admin() as admin:
                stats = (await admin.get("/api/statistics")).json()
    for name, (_, status, detail) in cases.items():
        assert results[name][0] == status, (name, results[name])
        assert detail in results[name][1], (name, results[name])
    assert stats["rejected_handshakes"] == {"refused": len(cases) - 1}
    assert stats["sessions_opened"] == 1


def _hs256_with_secret(secret: bytes, claims: dict[str, Any]) -> str:
    """pyjwt refuses to use a PEM key as an HMAC secret, so sign by hand."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = b64(orjson.dumps({"sub": "mallory", "exp": int(time.time()) + 300, **claims}))
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


@pytest.mark.parametrize("algorithm", ["HS256", "ES256-jwks", "RS256-jwks"])
async def test_other_key_sources(tmp_path: Path, algorithm: str) -> None:
    keys = make_keys(tmp_path)
    if algorithm == "HS256":
        auth = f'jwt_algorithm = "HS256"\njwt_secret = "{HS_SECRET}"'
        good = token(HS_SECRET, "HS256", sub="bob")
        bad = token(HS_SECRET + "x", "HS256", sub="bob")
    elif algorithm == "ES256-jwks":
        auth = f'jwt_algorithm = "ES256"\njwks_file = "{keys.jwks}"'
        good = token(keys.ec_private, "ES256", sub="bob", headers={"kid": "ec-1"})
        bad = token(keys.ec_private, "ES256", sub="bob", headers={"kid": "unknown"})
    else:
        auth = f'jwt_algorithm = "RS256"\njwks_file = "{keys.jwks}"'
        good = token(keys.rsa_private, sub="bob", headers={"kid": "rsa-1"})
        bad = token(keys.other_rsa_private, sub="bob", headers={"kid": "rsa-1"})
    config = write_config(tmp_path, f'[auth]\n{auth}\n[admin]\napi_key = "{API_KEY}"\n')
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--config", str(config)) as gateway:
            for via in ("query", "header", "cookie"):
                assert await handshake_status(gateway.ws_url, good, via) == (101, "bob")
                status, _ = await handshake_status(gateway.ws_url, bad, via)
                assert status == 401


async def refresh(ws: Any, credential: str) -> dict[str, Any]:
    await ws.send_message(orjson.dumps({"type": "auth", "payload": {"token": credential}}).decode())
    reply = await receive_json(ws)
    assert reply["type"] == "auth", reply
    payload: dict[str, Any] = reply["payload"]
    return payload


async def echo(ws: Any, trace_id: str) -> dict[str, Any]:
    request = {"type": "request", "payload": {"service": "s", "method": "m", "trace_id": trace_id}}
    await ws.send_message(orjson.dumps(request).decode())
    reply: dict[str, Any] = await receive_json(ws)
    return reply


@asynccontextmanager
async def rs256_gateway(tmp_path: Path) -> AsyncIterator[tuple[GatewayProcess, Issuer]]:
    """The gateway checking RS256 tokens; yields it and a token issuer for it."""
    keys = make_keys(tmp_path)

    def issue(lifetime: float = 300, sub: str = "alice", *, forged: bool = False) -> str:
        key = keys.other_rsa_private if forged else keys.rsa_private
        return token(key, sub=sub, lifetime=lifetime, **CLAIMS)

    async with gateway_process("--config", str(rs256_config(tmp_path, keys))) as gateway:
        yield gateway, issue


# Expiry runs on the gateway's wall clock, in another process. Sessions open
# with long-lived tokens (so that no handshake races a deadline), then move to
# a short one in-band; a machine too slow to refresh before that short token
# expires tries again with a longer one, rather than failing.
SHORT_LIFETIMES = (3, 6, 12, 24)


async def test_refresh_moves_the_deadline_and_expiry_closes_with_4005(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT + sum(SHORT_LIFETIMES)):
        async with rs256_gateway(tmp_path) as (gateway, issue):
            for lifetime in SHORT_LIFETIMES:
                async with gateway.admin() as admin:
                    before = (await admin.get("/api/statistics")).json()["closes_by_code"]
                async with (
                    client(gateway.ws_url, issue()) as (refreshed, _),
                    client(gateway.ws_url, issue()) as (lapsing, _),
                ):
                    short = issue(lifetime=lifetime)
                    if not all([(await refresh(ws, short))["ok"] for ws in (refreshed, lapsing)]):
                        continue  # the short token expired before it was checked
                    # A refresh before exp moves the deadline...
                    try:
                        answer = await refresh(refreshed, issue(lifetime=120))
                    except ConnectionClosed:
                        continue  # the short deadline passed first
                    assert answer["ok"] is True and answer["user_id"] == "alice"
                    assert answer["valid_until"] > time.time() + 60
                    # ... a refresh with a bad token is refused but closes nothing ...
                    answer = await refresh(refreshed, issue(forged=True))
                    assert answer == {"ok": False, "error": "token signature does not verify"}
                    # ... and the connection that did not refresh is closed with 4005.
                    with pytest.raises(ConnectionClosed) as closed:
                        await lapsing.get_message()
                    assert closed.value.reason.code == 4005
                    # The refreshed one outlived its short token's deadline.
                    reply = await echo(refreshed, "after-expiry")
                    assert reply["payload"]["trace_id"] == "after-expiry"
                    break
            else:
                pytest.fail(f"no refresh beat a {SHORT_LIFETIMES[-1]} s token")
            async with gateway.admin() as admin:
                stats = (await admin.get("/api/statistics")).json()
                metrics = (await admin.get("/metrics")).text
    assert stats["closes_by_code"].get("4005", 0) - before.get("4005", 0) == 1
    assert 'trio_gw_auth_refreshes_total{outcome="invalid"} 1.0' in metrics


async def test_refresh_after_expiry_is_too_late(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT + sum(SHORT_LIFETIMES)):
        async with rs256_gateway(tmp_path) as (gateway, issue):
            for lifetime in SHORT_LIFETIMES:
                async with client(gateway.ws_url, issue()) as (ws, _):
                    if not (await refresh(ws, issue(lifetime=lifetime)))["ok"]:
                        continue  # the short token expired before it was checked
                    # The gateway closes the session once the short token lapses...
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == 4005
                    # ... and a fresh token cannot bring it back.
                    with pytest.raises(ConnectionClosed):
                        await refresh(ws, issue(lifetime=120))
                    break
            else:
                pytest.fail(f"no refresh beat a {SHORT_LIFETIMES[-1]} s token")


async def test_refresh_for_another_user_closes_the_connection(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with rs256_gateway(tmp_path) as (gateway, issue):
            async with client(gateway.ws_url, issue()) as (ws, _):
                answer = await refresh(ws, issue(sub="mallory"))
                assert answer == {"ok": False, "error": "token is for a different user"}
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1008


def test_verifier_refuses_bad_key_files(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    missing = GatewayConfig.from_mapping(
        {
            "auth": {"jwt_algorithm": "RS256", "jwt_public_key_file": str(tmp_path / "nope.pem")},
            "admin": {"enabled": False},
        }
    )
    with pytest.raises(ConfigError, match=r"auth\.jwt_public_key_file: cannot read"):
        JwtVerifier(missing.auth)
    # An EC key where an RSA one is expected.
    wrong = GatewayConfig.from_mapping(
        {
            "auth": {"jwt_algorithm": "RS256", "jwt_public_key_file": str(keys.ec_public_pem)},
            "admin": {"enabled": False},
        }
    )
    with pytest.raises(
        ConfigError, match=r"auth\.jwt_public_key_file: .* is not a RS256 public key"
    ):
        JwtVerifier(wrong.auth)
    no_hs_key = tmp_path / "only-ec.json"
    no_hs_key.write_bytes(
        orjson.dumps(
            {
                "keys": [
                    k for k in orjson.loads(keys.jwks.read_bytes())["keys"] if k["kid"] == "ec-1"
                ]
            }
        )
    )
    only_ec = GatewayConfig.from_mapping(
        {
            "auth": {"jwt_algorithm": "RS256", "jwks_file": str(no_hs_key)},
            "admin": {"enabled": False},
        }
    )
    with pytest.raises(ConfigError, match=r"auth\.jwks_file: .* holds no RS256 key"):
        JwtVerifier(only_ec.auth)


async def test_refused_refreshes_keep_the_connection() -> None:
    with trio.fail_after(TIMEOUT):
        async with gateway_process() as gateway, client(gateway.ws_url, "dev") as (ws, _):
            await ws.send_message('{"type": "auth", "payload": {}}')
            assert (await receive_json(ws))["payload"] == {
                "ok": False,
                "error": "payload.token: expected a string",
            }
            answer = await refresh(ws, "anything")
            assert answer == {"ok": False, "error": "dev mode: tokens are not checked"}
            reply = await echo(ws, "still-open")
            assert reply["payload"]["trace_id"] == "still-open"


def _signed_raw(key: Any, payload: bytes) -> str:
    """An RS256 token over exactly these payload bytes (pyjwt's encoder cannot write 1e400)."""
    import jwt

    return jwt.PyJWS().encode(payload, key, algorithm="RS256")


async def test_absurd_claims_are_refused_with_401(tmp_path: Path) -> None:
    keys = make_keys(tmp_path)
    config = rs256_config(tmp_path, keys)
    key = keys.rsa_private
    later = int(time.time()) + 300
    claims = b'"aud": "trio-gw-tests", "iss": "https://issuer.test"'
    cases = {
        # 10**400 has no float value: it used to end in a 500 and a traceback.
        "exp 10**400": (token(key, exp=10**400, **CLAIMS), "'exp' claim is out of range"),
        "exp 1e300": (token(key, exp=1e300, **CLAIMS), "'exp' claim is out of range"),
        "exp 1e400": (
            _signed_raw(key, b'{"sub": "alice", "exp": 1e400, ' + claims + b"}"),
            "invalid token",
        ),
        "exp string": (token(key, exp="9999999999", **CLAIMS), "'exp' claim must be a number"),
        "nbf 10**400": (token(key, nbf=10**400, **CLAIMS), "not valid yet"),
        "iat 10**400": (token(key, iat=10**400, **CLAIMS), "not valid yet"),
        "iat 1e400": (
            _signed_raw(key, b'{"sub": "alice", "exp": %d, "iat": 1e400, %s}' % (later, claims)),
            "invalid token",
        ),
        "sub empty": (token(key, sub="", **CLAIMS), "'sub' claim must be a non-blank string"),
        "sub blank": (token(key, sub=" \t ", **CLAIMS), "'sub' claim must be a non-blank string"),
        "sub newline": (token(key, sub="alice\nINFO forged", **CLAIMS), "control characters"),
        "sub NUL": (token(key, sub="alice\x00", **CLAIMS), "control characters"),
        "sub DEL": (token(key, sub="al\x7fice", **CLAIMS), "control characters"),
        "sub C1": (token(key, sub="alice\x85", **CLAIMS), "control characters"),
        "sub RLO": (token(key, sub="ali\u202ece", **CLAIMS), "control characters"),
    }
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--config", str(config)) as gateway:
            results = {
                name: await handshake_status(gateway.ws_url, credential)
                for name, (credential, _) in cases.items()
            }
            # A refresh with such a token is refused the same way, and the
            # connection stays as it was.
            async with client(gateway.ws_url, token(key, **CLAIMS)) as (ws, _):
                answer = await refresh(ws, cases["exp 10**400"][0])
                assert answer == {"ok": False, "error": results["exp 10**400"][1]}
                answer = await refresh(ws, cases["sub newline"][0])
                assert answer["ok"] is False and "control characters" in answer["error"]
                assert (await echo(ws, "still-open"))["payload"]["trace_id"] == "still-open"
            async with gateway.admin() as admin:
                stats = (await admin.get("/api/statistics")).json()
        records = gateway.log_records()
    for name, (_, reason) in cases.items():
        status, body = results[name]
        assert status == 401, (name, results[name])
        assert reason in body, (name, results[name])
    assert stats["rejected_handshakes"] == {"refused": len(cases)}
    assert not [r for r in records if "exception" in r or r["level"] == "ERROR"]
