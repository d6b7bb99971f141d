"""Support for the standalone-gateway tests: the real ``trio-gw serve`` process, a real
HTTP backend, signing keys and tokens, and a client that stops reading."""

from __future__ import annotations

import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import jwt
import orjson
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection
from wsproto.events import Request as WsRequest

TRIO_GW = str(Path(sys.executable).with_name("trio-gw"))
HS_SECRET = "a-test-secret-that-is-long-enough-for-hs256!"
API_KEY = "test-admin-key"

# The start-up lines: one per listener, then "ready".
CLIENTS_LINE = re.compile(r"WebSocket clients on (wss?://(?:\[[0-9a-f:]+\]|[\w.-]+):\d+)/")
ADMIN_LINE = re.compile(r"admin API and dashboard on (https?://(?:\[[0-9a-f:]+\]|[\w.-]+):\d+)/")
READY_LINE = re.compile(r"\bready; ")


# --- keys and tokens -----------------------------------------------------------


@attrs.frozen
class Keys:
    """Signing keys, and the files the gateway reads them from."""

    rsa_private: Any
    rsa_public_pem: Path
    ec_private: Any
    ec_public_pem: Path
    other_rsa_private: Any
    jwks: Path  # holds the EC key as kid "ec-1" and the RSA key as kid "rsa-1"


def make_keys(directory: Path) -> Keys:
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem(key: Any, name: str) -> Path:
        path = directory / name
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return path

    jwks_keys = []
    for kid, algorithm, key in (("ec-1", "ES256", ec_private), ("rsa-1", "RS256", rsa_private)):
        jwk = orjson.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(key.public_key()))
        jwks_keys.append({**jwk, "kid": kid, "alg": algorithm, "use": "sig"})
    jwks = directory / "jwks.json"
    jwks.write_bytes(orjson.dumps({"keys": jwks_keys}))
    return Keys(
        rsa_private, pem(rsa_private, "rsa.pem"), ec_private, pem(ec_private, "ec.pem"), other, jwks
    )


def token(
    key: Any,
    algorithm: str = "RS256",
    *,
    sub: str = "alice",
    lifetime: float = 300,
    headers: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    payload = {"sub": sub, "exp": int(time.time() + lifetime), **claims}
    if payload["exp"] is None:
        del payload["exp"]
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def unsigned_token(sub: str = "alice") -> str:
    """An ``alg: none`` token, built by hand because pyjwt rightly refuses to decode one."""
    import base64

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()

    header = part({"alg": "none", "typ": "JWT"})
    return f"{header}.{part({'sub': sub, 'exp': int(time.time()) + 300})}."


# --- the trio-gw process ----------------------------------------------------------


@attrs.define
class GatewayProcess:
    """A running ``trio-gw serve``; the URLs are its start-up lines' (without the final "/")."""

    process: trio.Process
    ws_url: str
    admin_url: str | None
    log: list[str]

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines so far (needs ``--log-format json``)."""
        return [orjson.loads(line) for line in self.log if line.startswith("{")]

    def admin(
        self, key: str | None = API_KEY, *, verify: ssl.SSLContext | bool = True
    ) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        assert self.admin_url is not None
        return httpx.AsyncClient(
            base_url=self.admin_url, headers=headers, timeout=10, verify=verify
        )


def write_config(directory: Path, text: str) -> Path:
    path = directory / "hub.toml"
    path.write_text(text)
    return path


@asynccontextmanager
async def gateway_process(
    *args: str,
    env: dict[str, str] | None = None,
    stop: bool = True,
    preexec_fn: Callable[[], object] | None = None,
) -> AsyncIterator[GatewayProcess]:
    """Run ``trio-gw serve --port 0 --admin-port 0 --log-format json *args`` until the block ends.

    The block's end sends SIGTERM and expects exit code 0 (unless ``stop`` is
    False, for tests that stop the process themselves). ``preexec_fn`` runs in
    the child before ``exec`` (to set its resource limits, say).
    """
    command = [TRIO_GW, "serve", "--port", "0", "--admin-port", "0", "--log-format", "json", *args]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stderr=subprocess.PIPE,
                env={**os.environ, **(env or {})},
                preexec_fn=preexec_fn,
                check=False,
            )
        )
        log: list[str] = []
        ready = trio.Event()

        async def read_log() -> None:
            assert process.stderr is not None
            buffer = b""
            async for chunk in process.stderr:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for raw in lines:
                    line = raw.decode()
                    log.append(line)
                    if READY_LINE.search(line):
                        ready.set()
            ready.set()

        nursery.start_soon(read_log)
        await ready.wait()
        startup = "\n".join(log)
        clients = CLIENTS_LINE.search(startup)
        assert clients, "trio-gw exited before it was ready:\n" + startup
        admin = ADMIN_LINE.search(startup)
        gateway = GatewayProcess(process, clients.group(1), admin and admin.group(1), log)
        try:
            yield gateway
        finally:
            if stop and process.returncode is None:
                process.send_signal(signal.SIGTERM)
        if stop:
            code = await process.wait()
            assert code == 0, "\n".join(log)


# --- a real HTTP backend ------------------------------------------------------------


@attrs.define
class Backend:
    url: str
    calls: list[dict[str, Any]] = attrs.Factory(list)
    release: trio.Event = attrs.Factory(trio.Event)  # lets "hang" calls finish


async def _backend_endpoint(backend: Backend, request: Request) -> Response:
    body = orjson.loads(await request.body())
    backend.calls.append({"body": body, "headers": dict(request.headers)})
    method = body["method"]
    if method == "hang":
        await backend.release.wait()
        return JSONResponse({"released": True})
    if method == "fail":
        return JSONResponse({"reason": "database down"}, status_code=500)
    if method == "text":
        return PlainTextResponse("this is not JSON")
    return JSONResponse(
        {
            "params": body["params"],
            "trace_id": body["trace_id"],
            "user_id": request.headers.get("x-user-id"),
            "session_id": request.headers.get("x-session-id"),
            "header_trace_id": request.headers.get("x-trace-id"),
            "authorization": request.headers.get("authorization"),
        }
    )


@asynccontextmanager
async def http_backend() -> AsyncIterator[Backend]:
    """A Starlette backend on 127.0.0.1:<free port>: echoes, fails, hangs or answers text."""
    backend = Backend("")

    async def endpoint(request: Request) -> Response:
        return await _backend_endpoint(backend, request)

    app = Starlette(routes=[Route("/rpc", endpoint, methods=["POST"])])
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tests.backend")
    config.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: hypercorn_serve(app, config, task_status=task_status)
        )
        backend.url = f"{binds[0]}/rpc"
        yield backend
        backend.release.set()
        nursery.cancel_scope.cancel()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- a client that stops reading ------------------------------------------------------


@asynccontextmanager
async def deaf_client(ws_url: str, token: str) -> AsyncIterator[trio.SocketStream]:
    """A WebSocket client (wsproto over a TCP stream) that completes the handshake
    and then never reads again, so it never answers a close frame."""
    port = int(ws_url.rpartition(":")[2])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    connection = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(connection.send(WsRequest(host="127.0.0.1", target=f"/?token={token}")))
    accepted = False
    while not accepted:
        data = await stream.receive_some()
        assert data, "server closed during the handshake"
        connection.receive_data(data)
        accepted = any(isinstance(e, AcceptConnection) for e in connection.events())
    try:
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


def json_lines(log: list[str]) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log if line.startswith("{")]


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of a refused trio-websocket handshake."""
    from trio_websocket import ConnectionRejected

    return exc.status_code if isinstance(exc, ConnectionRejected) else None
