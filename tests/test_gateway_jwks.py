"""Signing keys from a JWKS URL (``auth.jwks_url``, in ``trio_gw/gateway/_jwt.py``).

The real ``trio-gw serve`` process checks tokens against a real JWKS server on
127.0.0.1 (Starlette on hypercorn, in the test's nursery) that rotates its keys,
fails in the ways providers fail, holds a request, or is not listening yet.

Rules, as in the rest of the suite: every test runs under ``trio.fail_after``;
nothing is mocked; no timing thresholds. Where the gateway must not refetch,
its intervals are an hour, so that a count of fetches is exact; where it must
retry, the test waits for the retries (their count, in /metrics) to happen.
"""

from __future__ import annotations

import gzip
import logging
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trio_gw import ConfigError, GatewayConfig
from trio_gw.gateway._jwt import _parse_jwks

from ._gateway_support import API_KEY, TRIO_GW, GatewayProcess, gateway_process, token, write_config
from .conftest import TIMEOUT, client
from .test_gateway_auth import handshake_status, refresh

HOUR = 3600.0

# --- a JWKS server ---------------------------------------------------------------------


def _jwk(kid: str, key: Any, algorithm: str = "RS256") -> dict[str, Any]:
    public = orjson.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(key.public_key()))
    return {**public, "kid": kid, "alg": algorithm, "use": "sig"}


