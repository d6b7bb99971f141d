"""Flow control over real sockets: producers wait for slow readers, up to a bound.

The rule (trio_gw/_router.py): a session's queue has a hard cap
(``outbound_queue_bytes``); above half of it the session is *pressured* and a
send that reaches it waits until it drains to a quarter, leaves, or is closed as
stuck (no write for ``stall_timeout``) or lagging (oldest frame older than
``max_lag``); the hub's queues together have a budget (``queued_bytes_budget``).
A slow consumer is closed with 4008.

Outcomes are asserted, never speed. A client that must really stop reading is a
raw socket (``RawClient``) with a small receive buffer that stops calling
``recv()``: trio-websocket's client reads the socket in the background into its
own queue, so it would keep taking bytes for a while.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from trio_gw import CloseCode, HandlerManager, Session
from trio_gw._frames import Frame

from .conftest import TIMEOUT, client, running_hub, wait_for

# Hostile clients, closes and slow consumers: on each engine (see conftest).
pytestmark = pytest.mark.usefixtures("each_engine")

KIB = 1024
PAD = "x" * 1000  # a message of about 1 KiB


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class RawClient:
    """A WebSocket client on a raw socket that reads only when a test makes it read."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.session_id = ""
        self.messages: list[Any] = []  # decoded, after the hello
        self.close_code: int | None = None
        self.eof = False
        self._partial = ""

    @classmethod
    async def open(cls, port: int, token: str, *, rcvbuf: int = 4 * KIB) -> RawClient:
        """Connect with a small receive buffer, upgrade, and read the hello."""
        sock = trio.socket.socket()
        # Before connect, so that the window the client offers is small from the start.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        await sock.connect(("127.0.0.1", port))
        self = cls(trio.SocketStream(sock))
        await self.stream.send_all(
            self.ws.send(Request(host="127.0.0.1", target=f"/?token={token}"))
        )
        while not self.messages:
            await self.receive()
        hello = self.messages.pop(0)
        assert hello["payload"]["topic"] == "hello", hello
        self.session_id = hello["payload"]["event"]["session_id"]
        return self

    async def receive(self, max_bytes: int = 64 * KIB) -> None:
        """Read once from the socket (at most ``max_bytes``) and decode what is complete."""
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:  # reset by the hub (an aborted slow consumer)
            data = b""
        if not data:
            self.eof = True
            return
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, TextMessage):
                self._partial += event.data
                if event.message_finished:
                    self.messages.append(orjson.loads(self._partial))
                    self._partial = ""
            elif isinstance(event, CloseConnection):
                self.close_code = event.code
                # Answer it, so that the hub's close handshake ends at once.
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.stream.send_all(self.ws.send(event.response()))
            elif not isinstance(event, AcceptConnection):
                raise AssertionError(f"unexpected event {event!r}")

    async def read_to_end(self) -> None:
        """Read everything until the hub closes the connection."""
        while not self.eof:
            await self.receive()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def raw_client(url: str, token: str, *, rcvbuf: int = 4 * KIB) -> AsyncIterator[RawClient]:
    """A ``RawClient``, closed on the way out whatever happened."""
    raw = await RawClient.open(port_of(url), token, rcvbuf=rcvbuf)
    try:
        yield raw
    finally:
        await raw.aclose()


async def assert_closed_as_slow_consumer(hub: HandlerManager, stalled: RawClient) -> None:
    """The hub closed ``stalled`` with 4008. The client may never see the close frame: a
    write blocked on a client that does not read is cut off by aborting the connection."""
    await wait_for(lambda: hub.get_handler(stalled.session_id) is None)
    await stalled.read_to_end()
    assert stalled.close_code in (None, CloseCode.SLOW_CONSUMER)


async def open_readers(
    nursery: trio.Nursery,
    url: str,
    count: int,
    expected: int,
    received: list[list[int]],
) -> None:
    """Start ``count`` trio-websocket clients that each read ``expected`` messages, noting
    each message's ``n``; returns once all are connected."""

    async def reader(index: int, task_status: trio.TaskStatus[None]) -> None:
        async with client(url, f"reader-{index}") as (ws, _):
            task_status.started()
            for _ in range(expected):
                received[index].append(orjson.loads(await ws.get_message())["n"])

    for index in range(count):
        received.append([])
        await nursery.start(reader, index)


def hub_config(**overrides: Any) -> dict[str, Any]:
    """No heartbeat (a stalled raw client never answers a ping), and a short
    ``close_timeout``: closing a client that does not read waits that long before the
    hub aborts the connection, and the hub's shutdown waits for it."""
    return {"heartbeat_interval": 0, "close_timeout": 1.0, **overrides}


