"""``python -m benchmarks [--full] [--servers ...] [--scenarios ...]``: run and report."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from . import _harness as h

HERE = Path(__file__).parent

# name -> (quick kwargs, full kwargs list); each full entry is one scenario variant.
SCENARIOS: dict[
    str, tuple[Callable[..., dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]
] = {
    "fanout": (
        h.fanout,
        [{"connections": 1000, "messages": 200}],
        [{"connections": 1000, "messages": 200}, {"connections": 5000, "messages": 40}],
    ),
    # 4 KiB messages; messages * size stays below trio_gw's 1 MiB outbound_queue_bytes.
    "fanout_4k": (
        h.fanout_4k,
        [{"connections": 1000, "messages": 100, "size": 4096}],
        [{"connections": 1000, "messages": 200, "size": 4096}],
    ),
    "to_users": (
        h.to_users,
        [{"connections": 2000, "users_n": 1000, "calls": 2000}],
        [{"connections": 2000, "users_n": 1000, "calls": 5000}],
    ),
    "rpc": (
        h.rpc,
        [{"connections": 200, "seconds": 3}, {"connections": 1000, "seconds": 3}],
        [{"connections": 200, "seconds": 10}, {"connections": 1000, "seconds": 10}],
    ),
    # Two connections per user; 32 calls in flight in all (one load generator).
    "rpc_fanout": (
        h.rpc_fanout,
        [{"connections": 1000, "users_n": 500, "per_call": 10, "inflight": 32, "seconds": 3}],
        [{"connections": 2000, "users_n": 1000, "per_call": 10, "inflight": 32, "seconds": 10}],
    ),
    "idle": (h.idle, [{"connections": 2000}], [{"connections": 5000}, {"connections": 10000}]),
    "burst": (
        h.burst,
        [{"normal": 100, "messages": 2000}],
        [{"normal": 100, "messages": 2000}, {"normal": 100, "messages": 10000}],
    ),
    "slow_consumer": (
        h.slow_consumer,
        [{"normal": 100, "messages": 3000, "timeout": 20}],
        [{"normal": 100, "messages": 10000, "timeout": 60}],
    ),
}

# The figure each scenario is judged by, and whether lower is better.
KEY = {
    "fanout": ("server_cpu_us_per_delivery", True),
    "fanout_4k": ("peak_rss_growth_mib", True),
    "to_users": ("server_cpu_us_per_delivery", True),
    "rpc": ("round_trips_per_s", False),
    "rpc_fanout": ("server_cpu_us_per_delivery", True),
    "idle": ("kib_per_connection", True),
    "slow_consumer": ("server_cpu_us_per_delivery", True),
    "burst": ("normal_whole", False),
}

# Further figures the table gives a ratio column for, after the key's.
MORE_RATIOS = {
    "fanout_4k": [("server_cpu_us_per_delivery", True)],
    "rpc": [("server_cpu_us_per_round_trip", True)],
    "burst": [("peak_rss_growth_mib", True)],
}


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric field over repetitions; other fields from the middle run."""
    if len(runs) == 1:
        return runs[0]
    merged = dict(runs[len(runs) // 2])
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), int | float)]
            merged[key] = round(statistics.median(values), 2)
        elif isinstance(value, bool):
            merged[key] = all(r[key] for r in runs)
    return merged


