"""Backend forwarding by the real ``trio-gw serve`` process, to a real HTTP backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import trio

from ._gateway_support import (
    API_KEY,
    HS_SECRET,
    closed_port,
    gateway_process,
    http_backend,
    token,
    write_config,
)
from .conftest import TIMEOUT, client, receive_json, wait_for


def request(method: str, trace_id: str | None = None, params: Any = None) -> str:
    payload: dict[str, Any] = {"service": "orders", "method": method, "params": params}
    if trace_id is not None:
        payload["trace_id"] = trace_id
    return orjson.dumps({"type": "request", "payload": payload}).decode()


def config_for(tmp_path: Path, backend_url: str, **backend: Any) -> Path:
    backend = {"timeout": 1, **backend}
    extra = "".join(f"{k} = {orjson.dumps(v).decode()}\n" for k, v in backend.items())
    return write_config(
        tmp_path,
        f"""
[auth]
jwt_algorithm = "HS256"
jwt_secret = "{HS_SECRET}"

[backend]
url = "{backend_url}"
{extra}
[admin]
api_key = "{API_KEY}"
""",
    )


async def test_requests_reach_the_backend_and_errors_come_back(tmp_path: Path) -> None:
    credential = token(HS_SECRET, "HS256", sub="alice")
    with trio.fail_after(TIMEOUT):
        async with http_backend() as backend:
            config = config_for(tmp_path, backend.url, forward_token=True)
            async with (
                gateway_process("--config", str(config)) as gateway,
                client(gateway.ws_url, credential) as (ws, hello),
            ):
                await ws.send_message(request("lookup", "t-1", {"id": 7}))
                ok = await receive_json(ws)
                # No trace_id from the client: the hub assigns one and returns it.
                await ws.send_message(request("lookup", None, [1]))
                assigned = await receive_json(ws)
                await ws.send_message(request("hang", "t-timeout"))
                timeout = await receive_json(ws)
                await ws.send_message(request("fail", "t-500"))
                failed = await receive_json(ws)
                await ws.send_message(request("text", "t-text"))
                not_json = await receive_json(ws)
                await ws.send_message('{"type": "request", "payload": {"trace_id": "t-bad"}}')
                malformed = await receive_json(ws)
                async with gateway.admin() as admin:
                    metrics = (await admin.get("/metrics")).text
            log = gateway.log_records()

    assert ok == {
        "type": "response",
        "payload": {
            "trace_id": "t-1",
            "result": {
                "params": {"id": 7},
                "trace_id": "t-1",
                "user_id": "alice",
                "session_id": hello["session_id"],
                "header_trace_id": "t-1",
                "authorization": f"Bearer {credential}",
            },
            "error": None,
        },
    }
    generated = assigned["payload"]["trace_id"]
    assert generated and assigned["payload"]["result"]["trace_id"] == generated
    assert assigned["payload"]["result"]["header_trace_id"] == generated

    def error(response: dict[str, Any], trace_id: str) -> dict[str, Any]:
        assert response["type"] == "response"
        assert response["payload"]["trace_id"] == trace_id
        assert response["payload"]["result"] is None
        result: dict[str, Any] = response["payload"]["error"]
        return result

    assert error(timeout, "t-timeout")["code"] == "backend_timeout"
    assert "within 1s" in error(timeout, "t-timeout")["message"]
    assert error(failed, "t-500") == {
        "code": "backend_status",
        "message": "the backend answered HTTP 500",
        "status": 500,
        "detail": {"reason": "database down"},
    }
    assert error(not_json, "t-text")["code"] == "backend_bad_reply"
    assert "text/plain" in error(not_json, "t-text")["message"]
    bad = error(malformed, "t-bad")
    assert bad["code"] == "bad_request"
    assert "payload.service" in bad["message"] and "payload.method" in bad["message"]

    assert 'trio_gw_backend_errors_total{code="backend_timeout"} 1.0' in metrics
    assert 'trio_gw_backend_errors_total{code="backend_status"} 1.0' in metrics
    assert 'trio_gw_backend_errors_total{code="backend_bad_reply"} 1.0' in metrics
    assert 'trio_gw_backend_call_seconds_count{outcome="ok"} 2.0' in metrics
    assert "trio_gw_backend_inflight_limit 256.0" in metrics
    # Request log lines carry the trace id, next to the session and user.
    answered = [r for r in log if r["message"].startswith("request orders.lookup answered")]
    assert {r["trace_id"] for r in answered} == {"t-1", generated}
    assert all(r["user_id"] == "alice" and r["session_id"] == hello["session_id"] for r in answered)


async def test_slow_backend_blocks_nobody_and_inflight_is_bounded(tmp_path: Path) -> None:
    credential = token(HS_SECRET, "HS256", sub="alice")
    with trio.fail_after(TIMEOUT):
        async with http_backend() as backend:
            config = config_for(
                tmp_path, backend.url, timeout=30, max_inflight=3, max_inflight_per_session=2
            )
            async with (
                gateway_process("--config", str(config)) as gateway,
                client(gateway.ws_url, credential) as (slow, _),
                client(gateway.ws_url, credential) as (other, _),
                client(gateway.ws_url, credential) as (third, _),
            ):
                # Two calls hang on this connection: its per-connection bound.
                await slow.send_message(request("hang", "h-1"))
                await slow.send_message(request("hang", "h-2"))
                await slow.send_message(request("lookup", "over-session-bound"))
                refused = await receive_json(slow)
                # Another connection is not held up by them.
                await other.send_message(request("lookup", "o-1"))
                answered = await receive_json(other)
                # One more hanging call fills the gateway-wide bound of 3...
                await other.send_message(request("hang", "o-2"))
                await wait_for(lambda: len(backend.calls) >= 3)
                async with gateway.admin() as admin:
                    busy_stats = (await admin.get("/api/statistics")).json()
                    # ... so a third connection is refused at once, not queued.
                    await third.send_message(request("lookup", "over-global-bound"))
                    busy = await receive_json(third)
                    backend.release.set()
                    released = {(await receive_json(slow))["payload"]["trace_id"] for _ in range(2)}
                    assert (await receive_json(other))["payload"]["trace_id"] == "o-2"
                    metrics = (await admin.get("/metrics")).text

    assert refused["payload"]["trace_id"] == "over-session-bound"
    assert refused["payload"]["error"]["code"] == "too_many_requests"
    assert answered["payload"]["trace_id"] == "o-1" and answered["payload"]["error"] is None
    assert busy_stats["backend_inflight"] == 3 and busy_stats["backend_max_inflight"] == 3
    assert busy["payload"]["error"]["code"] == "backend_busy"
    assert released == {"h-1", "h-2"}
    assert "trio_gw_backend_inflight 0.0" in metrics
    assert 'trio_gw_backend_errors_total{code="backend_busy"} 1.0' in metrics
    assert 'trio_gw_backend_errors_total{code="too_many_requests"} 1.0' in metrics


async def test_refused_backend_connection_is_an_error_response(tmp_path: Path) -> None:
    config = config_for(tmp_path, f"http://127.0.0.1:{closed_port()}/rpc")
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process("--config", str(config)) as gateway,
            client(gateway.ws_url, token(HS_SECRET, "HS256")) as (ws, _),
        ):
            await ws.send_message(request("lookup", "t-refused"))
            response = await receive_json(ws)
            # The connection is still usable afterwards.
            await ws.send_message(request("lookup", "t-again"))
            again = await receive_json(ws)
    assert response["payload"]["trace_id"] == "t-refused"
    assert response["payload"]["error"]["code"] == "backend_unreachable"
    assert again["payload"]["trace_id"] == "t-again"


async def test_non_string_fields_are_refused_not_coerced(tmp_path: Path) -> None:
    # cattrs's default converter would forward "service": null as "None" and
    # "method": ["a", "b"] as "['a', 'b']"; the backend must see none of these.
    def frame(service: Any, method: Any, trace_id: Any) -> str:
        payload = {"service": service, "method": method, "trace_id": trace_id}
        return orjson.dumps({"type": "request", "payload": payload}).decode()

    bad_frames = [
        (frame(None, "lookup", "t-null"), "t-null", "payload.service: expected a string, got null"),
        (
            frame("orders", ["a", "b"], "t-list"),
            "t-list",
            "payload.method: expected a string, got an array",
        ),
        (
            frame({"x": 1}, 7, "t-both"),
            "t-both",
            "payload.service: expected a string, got an object",
        ),
        (frame("orders", "lookup", 42), None, "payload.trace_id: expected a string, got a number"),
        (frame("orders", "lookup", None), None, "payload.trace_id: expected a string"),
        (
            frame("orders", "lookup", ["t"]),
            None,
            "payload.trace_id: expected a string, got an array",
        ),
    ]
    with trio.fail_after(TIMEOUT):
        async with http_backend() as backend:
            config = config_for(tmp_path, backend.url)
            async with (
                gateway_process("--config", str(config)) as gateway,
                client(gateway.ws_url, token(HS_SECRET, "HS256")) as (ws, _),
            ):
                answers = []
                for text, _, _ in bad_frames:
                    await ws.send_message(text)
                    answers.append(await receive_json(ws))
                # An absent trace_id is assigned one, as before.
                await ws.send_message(
                    orjson.dumps(
                        {"type": "request", "payload": {"service": "orders", "method": "lookup"}}
                    ).decode()
                )
                assigned = await receive_json(ws)
                await ws.send_message(request("lookup", "t-ok"))
                ok = await receive_json(ws)

    for answer, (_, trace_id, message) in zip(answers, bad_frames, strict=True):
        assert answer["payload"]["result"] is None
        assert answer["payload"]["error"]["code"] == "bad_request"
        assert message in answer["payload"]["error"]["message"], answer
        if trace_id is None:  # the client's trace_id was the bad field: a fresh one
            assert isinstance(answer["payload"]["trace_id"], str) and answer["payload"]["trace_id"]
        else:
            assert answer["payload"]["trace_id"] == trace_id
    assert (
        "payload.method: expected a string, got a number"
        in answers[2]["payload"]["error"]["message"]
    )
    generated = assigned["payload"]["trace_id"]
    assert generated and assigned["payload"]["error"] is None
    assert ok["payload"]["trace_id"] == "t-ok" and ok["payload"]["error"] is None
    # Only the two valid requests reached the backend, with their fields intact.
    assert [call["body"] for call in backend.calls] == [
        {"service": "orders", "method": "lookup", "params": None, "trace_id": generated},
        {"service": "orders", "method": "lookup", "params": None, "trace_id": "t-ok"},
    ]


async def test_the_python_client_drives_the_forwarding(tmp_path: Path) -> None:
    """What a service using ``trio_gw.client`` sees: results, and typed errors it can act on."""
    from trio_gw.client import RequestError, open_client

    async with http_backend() as backend:
        config = config_for(tmp_path, backend.url, timeout=0.5)
        with trio.fail_after(TIMEOUT):
            async with (
                gateway_process("--config", str(config)) as gateway,
                open_client(gateway.ws_url, token=token(HS_SECRET, "HS256")) as c,
            ):
                result = await c.request("orders", "lookup", {"id": 7})
                assert result["params"] == {"id": 7}
                assert result["user_id"] == "alice"
                assert result["session_id"] == c.session_id
                failures = {}
                for method in ("fail", "hang", "text"):
                    try:
                        await c.request("orders", method, None)
                    except RequestError as exc:
                        failures[method] = exc
                # The connection outlives every failure.
                assert (await c.request("orders", "lookup", [1]))["params"] == [1]
    assert failures["fail"].code == "backend_status" and failures["fail"].status == 500
    assert failures["hang"].code == "backend_timeout"
    assert failures["text"].code == "backend_bad_reply"
    assert all(exc.trace_id for exc in failures.values())
