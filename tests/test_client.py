"""trio_gw.client against the real hub: the embedded one and the ``trio-gw serve`` process.

Rules, as in the rest of the suite:

* every test that does I/O runs under ``trio.fail_after``;
* sockets are real, on 127.0.0.1; no mocks;
* no timing thresholds: tests wait for conditions (states, counters), and the
  only short timeouts are ones whose expiry is the behaviour under test;
* backoffs are tiny so that reconnects are quick, never so that a race is won.
"""

from __future__ import annotations

import gc
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import trio_gw
import trio_gw.client
from trio_gw import HandlerManager, Identity, Reply, Session
from trio_gw.client import (
    Backoff,
    ClientClosedError,
    ClientState,
    ConnectFailedError,
    ConnectionLostError,
    HandshakeRefusedError,
    MessagesLost,
    RequestError,
    RequestTimeoutError,
    open_client,
)
from trio_gw.client._policy import Action, after_close, after_refusal
from trio_gw.client._tokens import refresh_delay, token_expiry

from ._gateway_support import (
    HS_SECRET,
    GatewayProcess,
    closed_port,
    gateway_process,
    http_backend,
    token,
)
from .conftest import TIMEOUT, running_hub, wait_for

FAST = Backoff(initial=0.01, maximum=0.05)


def response(trace_id: Any, result: Any = None, error: Any = None) -> dict[str, Any]:
    return {"type": "response", "payload": {"trace_id": trace_id, "result": result, "error": error}}


async def answer_requests(reply: Reply, handler: Session, message: Any) -> None:
    """An embedded-hub callback: "echo" answers with the params, "fail" with an error."""
    payload = message["payload"]
    if payload["method"] == "fail":
        error = {"code": "backend_status", "message": "boom", "status": 500, "detail": {"x": 1}}
        await reply(handler, response(payload["trace_id"], error=error))
    else:
        await reply(handler, response(payload["trace_id"], payload["params"]))


def only_session(hub: HandlerManager) -> str:
    [session_id] = hub.session_ids()
    return session_id


# --- the package --------------------------------------------------------------------


def test_public_names() -> None:
    assert set(trio_gw.client.__all__) == {
        "Backoff",
        "Client",
        "ClientClosedError",
        "ClientError",
        "ClientState",
        "ClientStatistics",
        "ConnectFailedError",
        "ConnectionLostError",
        "HandshakeRefusedError",
        "MessagesLost",
        "ProtocolError",
        "RequestError",
        "RequestTimeoutError",
        "TokenProvider",
        "open_client",
    }
    for name in trio_gw.client.__all__:
        assert getattr(trio_gw.client, name) is not None
    assert issubclass(trio_gw.client.ClientError, trio_gw.GatewayError)
    assert issubclass(RequestTimeoutError, TimeoutError)


def test_import_trio_gw_does_not_import_the_client() -> None:
    probe = "import sys, trio_gw; print('trio_gw.client' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "False"


def test_trio_websocket_internals_the_client_relies_on() -> None:
    """The client contains trio-websocket's socket leaks with three internals (see _client.py)."""
    from trio_websocket import WebSocketConnection
    from wsproto import ConnectionType, WSConnection

    stream, _ = trio.testing.memory_stream_pair()
    ws = WebSocketConnection(stream, WSConnection(ConnectionType.CLIENT), host="h", path="/")
    assert callable(ws._reader_task)
    assert isinstance(ws._open_handshake, trio.Event)
    assert ws._stream is stream


# --- the pure core -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (1000, Action.STOP),
        (1008, Action.STOP),
        (1002, Action.STOP),
        (1001, Action.BACKOFF),
        (1006, Action.BACKOFF),
        (1009, Action.BACKOFF),
        (1011, Action.BACKOFF),
        (4008, Action.BACKOFF),
        (4012, Action.BACKOFF),
        (4999, Action.BACKOFF),
        (4005, Action.NEW_TOKEN),
    ],
)
def test_close_code_policy(code: int, action: Action) -> None:
    assert after_close(code, reconnect_on=(), has_provider=True) is action


def test_close_code_policy_options() -> None:
    assert after_close(1000, reconnect_on={1000}, has_provider=False) is Action.BACKOFF
    assert after_close(1008, reconnect_on={1000}, has_provider=False) is Action.STOP
    # Without a provider there is no new token to get: back off with the same one.
    assert after_close(4005, reconnect_on=(), has_provider=False) is Action.BACKOFF


