"""One connection's lifecycle (trio_gw/_session.py): slow consumers, heartbeat, churn.

Real sockets throughout. A client that "stops reading" is a trio-websocket
client that never calls ``get_message()``: its internal queue holds one message,
after which it stops reading the socket, so the kernel buffers fill up.
A client that never answers pings is a raw wsproto client over a trio stream.
"""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)

from trio_gw import CloseCode

from .conftest import TIMEOUT, client, running_hub, wait_for

# Hostile clients, closes and slow consumers: on each engine (see conftest).
pytestmark = pytest.mark.usefixtures("each_engine")


class RawClient:
    """A WebSocket client built from wsproto over a trio TCP stream: nothing automatic."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def connect(cls, port: int, token: str) -> RawClient:
        self = cls(await trio.open_tcp_stream("127.0.0.1", port))
        await self.stream.send_all(
            self.ws.send(Request(host="127.0.0.1", target=f"/?token={token}"))
        )
        return self

    async def events(self) -> list[Any]:
        data = await self.stream.receive_some(65536)
        if not data:
            return [None]
        self.ws.receive_data(data)
        return list(self.ws.events())


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize("writer", ["fast", "portable"])
@pytest.mark.parametrize("route", ["inline", "queued"])
async def test_slow_consumer_is_closed_and_others_get_everything(writer: str, route: str) -> None:
    """An idle hub delivers in the sender's task ("inline"); a busy one through its actor."""
    normal_clients, rounds, per_round = 5, 60, 20
    payload = "x" * 1000
    received = [0] * normal_clients
    progress = trio.Condition()
    in_order = [True] * normal_clients

    async def reader(index: int, url: str, ready: trio.Event) -> None:
        async with client(url, f"normal-{index}") as (ws, _):
            ready.set()
            for expected in range(rounds * per_round):
                message = orjson.loads(await ws.get_message())
                in_order[index] &= message["n"] == expected
                received[index] += 1
                async with progress:
                    progress.notify_all()

    with trio.fail_after(TIMEOUT):
        async with (
            running_hub(
                writer=writer,
                outbound_queue_bytes=64 * 1024,
                close_timeout=TIMEOUT,
                stall_timeout=1,
            ) as (
                hub,
                url,
            ),
            trio.open_nursery() as nursery,
            client(url, "slow") as (slow, slow_hello),
        ):
            for index in range(normal_clients):
                ready = trio.Event()
                nursery.start_soon(reader, index, url, ready)
                await ready.wait()
            sent = 0
            for _ in range(rounds):
                if route == "queued":
                    # A queued command keeps the actor busy for this round: the
                    # sends below queue behind it (none of them yields).
                    hub.close("node1:nobody")
                for _ in range(per_round):
                    await hub.send_message_to_all({"n": sent, "pad": payload})
                    sent += 1
                # Pace by the normal clients (not by time): wait until each has
                # everything so far. The slow one never reads, so its queue grows.
                async with progress:
                    while min(received) < sent:
                        await progress.wait()
            assert hub.statistics().slow_consumer_closes == 1
            assert hub.get_handler(slow_hello["session_id"]) is None

            # The slow client now reads: what was written, then the close code.
            slow_received = 0

            async def read_to_the_end() -> None:
                nonlocal slow_received
                while True:
                    await slow.get_message()
                    slow_received += 1

            with pytest.raises(ConnectionClosed) as closed:
                await read_to_the_end()
            assert closed.value.reason.code == CloseCode.SLOW_CONSUMER
        assert received == [rounds * per_round] * normal_clients
        assert all(in_order)
        stats = hub.statistics()
        # The slow one got part of it, and the counters say exactly what was
        # written: every normal client's messages, the slow one's, and 6 hellos.
        assert slow_received < sent
        assert stats.messages_out == normal_clients * sent + slow_received + 6
        assert stats.connections == 0
        hub._registry.check_invariants()


