"""The admin HTTP API of the real ``trio-gw serve`` process, checked against its OpenAPI doc."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from trio_websocket import ConnectionClosed

from trio_gw._admin import API_ROUTES

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