def test_refusal_policy() -> None:
    def act(status: int, provider: bool, fresh: bool) -> Action:
        return after_refusal(status, has_provider=provider, token_is_fresh=fresh)

    assert act(401, provider=True, fresh=False) is Action.NEW_TOKEN
    assert act(401, provider=True, fresh=True) is Action.GIVE_UP
    assert act(401, provider=False, fresh=False) is Action.GIVE_UP
    assert act(403, provider=True, fresh=False) is Action.GIVE_UP
    assert act(400, provider=True, fresh=False) is Action.GIVE_UP
    assert act(503, provider=False, fresh=False) is Action.BACKOFF
    assert act(429, provider=False, fresh=False) is Action.BACKOFF


def test_backoff_full_jitter_bounds() -> None:
    backoff = Backoff(initial=1, maximum=10, multiplier=3, max_attempts=4)
    assert [backoff.ceiling(n) for n in range(5)] == [1, 3, 9, 10, 10]
    assert backoff.ceiling(10**6) == 10  # no overflow
    assert backoff.delay(2, rng=lambda: 0.0) == 0
    assert backoff.delay(2, rng=lambda: 0.5) == 4.5
    assert not backoff.exhausted(3)
    assert backoff.exhausted(4)
    assert not Backoff().exhausted(10**9)
    with pytest.raises(ValueError, match="maximum"):
        Backoff(initial=2, maximum=1)
    with pytest.raises(ValueError, match="multiplier"):
        Backoff(multiplier=0.5)
    with pytest.raises(ValueError, match="max_attempts"):
        Backoff(max_attempts=0)


def test_token_expiry_is_read_without_verifying() -> None:
    exp = int(time.time()) + 300
    assert token_expiry(token(HS_SECRET + "-not-the-verifier", "HS256", lifetime=300)) == exp
    assert token_expiry("alice") is None  # dev mode: not a JWT, never refreshed
    assert token_expiry("a.!!!.c") is None
    assert token_expiry("a.e30.c") is None  # {} : no exp
    assert refresh_delay(1000, 900, ratio=0.8, margin=30) == 70  # 30 s before exp
    assert refresh_delay(1000, 0, ratio=0.8, margin=30) == 800  # 80 % of the lifetime
    assert refresh_delay(1000, 990, ratio=0.8, margin=30) == 0


# --- against the trio-gw process ------------------------------------------------------


async def test_hello_and_echo_with_the_gateway() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            gateway_process() as gateway,
            open_client(gateway.ws_url, token="alice") as client,
        ):
            assert client.state is ClientState.OPEN
            assert client.user_id == "alice"
            assert client.username == "alice"
            assert client.session_id
            async with gateway.admin() as admin:
                sessions = (await admin.get("/api/sessions")).json()["items"]
            assert [s["session_id"] for s in sessions] == [client.session_id]
            assert await client.request("svc", "m", {"n": [1, 2]}) == {"n": [1, 2]}
            stats = client.statistics()
            assert (stats.connects, stats.reconnects, stats.requests_sent) == (1, 0, 1)
        assert client.state is ClientState.CLOSED
        assert client.close_code == 1000


async def test_gateway_error_answer_is_a_request_error(tmp_path: Path) -> None:
    """The JWT gateway without a backend answers every request with ``no_backend``."""
    from .test_gateway_auth import rs256_gateway

    with trio.fail_after(TIMEOUT):
        async with rs256_gateway(tmp_path) as (gateway, issue):
            async with open_client(gateway.ws_url, token=issue()) as client:
                with pytest.raises(RequestError) as info:
                    await client.request("orders", "get", {"id": 7})
    assert info.value.code == "no_backend"
    assert info.value.message
    assert info.value.trace_id is not None and info.value.trace_id in str(info.value)


# --- requests against the embedded hub -------------------------------------------------


