"""A load-generating process: many picows connections, one asyncio loop.

``python -m benchmarks.loadgen JOB_JSON``; it reports JSON lines on stdout:
``{"event": "ready", ...}`` once every connection has its hello, then
``{"event": "done", ...}``. Modes:

* ``receive``: count messages per connection until each has its ``expected``
  count; check ``seq`` order; measure delivery latency from the message's ``t``.
  The first ``slow`` connections stop reading after the hello (their socket is
  paused), and are drained at the end to see what the server did with them.
* ``rpc``: each connection does request -> response round trips for ``seconds``.
* ``idle``: hold the connections until stdin says ``close``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from ._protocol import raise_fd_limit

SEQ_PREFIX = b'{"seq":'
SEQ_START = len(SEQ_PREFIX)


class Client(WSListener):
    """One connection's counters; picows calls ``on_ws_frame`` per frame."""

    def __init__(self, job: dict[str, Any], expected: int, strict: bool) -> None:
        self.job = job
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
        if expected == 0 and job["mode"] == "receive":
            self.complete.set_result(None)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            if not self.hello.done():
                self.hello.set_result(None)
                return
            head = bytes(frame.get_payload_as_memoryview()[:32])
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
                    lambda: Client(job, expected[index] if index >= slow else 0, strict),
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
    if mode == "rpc":
        until = time.monotonic() + job["seconds"]
        for client in clients:
            client.rpc_until = until
            client.send_request()
    try:
        await asyncio.wait_for(
            asyncio.gather(*(c.complete for c in clients[slow:])), job.get("timeout", 60)
        )
    except TimeoutError:
        timed_out = True
    elapsed = time.monotonic() - start
    cpu = time.process_time() - cpu0
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
    normal = clients[slow:]
    latencies = [x for c in normal for x in c.latencies]
    emit(
        {
            "event": "done",
            "received": sum(c.received for c in normal),
            "round_trips": sum(c.rpc_done for c in normal),
            "complete": not timed_out and all(c.received >= c.expected for c in normal),
            "in_order": all(c.in_order for c in normal),
            "closed": sum(c.disconnected for c in normal),
            # Healthy clients that got every message, in order.
            "whole": sum(c.received >= c.expected and c.in_order for c in normal),
            "timed_out": timed_out,
            "latency": percentiles(latencies),
            "cpu_seconds": cpu,
            "elapsed": elapsed,
            "slow": slow_report,
        }
    )
    for client in clients:
        if client.transport is not None and not client.disconnected:
            client.transport.disconnect()


if __name__ == "__main__":
    raise_fd_limit()
    asyncio.run(main(orjson.loads(sys.argv[1])))
