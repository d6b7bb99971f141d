"""A load-generating process: many picows connections, one asyncio loop.

``python -m benchmarks.loadgen JOB_JSON``; it reports JSON lines on stdout:
``{"event": "ready", ...}`` once every connection has its hello, then
``{"event": "done", ...}``. Modes:

* ``receive``: count messages per connection until each has its ``expected``
  count; check ``seq`` order; measure delivery latency from the message's ``t``.
  The first ``slow`` connections stop reading after the hello (their socket is
  paused), and are drained at the end to see what the server did with them.
* ``rpc``: each connection does request -> response round trips for ``seconds``.
* ``rpc_fanout``: ``"fanout"`` calls for ``seconds``, at most ``inflight`` at once
  over all of this process's connections, each call sent from the next
  connection in turn and answered before another takes its place. Call k goes to
  the k-th draw of ``per_call`` distinct users out of ``users_n`` (``seed``); at
  the end each connection must have received one push per call naming its user.
  With ``calls``, at most that many calls are made (the pushes may then go to
  another process's connections: ``benchmarks/cluster.py``).
* ``idle``: hold the connections until stdin says ``close``.

With ``"hold": true`` the connections stay open after the done event until stdin
says ``close`` (to measure what the server holds once everything was delivered).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter, deque
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from ._protocol import iter_user_draws, raise_fd_limit

SEQ_PREFIX = b'{"seq":'
WARMUP = b'{"warmup":'
SEQ_START = len(SEQ_PREFIX)


class Client(WSListener):
    """One connection's counters; picows calls ``on_ws_frame`` per frame."""

    def __init__(self, job: dict[str, Any], user: str, expected: int, strict: bool) -> None:
        self.job = job
        self.user = user
        self.expected = expected
        self.strict = strict
        self.hello = asyncio.get_running_loop().create_future()
        self.complete = asyncio.get_running_loop().create_future()
        self.gone = asyncio.get_running_loop().create_future()
        self.transport: WSTransport | None = None
        self.received = 0
        self.last_seq = -1
        self.in_order = True
        self.latencies: list[float] = []
        self.close_code: int | None = None
        self.disconnected = False
        self.rpc_sent_at = 0.0
        self.rpc_done = 0
        self.rpc_until = 0.0
        self.calls: FanoutCalls | None = None
        self.calls_sent_at: deque[float] = deque()
        if expected == 0 and job["mode"] == "receive":
            self.complete.set_result(None)
        if job["mode"] == "rpc_fanout":
            self.expected = sys.maxsize  # known once every call was answered

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            if not self.hello.done():
                self.hello.set_result(None)
                return
            head = bytes(frame.get_payload_as_memoryview()[:32])
            if head.startswith(WARMUP):
                return  # see server_hub.warm_up
            if head.startswith(SEQ_PREFIX):
                self.on_message(head, frame)
            else:
                self.on_response()
        elif kind == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_message(self, head: bytes, frame: WSFrame) -> None:
        # Parsing (or even copying) 1 KB of JSON per message would make this
        # client slower than the hub under test; "seq" leads every message, so
        # it is sliced from the head, and only latency samples are decoded.
        seq = int(head[SEQ_START : head.index(b",", SEQ_START)])
        ok = seq == self.last_seq + 1 if self.strict else seq > self.last_seq
        self.in_order &= ok
        self.last_seq = seq
        self.received += 1
        if self.received % 16 == 1:
            sent_at = orjson.loads(frame.get_payload_as_bytes())["t"]
            self.latencies.append(time.monotonic() - sent_at)
        if self.received >= self.expected and not self.complete.done():
            self.complete.set_result(None)

    def send_request(self) -> None:
        assert self.transport is not None
        self.rpc_sent_at = time.monotonic()
        request = {
            "type": "request",
            "payload": {
                "service": "bench",
                "method": "echo",
                "params": self.rpc_done,
                "trace_id": "t",
            },
        }
        self.transport.send(WSMsgType.TEXT, orjson.dumps(request))

    def on_response(self) -> None:
        if self.calls is not None:
            self.calls.on_response(self)
            return
        now = time.monotonic()
        self.latencies.append(now - self.rpc_sent_at)
        self.rpc_done += 1
        if now < self.rpc_until:
            self.send_request()
        elif not self.complete.done():
            self.complete.set_result(None)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.disconnected = True
        self.gone.set_result(None)
        if not self.hello.done():
            self.hello.set_exception(ConnectionError("disconnected before hello"))
        if not self.complete.done():
            self.complete.set_result(None)


