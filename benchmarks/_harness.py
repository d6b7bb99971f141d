"""Start servers and load generators as processes, run scenarios, measure."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import orjson
import psutil

from ._protocol import expected_per_user, user_draws

SERVER_CORE, CLIENT_CORE = 0, 1

SERVERS: dict[str, list[str]] = {
    "trio_gw": ["-m", "benchmarks.server_hub", "0"],
    "trio_gw trio-websocket": ["-m", "benchmarks.server_hub", "0", "--engine", "trio-websocket"],
    "websockets": ["-m", "benchmarks.server_websockets", "0"],
    "trio-websocket naive": ["-m", "benchmarks.server_naive", "0"],
}
#: ``--baseline DIR``: a checkout of an earlier trio_gw, run as "trio_gw baseline"
#: from that directory (its own trio_gw and benchmarks/ come first on sys.path).
BASELINE = "trio_gw baseline"
SERVER_CWD: dict[str, Path] = {}


def _pin(pid: int, core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        with suppress(OSError):  # not allowed here: run unpinned, still measured
            os.sched_setaffinity(pid, {core})


def _readline(stream: IO[bytes], timeout: float) -> dict[str, Any] | None:
    """One JSON line from a child, or None after ``timeout`` seconds or at EOF."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return None
    line = stream.readline()
    return orjson.loads(line) if line.strip() else None


class Server:
    """A server under test, pinned to one core, driven through stdin."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.log = (log_dir / f"{name.replace(' ', '_')}.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, *SERVERS[name]],
            cwd=SERVER_CWD.get(name),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        _pin(self.process.pid, SERVER_CORE)
        assert self.process.stdout is not None
        started = _readline(self.process.stdout, 30)
        if started is None:
            raise RuntimeError(f"{name} did not start; see {self.log.name}")
        self.port = started["port"]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.ps = psutil.Process(self.process.pid)

    def send(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(orjson.dumps(command) + b"\n")
        self.process.stdin.flush()

    def reply(self, timeout: float) -> dict[str, Any] | None:
        assert self.process.stdout is not None
        return _readline(self.process.stdout, timeout)

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def close(self) -> None:
        try:
            self.send({"op": "quit"})
            self.process.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.log.close()


class PeakRss:
    """The highest RSS of a server while the block runs, sampled every ``interval`` s.

    Sampled on a thread of the harness (not on either measured core's processes),
    from a reading taken on entry; ``sample()`` adds one more reading.
    """

    def __init__(self, server: Server, interval: float = 0.02) -> None:
        self.interval = interval
        self.process = psutil.Process(server.process.pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        try:
            rss = int(self.process.memory_info().rss)
        except psutil.Error:
            return self.peak
        self.peak = max(self.peak, rss)
        return rss

    def _run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRss:
        self.sample()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.sample()


class LoadGen:
    """One load-generating process, pinned to the client core."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.loadgen", orjson.dumps(job).decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        _pin(self.process.pid, CLIENT_CORE)

    def event(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        event = _readline(self.process.stdout, timeout)
        if event is None:
            self.process.kill()
            raise RuntimeError("load generator gave no answer")
        return event

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"close\n")
        self.process.stdin.flush()

    def cpu(self) -> float:
        try:
            times = psutil.Process(self.process.pid).cpu_times()
            return float(times.user + times.system)
        except psutil.NoSuchProcess:
            return 0.0

    def wait(self) -> None:
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def running(name: str, log_dir: Path) -> Iterator[Server]:
    server = Server(name, log_dir)
    try:
        yield server
    finally:
        server.close()


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts)]


def _connect(server: Server, users: list[str], procs: int, **job: Any) -> list[LoadGen]:
    gens = []
    for part in _split(list(range(len(users))), procs):
        expected = job.pop("expected_all", None)
        sub = {**job, "url": server.url, "users": [users[i] for i in part]}
        if expected is not None:
            sub["expected"] = [expected[i] for i in part]
            job["expected_all"] = expected
        gens.append(LoadGen(sub))
    return gens


def _ready(gens: list[LoadGen], timeout: float = 120) -> dict[str, Any]:
    events = [g.event(timeout) for g in gens]
    return {
        "connected": sum(e["connected"] for e in events),
        "connect_seconds": max(e["connect_seconds"] for e in events),
        "errors": sum(e["error_count"] for e in events),
    }


