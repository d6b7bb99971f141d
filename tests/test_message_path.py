"""The message path's inline shortcuts, held to what the slow paths guarantee.

Each test here is a case the attack review of the message path found: an
inline write must end flow control's wait like a queued one, a dispatcher
between two callbacks must not look like a dead client, and a loop of sends
that reach nobody must still let other tasks run.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionClosed
from wsproto.frame_protocol import Opcode

from trio_gw import CloseCode, HubConfig, Reply, Session, dev_authorizer, open_hub, serve_hub
from trio_gw._router import Close
from trio_gw._targets import ToSession
from trio_gw._transport import handed_over

from .conftest import TIMEOUT, client, running_hub, wait_for
from .test_hostile import RawClient, frame
from .test_session import port_of

# Hostile clients, closes and slow consumers: on each engine (see conftest).
pytestmark = pytest.mark.usefixtures("each_engine")


async def test_a_frame_written_inline_ends_the_wait_it_caused() -> None:
    """A queue of one message (high water 0), or a frame over half the byte bound: the
    frame marks the session pressured, then goes out inline, whole. The sender must not
    wait for a drain that already happened, and the client is not a slow consumer.
    """
    for config, size in (
        ({"outbound_queue_size": 1}, 10),
        ({"outbound_queue_bytes": 64 << 10}, 40_000),
    ):
        with trio.fail_after(TIMEOUT):
            async with (
                running_hub(stall_timeout=TIMEOUT, **config) as (hub, url),
                client(url, "reader") as (ws, hello),
            ):
                for _ in range(3):
                    await trio.sleep(0.01)  # a trickle: each frame finds the writer idle
                    await hub.send_message(hello["session_id"], "x" * size)
                    assert len(await ws.get_message()) == size
                stats = hub.statistics()
                assert stats.sender_waits == 0, config
                assert stats.slow_consumer_closes == 0, config
                assert not hub._router._pressured


async def test_a_flooding_client_with_a_slow_callback_is_not_taken_for_dead() -> None:
    """The client sends as fast as it can and reads every answer; the callback is slower.
    trio-websocket's queue stays full, so its reader reads no pong for a while: the
    heartbeat must not close a client whose messages are waiting for the callback.

    The client keeps at most ``window`` messages unanswered: 2,000 at 2 ms each puts
    a pong seconds behind the messages ahead of it (past the heartbeat timeout),
    and the end waits for at most those to be answered. Unbounded, the socket
    buffers could hold more than the test's time limit can drain.
    """
    window = 2000

    async def slow(reply: Reply, handler: Session, message: Any) -> None:
        await trio.sleep(0.002)
        await reply(handler, {"ok": message["i"]})

    for inflight in (1, 4):
        with trio.fail_after(TIMEOUT):
            async with (
                running_hub(
                    slow,
                    heartbeat_interval=0.3,
                    heartbeat_timeout=1.0,
                    inbound_queue_size=4,
                    max_inflight_per_session=inflight,
                ) as (hub, url),
                client(url, "flood") as (ws, _),
                trio.open_nursery() as nursery,
            ):
                answers = 0
                credit = trio.Semaphore(window)

                async def read(credit: trio.Semaphore) -> None:
                    nonlocal answers
                    while True:
                        await ws.get_message()
                        answers += 1
                        credit.release()

                nursery.start_soon(read, credit)
                sent = 0
                # Several heartbeat rounds. A deadline, not a cancel scope: a send
                # cancelled halfway would leave half a frame on the wire.
                end = trio.current_time() + 3
                while trio.current_time() < end:
                    await credit.acquire()
                    await ws.send_message(orjson.dumps({"i": sent}).decode())
                    sent += 1
                assert ws.closed is None, (inflight, ws.closed)
                assert CloseCode.NO_PONG not in hub.statistics().closes_by_code
                assert answers > 0
                # Every message answered before the close: a client that stopped
                # reading would leave the hub's answers, and its close reply, unread.
                for _ in range(window):
                    await credit.acquire()
                assert answers == sent
                nursery.cancel_scope.cancel()


async def test_sends_that_reach_nobody_still_let_other_tasks_run() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.lowlevel.checkpoint()
            ticks += 1

    with trio.fail_after(TIMEOUT):
        async with running_hub() as (hub, _), trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            for send in (
                lambda: hub.send_message_to_all("x"),
                lambda: hub.send_message("node1:nobody", "x"),
                lambda: hub.send_message_to_user_ids(["nobody"], "x"),
            ):
                before = ticks
                with trio.move_on_after(0.2) as scope:
                    while True:
                        await send()
                assert scope.cancelled_caught  # the deadline could fire: the loop yielded
                assert ticks > before
            nursery.cancel_scope.cancel()


async def test_a_cancelled_hub_block_still_closes_its_clients_gracefully() -> None:
    """Leaving ``open_hub`` by an outer cancellation: clients get 1001 after what was
    queued for them, and the registry and the queues are left empty.
    """
    scope = trio.CancelScope()
    hubs: list[tuple[Any, str]] = []
    started = trio.Event()

    async def run_hub() -> None:
        with scope:
            async with running_hub(heartbeat_interval=0) as (hub, url):
                hubs.append((hub, url))
                started.set()
                await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_hub)
            await started.wait()
            hub, url = hubs[0]
            async with client(url, "witness") as (ws, hello):
                await hub.send_message(hello["session_id"], "last words")
                scope.cancel()
                assert await ws.get_message() == "last words"
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == CloseCode.GOING_AWAY
        stats = hub.statistics()
        assert stats.connections == 0 and stats.queued_bytes == 0
        assert not hub.running


@attrs.define
class RecordingBackplane:
    """A single-node backplane that records what the hub tells it (the seam, unchanged)."""

    node_id: str
    calls: list[tuple[str, str]] = attrs.Factory(list)

    def publish_nowait(self, message: object) -> bool:
        self.calls.append(("publish", type(message).__name__))
        return True

    def subscribe_nowait(self, user_id: str) -> None:
        self.calls.append(("subscribe", user_id))

    def unsubscribe_nowait(self, user_id: str) -> None:
        self.calls.append(("unsubscribe", user_id))

    async def serve(
        self, inbox: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        await trio.sleep_forever()


async def test_the_backplane_hears_which_users_this_node_holds() -> None:
    """A user's first session subscribes it, its last one leaving unsubscribes it; sends
    that may concern other nodes are published, a local session's are not.
    """
    backplane = RecordingBackplane("node1")
    config = HubConfig(host="127.0.0.1", port=0)
    with trio.fail_after(TIMEOUT):
        async with (
            open_hub(
                "test", "node1", config=config, authorizer=dev_authorizer, backplane=backplane
            ) as hub,
            trio.open_nursery() as nursery,
        ):
            url = f"ws://127.0.0.1:{await nursery.start(serve_hub, hub)}"
            async with client(url, "ann") as (ann, first):
                async with client(url, "ann") as (ann2, _), client(url, "bob") as (bob, _):
                    await hub.send_message_to_user_ids(["ann"], "hi")
                    await hub.send_message(first["session_id"], "just you")
                    await hub.send_message_to_all("all")
                    # (Read, so that trio-websocket's client can finish its close.)
                    assert [await ann2.get_message() for _ in range(2)] == ["hi", "all"]
                    assert await bob.get_message() == "all"
                await wait_for(lambda: len(hub.user_sessions("ann")) == 1)
                assert ("unsubscribe", "ann") not in backplane.calls
                assert [await ann.get_message() for _ in range(3)] == ["hi", "just you", "all"]
            await wait_for(lambda: hub.statistics().connections == 0)
            nursery.cancel_scope.cancel()
    subscriptions = [call for call in backplane.calls if call[0] != "publish"]
    assert sorted(subscriptions) == sorted(
        [("subscribe", "ann"), ("subscribe", "bob"), ("unsubscribe", "bob"), ("unsubscribe", "ann")]
    )
    assert subscriptions.index(("subscribe", "ann")) < subscriptions.index(("unsubscribe", "ann"))
    publishes = [call for call in backplane.calls if call[0] == "publish"]
    assert publishes == [("publish", "BackplaneDeliver")] * 2  # to users, to all; not to a local id


async def test_a_message_handed_to_the_dispatcher_before_a_close_is_still_processed() -> None:
    """trio's channel hands a message straight to a dispatcher waiting in
    ``get_message``; if the hub closes the session before the dispatcher runs, the
    message was still received first, and goes to the callback, not to ``drops``.
    """
    processed: list[Any] = []

    async def callback(reply: Reply, handler: Session, message: Any) -> None:
        processed.append(message)

    hits = 0
    with trio.fail_after(TIMEOUT):
        async with running_hub(
            callback, close_timeout=0.3, heartbeat_interval=0, engine="trio-websocket"
        ) as (hub, url):
            for round_ in range(200):
                raw = await RawClient.open(port_of(url), f"u{round_}")
                session = hub.get_handler(raw.session_id)
                assert session is not None
                await raw.stream.send_all(frame(Opcode.TEXT, orjson.dumps(round_)))
                # Catch the moment the message is handed over, before the dispatcher runs.
                caught = False
                for _ in range(1000):
                    await trio.lowlevel.checkpoint()
                    if session._awaiting_message and handed_over(session._conn._ws):
                        caught = True
                        # What the actor does with hub.close(), done now, before
                        # the dispatcher runs.
                        hub._run_command(Close(ToSession(raw.session_id), 1000, "closed"))
                        break
                    if processed and processed[-1] == round_:
                        break
                if caught:
                    hits += 1
                    await raw.closed_with(CloseCode.NORMAL)
                    assert processed[-1] == round_
                else:
                    await raw.stream.aclose()
                if hits >= 3:
                    break
    assert hits > 0  # the race was reached at least once
    assert hub.statistics().drops == 0


class FailingBackplane(RecordingBackplane):
    """A backplane whose connection fails while the hub starts."""

    async def serve(
        self, inbox: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await trio.sleep(0.01)
        raise OSError("backplane: connection refused")


async def test_a_hub_whose_start_fails_or_is_cancelled_does_not_hang() -> None:
    """The actor runs shielded from the caller: a start-up that fails, is cancelled, or
    begins cancelled must still end it, and raise (or return) at once.
    """
    config = HubConfig(host="127.0.0.1", port=0)
    with trio.fail_after(TIMEOUT):
        with pytest.raises(BaseExceptionGroup) as failed:
            async with open_hub("t", "node1", config=config, backplane=FailingBackplane("node1")):
                pytest.fail("the block must not run")  # pragma: no cover
        assert failed.group_contains(OSError, match="connection refused")

        with trio.CancelScope() as already:
            already.cancel()
            async with open_hub("t", "node1", config=config):
                pytest.fail("the block must not run")  # pragma: no cover
        assert already.cancelled_caught

        with trio.move_on_after(0.05) as gave_up:
            async with open_hub("t", "node1", config=config, backplane=SlowBackplane("node1")):
                pytest.fail("the block must not run")  # pragma: no cover
        assert gave_up.cancelled_caught


class SlowBackplane(RecordingBackplane):
    """A backplane that takes for ever to connect."""

    async def serve(
        self, inbox: object, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await trio.sleep_forever()
