"""The hub's public API over real WebSocket connections (trio_gw/_hub.py).

Each test starts a hub on 127.0.0.1 at port 0 and talks to it with
trio-websocket's client, or with the ``websockets`` library where an HTTP status
matters. Every test runs under ``trio.fail_after``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed

from trio_gw import CloseCode, HubClosedError, HubOverloadedError, Reply, Session
from trio_gw._transport import FastWriter, PortableWriter
from trio_gw._wsproto_engine import StreamWriter

from .conftest import TIMEOUT, client, receive_json, running_hub, wait_for

# The core tests run on each connection layer: wsproto (the default), and
# trio-websocket with each of its writers.
pytestmark = pytest.mark.parametrize("writer", ["wsproto", "fast", "portable"])


def layer(writer: str) -> dict[str, str]:
    """The hub settings for one ``writer`` parameter."""
    if writer == "wsproto":
        return {"engine": "wsproto"}
    return {"engine": "trio-websocket", "writer": writer}


async def echo(reply: Reply, handler: Session, message: Any) -> None:
    await reply(handler, {"echo": message})


async def test_hello_carries_session_and_user(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(**layer(writer)) as (hub, url), client(url, "alice") as (_, hello):
            assert hello["user_id"] == "alice"
            assert hello["username"] == "alice"
            assert hello["session_id"].startswith("node1:")
            handler = hub.get_handler(hello["session_id"])
            assert handler is not None
            assert handler.user_id == "alice"
            expected = {"wsproto": StreamWriter, "fast": FastWriter, "portable": PortableWriter}[
                writer
            ]
            assert isinstance(handler._writer, expected)


async def test_nuropb_scenario(writer: str) -> None:
    """Three users, one with two connections: send to one, to users, to all; then close."""
    with trio.fail_after(TIMEOUT):
        async with running_hub(**layer(writer)) as (hub, url):
            async with (
                client(url, "u1") as (a1, h_a1),
                client(url, "u1") as (a2, h_a2),
                client(url, "u2") as (b, h_b),
                client(url, "u3") as (c, h_c),
            ):
                assert hub.user_sessions("u1") == {h_a1["session_id"], h_a2["session_id"]}
                assert hub.statistics().connections == 4
                assert hub.statistics().users == 3

                await hub.send_message(h_b["session_id"], {"n": 1})
                assert await receive_json(b) == {"n": 1}

                await hub.send_message_to_user_ids(["u1", "u3"], {"n": 2})
                for ws in (a1, a2, c):
                    assert await receive_json(ws) == {"n": 2}

                await hub.send_message_to_all("plain text")
                for ws in (a1, a2, b, c):
                    assert await ws.get_message() == "plain text"

                # b got nothing from the user-level send: its next message is the 3rd
                await hub.send_message(h_b["session_id"], {"n": 3})
                assert await receive_json(b) == {"n": 3}

                hub.close(h_c["session_id"])
                with pytest.raises(ConnectionClosed) as closed:
                    await c.get_message()
                assert closed.value.reason.code == CloseCode.NORMAL

                hub.close_user_ids(["u1"])
                for ws in (a1, a2):
                    with pytest.raises(ConnectionClosed):
                        await ws.get_message()
                assert hub.user_sessions("u1") == frozenset()

                hub.close_all()
                with pytest.raises(ConnectionClosed):
                    await b.get_message()
                await hub.flush()
                assert hub._registry.session_count == 0
                assert hub._registry.user_count == 0
                hub._registry.check_invariants()
            await wait_for(lambda: hub.statistics().sessions_closed == 4)
            stats = hub.statistics()
            assert stats.sessions_opened == 4
            assert stats.peak_connections == 4


async def test_to_handler_message_encodes_by_type(writer: str) -> None:
    async def reply_three_ways(reply: Reply, handler: Session, message: Any) -> None:
        await reply(handler, "text as is")
        await reply(handler, b"\x00\x01binary")
        await reply(handler, {"json": message})

    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(reply_three_ways, **layer(writer)) as (_, url),
            client(url, "a") as (
                ws,
                _,
            ),
        ):
            await ws.send_message('{"q": 1}')
            assert await ws.get_message() == "text as is"
            assert await ws.get_message() == b"\x00\x01binary"
            assert orjson.loads(await ws.get_message()) == {"json": {"q": 1}}


async def test_bad_json_answers_that_client_only(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, **layer(writer)) as (hub, url):
            async with client(url, "a") as (bad, _), client(url, "b") as (good, _):
                await bad.send_message("{not json")
                error = await receive_json(bad)
                assert error["error"] == "JSONDecodeError"
                assert error["description"].startswith("Error decoding JSON: ")
                # the connection stays open and keeps working
                await bad.send_message('{"ok": true}')
                assert await receive_json(bad) == {"echo": {"ok": True}}
                await good.send_message("[1]")
                assert await receive_json(good) == {"echo": [1]}
                assert hub.statistics().bad_messages == 1


async def test_raising_callback_answers_error_and_keeps_connection(
    writer: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def flaky(reply: Reply, handler: Session, message: Any) -> None:
        if message == "boom":
            raise KeyError("internal detail")
        await reply(handler, {"ok": message})

    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(flaky, **layer(writer)) as (hub, url),
            client(url, "a") as (ws, hello),
        ):
            await ws.send_message('"boom"')
            error = await receive_json(ws)
            assert error["error"] == "KeyError"
            assert "internal detail" not in error["description"]
            await ws.send_message('"fine"')
            assert await receive_json(ws) == {"ok": "fine"}
            assert hub.statistics().callback_errors == 1
    assert any(hello["session_id"] in r.getMessage() for r in caplog.records)


async def test_oversized_message_closes_1009_and_spares_others(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(echo, **layer(writer), max_message_size=1000) as (hub, url):
            async with client(url, "big") as (big, _), client(url, "small") as (small, hs):
                await big.send_message("[" + "1," * 1000 + "1]")
                with pytest.raises(ConnectionClosed) as closed:
                    await big.get_message()
                assert closed.value.reason.code == CloseCode.MESSAGE_TOO_BIG
                await small.send_message("[2]")
                assert await receive_json(small) == {"echo": [2]}
                await wait_for(lambda: hub.statistics().connections == 1)
                assert hub.session_ids() == [hs["session_id"]]


async def test_send_to_unknown_session_is_counted_as_drop(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(**layer(writer)) as (hub, _):
            await hub.send_message("node1:nobody", "hello?")
            await hub.flush()
            assert hub.statistics().drops == 1


async def test_caller_errors_are_clear(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(**layer(writer), outbound_queue_bytes=1000) as (hub, _):
            with pytest.raises(TypeError, match="not a single string"):
                await hub.send_message_to_user_ids("alice", "x")
            with pytest.raises(ValueError, match="exceeds outbound_queue_bytes"):
                await hub.send_message_to_all("x" * 2000)
            with pytest.raises(TypeError, match="not JSON-serializable"):
                await hub.send_message_to_all({"x": object()})
    with pytest.raises(HubClosedError):
        await hub.send_message_to_all("after shutdown")
    with pytest.raises(HubClosedError):
        hub.close_all()


async def test_per_session_order_under_concurrent_senders(writer: str) -> None:
    senders, per_sender = 8, 200
    with trio.fail_after(TIMEOUT):
        # The hub never slows producers down; the queue must hold the whole burst
        # or the (portable, one-syscall-per-frame) writer's client counts as slow.
        async with (
            running_hub(**layer(writer), outbound_queue_size=senders * per_sender) as (
                hub,
                url,
            ),
            client(url, "a") as (ws, hello),
        ):
            sid = hello["session_id"]

            async def send_run(sender: int) -> None:
                for i in range(per_sender):
                    await hub.send_message(sid, {"s": sender, "i": i})
                    if i % 7 == 0:
                        await trio.lowlevel.checkpoint()

            async with trio.open_nursery() as nursery:
                for sender in range(senders):
                    nursery.start_soon(send_run, sender)
                seen: dict[int, list[int]] = {s: [] for s in range(senders)}
                for _ in range(senders * per_sender):
                    message = await receive_json(ws)
                    seen[message["s"]].append(message["i"])
            assert all(seen[s] == list(range(per_sender)) for s in range(senders))


async def test_sequential_by_default_concurrent_when_configured(writer: str) -> None:
    """With one in-flight callback the 2nd message waits for the 1st; with two it does not."""
    for inflight, expected in ((1, ["first", "second"]), (2, ["second", "first"])):
        release = trio.Event()

        async def gate(
            reply: Reply,
            handler: Session,
            message: Any,
            release: trio.Event = release,
            concurrent: bool = inflight > 1,
        ) -> None:
            if message == "first":
                # The hub has read "second" as well: a sequential hub holds it
                # back until this returns, a concurrent one runs it meanwhile.
                # (Received: taken by the dispatcher, or waiting in the session's queue.)
                # The wsproto engine does not read while a sequential callback
                # runs (the client meets TCP's push-back): "second" waits in the
                # socket, and this callback gives it a chance to overtake.
                if writer == "wsproto" and not concurrent:
                    await trio.sleep(0.05)
                else:
                    await wait_for(
                        lambda: (
                            handler._hub.statistics().messages_in + handler._conn.inbound_backlog()
                            == 2
                        )
                    )
                if concurrent:
                    await release.wait()
            else:
                release.set()
            await reply(handler, [message])

        with trio.fail_after(TIMEOUT):
            async with (
                running_hub(gate, **layer(writer), max_inflight_per_session=inflight) as (
                    _,
                    url,
                ),
                client(url, "a") as (ws, _),
            ):
                await ws.send_message('"first"')
                await ws.send_message('"second"')
                got = [(await receive_json(ws))[0], (await receive_json(ws))[0]]
                assert got == expected


async def test_shutdown_drains_then_sends_going_away(writer: str) -> None:
    """Leaving ``open_hub`` writes what is queued, then closes every client with 1001."""
    received: dict[str, list[Any]] = {"a": [], "b": []}
    stop = trio.Event()

    async def run_hub(*, task_status: trio.TaskStatus[Any]) -> None:
        async with running_hub(**layer(writer)) as (hub, url):
            task_status.started((hub, url))
            await stop.wait()

    async def read_until_closed(url: str, name: str, connected: trio.Event) -> None:
        async with client(url, name) as (ws, _):
            connected.set()
            try:
                while True:
                    received[name].append(await ws.get_message())
            except ConnectionClosed as exc:
                received[name].append(exc.reason.code)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            hub, url = await nursery.start(run_hub)
            for name in received:
                connected = trio.Event()
                nursery.start_soon(read_until_closed, url, name, connected)
                await connected.wait()
            await hub.send_message_to_all("last words")
            stop.set()
    assert received == {name: ["last words", CloseCode.GOING_AWAY] for name in received}
    assert hub.statistics().sessions_closed == 2
    assert hub._registry.session_count == 0


async def test_unregister_closes_and_register_is_idempotent(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(**layer(writer)) as (hub, url), client(url, "a") as (ws, hello):
            handler = hub.get_handler(hello["session_id"])
            assert handler is not None
            hub.register(handler)  # already registered: nothing happens
            await hub.flush()
            assert hub.statistics().sessions_opened == 1
            hub.unregister(handler)
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == CloseCode.NORMAL
            assert hub.get_handler(hello["session_id"]) is None
            with pytest.raises(ValueError, match="closing"):
                hub.register(handler)
            hub.unregister(handler)  # twice: nothing happens
            await hub.flush()
            assert hub.statistics().sessions_closed == 1


async def test_sync_commands_raise_when_the_queue_is_full(writer: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(**layer(writer), hub_queue_size=1) as (hub, _):
            hub.close("node1:a")  # handed straight to the waiting actor
            hub.close("node1:b")  # fills the one-slot queue: the actor has not run yet
            with pytest.raises(HubOverloadedError, match="command queue full"):
                hub.close("node1:c")
            await hub.flush()
            hub.close("node1:d")  # room again


async def test_a_failing_session_gets_1011_and_the_hub_survives(
    writer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_hub(echo, **layer(writer)) as (hub, url):
        original = hub.on_handler_message

        async def broken(handler: Session, message: str | bytes) -> None:
            if message == '"crash"':
                raise RuntimeError("a bug inside the hub")
            await original(handler, message)

        # Stands in for a hub bug: nothing a client or a callback can do reaches here.
        monkeypatch.setattr(hub, "on_handler_message", broken)
        with trio.fail_after(TIMEOUT):
            async with client(url, "victim") as (victim, _), client(url, "other") as (other, _):
                await victim.send_message('"crash"')
                with pytest.raises(ConnectionClosed) as closed:
                    await victim.get_message()
                assert closed.value.reason.code == CloseCode.SERVER_ERROR
                await other.send_message('"still fine"')
                assert await receive_json(other) == {"echo": "still fine"}
                await wait_for(lambda: hub.statistics().connections == 1)
                assert hub.statistics().closes_by_code == {CloseCode.SERVER_ERROR: 1}


async def test_a_burst_larger_than_the_actor_batch_arrives_whole(writer: str) -> None:
    """Sends queued without yielding all arrive, in order: none is lost between batches."""
    burst = 1000  # many times the actor's per-wake batch
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(**layer(writer), outbound_queue_size=burst) as (hub, url),
            client(url, "a") as (ws, hello),
        ):
            for i in range(burst):
                await hub.send_message(hello["session_id"], str(i))
            got = [await ws.get_message() for _ in range(burst)]
            assert got == [str(i) for i in range(burst)]
            assert hub.statistics().drops == 0