def _done(
    gens: list[LoadGen], timeout: float, server: Server, hold: bool = False
) -> dict[str, Any]:
    """The load generators' done events, summed; ``hold``: they stay connected until released."""
    events = [g.event(timeout) for g in gens]
    # Read the clock before the load generators hang up: tearing connections
    # down is not part of what a scenario measures.
    server_cpu, at = server.cpu(), time.monotonic()
    if not hold:
        for g in gens:
            g.wait()
    latency = max((e["latency"] for e in events), key=lambda x: x.get("p99_us", 0))
    call_latency = max((e["call_latency"] for e in events), key=lambda x: x.get("p99_us", 0))
    return {
        "received": sum(e["received"] for e in events),
        "expected": sum(e["expected"] for e in events),
        "round_trips": sum(e["round_trips"] for e in events),
        "call_latency": call_latency,
        "complete": all(e["complete"] for e in events),
        "in_order": all(e["in_order"] for e in events),
        "timed_out": any(e["timed_out"] for e in events),
        "latency": latency,
        "client_cpu_s": sum(e["cpu_seconds"] for e in events),
        "slow": [s for e in events for s in e["slow"]],
        "whole": sum(e.get("whole", 0) for e in events),
        "closed": sum(e.get("closed", 0) for e in events),
        "server_cpu": server_cpu,
        "at": at,
    }


def _release(gens: list[LoadGen]) -> None:
    """Let held load generators hang up, and wait for them."""
    for g in gens:
        with suppress(OSError):  # it may have been killed for not answering
            g.release()
    for g in gens:
        g.wait()


def _delivery_result(
    server: Server,
    gens: list[LoadGen],
    expected: int,
    cpu0: float,
    t0: float,
    timeout: float,
    hold: bool = False,
) -> dict[str, Any]:
    done = _done(gens, timeout, server, hold)
    seconds = done["at"] - t0
    cpu = done["server_cpu"] - cpu0
    deliveries = done["received"]
    return {
        "deliveries": deliveries,
        "expected": expected,
        "seconds": round(seconds, 3),
        "deliveries_per_s": round(deliveries / seconds) if seconds else 0,
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2) if deliveries else None,
        "client_cpu_s": round(done["client_cpu_s"], 3),
        "latency": done["latency"],
        "complete": done["complete"] and deliveries == expected,
        "in_order": done["in_order"],
        "timed_out": done["timed_out"],
        "rss_mib": round(server.rss() / 2**20, 1),
        "slow": done["slow"],
        "normal_whole": done["whole"],
        "normal_closed": done["closed"],
    }


def fanout(
    server: Server,
    connections: int,
    messages: int,
    size: int = 100,
    timeout: float = 120,
    settle: bool = False,
) -> dict[str, Any]:
    users = [f"u{i}" for i in range(connections)]
    gens = _connect(
        server, users, 1, mode="receive", expected_all=[messages] * connections, timeout=timeout
    )
    ready = _ready(gens)
    gc0 = settled(server, timeout, warm=True) if settle else None
    cpu0, t0 = server.cpu(), time.monotonic()
    server.send({"op": "fanout", "count": messages, "size": size})
    result = _delivery_result(server, gens, connections * messages, cpu0, t0, timeout)
    gc1 = (server.reply(timeout) or {}).get("gc")
    return {**result, "connect_errors": ready["errors"], "gc": gc_delta(gc0, gc1)}


def settled(server: Server, timeout: float = 120, warm: bool = False) -> dict[str, Any] | None:
    """Have a trio_gw server settle (its backplane in sync, then a full garbage
    collection); returns its collector's counts so far.

    With ``warm`` it first sends each of its sessions one message, which the
    clients ignore (``server_hub.warm_up``), so that the run measures
    deliveries to sessions in their steady state. The objects of the
    connections just made are owed a full collection; made here, no measured
    window is charged for it by chance (the collections inside a window are
    reported, as ``gc``).
    """
    server.send({"op": "settle", "warm": warm})
    reply = server.reply(timeout) or {}
    gc = reply.get("gc")
    return gc if isinstance(gc, dict) else None


