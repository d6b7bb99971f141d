"""Operating the real ``trio-gw serve`` process: config, shutdown, signals, logs, TLS."""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, open_websocket_url

from trio_gw import GatewayConfig

from ._gateway_support import (
    API_KEY,
    HS_SECRET,
    TRIO_GW,
    deaf_client,
    gateway_process,
    token,
    write_config,
)
from .conftest import TIMEOUT, client, receive_json, wait_for

EXAMPLE = Path(__file__).parent.parent / "examples" / "hub.toml"
SECRETS = {"TRIO_GW_AUTH_JWT_SECRET": HS_SECRET, "TRIO_GW_ADMIN_API_KEY": API_KEY}


def check_config(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [TRIO_GW, "check-config", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_example_config_documents_every_setting() -> None:
    text = EXAMPLE.read_text()
    config = GatewayConfig()
    for section in attrs.fields(GatewayConfig):
        assert f"[{section.name}]" in text
        for field in attrs.fields(type(getattr(config, section.name))):
            assert f"\n{field.name} = " in text or f"\n# {field.name} = " in text, field.name
    ok = check_config("--config", str(EXAMPLE), env=SECRETS)
    assert ok.returncode == 0, ok.stderr
    assert "JWT HS256" in ok.stdout
    # Without the secret from the environment, the error names the field.
    missing = check_config("--config", str(EXAMPLE), env={"TRIO_GW_ADMIN_API_KEY": API_KEY})
    assert missing.returncode == 2
    assert "auth.jwt_secret: HS256 needs jwt_secret" in missing.stderr


async def test_example_config_serves(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with gateway_process(
            "--config", str(EXAMPLE), "--host", "127.0.0.1", env=SECRETS
        ) as gateway:
            credential = token(
                HS_SECRET, "HS256", sub="dana", aud="my-app", iss="https://auth.example.com"
            )
            async with client(gateway.ws_url, credential) as (_, hello):
                assert hello["user_id"] == "dana"


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            (),
            {"TRIO_GW_AUTH_JWT_ALGORITHM": "HS512"},
            "auth.jwt_algorithm: expected one of HS256, RS256, ES256, got 'HS512'",
        ),
        (
            ("--backend-url", "ftp://files"),
            {},
            "backend.url: expected an http:// or https:// URL, got 'ftp://files'",
        ),
        ((), {"TRIO_GW_LOG_FORMAT": "xml"}, "log.format: expected 'text' or 'json', got 'xml'"),
        (
            (),
            {"TRIO_GW_BACKEND_FORWARD_TOKEN": "maybe"},
            "backend.forward_token: expected true or false, got 'maybe'",
        ),
        (
            ("--admin-host", "0.0.0.0"),
            {},
            "admin.api_key: required when the admin API binds '0.0.0.0'",
        ),
        (
            (),
            {
                "TRIO_GW_AUTH_JWT_ALGORITHM": "RS256",
                "TRIO_GW_AUTH_JWKS_FILE": "/nonexistent.json",
                "TRIO_GW_ADMIN_ENABLED": "false",
            },
            "auth.jwks_file: cannot read '/nonexistent.json'",
        ),
        (
            ("--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"),
            {},
            "tls.cert_file: cannot load '/nonexistent.pem'",
        ),
        (
            ("--admin-tls-cert", "/nonexistent.pem", "--admin-tls-key", "/nonexistent.key"),
            {},
            "admin.tls_cert_file: cannot load '/nonexistent.pem'",
        ),
    ],
)
def test_bad_values_exit_2_naming_the_field(
    args: tuple[str, ...], env: dict[str, str], expected: str
) -> None:
    result = check_config(*args, env=env)
    assert result.returncode == 2
    assert expected in result.stderr, result.stderr


