"""The admin HTTP API of the real ``trio-gw serve`` process, checked against its OpenAPI doc."""

from __future__ import annotations

import base64
import hashlib
import itertools
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_gw.gateway._admin import API_ROUTES

from ._gateway_support import API_KEY, HS_SECRET, gateway_process, token, write_config
from .conftest import TIMEOUT, client, receive_json

CONFIG = f"""
[auth]
jwt_algorithm = "HS256"
jwt_secret = "{HS_SECRET}"

[admin]
api_key = "{API_KEY}"
"""


class Spec:
    """The served OpenAPI document, and response validation against it."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.checked: set[tuple[str, str]] = set()

    def check(self, method: str, template: str, response: httpx.Response) -> Any:
        operation = self.document["paths"][template][method]
        declared = operation["responses"].get(str(response.status_code))
        assert declared is not None, (method, template, response.status_code, response.text)
        schema = declared["content"]["application/json"]["schema"]
        body = response.json()
        jsonschema.validate(
            body,
            {**schema, "components": self.document["components"]},
            cls=jsonschema.Draft202012Validator,
        )
        self.checked.add((method, template))
        return body

    def request_schema_accepts(self, template: str, body: Any) -> bool:
        schema = self.document["paths"][template]["post"]["requestBody"]["content"][
            "application/json"
        ]["schema"]
        validator = jsonschema.Draft202012Validator(
            {**schema, "components": self.document["components"]}
        )
        return validator.is_valid(body)


async def history_until(
    get: Callable[[str], Awaitable[tuple[int, Any]]], seen: Callable[[dict[str, Any]], bool]
) -> Any:
    """Poll ``GET /api/history`` until its newest sample is ``seen``; return that answer.

    The sampler takes one a second; the caller's ``fail_after`` bounds the wait.
    """
    while True:
        status, kept = await get("/api/history")
        assert status == 200, kept
        if kept["samples"] and seen(kept["samples"][-1]):
            return kept
        await trio.sleep(0.05)


async def test_every_endpoint_against_the_openapi_document(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    alice = token(HS_SECRET, "HS256", sub="alice", name="Alice Liddell")
    bob = token(HS_SECRET, "HS256", sub="bob")
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process("--config", str(config)) as gateway,
            gateway.admin() as admin,
            client(gateway.ws_url, alice) as (a1, a1_hello),
            client(gateway.ws_url, alice) as (a2, _),
            client(gateway.ws_url, bob) as (b1, b1_hello),
        ):
            spec = Spec((await admin.get("/openapi.json")).json())
            assert spec.document["openapi"].startswith("3.1")

            async def post(template: str, body: Any) -> tuple[int, Any]:
                response = await admin.post(template, json=body)
                return response.status_code, spec.check("post", template, response)

            async def get(template: str, path: str | None = None) -> tuple[int, Any]:
                response = await admin.get(path or template)
                return response.status_code, spec.check("get", template, response)

            # send: to one session, to users, to all
            status, body = await post(
                "/api/send/session", {"session_id": a1_hello["session_id"], "message": {"n": 1}}
            )
            assert (status, body) == (200, {"sessions": 1})
            assert await receive_json(a1) == {"n": 1}
            status, body = await post("/api/send/users", {"user_ids": ["alice"], "message": "hi"})
            assert (status, body) == (200, {"sessions": 2})
            assert [await a1.get_message(), await a2.get_message()] == ["hi", "hi"]
            status, body = await post("/api/send/all", {"message": [1, 2]})
            assert (status, body) == (200, {"sessions": 3})
            for ws in (a1, a2, b1):
                assert await receive_json(ws) == [1, 2]

            # lists, pages, one user's sessions, statistics
            status, page = await get("/api/sessions", "/api/sessions?limit=2")
            assert status == 200 and page["total"] == 3 and len(page["items"]) == 2
            status, rest = await get("/api/sessions", "/api/sessions?offset=2&limit=2")
            assert len(rest["items"]) == 1
            listed = {item["session_id"] for item in page["items"] + rest["items"]}
            assert b1_hello["session_id"] in listed and a1_hello["session_id"] in listed
            status, users = await get("/api/users")
            assert {(u["user_id"], u["sessions"]) for u in users["items"]} == {
                ("alice", 2),
                ("bob", 1),
            }
            status, mine = await get("/api/users/{user_id}/sessions", "/api/users/bob/sessions")
            assert [s["session_id"] for s in mine["items"]] == [b1_hello["session_id"]]
            assert mine["items"][0]["username"] == "bob"  # no name claim: the user id
            status, hers = await get("/api/users/{user_id}/sessions", "/api/users/alice/sessions")
            assert {s["username"] for s in hers["items"]} == {"Alice Liddell"}
            assert mine["items"][0]["valid_until"] is not None
            status, stats = await get("/api/statistics")
            assert stats["connections"] == 3 and stats["users"] == 2
            kept = await history_until(get, lambda s: (s["connections"], s["users"]) == (3, 2))
            assert (kept["interval"], kept["capacity"]) == (1.0, 900)
            last = kept["samples"][-1]["seq"]
            status, newer = await get("/api/history", f"/api/history?after={last}")
            assert all(s["seq"] > last for s in newer["samples"])

            # errors: unknown session 404, bad bodies 400 naming the field, bad paging 400
            status, body = await post("/api/send/session", {"session_id": "hub:nope", "message": 1})
            assert status == 404 and "session_id" in body["detail"]
            status, body = await post("/api/close/session", {"session_id": "hub:nope"})
            assert status == 404
            for template, bad, field in (
                ("/api/send/session", {"message": 1}, "session_id: required field missing"),
                (
                    "/api/send/users",
                    {"user_ids": "alice", "message": 1},
                    "user_ids: expected a list",
                ),
                (
                    "/api/send/users",
                    {"user_ids": [], "message": 1},
                    "user_ids: expected a non-empty",
                ),
                ("/api/send/all", {"message": 1, "extra": 2}, "unknown field(s): extra"),
                ("/api/close/all", {"code": 1001}, "code: expected 1000 or 3000..4999"),
                ("/api/close/users", {"user_ids": ["a"], "reason": "x" * 200}, "reason:"),
                ("/api/close/session", {"session_id": 5}, "session_id: expected a string"),
            ):
                assert not spec.request_schema_accepts(template, bad), (template, bad)
                status, body = await post(template, bad)
                assert status == 400 and field in body["detail"], (template, body)
            raw = await admin.post("/api/send/all", content=b"{not json")
            assert spec.check("post", "/api/send/all", raw)["error"] == "bad_request"
            status, body = await get("/api/sessions", "/api/sessions?limit=0")
            assert status == 400 and body["detail"].startswith("limit:")
            status, body = await get("/api/users", "/api/users?offset=x")
            assert status == 400 and body["detail"].startswith("offset:")
            status, body = await get("/api/history", "/api/history?after=-1")
            assert status == 400 and body["detail"].startswith("after:")

            # without the key: 401, counted
            async with gateway.admin(key=None) as anonymous, gateway.admin("wrong") as wrong:
                for response in (
                    await anonymous.get("/api/statistics"),
                    await wrong.post("/api/close/all", json={}),
                ):
                    assert response.status_code == 401
                unauthorized = await anonymous.get("/api/sessions")
                spec.check("get", "/api/sessions", unauthorized)
            metrics = (await admin.get("/metrics")).text
            assert "trio_gw_admin_refused_total 3.0" in metrics

            # close: one session, a user's sessions, everyone
            status, body = await post(
                "/api/close/session",
                {"session_id": a1_hello["session_id"], "code": 4000, "reason": "bye"},
            )
            assert (status, body) == (200, {"sessions": 1})
            with pytest.raises(ConnectionClosed) as closed:
                await a1.get_message()
            assert (closed.value.reason.code, closed.value.reason.reason) == (4000, "bye")
            status, body = await post("/api/close/users", {"user_ids": ["alice"]})
            assert (status, body) == (200, {"sessions": 1})
            with pytest.raises(ConnectionClosed) as closed:
                await a2.get_message()
            assert closed.value.reason.code == 1000
            status, body = await post("/api/close/all", {"code": 4001})
            assert (status, body) == (200, {"sessions": 1})
            with pytest.raises(ConnectionClosed) as closed:
                await b1.get_message()
            assert closed.value.reason.code == 4001

            # Every operation of the document was exercised, and the app serves
            # no /api route the document leaves out.
            documented = {
                (method, path)
                for path, operations in spec.document["paths"].items()
                for method in operations
            }
            assert spec.checked == documented
            assert {(method.lower(), path) for method, path in API_ROUTES} == documented


async def test_history_follows_the_clients(tmp_path: Path) -> None:
    # One sample a second from the sampler in the real process: gauges as they
    # were, counters as read, rates as their growth per second; oldest first,
    # numbered without gaps, and never more than its capacity.
    config = write_config(tmp_path, CONFIG)
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--config", str(config)) as gateway, gateway.admin() as admin:

            async def get(path: str) -> tuple[int, Any]:
                response = await admin.get(path)
                return response.status_code, response.json()

            await history_until(get, lambda s: s["connections"] == 0)
            async with (
                client(gateway.ws_url, token(HS_SECRET, "HS256", sub="ann")) as (ws1, _),
                client(gateway.ws_url, token(HS_SECRET, "HS256", sub="ann")) as (ws2, _),
                client(gateway.ws_url, token(HS_SECRET, "HS256", sub="ben")) as (ws3, _),
            ):
                # Out: a hello to each, then an error answer to each "{}".
                for ws in (ws1, ws2, ws3):
                    await ws.send_message("{}")
                    assert "error" in await receive_json(ws)
                with_clients = await history_until(
                    get, lambda s: (s["connections"], s["users"]) == (3, 2)
                )
                counted = with_clients["samples"][-1]
                await history_until(get, lambda s: s["messages_out_total"] >= 6)
            kept = await history_until(get, lambda s: s["connections"] == 0)
    samples = kept["samples"]
    assert kept["capacity"] == 900 and len(samples) <= kept["capacity"]
    assert [s["seq"] for s in samples] == list(range(samples[0]["seq"], samples[-1]["seq"] + 1))
    assert all(a["time"] < b["time"] for a, b in itertools.pairwise(samples))
    assert kept["started"] < samples[0]["time"]
    assert counted in samples
    assert max(s["connections"] for s in samples) == 3
    # Counters only grow, and their per-second rates add up to the growth.
    totals = [s["messages_out_total"] for s in samples]
    assert totals == sorted(totals) and totals[0] == 0 and totals[-1] >= 6
    grown = sum(
        b["messages_out_per_second"] * (b["time"] - a["time"])
        for a, b in itertools.pairwise(samples)
    )
    assert grown == pytest.approx(totals[-1] - totals[0], rel=0.05)


async def test_health_readiness_and_metrics(tmp_path: Path) -> None:
    config = write_config(tmp_path, CONFIG)
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process("--config", str(config)) as gateway,
            gateway.admin(key=None) as anonymous,
        ):
            assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
            assert (await anonymous.get("/readyz")).json() == {"status": "ready"}
            async with client(gateway.ws_url, token(HS_SECRET, "HS256", sub="carol")):
                metrics = await anonymous.get("/metrics")
                assert metrics.headers["content-type"].startswith("text/plain")
                assert "trio_gw_connections 1.0" in metrics.text
                assert "trio_gw_users 1.0" in metrics.text
            # A refused handshake shows up by reason.
            async with httpx.AsyncClient() as plain:
                refused = await plain.get(
                    gateway.ws_url.replace("ws://", "http://") + "/?token=bad",
                    headers={
                        "connection": "Upgrade",
                        "upgrade": "websocket",
                        "sec-websocket-version": "13",
                        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                    },
                )
            assert refused.status_code == 401
            text = (await anonymous.get("/metrics")).text
    for line in (
        'trio_gw_rejected_handshakes_total{reason="refused"} 1.0',
        "trio_gw_sessions_opened_total 1.0",
        "trio_gw_messages_out_total 1.0",  # the hello event
        "trio_gw_drops_total 0.0",
        "trio_gw_slow_consumer_closes_total 0.0",
        "trio_gw_backend_inflight_limit 256.0",
        "trio_gw_backend_inflight 0.0",
    ):
        assert line in text, line


# --- what a web page could make a browser send -------------------------------------------


async def test_web_pages_cannot_drive_the_dev_mode_admin_api() -> None:
    # Dev mode: no API key, so the guard is all that stands between a page and the API.
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process() as gateway,
            gateway.admin(key=None) as admin,
            client(gateway.ws_url, "alice") as (ws, _),
        ):
            assert gateway.admin_url is not None
            port = gateway.admin_url.rpartition(":")[2]
            refused = 0

            async def get(path: str, host: str) -> httpx.Response:
                return await admin.get(path, headers={"host": host})

            # DNS rebinding: the page's own name resolves to 127.0.0.1.
            for path in ("/api/sessions", "/", "/metrics", "/healthz", "/openapi.json"):
                response = await get(path, f"evil.example.com:{port}")
                assert response.status_code == 403, path
                assert response.json()["error"] == "forbidden"
                assert "'evil.example.com:" in response.json()["detail"]
                refused += 1
            for host in (
                "evil.example.com",
                f"0.0.0.0:{port}",
                f"127.0.0.1.evil.example.com:{port}",
                f"localhost.evil.example.com:{port}",
                f"[::ffff:7f00:1]:{port}",
                f"[::1:{port}",
                "",
            ):
                assert (await get("/api/sessions", host)).status_code == 403, host
                refused += 1
            for host in (f"127.0.0.1:{port}", f"LocalHost:{port}", f"[::1]:{port}", "127.9.9.9"):
                response = await get("/api/sessions", host)
                assert response.status_code == 200, host
                assert response.json()["total"] == 1

            # A cross-site form or fetch: text/plain needs no CORS preflight.
            for origin in ("http://evil.example.com", "null", f"http://127.0.0.1:{int(port) + 1}"):
                response = await admin.post(
                    "/api/close/all",
                    content=b"{}",
                    headers={"content-type": "text/plain", "origin": origin},
                )
                assert response.status_code == 403, origin
                assert response.json()["detail"].startswith("cross-origin request refused")
                refused += 1
            # The dashboard's own POSTs, and those of clients that send no Origin, pass;
            # and the session that the refused POSTs meant to close is still open.
            sent = await admin.post(
                "/api/send/all",
                json={"message": "still here"},
                headers={"origin": gateway.admin_url},
            )
            assert sent.json() == {"sessions": 1}
            assert await ws.get_message() == "still here"
            sent = await admin.post("/api/send/users", json={"user_ids": ["alice"], "message": "2"})
            assert sent.json() == {"sessions": 1}
            assert await ws.get_message() == "2"

            metrics = (await admin.get("/metrics")).text
            assert f"trio_gw_admin_refused_total {float(refused)}" in metrics


async def test_dashboard_and_api_answers_carry_security_headers() -> None:
    with trio.fail_after(TIMEOUT):
        async with gateway_process() as gateway, gateway.admin(key=None) as admin:
            page = await admin.get("/")
            api = await admin.get("/api/statistics")
            refusal = await admin.get("/", headers={"host": "evil.example.com"})
    for response in (page, api, refusal):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert api.headers["content-security-policy"].startswith("default-src 'none'")
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'self'"
    # The page's inline script and style are allowed by their hashes, and nothing
    # else inline ('unsafe-inline' would let injected markup run).
    for tag in ("script", "style"):
        [body] = re.findall(rf"<{tag}>(.*?)</{tag}>", page.text, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert policy[f"{tag}-src"] == f"'sha256-{digest}'"
    assert "unsafe" not in page.headers["content-security-policy"]


@pytest.mark.parametrize("admin_host", ["127.0.0.1", "0.0.0.0"])
async def test_the_host_check_follows_the_admin_address(tmp_path: Path, admin_host: str) -> None:
    # Bound to loopback, only a rebinding page uses another name. Bound to all
    # interfaces (a pod), probes and scrapers come by the pod's address, and the
    # API key, which is then required, protects /api.
    config = write_config(tmp_path, CONFIG)
    with trio.fail_after(TIMEOUT):
        async with gateway_process("--config", str(config), "--admin-host", admin_host) as gateway:
            [port] = {
                match.group(1)
                for line in gateway.log
                if (match := re.search(r"admin API and dashboard on http://[^:]+:(\d+)/", line))
            }
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}",
                headers={"authorization": f"Bearer {API_KEY}"},
                timeout=10,
            ) as admin:
                pod = {"host": f"10.0.0.7:{port}"}
                statuses = [
                    (await admin.get(path, headers=pod)).status_code
                    for path in ("/healthz", "/readyz", "/metrics", "/api/statistics")
                ]
                # A cross-origin POST is refused either way, key or not.
                post = await admin.post(
                    "/api/close/all", json={}, headers={"origin": "http://evil.example.com"}
                )
    assert statuses == ([403] * 4 if admin_host == "127.0.0.1" else [200] * 4)
    assert post.status_code == 403


async def test_a_user_id_with_a_slash_has_its_own_sessions_view() -> None:
    """``GET /api/users/a%2Fb/sessions``: Starlette decodes %2F before routing."""
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process() as gateway,
            client(gateway.ws_url, "a%2Fb") as (_, hello),
            client(gateway.ws_url, "a") as (_, other),
            gateway.admin(key=None) as admin,
        ):
            assert hello["user_id"] == "a/b"
            answer = (await admin.get("/api/users/a%2Fb/sessions")).json()
            unknown = await admin.get("/api/users/a%2Fc/sessions")
    assert answer["user_id"] == "a/b"
    assert [item["session_id"] for item in answer["items"]] == [hello["session_id"]]
    assert other["session_id"] not in str(answer)
    assert unknown.status_code == 200 and unknown.json()["items"] == []