async def test_client_that_never_pongs_is_closed_4012() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(heartbeat_interval=0.2, heartbeat_timeout=1.0) as (hub, url):
            async with client(url, "polite") as (polite, polite_hello):
                mute = await RawClient.connect(port_of(url), "mute")
                pings, close_code, accepted = 0, None, False
                while close_code is None:
                    for event in await mute.events():
                        if isinstance(event, AcceptConnection):
                            accepted = True
                        elif isinstance(event, Ping):
                            pings += 1  # and never answered
                        elif isinstance(event, CloseConnection):
                            close_code = event.code
                        elif event is None:
                            raise AssertionError("closed without a close frame")
                await mute.stream.aclose()
                assert accepted and pings >= 1
                assert close_code == CloseCode.NO_PONG
                # the polite client answered every ping and is still served
                assert hub.get_handler(polite_hello["session_id"]) is not None
                await hub.send_message(polite_hello["session_id"], "still here")
                assert await polite.get_message() == "still here"
                # Closed from the server side: trio-websocket's *client* crashes
                # when a ping reaches it while it is closing (wsproto refuses the
                # pong), and a server-side close cannot race a ping.
                hub.close(polite_hello["session_id"])
                with pytest.raises(ConnectionClosed):
                    await polite.get_message()
            await wait_for(lambda: hub.statistics().connections == 0)
            assert hub.statistics().closes_by_code[CloseCode.NO_PONG] == 1


async def test_heartbeat_can_be_turned_off() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_hub(heartbeat_interval=0) as (hub, url):
            mute = await RawClient.connect(port_of(url), "mute")
            events: list[Any] = []
            while not any(isinstance(e, TextMessage) for e in events):
                events += await mute.events()
            with trio.move_on_after(0.5):
                events += await mute.events()
            assert not any(isinstance(e, Ping | CloseConnection) for e in events)
            assert hub.statistics().connections == 1
            await mute.stream.aclose()


async def test_churn_leaves_no_registry_entry() -> None:
    """Thousands of connects and disconnects, some clean, some abrupt, some mid-handshake.

    Progress, not speed, is checked: every cycle of every worker completes, and
    the hang guards are generous enough for a loaded machine.
    """
    workers, cycles = 20, 100
    outcomes = {"clean": 0, "abrupt": 0, "half_handshake": 0}
    completed = [0] * workers
    trouble: list[tuple[int, str, str]] = []

    async def worker(seed: int, url: str) -> None:
        rng = random.Random(seed)
        port = port_of(url)
        for _ in range(cycles):
            kind = rng.choice(["clean", "clean", "abrupt", "half_handshake"])
            try:
                await cycle(kind, rng, url, port)
            except Exception as exc:  # reported below, with every worker's progress
                trouble.append((seed, kind, repr(exc)))
                return
            outcomes[kind] += 1
            completed[seed] += 1

    async def cycle(kind: str, rng: random.Random, url: str, port: int) -> None:
        if kind == "clean":
            async with open_websocket_url(f"{url}/?token=u{rng.randrange(50)}") as ws:
                await ws.get_message()
        elif kind == "abrupt":
            raw = await RawClient.connect(port, f"u{rng.randrange(50)}")
            events: list[Any] = []
            while not any(isinstance(e, TextMessage) for e in events):
                events += await raw.events()
            await trio.aclose_forcefully(raw.stream)  # no close frame: a vanished client
        else:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"GET /?token=x HTTP/1.1\r\nHost: x\r\n")
            await trio.aclose_forcefully(stream)

    # Hang guards only, generous for a loaded machine: the churn takes seconds.
    with trio.fail_after(20 * TIMEOUT):
        # A handshake slowed down by the load must not be refused as timed out.
        async with running_hub(handshake_timeout=TIMEOUT) as (hub, url):
            with trio.move_on_after(15 * TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for seed in range(workers):
                        nursery.start_soon(worker, seed, url)
            # Every worker got through every cycle; a stalled one shows where.
            assert not trouble, trouble
            assert completed == [cycles] * workers, (completed, hub.statistics())
            sessions = outcomes["clean"] + outcomes["abrupt"]
            with trio.move_on_after(3 * TIMEOUT):
                await wait_for(lambda: hub.statistics().sessions_closed == sessions)
                await wait_for(lambda: hub._live_connections == 0)
            stuck = [
                (s, s._close, s._ws.closed, s._work_pending, s._writer_done.done)
                for s in map(hub.get_handler, hub.session_ids()[:5])
            ]
            assert hub._live_connections == 0, (sessions, hub.statistics(), stuck)
            await hub.flush()
            stats = hub.statistics()
            assert stats.sessions_opened == sessions
            assert stats.connections == 0 and stats.users == 0
            assert stats.handshakes_in_progress == 0
            assert hub._registry.session_count == 0 and hub._registry.user_count == 0
            hub._registry.check_invariants()
            assert sum(outcomes.values()) == workers * cycles
            assert stats.closes_by_code[1006] == outcomes["abrupt"]
