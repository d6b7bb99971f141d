"""Authorization before the upgrade (trio_gw/_hub.py ``_handle_request``), seen by a real client.

These use the ``websockets`` library's client (in a worker thread) because it
reports the HTTP status of a refused handshake.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from trio_gw import AuthRefused, Handshake, Identity, bearer_token_authorizer

from .conftest import TIMEOUT, client, echo_round_trip, running_hub, wait_for

TOKENS = {"tok-alice": Identity("alice", "Alice")}


def check_token(token: str) -> Identity | None:
    return TOKENS.get(token)


def open_and_hello(url: str, **kwargs: Any) -> dict[str, Any]:
    """Connect with ``websockets``, return the hello event (runs in a thread)."""
    with connect(url, open_timeout=5, close_timeout=5, **kwargs) as ws:
        return json.loads(ws.recv(timeout=5))["payload"]["event"]  # type: ignore[no-any-return]


def status_of(url: str, **kwargs: Any) -> int:
    """Connect with ``websockets`` and return the HTTP status it was refused with."""
    try:
        with connect(url, open_timeout=5, close_timeout=5, **kwargs):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))


async def test_token_sources_and_refusals() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(authorizer=bearer_token_authorizer(check_token)) as (hub, url):
            for headers in (
                {"Authorization": "Bearer tok-alice"},
                {"Authorization": "Bearer:tok-alice"},
                {"Authorization": "Bearer :tok-alice"},
                {"Cookie": "Authorization=Bearer tok-alice"},
            ):
                hello = await in_thread(open_and_hello, url, additional_headers=headers)
                assert (hello["user_id"], hello["username"]) == ("alice", "Alice")
            hello = await in_thread(open_and_hello, f"{url}/?token=tok-alice")
            assert hello["user_id"] == "alice"

            for kwargs in (
                {},  # no token at all
                {"additional_headers": {"Authorization": "Basic tok-alice"}},  # malformed
                {"additional_headers": {"Authorization": "Bearer nope"}},  # wrong
            ):
                assert await in_thread(status_of, url, **kwargs) == 401
            assert await in_thread(status_of, f"{url}/?token=nope") == 401

            await wait_for(lambda: hub.statistics().sessions_closed == 5)
            await wait_for(lambda: hub.statistics().handshakes_in_progress == 0)
            stats = hub.statistics()
            assert stats.rejected_handshakes == {"unauthorized": 4}
            assert stats.connections == 0
            assert stats.handshakes_in_progress == 0


async def test_origin_policy() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(allowed_origins=["https://app.example.com"]) as (hub, url):
            target = f"{url}/?token=u"
            assert await in_thread(status_of, target, origin="https://evil.example.com") == 403
            assert await in_thread(status_of, target, origin="https://app.example.com.evil") == 403
            hello = await in_thread(open_and_hello, target, origin="https://app.example.com")
            assert hello["user_id"] == "u"
            # no Origin header: not a browser, allowed
            assert (await in_thread(open_and_hello, target))["user_id"] == "u"
            assert hub.statistics().rejected_handshakes == {"origin": 2}


async def test_max_connections_answers_503_until_a_slot_frees() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(max_connections=2) as (hub, url):
            async with client(url, "a"), client(url, "b") as (b, _):
                assert await in_thread(status_of, f"{url}/?token=c") == 503
                assert hub.statistics().connections == 2
                await b.aclose()
                await wait_for(lambda: hub.statistics().connections == 1)
                await wait_for(lambda: hub._live_connections == 1)
                hello = await in_thread(open_and_hello, f"{url}/?token=c")
                assert hello["user_id"] == "c"
            assert hub.statistics().rejected_handshakes == {"connection_limit": 1}


async def test_authorizer_refusal_status_and_crash() -> None:
    async def authorize(handshake: Handshake) -> Identity | None:
        token = handshake.first_query("token")
        if token == "banned":
            raise AuthRefused(403, "banned")
        if token == "crash":
            raise RuntimeError("authorizer bug")
        return Identity(token) if token else None

    with trio.fail_after(TIMEOUT):
        async with running_hub(authorizer=authorize) as (hub, url):
            assert await in_thread(status_of, f"{url}/?token=banned") == 403
            assert await in_thread(status_of, f"{url}/?token=crash") == 500
            # the hub is unharmed
            assert (await in_thread(open_and_hello, f"{url}/?token=ok"))["user_id"] == "ok"
            assert hub.statistics().rejected_handshakes == {"refused": 1, "authorizer_error": 1}


async def test_no_authorizer_refuses_everything(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(authorizer=None) as (hub, url):
            assert await in_thread(status_of, f"{url}/?token=anyone") == 401
            assert hub.statistics().rejected_handshakes == {"no_authorizer": 1}
    assert "no authorizer configured" in caplog.text


async def test_websockets_client_round_trip() -> None:
    """A second client library: hello, an echo request, and a clean close."""

    from trio_gw import echo_backend

    with trio.fail_after(TIMEOUT):
        async with running_hub(echo_backend) as (hub, url):
            hello, response = await in_thread(echo_round_trip, f"{url}/?token=zed", [1, 2], "t-1")
            assert hello["type"] == "event" and hello["payload"]["event"]["user_id"] == "zed"
            assert response == {
                "type": "response",
                "payload": {"trace_id": "t-1", "result": [1, 2], "error": None},
            }
            await wait_for(lambda: hub.statistics().sessions_closed == 1)
            assert hub.statistics().closes_by_code == {1000: 1}