async def test_concurrent_requests_answered_out_of_order() -> None:
    arrived: list[str] = []
    answered: list[str] = []
    turns = [trio.Event() for _ in range(3)]

    async def reverse_order(reply: Reply, handler: Session, message: Any) -> None:
        payload = message["payload"]
        index = len(arrived)
        arrived.append(payload["trace_id"])
        if len(arrived) == len(turns):
            turns[-1].set()  # all three are in: the last to arrive answers first
        await turns[index].wait()
        answered.append(payload["trace_id"])
        await reply(handler, response(payload["trace_id"], {"answer_to": payload["params"]}))
        if index > 0:
            turns[index - 1].set()

    results: dict[int, Any] = {}
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(reverse_order, max_inflight_per_session=3) as (_, url),
            open_client(url, token="alice") as client,
        ):

            async def ask(n: int) -> None:
                results[n] = await client.request("svc", "m", n)

            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(ask, n)
    assert len(set(arrived)) == 3  # a fresh trace_id per request
    assert answered == arrived[::-1]
    assert results == {n: {"answer_to": n} for n in range(3)}
    assert client.statistics().requests_sent == 3


async def test_error_answer_raises_request_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(answer_requests) as (_, url),
            open_client(url, token="alice") as client,
        ):
            with pytest.raises(RequestError) as info:
                await client.request("svc", "fail", {})
            # The connection is fine afterwards.
            assert await client.request("svc", "echo", [1]) == [1]
    error = info.value
    assert (error.code, error.message, error.status, error.detail) == (
        "backend_status",
        "boom",
        500,
        {"x": 1},
    )
    assert "HTTP 500" in str(error)


async def test_request_timeout_drops_the_late_answer() -> None:
    release = trio.Event()

    async def slow(reply: Reply, handler: Session, message: Any) -> None:
        payload = message["payload"]
        if payload["method"] == "hang":
            await release.wait()
        await reply(handler, response(payload["trace_id"], payload["params"]))

    with trio.fail_after(TIMEOUT):
        async with running_hub(slow) as (hub, url), open_client(url, token="alice") as client:
            # The timeout is the behaviour under test: the callback never answers
            # before it is released, whatever the machine's speed.
            with pytest.raises(RequestTimeoutError) as info:
                await client.request("svc", "hang", 1, timeout=0.05)
            release.set()
            await wait_for(lambda: client.statistics().late_responses == 1)
            # The late answer went nowhere: the next pushed message is the next item.
            assert client.session_id is not None
            await hub.send_message(client.session_id, {"after": 1})
            assert await client.receive() == {"after": 1}
            assert await client.request("svc", "echo", 2) == 2
    assert info.value.timeout == 0.05
    assert client.statistics().requests_timed_out == 1


# --- pushed messages ---------------------------------------------------------------------


async def test_pushed_messages_are_received_in_order() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(answer_requests) as (hub, url),
            open_client(url, token="alice") as client,
        ):
            assert client.session_id is not None
            await hub.send_message_to_user_ids(["alice"], {"news": 1})
            await hub.send_message(client.session_id, "not JSON")
            await hub.send_message(client.session_id, b"\x00\x01")
            await hub.send_message_to_all({"news": 2})
            # A response nobody waits for (not a timed-out request) is pushed too.
            await hub.send_message(client.session_id, response("someone-else", 3))
            received = [await client.receive() for _ in range(5)]
    assert received == [
        {"news": 1},
        "not JSON",
        b"\x00\x01",
        {"news": 2},
        response("someone-else", 3),
    ]


async def test_a_full_buffer_drops_the_oldest_and_says_so() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(answer_requests) as (hub, url),
            open_client(url, token="alice", max_buffered_messages=5) as client,
        ):
            assert client.session_id is not None
            for n in range(20):  # the consumer does not read meanwhile
                await hub.send_message(client.session_id, {"n": n})
            await wait_for(lambda: client.statistics().messages_in == 21)  # hello + 20
            stats = client.statistics()
            assert (stats.messages_buffered, stats.messages_lost) == (5, 15)
            received = [await client.receive() for _ in range(6)]
            assert received == [MessagesLost(15), *({"n": n} for n in range(15, 20))]
            # Nothing lost since: no marker.
            await hub.send_message(client.session_id, {"n": 20})
            assert await client.receive() == {"n": 20}
            assert client.statistics().messages_lost == 15