async def test_producer_waits_readers_get_everything_and_a_stalled_client_is_closed() -> None:
    readers, count = 10, 3000
    cap = 64 * KIB
    received: list[list[int]] = []
    config = hub_config(outbound_queue_bytes=cap, stall_timeout=0.5, max_lag=30)
    with trio.fail_after(TIMEOUT):
        async with running_hub(**config) as (hub, url), raw_client(url, "stalled") as stalled:
            peak = [0]

            async with trio.open_nursery() as nursery:
                await open_readers(nursery, url, readers, count, received)
                assert hub.statistics().connections == readers + 1
                for n in range(count):
                    await hub.send_message_to_all({"n": n, "pad": PAD})
                    session = hub.get_handler(stalled.session_id)
                    if session is not None:
                        peak[0] = max(peak[0], session.queued_bytes)

            assert received == [list(range(count))] * readers
            assert hub.statistics().slow_consumer_closes == 1
            assert hub.statistics().sender_waits > 0  # the producer waited for someone
            assert peak[0] <= cap
            await assert_closed_as_slow_consumer(hub, stalled)
            await wait_for(lambda: hub._live_connections == 0)
            stats = hub.statistics()
            assert stats.connections == 0 and stats.slow_consumer_closes == 1
            assert stats.closes_by_code[CloseCode.SLOW_CONSUMER] == 1
            hub._registry.check_invariants()
            assert hub._registry.user_count == 0
            assert hub._router._pressured == {}


async def test_producer_takes_turns_with_a_slow_reader_that_keeps_reading() -> None:
    count, cap = 2000, 32 * KIB
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(
                **hub_config(outbound_queue_bytes=cap, stall_timeout=TIMEOUT, max_lag=30)
            ) as (hub, url),
            raw_client(url, "slow") as slow,
        ):
            session = hub.get_handler(slow.session_id)
            assert session is not None
            seen = {"peak": 0, "pressured": 0, "polls": 0}
            sending = True

            async def watch() -> None:
                # At every scheduling round while the producer sends.
                while sending:
                    seen["peak"] = max(seen["peak"], session.queued_bytes)
                    seen["pressured"] += session.pressured
                    seen["polls"] += 1
                    await trio.lowlevel.checkpoint()

            async def read_slowly() -> None:
                while len(slow.messages) < count:
                    await slow.receive(4 * KIB)
                    await trio.sleep(0.001)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slowly)
                nursery.start_soon(watch)
                for n in range(count):
                    await hub.send_message(slow.session_id, {"n": n, "pad": PAD})
                    # Whenever the queue passed high water, the producer waited
                    # for it to drain: it never reached the cap.
                    assert session.queued_bytes <= cap
                sending = False

            assert [m["n"] for m in slow.messages] == list(range(count))
            # The queue did pass high water, so the producer waited; and it waited at
            # high water, so the queue never held more than one message above it.
            assert seen["pressured"] > 0, seen
            assert seen["peak"] <= cap // 2 + 2 * KIB, seen
            stats = hub.statistics()
            assert stats.sender_waits > 0
            assert stats.slow_consumer_closes == 0 and stats.drops == 0
            assert hub.get_handler(slow.session_id) is session
            await slow.aclose()  # a client that leaves
            await wait_for(lambda: hub._live_connections == 0)
            assert hub.statistics().closes_by_code.get(CloseCode.SLOW_CONSUMER) is None


async def test_a_reader_slower_than_the_producers_is_closed_at_max_lag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A pressured reader that keeps up with high water / max_lag (64 KiB/s here) is
    # waited for; this one reads about 20 KiB/s, one 1 KiB message per 50 ms.
    cap, max_lag = 64 * KIB, 0.5
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(
                # Never stuck: a write may wait long for this reader, and lag must decide.
                **hub_config(outbound_queue_bytes=cap, stall_timeout=TIMEOUT, max_lag=max_lag)
            ) as (hub, url),
            raw_client(url, "slow", rcvbuf=2 * KIB) as slow,
        ):
            normal: list[int] = []

            async def read_slowly() -> None:
                while not slow.eof:
                    await slow.receive(KIB)
                    await trio.sleep(0.05)

            async def read_normally(task_status: trio.TaskStatus[None]) -> None:
                async with client(url, "normal") as (ws, _):
                    task_status.started()
                    while True:
                        normal.append(orjson.loads(await ws.get_message())["n"])

            sent = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_slowly)
                await nursery.start(read_normally)
                while hub.get_handler(slow.session_id) is not None:
                    assert sent < 100_000, "the slow reader was never closed"
                    await hub.send_message_to_all({"n": sent, "pad": PAD})
                    sent += 1
                await wait_for(lambda: len(normal) >= sent)
                nursery.cancel_scope.cancel()

            assert normal == list(range(sent))
            # What the slow one read before it was cut off, it read in order.
            assert [m["n"] for m in slow.messages] == list(range(len(slow.messages)))
            assert len(slow.messages) < sent
            await slow.aclose()  # a client that leaves
            await wait_for(lambda: hub._live_connections == 0)
            stats = hub.statistics()
            assert stats.slow_consumer_closes == 1
            assert stats.closes_by_code[CloseCode.SLOW_CONSUMER] == 1
            # Closed for its lag, not as stuck (stall_timeout is out of reach here).
            assert any("max_lag" in r.getMessage() for r in caplog.records), caplog.text