def label(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "timeout")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--full", action="store_true", help="every scenario at full size, 3 repetitions"
    )
    parser.add_argument("--repeat", type=int, help="repetitions (default 1 quick, 3 full)")
    parser.add_argument(
        "--servers",
        nargs="+",
        choices=[*h.SERVERS, h.BASELINE],
        default=list(h.SERVERS),
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of an earlier trio_gw (with this benchmarks/ copied in), "
        "measured as 'trio_gw baseline' in the same run",
    )
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument(
        "--tiny", action="store_true", help="a smoke run on a tiny load (for tests)"
    )
    parser.add_argument("--write-results", action="store_true", help="write benchmarks/RESULTS.md")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where JSON lines go")
    parser.add_argument(
        "--from-jsonl", type=Path, help="render (and with --write-results, write) a past run"
    )
    args = parser.parse_args(argv)
    if args.baseline is not None:
        h.SERVERS[h.BASELINE] = h.SERVERS["trio_gw"]
        h.SERVER_CWD[h.BASELINE] = args.baseline.resolve()
        if h.BASELINE not in args.servers:
            args.servers.insert(1, h.BASELINE)
    if args.from_jsonl:
        past = [orjson.loads(line) for line in args.from_jsonl.read_text().splitlines()]
        table = render(past)
        print(table)
        if args.write_results:
            args.full = args.full or any(r["repetitions"] > 1 for r in past)
            (HERE / "RESULTS.md").write_text(results_page(table, args, past[0]["repetitions"]))
        return 0
    repeat = args.repeat or (3 if args.full else 1)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    rows: list[dict[str, Any]] = []
    with jsonl.open("ab") as out:
        for scenario in args.scenarios:
            fn, quick, full = SCENARIOS[scenario]
            variants = full if args.full else quick
            if args.tiny:
                variants = [tiny(scenario)]
            for kwargs in variants:
                for server_name in args.servers:
                    runs = []
                    for _ in range(repeat):
                        with h.running(server_name, args.out) as server:
                            try:
                                result = fn(server, **kwargs)
                            except RuntimeError as exc:
                                result = {"error": str(exc), "complete": False}
                        runs.append(result)
                    row = {
                        "scenario": scenario,
                        "params": label(kwargs),
                        "server": server_name,
                        "repetitions": repeat,
                        **median_of(runs),
                    }
                    out.write(orjson.dumps(row) + b"\n")
                    out.flush()
                    rows.append(row)
                    print(f"{scenario:14} {server_name:22} {summary(scenario, row)}", flush=True)
    table = render(rows)
    print("\n" + table)
    print(f"\nJSON lines: {jsonl}")
    if args.write_results:
        (HERE / "RESULTS.md").write_text(results_page(table, args, repeat))
        print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


def tiny(scenario: str) -> dict[str, Any]:
    sizes: dict[str, dict[str, Any]] = {
        "fanout": {"connections": 20, "messages": 20},
        "fanout_4k": {"connections": 20, "messages": 20, "size": 4096, "settle_seconds": 0.2},
        "to_users": {"connections": 20, "users_n": 10, "calls": 20, "per_call": 3},
        "rpc": {"connections": 5, "seconds": 0.5},
        "rpc_fanout": {
            "connections": 20,
            "users_n": 10,
            "per_call": 3,
            "inflight": 8,
            "seconds": 0.5,
        },
        "idle": {"connections": 20},
        "slow_consumer": {"normal": 5, "messages": 50, "timeout": 10, "slow_drain_seconds": 1},
        "burst": {"normal": 5, "messages": 50, "timeout": 10, "slow_drain_seconds": 1},
    }
    return sizes[scenario]


def summary(scenario: str, row: dict[str, Any]) -> str:
    key, _ = KEY[scenario]
    extra = ""
    if scenario in ("slow_consumer", "burst"):
        extra = (
            f" slow={row.get('slow_client')} normal_complete={row.get('normal_clients_complete')}"
            f" peak_rss_growth_mib={row.get('peak_rss_growth_mib')}"
        )
    elif scenario == "rpc":
        extra = f" server_cpu_us_per_round_trip={row.get('server_cpu_us_per_round_trip')}"
    elif scenario == "rpc_fanout":
        extra = (
            f" calls={row.get('calls')} deliveries={row.get('deliveries')}"
            f" expected={row.get('expected')}"
        )
    elif scenario == "fanout_4k":
        extra = (
            f" held_rss_growth_mib={row.get('held_rss_growth_mib')}"
            f" server_cpu_us_per_delivery={row.get('server_cpu_us_per_delivery')}"
        )
    if row.get("error"):
        extra += f" error={row['error']}"
    return f"{key}={row.get(key)} complete={row.get('complete')}{extra}"


def ratio(row: dict[str, Any], hub: dict[str, Any], key: str, lower: bool) -> str:
    """peer / trio_gw if lower is better, else trio_gw / peer: above 1, trio_gw did better."""
    peer, ours = row.get(key), hub.get(key)
    if row is hub or not isinstance(peer, int | float) or not isinstance(ours, int | float):
        return ""
    if ours <= 0 or peer < 0 or (peer == 0 and not lower):
        return ""
    return f"{peer / ours:.2f}x" if lower else f"{ours / peer:.2f}x"