async def test_the_buffer_is_bounded_in_bytes_too() -> None:
    """A few large messages hit the byte bound before the count bound."""
    pad = "x" * 1000  # each frame is a little over 1000 bytes
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(answer_requests) as (hub, url),
            open_client(url, token="alice", max_buffered_bytes=5000) as client,
        ):
            assert client.session_id is not None
            for n in range(20):
                await hub.send_message(client.session_id, {"n": n, "pad": pad})
            await wait_for(lambda: client.statistics().messages_in == 21)
            stats = client.statistics()
            assert stats.messages_buffered == 4 and stats.messages_lost == 16
            received = [await client.receive() for _ in range(5)]
    assert received[0] == MessagesLost(16)
    assert [m["n"] for m in received[1:]] == [16, 17, 18, 19]


# --- closes and reconnects (embedded hub) ----------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1008])
async def test_no_reconnect_after_1000_and_1008(code: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(answer_requests) as (hub, url):
            async with open_client(url, token="alice", backoff=FAST) as client:
                session_id = only_session(hub)
                await hub.send_message(session_id, {"last": 1})
                hub.close(session_id, code=code, reason="bye")
                # Messages sent before the close are still delivered; then iteration ends.
                assert [message async for message in client] == [{"last": 1}]
                assert client.state is ClientState.CLOSED
                assert (client.close_code, client.close_reason) == (code, "bye")
                with pytest.raises(ClientClosedError) as info:
                    await client.request("svc", "echo", 1)
                assert (info.value.close_code, info.value.error) == (code, None)
            await hub.flush()
            assert hub.statistics().sessions_opened == 1
    assert client.statistics().reconnects == 0
    gc.collect()  # the hub closed first: a socket left open would warn (an error here)


async def test_reconnect_on_overrides_the_policy() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(answer_requests) as (hub, url):
            async with open_client(url, token="alice", backoff=FAST, reconnect_on={1000}) as client:
                first = client.session_id
                hub.close(only_session(hub))
                await client.wait_state(ClientState.RECONNECTING)
                await client.wait_state(ClientState.OPEN)
                assert client.session_id not in (None, first)
                assert client.session_id == only_session(hub)
                assert client.close_code == 1000
                assert await client.request("svc", "echo", 1) == 1


async def test_4008_reconnects_with_backoff() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(answer_requests, outbound_queue_bytes=4096) as (hub, url):
            async with open_client(url, token="alice", backoff=FAST) as client:
                first = client.session_id
                hub.close(only_session(hub), code=4008, reason="slow consumer")
                await client.wait_state(ClientState.RECONNECTING)
                await client.wait_state(ClientState.OPEN)
                assert (client.close_code, client.close_reason) == (4008, "slow consumer")
                assert client.session_id not in (None, first)
                assert await client.request("svc", "echo", "again") == "again"
                stats = client.statistics()
                assert (stats.connects, stats.reconnects) == (2, 1)


async def test_4005_fetches_a_new_token_and_reconnects_at_once() -> None:
    seen: list[str | None] = []
    issued: list[str] = []

    async def authorize(handshake: trio_gw.Handshake) -> Identity | None:
        credential = trio_gw.extract_token(handshake)
        seen.append(credential)
        if credential == "t1":
            return Identity("alice", valid_until=time.time() + 0.5)
        return Identity("alice") if credential in issued else None

    async def provider() -> str:
        issued.append(f"t{len(issued) + 1}")
        return issued[-1]

    # A huge backoff: a reconnect that backed off instead of going at once
    # would wait up to 1000 s and hit fail_after.
    slow = Backoff(initial=1000, maximum=1000)
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(answer_requests, authorizer=authorize) as (_, url),
            open_client(url, token_provider=provider, backoff=slow) as client,
        ):
            first = client.session_id
            await wait_for(lambda: client.statistics().connects == 2)
            assert client.close_code == 4005
            assert client.session_id not in (None, first)
            assert await client.request("svc", "echo", 5) == 5
    assert seen == ["t1", "t2"]
    assert client.statistics().token_fetches == 2