class FanoutCalls:
    """rpc_fanout: keeps up to ``inflight`` calls open over all the connections."""

    def __init__(self, clients: list[Client], job: dict[str, Any]) -> None:
        self.clients = clients
        self.draws = iter_user_draws(job["per_call"], job["users_n"], job["seed"])
        self.size = job["size"]
        self.inflight = job["inflight"]
        self.limit: int | None = job.get("calls")
        self.until = 0.0
        self.turn = 0
        self.sent = 0
        self.answered = 0
        self.per_user: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.finished = asyncio.get_running_loop().create_future()
        for client in clients:
            client.calls = self

    def start(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds
        for _ in range(self.inflight):
            self.call()
        if not self.sent:
            self.finished.set_result(None)

    def call(self) -> None:
        if self.limit is not None and self.sent >= self.limit:
            return
        for _ in range(len(self.clients)):
            client = self.clients[self.turn]
            self.turn = (self.turn + 1) % len(self.clients)
            if client.transport is not None and not client.disconnected:
                break
        else:
            return
        assert client.transport is not None
        users = next(self.draws)
        self.per_user.update(users)
        request = {
            "type": "request",
            "payload": {
                "service": "bench",
                "method": "fanout",
                "params": {"call": self.sent, "users": users, "size": self.size},
                "trace_id": "t",
            },
        }
        self.sent += 1
        client.calls_sent_at.append(time.monotonic())
        client.transport.send(WSMsgType.TEXT, orjson.dumps(request))

    def on_response(self, client: Client) -> None:
        now = time.monotonic()
        # Each server answers one connection's requests in the order it got them.
        self.latencies.append(now - client.calls_sent_at.popleft())
        self.answered += 1
        if now < self.until and (self.limit is None or self.sent < self.limit):
            self.call()
        elif self.answered == self.sent and not self.finished.done():
            self.finished.set_result(None)

    def expect(self) -> None:
        """Now that every call was answered: each connection's pushes to come."""
        for client in self.clients:
            client.expected = self.per_user[client.user]
            if client.received >= client.expected and not client.complete.done():
                client.complete.set_result(None)


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(event).decode() + "\n")
    sys.stdout.flush()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6, 1)

    return {"p50_us": at(0.50), "p99_us": at(0.99), "max_us": at(1.0)}


async def main(job: dict[str, Any]) -> None:
    users: list[str] = job["users"]
    expected: list[int] = job.get("expected") or [0] * len(users)
    strict = job.get("strict", True)
    slow = job.get("slow", 0)
    limit = asyncio.Semaphore(job.get("connect_concurrency", 100))
    errors: list[str] = []

    async def open_one(index: int) -> Client | None:
        async with limit:
            try:
                _, client = await ws_connect(
                    lambda: Client(
                        job, users[index], expected[index] if index >= slow else 0, strict
                    ),
                    f"{job['url']}/?token={users[index]}",
                    websocket_handshake_timeout=60,
                    max_frame_size=1 << 24,
                )
                assert isinstance(client, Client)
                await asyncio.wait_for(client.hello, 60)
                return client
            except Exception as exc:  # reported, not hidden
                errors.append(f"{type(exc).__name__}: {exc}")
                return None

    start = time.monotonic()
    opened = await asyncio.gather(*(open_one(i) for i in range(len(users))))
    connect_seconds = time.monotonic() - start
    clients = [c for c in opened if c is not None]
    for client in clients[:slow]:
        assert client.transport is not None
        client.transport.underlying_transport.pause_reading()
    emit(
        {
            "event": "ready",
            "connected": len(clients),
            "connect_seconds": connect_seconds,
            "errors": errors[:5],
            "error_count": len(errors),
        }
    )

    mode = job["mode"]
    loop = asyncio.get_running_loop()
    if mode == "idle":
        await loop.run_in_executor(None, sys.stdin.readline)
        emit({"event": "done"})
        return
    cpu0 = time.process_time()
    timed_out = False
    deadline = loop.time() + job.get("timeout", 60)
    calls = None
    if mode == "rpc":
        until = time.monotonic() + job["seconds"]
        for client in clients:
            client.rpc_until = until
            client.send_request()
    elif mode == "rpc_fanout":
        calls = FanoutCalls(clients, job)
        calls.start(job["seconds"])
    try:
        async with asyncio.timeout_at(deadline):
            if calls is not None:
                await calls.finished
                calls.expect()
            await asyncio.gather(*(c.complete for c in clients[slow:]))
    except TimeoutError:
        timed_out = True
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
    normal = clients[slow:]
    # Counted before the stalled readers read again: a healthy reader that gets
    # the rest only once they do was held up by them.
    whole = sum(c.received >= c.expected and c.in_order for c in normal)
    closed = sum(c.disconnected for c in normal)
    slow_report = []
    for client in clients[:slow]:
        assert client.transport is not None
        client.transport.underlying_transport.resume_reading()
    if slow:
        await asyncio.wait(
            [c.gone for c in clients[:slow]], timeout=job.get("slow_drain_seconds", 15)
        )
        slow_report = [
            {"received": c.received, "close_code": c.close_code, "disconnected": c.disconnected}
            for c in clients[:slow]
        ]
    latencies = [x for c in normal for x in c.latencies]
    emit(
        {
            "event": "done",
            "received": sum(c.received for c in normal),
            "expected": sum(calls.per_user[c.user] if calls else c.expected for c in normal),
            "round_trips": calls.answered if calls else sum(c.rpc_done for c in normal),
            "call_latency": percentiles(calls.latencies) if calls else {},
            "complete": not timed_out and all(c.received >= c.expected for c in normal),
            "in_order": all(c.in_order for c in normal),
            # Healthy clients that were disconnected, and that got every
            # message in order, by the time the wait for them ended.
            "closed": closed,
            "whole": whole,
            "timed_out": timed_out,
            "latency": percentiles(latencies),
            "cpu_seconds": cpu,
            "elapsed": elapsed,
            "slow": slow_report,
        }
    )
    if job.get("hold"):
        await loop.run_in_executor(None, sys.stdin.readline)
    for client in clients:
        if client.transport is not None and not client.disconnected:
            client.transport.disconnect()


if __name__ == "__main__":
    raise_fd_limit()
    asyncio.run(main(orjson.loads(sys.argv[1])))