async def test_the_hub_budget_makes_producers_wait_and_closes_the_stalled_clients() -> None:
    readers, stalled_count, count = 3, 4, 1500
    budget = 128 * KIB
    received: list[list[int]] = []
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(
                # Each queue may hold far more than the budget allows them all: the
                # budget, not a session's own high-water mark, binds.
                **hub_config(
                    outbound_queue_bytes=1024 * KIB,
                    queued_bytes_budget=budget,
                    stall_timeout=0.5,
                    max_lag=30,
                )
            ) as (hub, url),
            AsyncExitStack() as stack,
        ):
            stalled = [
                await stack.enter_async_context(raw_client(url, f"stalled-{i}"))
                for i in range(stalled_count)
            ]
            pressured = False
            async with trio.open_nursery() as nursery:
                await open_readers(nursery, url, readers, count, received)
                for n in range(count):
                    await hub.send_message_to_all({"n": n, "pad": PAD})
                    pressured |= bool(hub._router._pressured)
                    # A send returns with the queues back within the budget.
                    assert hub._router.budget.queued <= budget

            assert received == [list(range(count))] * readers
            # Nobody got near their own high-water mark: only waiting for the budget
            # (a Recheck of every session) can have closed the stalled ones.
            assert not pressured
            assert hub.statistics().sender_waits > 0
            assert hub.statistics().slow_consumer_closes == stalled_count
            for raw in stalled:
                await assert_closed_as_slow_consumer(hub, raw)
            await wait_for(lambda: hub._live_connections == 0)
            stats = hub.statistics()
            assert stats.connections == 0 and stats.slow_consumer_closes == stalled_count
            assert stats.closes_by_code[CloseCode.SLOW_CONSUMER] == stalled_count
            assert hub._router.budget.queued == 0


@pytest.mark.parametrize("route", ["inline", "queued"])
async def test_producers_that_do_not_wait_for_each_other_are_bounded_too(
    route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many sends started at once, none awaiting another, toward a client that stopped
    reading: its queue never passes the cap however the sends interleave.

    No reader could keep up with a burst like this (every send has run before any
    writer does), so there is only the stalled client: what is bounded is memory.
    The burst runs in one scheduling round, so the queue is watched at every offer
    (the real ``_offer_nowait``, spied on), not by polling.
    """
    producers, cap, messages_cap = 600, 64 * KIB, 48
    levels: list[tuple[int, int]] = []
    offer_nowait = Session._offer_nowait

    def spy(session: Session, frame: Frame, now: float, inline: bool = False) -> bool:
        queued = offer_nowait(session, frame, now, inline)
        if session.user_id == "stalled":
            levels.append((session.queued_messages, session.queued_bytes))
        return queued

    monkeypatch.setattr(Session, "_offer_nowait", spy)
    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(
                **hub_config(
                    outbound_queue_bytes=cap,
                    outbound_queue_size=messages_cap,
                    stall_timeout=0.5,
                    max_lag=30,
                )
            ) as (hub, url),
            raw_client(url, "stalled") as stalled,
        ):
            async with trio.open_nursery() as nursery:
                for n in range(producers):
                    if route == "queued" and n % 50 == 0:
                        # A queued command keeps the actor busy: the sends started
                        # now go through its queue rather than inline.
                        hub.close(f"{hub.instance_id}:nobody")
                    nursery.start_soon(hub.send_message_to_all, {"n": n, "pad": PAD})
            # Every send returned: none waits for a session that has gone.

            assert len(levels) > 1  # the hello, then what fitted before the close
            assert max(m for m, _ in levels) <= messages_cap, levels
            assert max(b for _, b in levels) <= cap, levels
            assert hub.statistics().slow_consumer_closes == 1
            await assert_closed_as_slow_consumer(hub, stalled)
            await wait_for(lambda: hub._live_connections == 0)
            stats = hub.statistics()
            assert stats.connections == 0 and stats.slow_consumer_closes == 1
            assert stats.closes_by_code[CloseCode.SLOW_CONSUMER] == 1
            assert hub._router.budget.queued == 0