def fanout_4k(
    server: Server,
    connections: int,
    messages: int,
    size: int = 4096,
    settle_seconds: float = 1.0,
    timeout: float = 120,
) -> dict[str, Any]:
    """``fanout`` of large messages: CPU per delivery, and the memory it takes and keeps.

    ``peak_rss_growth_mib``: the highest RSS sampled (every 20 ms) from the broadcast
    until every client had every message, over the RSS just before it.
    ``held_rss_growth_mib``: the RSS ``settle_seconds`` after that, clients still
    connected, over the same baseline. ``messages * size`` stays below trio_gw's
    ``outbound_queue_bytes`` (1 MiB), so no reader is closed as a slow consumer.
    """
    users = [f"u{i}" for i in range(connections)]
    gens = _connect(
        server,
        users,
        1,
        mode="receive",
        expected_all=[messages] * connections,
        timeout=timeout,
        hold=True,
    )
    ready = _ready(gens)
    try:
        rss0 = server.rss()
        with PeakRss(server) as peak:
            cpu0, t0 = server.cpu(), time.monotonic()
            server.send({"op": "fanout", "count": messages, "size": size})
            result = _delivery_result(
                server, gens, connections * messages, cpu0, t0, timeout, hold=True
            )
            server.reply(timeout)
            time.sleep(settle_seconds)
            held = peak.sample()
    finally:
        _release(gens)
    return {
        **result,
        "rss_before_mib": round(rss0 / 2**20, 1),
        "peak_rss_growth_mib": round((peak.peak - rss0) / 2**20, 1),
        "held_rss_growth_mib": round((held - rss0) / 2**20, 1),
        "connect_errors": ready["errors"],
    }


def to_users(
    server: Server,
    connections: int,
    users_n: int,
    calls: int,
    per_call: int = 10,
    timeout: float = 120,
    settle: bool = False,
) -> dict[str, Any]:
    users = [f"u{i % users_n}" for i in range(connections)]
    draws = user_draws(calls, per_call, users_n, seed=7)
    per_user = expected_per_user(draws)
    expected = [per_user[u] for u in users]
    gens = _connect(
        server, users, 1, mode="receive", expected_all=expected, strict=False, timeout=timeout
    )
    ready = _ready(gens)
    gc0 = settled(server, timeout, warm=True) if settle else None
    cpu0, t0 = server.cpu(), time.monotonic()
    server.send(
        {
            "op": "to_users",
            "calls": calls,
            "per_call": per_call,
            "users": users_n,
            "seed": 7,
            "size": 100,
        }
    )
    result = _delivery_result(server, gens, sum(expected), cpu0, t0, timeout)
    gc1 = (server.reply(timeout) or {}).get("gc")
    return {**result, "connect_errors": ready["errors"], "gc": gc_delta(gc0, gc1)}


def gc_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """The collections (per generation) and their seconds between two ``gc`` reports."""
    if not before or not after:
        return None
    return {
        key: [round(b - a, 4) for a, b in zip(before[key], after[key], strict=True)]
        for key in ("collections", "seconds")
    }


def rpc(server: Server, connections: int, seconds: float) -> dict[str, Any]:
    users = [f"u{i}" for i in range(connections)]
    gens = _connect(server, users, 1, mode="rpc", seconds=seconds, timeout=seconds + 30)
    ready = _ready(gens)
    cpu0, t0 = server.cpu(), time.monotonic()
    done = _done(gens, seconds + 60, server)
    elapsed = done["at"] - t0
    cpu = done["server_cpu"] - cpu0
    trips = done["round_trips"]
    return {
        "round_trips": trips,
        "round_trips_per_s": round(trips / elapsed) if elapsed else 0,
        "server_cpu_us_per_round_trip": round(cpu / trips * 1e6, 2) if trips else None,
        "client_cpu_s": round(done["client_cpu_s"], 3),
        "latency": done["latency"],
        "complete": not done["timed_out"],
        "connect_errors": ready["errors"],
    }