async def test_401_on_reconnect_fetches_one_new_token_then_gives_up() -> None:
    accepted = {"t1"}
    seen: list[str | None] = []
    issued: list[str] = []

    async def authorize(handshake: trio_gw.Handshake) -> Identity | None:
        credential = trio_gw.extract_token(handshake)
        seen.append(credential)
        return Identity("alice") if credential in accepted else None

    async def provider() -> str:
        issued.append(f"t{len(issued) + 1}")
        return issued[-1]

    with trio.fail_after(TIMEOUT):
        async with running_hub(answer_requests, authorizer=authorize) as (hub, url):
            async with open_client(url, token_provider=provider, backoff=FAST) as client:
                # t1 is revoked; the reconnect with it is refused, and t2 is fetched.
                accepted = {"t2"}
                hub.close(only_session(hub), code=4008)
                await client.wait_state(ClientState.RECONNECTING)
                await client.wait_state(ClientState.OPEN)
                assert seen == ["t1", "t1", "t2"]
                # Now nothing is accepted: t2 is refused, t3 is refused, and it gives up.
                accepted = set()
                hub.close(only_session(hub), code=4008)
                await client.wait_state(ClientState.CLOSED)
                assert seen == ["t1", "t1", "t2", "t2", "t3"]
                assert isinstance(client.error, HandshakeRefusedError)
                assert client.error.status == 401
                with pytest.raises(ClientClosedError) as info:
                    await client.request("svc", "echo", 1)
                assert info.value.error is client.error
                assert info.value.__cause__ is client.error
                with pytest.raises(ClientClosedError):
                    await anext(aiter(client))
    gc.collect()  # a leaked socket of a refused handshake would warn (an error here)


@pytest.mark.parametrize(("status", "provider"), [(401, False), (401, True), (403, False)])
async def test_a_refused_first_handshake_raises(status: int, provider: bool) -> None:
    calls: list[int] = []

    async def refuse(handshake: trio_gw.Handshake) -> Identity | None:
        raise trio_gw.AuthRefused(status, "go away")

    async def token_provider() -> str:
        calls.append(1)
        return "t"

    options: dict[str, Any] = {"token_provider": token_provider} if provider else {"token": "t"}
    with trio.fail_after(TIMEOUT):
        async with running_hub(answer_requests, authorizer=refuse) as (hub, url):
            with pytest.raises(HandshakeRefusedError) as info:
                async with open_client(url, backoff=FAST, **options):
                    pytest.fail("entered a refused client")
            assert hub.statistics().rejected_handshakes
    assert (info.value.status, info.value.body) == (status, "go away")
    # A token fetched for this very attempt is not fetched again.
    assert calls == ([1] if provider else [])
    gc.collect()


async def test_connect_failures_give_up_after_max_attempts() -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ConnectFailedError) as info:
            async with open_client(
                f"ws://127.0.0.1:{closed_port()}",
                token="alice",
                backoff=Backoff(initial=0.01, maximum=0.01, max_attempts=3),
            ):
                pytest.fail("connected to a closed port")
    assert info.value.attempts == 3
    assert "cannot connect" in str(info.value)


# --- closing -------------------------------------------------------------------------------


async def test_leaving_closes_with_1000_and_fails_pending_requests() -> None:
    async def never(reply: Reply, handler: Session, message: Any) -> None:
        await trio.sleep_forever()

    outcome: list[BaseException] = []
    with trio.fail_after(TIMEOUT):
        async with running_hub(never, close_timeout=0.1) as (hub, url):
            async with open_client(url, token="alice") as client:

                async def ask() -> None:
                    try:
                        await client.request("svc", "m", 1)
                    except ClientClosedError as exc:
                        outcome.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ask)
                    await wait_for(lambda: client.statistics().requests_sent == 1)
                    await client.aclose()
                await client.aclose()  # idempotent
            await wait_for(lambda: hub.statistics().sessions_closed == 1)
            assert hub.statistics().closes_by_code == {1000: 1}
    assert len(outcome) == 1
    assert client.state is ClientState.CLOSED


async def test_block_errors_and_cancellation_propagate_unwrapped() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(answer_requests) as (hub, url):
            with pytest.raises(KeyError, match="mine"):
                async with open_client(url, token="alice"):
                    raise KeyError("mine")
            with trio.CancelScope() as scope:
                async with open_client(url, token="alice") as client:
                    scope.cancel()
                    await trio.sleep_forever()
            assert scope.cancelled_caught
            assert client.state is ClientState.CLOSED
            # Both were closed gracefully, the cancelled one too.
            await wait_for(lambda: hub.statistics().sessions_closed == 2)
            assert hub.statistics().closes_by_code == {1000: 2}


# --- against the trio-gw process: restarts and token refresh ------------------------------