@attrs.define(eq=False)
class JwksServer:
    """Serves ``{"keys": [...]}`` with the public halves of the keys in ``served``.

    ``answer`` picks a failure instead ("500", "not json", "too large",
    "no RS256 key", "hang"); while ``gate`` is an unset event, requests wait for it.
    """

    url: str
    listen: Callable[[], Awaitable[None]]
    private: dict[str, Any] = attrs.Factory(dict)  # every key ever made, by kid
    served: list[str] = attrs.Factory(list)
    answer: str = "keys"
    gate: trio.Event | None = None
    fetches: int = 0
    waiting: int = 0

    def rotate(self) -> str:
        """Serve a new key (new kid) instead of the current ones; returns its kid."""
        kid = f"key-{len(self.private) + 1}"
        self.private[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.served = [kid]
        return kid

    def sign(self, kid: str, sub: str = "alice") -> str:
        return token(self.private[kid], sub=sub, headers={"kid": kid})

    async def respond(self, _request: Request) -> Response:
        self.fetches += 1
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        match self.answer:
            case "keys":
                return JSONResponse({"keys": [_jwk(k, self.private[k]) for k in self.served]})
            case "500":
                return JSONResponse({"error": "provider down"}, status_code=500)
            case "not json":
                return Response(b"<html>maintenance</html>", media_type="text/html")
            case "too large":
                return Response(b" " * ((1 << 20) + 1), media_type="application/json")
            case "no RS256 key":
                ec_key = ec.generate_private_key(ec.SECP256R1())
                return JSONResponse({"keys": [_jwk("ec-1", ec_key, "ES256")]})
            case "hang":
                await trio.sleep_forever()
            case "gzip":  # a small body that would inflate past any bound
                keys = {"keys": [_jwk(k, self.private[k]) for k in self.served]}
                return Response(
                    gzip.compress(orjson.dumps(keys)),
                    media_type="application/json",
                    headers={"content-encoding": "gzip"},
                )
        raise AssertionError(self.answer)


@asynccontextmanager
async def jwks_server(*, listening: bool = True) -> AsyncIterator[JwksServer]:
    """A JWKS server on 127.0.0.1:<free port>; with ``listening=False`` the port is
    bound but refuses connections until ``await server.listen()``."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def listen() -> None:
            config = HypercornConfig()
            config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns it from here
            config.accesslog = None
            config.errorlog = logging.getLogger("tests.jwks")
            config.graceful_timeout = 0.1
            app = Starlette(routes=[Route("/jwks.json", server.respond, methods=["GET"])])
            await nursery.start(
                lambda task_status: hypercorn_serve(app, config, task_status=task_status)
            )

        server = JwksServer(f"http://127.0.0.1:{port}/jwks.json", listen)
        try:
            if listening:
                await listen()
            yield server
        finally:
            if server.gate is not None:
                server.gate.set()
            nursery.cancel_scope.cancel()
            sock.close()  # if it never listened


# --- the gateway -----------------------------------------------------------------------


def jwks_config(
    tmp_path: Path,
    url: str,
    *,
    refresh: float = HOUR,
    min_refresh: float = HOUR,
    timeout: float = 5.0,
) -> Path:
    return write_config(
        tmp_path,
        f"""
[auth]
jwt_algorithm = "RS256"
jwks_url = "{url}"
jwks_refresh_interval = {refresh}
jwks_min_refresh_interval = {min_refresh}
jwks_timeout = {timeout}
[admin]
api_key = "{API_KEY}"
""",
    )


async def metrics(gateway: GatewayProcess) -> dict[str, float]:
    """The gateway's unlabelled samples, by name."""
    async with gateway.admin() as admin:
        text = (await admin.get("/metrics")).text
    samples = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


async def eventually(condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll a condition of the other process (under the caller's fail_after)."""
    # Polling, because the conditions are another process's counters and logs.
    while not await condition():  # noqa: ASYNC110
        await trio.sleep(0.02)


async def fetch_errors_reach(gateway: GatewayProcess, count: int) -> None:
    async def reached() -> bool:
        return (await metrics(gateway)).get("trio_gw_jwks_fetch_errors_total", 0) >= count

    await eventually(reached)


async def readyz(gateway: GatewayProcess) -> tuple[int, Any]:
    async with gateway.admin(key=None) as anonymous:
        response = await anonymous.get("/readyz")
    return response.status_code, response.json()


def fetch_warnings(gateway: GatewayProcess) -> list[str]:
    return [
        r["message"]
        for r in gateway.log_records()
        if r["level"] == "WARNING" and "auth.jwks_url: cannot fetch" in r["message"]
    ]


# --- rotation and the rate limit -----------------------------------------------------------


async def test_a_rotated_key_is_fetched_on_its_unknown_kid_and_forged_kids_are_not(
    tmp_path: Path,
) -> None:
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with trio.fail_after(TIMEOUT):
        async with jwks_server() as server:
            old = server.rotate()
            # No background refresh, and at most one fetch per hour on an unknown kid.
            config = jwks_config(tmp_path, server.url)
            async with gateway_process("--config", str(config)) as gateway:
                assert server.fetches == 1  # at start
                assert await handshake_status(gateway.ws_url, server.sign(old)) == (101, "alice")
                async with client(gateway.ws_url, server.sign(old)) as (ws, _):
                    new = server.rotate()  # the provider drops the old key
                    # An in-band refresh with the new key: its kid is unknown, so
                    # the gateway fetches the set again (no restart) and accepts it.
                    answer = await refresh(ws, server.sign(new))
                    assert answer["ok"] is True and answer["user_id"] == "alice", answer
                assert server.fetches == 2
                # New handshakes with the new key need no fetch.
                assert await handshake_status(gateway.ws_url, server.sign(new, "bob")) == (
                    101,
                    "bob",
                )
                # The retired key is refused, and does not refetch within the interval.
                status, reason = await handshake_status(gateway.ws_url, server.sign(old))
                assert (status, reason) == (401, "unknown signing key (kid)")
                # Nor does a flood of made-up kids.
                forged: dict[int, tuple[int, str]] = {}

                async def forge(i: int) -> None:
                    credential = token(forger, sub=f"mallory{i}", headers={"kid": f"forged-{i}"})
                    forged[i] = await handshake_status(gateway.ws_url, credential)

                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(forge, i)
                assert set(forged.values()) == {(401, "unknown signing key (kid)")}
                assert server.fetches == 2
                samples = await metrics(gateway)
    assert samples["trio_gw_jwks_fetches_total"] == 2
    assert samples["trio_gw_jwks_fetch_errors_total"] == 0
    assert samples["trio_gw_jwks_keys"] == 1
    assert samples["trio_gw_jwks_age_seconds"] >= 0
    # The set was logged when it changed (two key sets), never per handshake.
    loaded = [r for r in gateway.log_records() if "key(s) in use from" in r["message"]]
    assert [r["message"].rpartition("(kid ")[2] for r in loaded] == [f"{old})", f"{new})"]


async def test_concurrent_unknown_kids_share_one_fetch(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with jwks_server() as server:
            server.rotate()
            config = jwks_config(tmp_path, server.url, timeout=TIMEOUT)
            async with gateway_process("--config", str(config)) as gateway:
                assert server.fetches == 1
                new = server.rotate()
                server.gate = trio.Event()  # the next fetch is held at the server
                results: dict[int, tuple[int, str]] = {}

                async def connect(i: int) -> None:
                    results[i] = await handshake_status(gateway.ws_url, server.sign(new, f"u{i}"))

                async def all_waiting() -> bool:
                    async with gateway.admin() as admin:
                        stats = (await admin.get("/api/statistics")).json()
                    return server.waiting == 1 and stats["handshakes_in_progress"] == 20

                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(connect, i)
                    # The first unknown kid started a fetch; the other 19 wait for
                    # that one instead of being refused by the rate limit.
                    await eventually(all_waiting)
                    server.gate.set()
                assert results == {i: (101, f"u{i}") for i in range(20)}
                assert server.fetches == 2


# --- failures ----------------------------------------------------------------------------


async def test_not_ready_until_the_first_key_set_is_loaded(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with jwks_server(listening=False) as server:
            kid = server.rotate()
            # Retries come every 0.2 s (the backoff's cap); no background refresh.
            config = jwks_config(tmp_path, server.url, min_refresh=0.2)
            async with gateway_process("--config", str(config)) as gateway:
                status, body = await readyz(gateway)
                assert status == 503
                assert body == {
                    "status": "not ready",
                    "reason": "no signing keys loaded yet from auth.jwks_url",
                }
                # Meanwhile handshakes are told to come back (503, not 401).
                status, reason = await handshake_status(gateway.ws_url, server.sign(kid))
                assert status == 503 and "signing keys not loaded yet" in reason
                await fetch_errors_reach(gateway, 3)
                assert (await readyz(gateway))[0] == 503
                await server.listen()  # the provider comes up

                async def ready() -> bool:
                    return (await readyz(gateway))[0] == 200

                await eventually(ready)
                assert await handshake_status(gateway.ws_url, server.sign(kid)) == (101, "alice")
    # One warning for the whole streak of failures, and a line when it ended.
    [warning] = fetch_warnings(gateway)
    assert "ConnectError" in warning and "no keys yet: handshakes get 503" in warning
    assert any("works again after" in r["message"] for r in gateway.log_records())


@pytest.mark.parametrize(
    ("failure", "logged"),
    [
        ("500", "is HTTP 500, not 200"),
        ("not json", "is not a JWKS document"),
        ("too large", "is larger than 1048576 bytes"),
        ("no RS256 key", "holds no RS256 key"),
        ("hang", "no complete answer within 0.5s"),
        ("gzip", "is compressed (gzip); only identity is accepted"),
    ],
)
async def test_a_failing_provider_leaves_the_last_good_key_set_in_use(
    tmp_path: Path, failure: str, logged: str
) -> None:
    with trio.fail_after(TIMEOUT):
        async with jwks_server() as server:
            kid = server.rotate()
            config = jwks_config(tmp_path, server.url, refresh=0.2, min_refresh=0.2, timeout=0.5)
            async with gateway_process("--config", str(config)) as gateway:
                assert await handshake_status(gateway.ws_url, server.sign(kid)) == (101, "alice")
                server.answer = failure
                await fetch_errors_reach(gateway, 3)
                assert await handshake_status(gateway.ws_url, server.sign(kid)) == (101, "alice")
                assert (await readyz(gateway))[0] == 200
                samples = await metrics(gateway)
                assert samples["trio_gw_jwks_keys"] == 1
                server.answer = "keys"  # the provider recovers

                async def recovered() -> bool:
                    return any("works again" in r["message"] for r in gateway.log_records())

                await eventually(recovered)
    [warning] = fetch_warnings(gateway)
    assert logged in warning and "keeping the last good key set (1 keys)" in warning


# --- configuration ------------------------------------------------------------------------


def test_jwks_url_settings_are_validated_by_field() -> None:
    rs256 = {"jwt_algorithm": "RS256"}
    for auth, expected in (
        (
            {**rs256, "jwks_url": "ftp://idp.example/jwks.json"},
            "auth.jwks_url: expected an http:// or https:// URL, got 'ftp://idp.example/jwks.json'",
        ),
        ({**rs256, "jwks_url": "https://"}, "auth.jwks_url: expected an http:// or https:// URL"),
        (
            {**rs256, "jwks_url": "https://idp.example/jwks.json", "jwks_file": "k.json"},
            "auth.jwks_url: RS256 needs exactly one of jwt_public_key_file, jwks_file or jwks_url",
        ),
        (
            {"jwt_algorithm": "HS256", "jwks_url": "https://idp.example/jwks.json"},
            "auth.jwks_url: HS256 needs jwt_secret and no key file or URL",
        ),
        (
            {"jwks_url": "https://idp.example/jwks.json"},
            "auth.jwt_algorithm: required when jwks_url is set",
        ),
        (
            {**rs256, "jwks_url": "https://idp.example/j", "jwks_min_refresh_interval": 600},
            "auth.jwks_min_refresh_interval: expected at most jwks_refresh_interval (300.0), "
            "got 600",
        ),
        ({**rs256, "jwks_timeout": 0}, "auth.jwks_timeout: expected a number > 0 (seconds)"),
        (
            {**rs256, "jwks_refresh_interval": "soon"},
            "auth.jwks_refresh_interval: expected a number",
        ),
    ):
        with pytest.raises(ConfigError) as error:
            GatewayConfig.from_mapping({"auth": auth, "admin": {"enabled": False}})
        assert expected in str(error.value), (auth, str(error.value))


def test_jwks_url_comes_from_the_environment_too() -> None:
    config = GatewayConfig.load(
        None,
        {
            "TRIO_GW_AUTH_JWT_ALGORITHM": "ES256",
            "TRIO_GW_AUTH_JWKS_URL": "https://idp.example/.well-known/jwks.json",
            "TRIO_GW_AUTH_JWKS_MIN_REFRESH_INTERVAL": "0.25",
            "TRIO_GW_ADMIN_API_KEY": "k",
        },
    )
    auth = config.auth
    assert auth.jwks_url == "https://idp.example/.well-known/jwks.json"
    assert (auth.jwks_min_refresh_interval, auth.jwks_refresh_interval) == (0.25, 300.0)
    assert auth.jwks_timeout == 5.0


def test_check_config_checks_the_url_without_fetching_it(tmp_path: Path) -> None:
    with socket.socket() as unused:  # bound, not listening: a fetch would fail
        unused.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{unused.getsockname()[1]}/jwks.json"
        ok = subprocess.run(
            [TRIO_GW, "check-config", "--config", str(jwks_config(tmp_path, url))],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    assert ok.returncode == 0, ok.stderr
    assert "JWT RS256" in ok.stdout
    bad = subprocess.run(
        [TRIO_GW, "check-config", "--config", str(jwks_config(tmp_path, "file:///etc/jwks"))],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert bad.returncode == 2
    assert "auth.jwks_url: expected an http:// or https:// URL" in bad.stderr


def test_keys_the_gateway_cannot_use_do_not_spoil_the_set() -> None:
    """A numeric kid (once crashed the refresh task), "alg": "none", a key for another
    algorithm, a malformed member and a repeated kid are skipped; the usable key stands."""
    good, other = rsa.generate_private_key(65537, 2048), rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    document = {
        "keys": [
            {**_jwk("numeric", good), "kid": 7},
            {"kty": "oct", "k": "c2VjcmV0", "alg": "none", "kid": "none"},
            _jwk("ec-1", ec_key, "ES256"),
            {"kty": "RSA", "kid": "broken", "n": 5},
            "not an object",
            _jwk("rsa-1", good),
            _jwk("rsa-1", other),
        ]
    }
    keys = _parse_jwks(orjson.dumps(document), "RS256")
    assert list(keys) == ["rsa-1"]
    signed = jwt.encode({"sub": "a"}, good, algorithm="RS256")
    assert jwt.decode(signed, keys["rsa-1"].key, algorithms=["RS256"]) == {"sub": "a"}