def rpc_fanout(
    server: Server,
    connections: int,
    users_n: int,
    seconds: float,
    per_call: int = 10,
    inflight: int = 32,
    size: int = 100,
    timeout: float = 60,
) -> dict[str, Any]:
    """Requests whose handling pushes to ``per_call`` users, then answers the caller.

    ``connections`` are spread evenly over ``users_n`` users (connection i is user
    ``u{i % users_n}``). One load generator keeps ``inflight`` calls open in
    total, each from the next connection in turn, for ``seconds``; call k names
    the k-th draw of ``per_call`` distinct users (seed 11). A delivery is a push
    received by a client; answers are counted as calls, not deliveries.
    """
    users = [f"u{i % users_n}" for i in range(connections)]
    gens = _connect(
        server,
        users,
        1,
        mode="rpc_fanout",
        users_n=users_n,
        per_call=per_call,
        seed=11,
        inflight=inflight,
        size=size,
        seconds=seconds,
        strict=False,
        timeout=seconds + timeout,
    )
    ready = _ready(gens)
    cpu0, t0 = server.cpu(), time.monotonic()
    done = _done(gens, seconds + timeout + 30, server)
    elapsed = done["at"] - t0
    cpu = done["server_cpu"] - cpu0
    calls, deliveries = done["round_trips"], done["received"]
    return {
        "calls": calls,
        "calls_per_s": round(calls / elapsed) if elapsed else 0,
        "deliveries": deliveries,
        "expected": done["expected"],
        "deliveries_per_s": round(deliveries / elapsed) if elapsed else 0,
        "seconds": round(elapsed, 3),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2) if deliveries else None,
        "server_cpu_us_per_call": round(cpu / calls * 1e6, 2) if calls else None,
        "client_cpu_s": round(done["client_cpu_s"], 3),
        "call_latency": done["call_latency"],
        "push_latency": done["latency"],
        "complete": done["complete"] and calls > 0 and deliveries == done["expected"],
        "timed_out": done["timed_out"],
        "rss_mib": round(server.rss() / 2**20, 1),
        "connect_errors": ready["errors"],
    }


def idle(server: Server, connections: int) -> dict[str, Any]:
    time.sleep(0.5)
    rss0 = server.rss()
    users = [f"u{i}" for i in range(connections)]
    gens = _connect(
        server, users, 2 if connections > 5000 else 1, mode="idle", connect_concurrency=100
    )
    ready = _ready(gens, timeout=300)
    time.sleep(1.0)
    rss1 = server.rss()
    for g in gens:
        g.release()
    for g in gens:
        g.event(30)
        g.wait()
    connected = ready["connected"]
    return {
        "connections": connected,
        "kib_per_connection": round((rss1 - rss0) / 1024 / connected, 2) if connected else None,
        "accepts_per_s": round(connected / ready["connect_seconds"]),
        "rss_mib": round(rss1 / 2**20, 1),
        "complete": connected == connections,
        "connect_errors": ready["errors"],
    }


def slow_consumer(
    server: Server,
    normal: int,
    messages: int,
    size: int = 1000,
    rate: int = 1000,
    timeout: float = 60,
    slow_drain_seconds: float = 10,
) -> dict[str, Any]:
    """Normal clients and one that stopped reading, at a paced ``rate`` of broadcasts.

    Paced, because the question is whether the normal clients keep receiving at
    the offered rate while one client is stuck. Unpaced, a hub faster than the
    load generator overflows every client's queue, which measures the client.
    """
    users = ["slow"] + [f"u{i}" for i in range(normal)]
    gens = _connect(
        server,
        users,
        1,
        mode="receive",
        expected_all=[0] + [messages] * normal,
        slow=1,
        timeout=timeout,
        slow_drain_seconds=slow_drain_seconds,
    )
    _ready(gens)
    rss0 = server.rss()
    with PeakRss(server) as peak:
        cpu0, t0 = server.cpu(), time.monotonic()
        server.send({"op": "fanout", "count": messages, "size": size, "rate": rate})
        result = _delivery_result(server, gens, normal * messages, cpu0, t0, timeout + 30)
        server.reply(5)
    slow = result.pop("slow")
    outcome = "still connected"
    if slow and slow[0]["close_code"] is not None:
        outcome = f"closed {slow[0]['close_code']}"
    elif slow and slow[0]["disconnected"]:
        outcome = "disconnected (no close frame)"
    return {
        **result,
        "normal_clients_complete": result["complete"],
        "slow_client": outcome,
        "slow_client_received": slow[0]["received"] if slow else None,
        "rss_growth_mib": round((server.rss() - rss0) / 2**20, 1),
        "peak_rss_growth_mib": round((peak.peak - rss0) / 2**20, 1),
    }


def burst(
    server: Server,
    normal: int,
    messages: int,
    size: int = 1024,
    timeout: float = 60,
    slow_drain_seconds: float = 10,
) -> dict[str, Any]:
    """An unpaced burst of broadcasts to ``normal`` reading clients and one stalled reader.

    The producer sends as fast as the server lets it. The questions: does every
    healthy reader get everything in order, is the stalled one closed (and how),
    and how much memory does the burst cost (at its peak, sampled every 20 ms
    until the stalled reader was drained, and once everyone hung up)?
    """
    return slow_consumer(
        server,
        normal,
        messages,
        size=size,
        rate=0,
        timeout=timeout,
        slow_drain_seconds=slow_drain_seconds,
    )