def test_serve_refuses_a_bad_key_file_before_binding() -> None:
    import os

    result = subprocess.run(
        [TRIO_GW, "serve", "--port", "0", "--admin-port", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={
            **os.environ,
            "TRIO_GW_AUTH_JWT_ALGORITHM": "ES256",
            "TRIO_GW_AUTH_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem",
            "TRIO_GW_ADMIN_ENABLED": "0",
        },
        check=False,
    )
    assert result.returncode == 2
    assert "auth.jwt_public_key_file: cannot read '/nonexistent.pem'" in result.stderr


async def test_graceful_shutdown_closes_everyone_with_1001(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[hub]\nshutdown_timeout = 10\nclose_timeout = 3\n")
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--config", str(config), stop=False) as gateway:
            async with (
                client(gateway.ws_url, "u1") as (ws1, hello1),
                client(gateway.ws_url, "u2") as (ws2, _),
                client(gateway.ws_url, "u3") as (ws3, _),
                deaf_client(gateway.ws_url, "deaf"),
                gateway.admin(key=None) as admin,
            ):
                assert (await admin.get("/readyz")).status_code == 200
                # Something queued for u1 is still delivered before the close.
                await admin.post("/api/send/users", json={"user_ids": ["u1"], "message": "last"})
                gateway.process.send_signal(signal.SIGTERM)
                assert await ws1.get_message() == "last"
                codes = []
                for ws in (ws1, ws2, ws3):
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    codes.append(closed.value.reason.code)
                assert codes == [1001, 1001, 1001]
                # The deaf client holds the shutdown open (up to close_timeout):
                # meanwhile the process is not ready and accepts no one new.
                not_ready = await admin.get("/readyz")
                assert not_ready.status_code == 503
                port = int(gateway.ws_url.rpartition(":")[2])
                with pytest.raises(OSError, match="all attempts to connect"):
                    await trio.open_tcp_stream("127.0.0.1", port)
            assert await gateway.process.wait() == 0
    records = gateway.log_records()
    assert any("SIGTERM received" in r["message"] for r in records)
    registered = [r for r in records if r["message"].endswith("registered")]
    assert {r["user_id"] for r in registered} >= {"u1", "u2", "u3", "deaf"}
    assert all(r["session_id"].startswith("hub:") for r in registered)
    assert any(r.get("session_id") == hello1["session_id"] for r in registered)


async def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[hub]\nshutdown_timeout = 600\nclose_timeout = 600\n")
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process("--config", str(config), stop=False) as gateway,
            deaf_client(gateway.ws_url, "deaf"),
        ):
            gateway.process.send_signal(signal.SIGINT)
            await wait_for(lambda: any("SIGINT received" in line for line in gateway.log))
            gateway.process.send_signal(signal.SIGINT)
            assert await gateway.process.wait() == 128 + signal.SIGINT
    assert any("received again: exiting at once" in line for line in gateway.log)


async def test_tls_serves_wss(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    with trio.fail_after(TIMEOUT):
        async with gateway_process(
            "--tls-cert", str(cert_file), "--tls-key", str(key_file)
        ) as gateway:
            assert gateway.ws_url.startswith("wss://")
            async with open_websocket_url(f"{gateway.ws_url}/?token=tess", trusted) as ws:
                hello = await receive_json(ws)
                assert hello["payload"]["event"]["user_id"] == "tess"
                await trio.aclose_forcefully(ws._stream)
            # A client that does not trust the certificate is refused by TLS itself.
            port = int(gateway.ws_url.rpartition(":")[2])
            untrusting = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", port, ssl_context=ssl.create_default_context()
            )
            with pytest.raises(trio.BrokenResourceError) as refused:
                await untrusting.do_handshake()
            assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
            await trio.aclose_forcefully(untrusting)
            async with httpx.AsyncClient() as plain:
                assert (await plain.get(f"{gateway.admin_url}/healthz")).status_code == 200


# --- admin TLS and the start-up lines -------------------------------------------------

# A URL in a start-up line: scheme, then host (IPv6 in brackets) and port, then "/".
_URL = re.compile(r"\b(?:wss?|https?)://(?:\[[0-9a-f:]+\]|[\w.-]+):\d+/")


def _issue(tmp_path: Path, *hosts: str) -> tuple[trustme.CA, Path, Path, ssl.SSLContext]:
    """A CA, a server certificate for ``hosts`` in two PEM files, and a context trusting the CA."""
    ca = trustme.CA()
    cert = ca.issue_cert(*hosts)
    cert_file, key_file = tmp_path / "admin-cert.pem", tmp_path / "admin-key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    return ca, cert_file, key_file, trusted


def _chain(exc: BaseException | None) -> list[BaseException]:
    """``exc`` and its causes (httpx under trio wraps the ssl error twice)."""
    chain = []
    while exc is not None:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _startup(log: list[str]) -> list[str]:
    """The log lines up to and including "ready"."""
    end = next(i for i, line in enumerate(log) if "ready; " in line)
    return log[: end + 1]


async def test_admin_tls_serves_https_to_verifying_clients_only(tmp_path: Path) -> None:
    _, cert_file, key_file, trusted = _issue(tmp_path, "127.0.0.1", "localhost")
    env = {
        "TRIO_GW_ADMIN_API_KEY": API_KEY,
        "TRIO_GW_ADMIN_TLS_CERT_FILE": str(cert_file),
        "TRIO_GW_ADMIN_TLS_KEY_FILE": str(key_file),
    }
    with trio.fail_after(TIMEOUT):
        async with gateway_process(env=env) as gateway:
            assert gateway.admin_url is not None and gateway.admin_url.startswith("https://")
            assert gateway.ws_url.startswith("ws://")  # [tls] is not set: clients stay on ws://
            port = int(gateway.admin_url.rpartition(":")[2])
            async with gateway.admin(verify=trusted) as admin:
                assert (await admin.get("/healthz")).json() == {"status": "ok"}
                statistics = await admin.get("/api/statistics")
                assert statistics.status_code == 200 and statistics.json()["connections"] == 0
                assert (
                    await admin.get("/api/statistics", headers={"authorization": ""})
                ).status_code == 401
                # The dashboard and the browser guard work over https: the page
                # carries its CSP, a same-origin POST passes, a cross-site one does not.
                page = await admin.get("/")
                assert page.status_code == 200
                assert "script-src 'sha256-" in page.headers["content-security-policy"]
                body = {"message": "hi"}
                own = await admin.post(
                    "/api/send/all", headers={"origin": gateway.admin_url}, json=body
                )
                assert own.status_code == 200, own.text
                hostile = await admin.post(
                    "/api/send/all", headers={"origin": "https://evil.example"}, json=body
                )
                assert hostile.status_code == 403
            # The certificate's other name works too, and passes the Host check.
            async with httpx.AsyncClient(verify=trusted) as by_name:
                assert (await by_name.get(f"https://localhost:{port}/healthz")).status_code == 200
            # A client that does not trust the CA refuses the certificate.
            async with httpx.AsyncClient() as untrusting:
                with pytest.raises(httpx.ConnectError) as refused:
                    await untrusting.get(f"{gateway.admin_url}/healthz")
                assert any(
                    isinstance(e, ssl.SSLCertVerificationError) for e in _chain(refused.value)
                )
            # Plain http to the https port gets no HTTP answer...
            async with httpx.AsyncClient() as plain:
                with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                    await plain.get(f"http://127.0.0.1:{port}/healthz")
            # ... and the process carries on serving.
            async with gateway.admin(verify=trusted) as admin:
                assert (await admin.get("/healthz")).status_code == 200
            assert gateway.process.returncode is None
    assert not any("Traceback" in line for line in gateway.log), "\n".join(gateway.log)


async def test_admin_reuses_client_tls_and_logs_one_pasteable_url_per_listener(
    tmp_path: Path,
) -> None:
    _, cert_file, key_file, trusted = _issue(tmp_path, "127.0.0.1")
    with trio.fail_after(TIMEOUT):
        async with gateway_process(
            "--tls-cert",
            str(cert_file),
            "--tls-key",
            str(key_file),
            "--log-format",
            "text",
            env={"TRIO_GW_ADMIN_USE_CLIENT_TLS": "true"},
        ) as gateway:
            startup = _startup(gateway.log)
            with_urls = [line for line in startup if _URL.search(line)]
            urls = [url for line in with_urls for url in _URL.findall(line)]
            # Exactly one line per listener, one URL each, as a person would paste it.
            assert len(with_urls) == 2, startup
            assert sorted(u.partition(":")[0] for u in urls) == ["https", "wss"], urls
            wss = next(u for u in urls if u.startswith("wss://"))
            https = next(u for u in urls if u.startswith("https://"))
            async with client(wss.rstrip("/"), "pat", ssl_context=trusted) as (_, hello):
                assert hello["user_id"] == "pat"
            async with httpx.AsyncClient(verify=trusted) as admin:
                assert (await admin.get(f"{https}healthz")).status_code == 200
    # hypercorn's own "Running on ..." line is gone; no Endpoint(...) reprs either.
    text = "\n".join(gateway.log)
    assert "Running on" not in text and "Endpoint(" not in text
    assert not any(line.startswith("{") for line in startup)


async def test_startup_lines_bracket_ipv6_and_mark_wildcard_binds(tmp_path: Path) -> None:
    _, cert_file, key_file, trusted = _issue(tmp_path, "::1")
    with trio.fail_after(TIMEOUT):
        async with gateway_process(
            "--host",
            "::1",
            "--admin-host",
            "::1",
            "--admin-tls-cert",
            str(cert_file),
            "--admin-tls-key",
            str(key_file),
            env={"TRIO_GW_ADMIN_API_KEY": API_KEY},
        ) as gateway:
            messages = [r["message"] for r in gateway.log_records()]
            [clients] = [m for m in messages if "WebSocket clients on" in m]
            [admin] = [m for m in messages if "admin API and dashboard on" in m]
            ws_url = _URL.search(clients)
            https = _URL.search(admin)
            assert ws_url and ws_url.group().startswith("ws://[::1]:"), clients
            assert https and https.group().startswith("https://[::1]:"), admin
            async with client(ws_url.group().rstrip("/"), "ivy") as (_, hello):
                assert hello["user_id"] == "ivy"
            async with httpx.AsyncClient(verify=trusted) as by_url:
                assert (await by_url.get(f"{https.group()}healthz")).status_code == 200
            assert not any("plain http" in m for m in messages)  # TLS and loopback
        async with gateway_process(
            "--admin-host", "0.0.0.0", env={"TRIO_GW_ADMIN_API_KEY": API_KEY}
        ) as wildcard:
            records = wildcard.log_records()
    [admin] = [r["message"] for r in records if "admin API and dashboard on" in r["message"]]
    assert re.fullmatch(
        r"admin API and dashboard on http://0\.0\.0\.0:\d+/ \(all interfaces: .*\)", admin
    ), admin
    # Plain http off loopback: served, with a warning that the key travels in clear.
    warnings = [r["message"] for r in records if r["level"] == "WARNING"]
    assert any("API key crosses the network in clear" in w for w in warnings), warnings