async def run_gateway(
    *args: str, task_status: trio.TaskStatus[GatewayProcess] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run ``trio-gw serve`` in a task of its own until the process exits (the test stops it)."""
    async with gateway_process(*args, stop=False) as gateway:
        task_status.started(gateway)
        await gateway.process.wait()


async def test_reconnects_across_gateway_restarts_on_the_same_port() -> None:
    """Killed (1006, a pending request fails), then stopped (1001): the client comes back."""
    port = str(closed_port())
    lost: list[BaseException] = []
    with trio.fail_after(3 * TIMEOUT):
        async with http_backend() as backend, trio.open_nursery() as gateways:
            args = ("--port", port, "--backend-url", backend.url)
            first = await gateways.start(partial(run_gateway, *args))
            async with open_client(first.ws_url, token="alice", backoff=FAST) as client:
                first_session = client.session_id

                async def hang() -> None:
                    try:
                        await client.request("svc", "hang")
                    except ConnectionLostError as exc:
                        lost.append(exc)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(hang)
                    await wait_for(lambda: len(backend.calls) == 1)
                    first.process.kill()
                # The pending request failed at once, with the network error.
                assert [(type(e), e.close_code) for e in lost] == [(ConnectionLostError, 1006)]
                assert client.statistics().requests_lost == 1
                await first.process.wait()
                await client.wait_state(ClientState.RECONNECTING)

                second = await gateways.start(partial(run_gateway, *args))
                await client.wait_state(ClientState.OPEN)
                second_session = client.session_id
                assert second_session not in (None, first_session)
                answer = await client.request("svc", "echo", [1])
                assert (answer["params"], answer["session_id"]) == ([1], second_session)

                second.process.send_signal(signal.SIGTERM)
                await client.wait_state(ClientState.RECONNECTING)
                assert client.close_code == 1001
                assert await second.process.wait() == 0
                third = await gateways.start(partial(run_gateway, *args))
                await client.wait_state(ClientState.OPEN)
                assert client.session_id not in (None, first_session, second_session)
                assert (await client.request("svc", "echo", [2]))["params"] == [2]
                stats = client.statistics()
                assert (stats.connects, stats.reconnects) == (3, 2)
                assert stats.connect_failures >= 1  # while no gateway listened
            third.process.send_signal(signal.SIGTERM)
            assert await third.process.wait() == 0


async def test_in_band_refresh_before_exp(tmp_path: Path) -> None:
    from .test_gateway_auth import rs256_gateway

    issued: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with rs256_gateway(tmp_path) as (gateway, issue):

            async def provider() -> str:
                # Each token lives 300 s and must be refreshed 299 s before it
                # expires, i.e. within a second: the refresh is forced early
                # without any short-lived token.
                issued.append(issue(lifetime=300))
                return issued[-1]

            async with open_client(
                gateway.ws_url, token_provider=provider, refresh_margin=299
            ) as client:
                session_id = client.session_id
                await wait_for(lambda: client.statistics().token_refreshes >= 1)
                assert client.state is ClientState.OPEN
                assert client.session_id == session_id  # in-band: no reconnect
                assert client.statistics().connects == 1
                assert gateway.admin_url is not None
                async with httpx.AsyncClient(base_url=gateway.admin_url) as admin:
                    metrics = (await admin.get("/metrics")).text
    [ok] = [line for line in metrics.splitlines() if 'refreshes_total{outcome="ok"}' in line]
    assert float(ok.split()[-1]) >= 1
    assert len(issued) >= 2


async def test_refused_refreshes_are_retried_a_bounded_number_of_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from .test_gateway_auth import rs256_gateway

    issued: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with rs256_gateway(tmp_path) as (gateway, issue):

            async def provider() -> str:
                # The first token is good; every later one is forged (refused in-band).
                issued.append(issue(lifetime=300, forged=bool(issued)))
                return issued[-1]

            async with open_client(
                gateway.ws_url,
                token_provider=provider,
                refresh_margin=299,
                max_refresh_attempts=2,
                backoff=FAST,
            ) as client:
                await wait_for(lambda: client.statistics().token_refresh_failures == 2)
                # The refresher gave up after its second failure (logged in the same step).
                assert "2 token refreshes failed" in caplog.text
                # Refused refreshes keep the connection: the old token stands.
                with pytest.raises(RequestError, match="no_backend"):
                    await client.request("s", "m")
                stats = client.statistics()
                assert (stats.connects, stats.token_fetches, stats.token_refreshes) == (1, 3, 0)
                assert client.state is ClientState.OPEN


# --- the README --------------------------------------------------------------------------