def render(rows: list[dict[str, Any]]) -> str:
    """A Markdown table per scenario variant, with ratios against the hub."""
    lines: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["params"]), []).append(row)
    for (scenario, params), group in groups.items():
        ratios = [KEY[scenario], *MORE_RATIOS.get(scenario, [])]
        hub = next((r for r in group if r["server"] == "trio_gw"), None)
        lines.append(f"\n### {scenario} ({params})\n")
        cols = columns(scenario)
        heads = [f"{k}: {'peer / trio_gw' if lower else 'trio_gw / peer'}" for k, lower in ratios]
        lines.append("| server | " + " | ".join(cols + heads) + " |")
        lines.append("|---" * (len(cols) + len(heads) + 1) + "|")
        for row in group:
            cells = [
                fmt(
                    row.get(c)
                    if "." not in c
                    else row.get(c.split(".")[0], {}).get(c.split(".")[1])
                )
                for c in cols
            ]
            cells += [ratio(row, hub, key, lower) if hub else "" for key, lower in ratios]
            lines.append(f"| {row['server']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def columns(scenario: str) -> list[str]:
    if scenario == "fanout_4k":
        return [
            "server_cpu_us_per_delivery",
            "peak_rss_growth_mib",
            "held_rss_growth_mib",
            "rss_before_mib",
            "deliveries_per_s",
            "latency.p50_us",
            "latency.p99_us",
            "client_cpu_s",
            "complete",
            "in_order",
        ]
    if scenario == "rpc_fanout":
        return [
            "server_cpu_us_per_delivery",
            "server_cpu_us_per_call",
            "calls_per_s",
            "deliveries_per_s",
            "call_latency.p50_us",
            "call_latency.p99_us",
            "push_latency.p99_us",
            "client_cpu_s",
            "complete",
        ]
    if scenario in ("fanout", "to_users"):
        return [
            "server_cpu_us_per_delivery",
            "deliveries_per_s",
            "latency.p50_us",
            "latency.p99_us",
            "client_cpu_s",
            "rss_mib",
            "complete",
            "in_order",
        ]
    if scenario == "rpc":
        return [
            "round_trips_per_s",
            "server_cpu_us_per_round_trip",
            "latency.p50_us",
            "latency.p99_us",
            "client_cpu_s",
            "complete",
        ]
    if scenario == "idle":
        return ["kib_per_connection", "accepts_per_s", "rss_mib", "complete"]
    if scenario == "burst":
        return [
            "normal_whole",
            "normal_closed",
            "seconds",
            "slow_client",
            "slow_client_received",
            "peak_rss_growth_mib",
            "rss_growth_mib",
            "server_cpu_us_per_delivery",
        ]
    return [
        "normal_clients_complete",
        "seconds",
        "slow_client",
        "slow_client_received",
        "peak_rss_growth_mib",
        "rss_growth_mib",
        "server_cpu_us_per_delivery",
        "in_order",
    ]


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def baseline_note(table: str) -> str:
    """What "trio_gw baseline" and the engine rows are, if the run measured them."""
    note = ""
    if "trio_gw trio-websocket" in table:
        note += (
            '\n"trio_gw" is the hub on its default connection engine (wsproto); '
            '"trio_gw trio-websocket" is the same hub with `engine = "trio-websocket"`.'
        )
    if h.BASELINE in table:
        note += (
            f'\n"{h.BASELINE}" is an earlier checkout of trio_gw measured in the same run '
            "(`--baseline DIR`), for before/after figures."
        )
    return note


def results_page(table: str, args: argparse.Namespace, repeat: int) -> str:
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}"
        for p in ("trio", "trio-websocket", "wsproto", "websockets", "picows", "orjson")
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mode = "full (--full)" if args.full else "quick"
    return f"""# Benchmark results

Produced by `python -m benchmarks {"--full " if args.full else ""}--write-results`
on {time.strftime("%Y-%m-%d")}.
Mode: {mode}; median of {repeat} repetition(s) per figure. All servers ran in the same
invocation, one at a time, each as its own process pinned to core {h.SERVER_CORE}; the picows
load generator ran pinned to core {h.CLIENT_CORE}. "Server CPU" is the server process's own
user+system time over the measured interval, so it does not depend on the load generator's speed.
Ratios are peer / trio_gw for lower-is-better figures and trio_gw / peer otherwise, so a
ratio above 1 means trio_gw did better.{baseline_note(table)}

Machine: {cpu}, {psutil_cores()} cores, Python {platform.python_version()},
{platform.system()} {platform.release()}.
Versions: {versions}.

## How to read these numbers

- **Server CPU per delivery** is the headline figure for fanout and to_users: it is
  what a hub node can sustain per core. Absolute figures vary by about 20% from run
  to run on this kind of machine; compare ratios within one run.
- **Latency in fanout and to_users** is measured from the moment the server was
  asked to send a message to the moment a client had it. In these scenarios the
  server is asked for a whole burst at once. trio_gw takes the burst in one go
  (its senders do not yield while the hub keeps up, and yield every 32 messages'
  worth of work), and writes each connection's share in large batches: the burst
  finishes several times sooner, but the median message waits behind more of it.
  `websockets` writes every message to every socket as it is produced, so a
  message waits only for the one before it, and the burst takes longer.
- **slow_consumer** is paced at 1,000 broadcasts a second, so that the question is
  whether the normal clients keep receiving while one client is stuck. Unpaced,
  trio_gw produces faster than one load-generator process can read, and every
  client's queue overflows, which measures the client. Paced, the messages arrive
  one at a time, so each delivery wakes its connection's writer: this is trio_gw's
  most expensive case per delivery. The stuck client is closed once its queue is
  over half full and it took no write for `stall_timeout` (flow control; the
  `burst` scenario is the unpaced case). It sees the 4008 close frame if it reads again within
  `close_timeout`; a client that never reads cannot receive a close frame behind
  the frame it stopped in the middle of, so after `close_timeout` its TCP
  connection is aborted ("disconnected (no close frame)" here, because the load
  generator resumes reading only at the end). `websockets` buffers everything for
  the stuck client; the naive trio-websocket server stalls every client.
- **idle** memory is the server's RSS growth per open connection. trio-websocket
  alone accounts for about 20 KiB of it (the naive server's figure).
- **rpc** is closed-loop echo: every connection keeps one request in flight
  (200 or 1,000 in all). Round trips a second also depend on the single load
  generator; server CPU per round trip does not.
- **rpc_fanout** is a request whose handling pushes: for each call the server
  sends one ~100-byte message to every connection of 10 distinct users (two
  connections each, so 20 pushes) and then answers the caller. Call k draws its
  users from a fixed seed. One load generator keeps 32 calls in flight in all,
  each sent from the next connection in turn. trio_gw does this in its
  `on_handler_message_received` callback (`send_message_to_user_ids`, then
  `reply`); `websockets` calls `broadcast()` on those connections, then
  `await send`s the answer; the naive server awaits `send_message` on each of
  them in turn, then answers. Server CPU is per push received; `complete` means
  every push reached every one of its recipients.
- **fanout_4k** is `fanout` with 4 KiB messages. Peak RSS growth is the highest
  server RSS, sampled every 20 ms from the broadcast until every client had
  every message, over the RSS just before; held is the same 1 s later, clients
  still connected. RSS leaves out the kernel's socket buffers: what a server
  has written to a socket but the client has not yet read is not counted, only
  what it still holds itself.
- **burst** is unpaced 1 KiB broadcasts to 100 reading clients and one that
  stopped reading. `normal_whole` counts readers that got everything in order,
  `normal_closed` readers that were disconnected, both taken when the readers
  finished (or the timeout passed), before the stalled reader reads again. Peak
  RSS growth is sampled every 20 ms until the stalled reader has been drained;
  `rss_growth_mib` is measured after every client hung up. `seconds` includes up
  to 10 s waiting, after the readers finished, for the stalled reader (reading
  again) to be closed.
{table}
"""


def psutil_cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
