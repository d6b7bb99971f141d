"""The benchmark harness (benchmarks/) runs end to end on a tiny load, against every server.

This checks that the harness works, not how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]


def test_harness_runs_every_scenario_against_every_server(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        orjson.loads(line)
        for f in tmp_path.glob("run-*.jsonl")
        for line in f.read_text().splitlines()
    ]
    seen = {(r["scenario"], r["server"]) for r in rows}
    scenarios = {
        "fanout",
        "fanout_4k",
        "to_users",
        "rpc",
        "rpc_fanout",
        "idle",
        "slow_consumer",
        "burst",
    }
    servers = {"trio_gw", "trio_gw trio-websocket", "websockets", "trio-websocket naive"}
    assert seen == {(s, v) for s in scenarios for v in servers}
    for row in rows:
        assert "error" not in row, row
    hub = {r["scenario"]: r for r in rows if r["server"] == "trio_gw"}
    for scenario in ("fanout", "to_users"):
        assert hub[scenario]["complete"] and hub[scenario]["in_order"], hub[scenario]
        assert hub[scenario]["deliveries"] == hub[scenario]["expected"] > 0
    assert hub["rpc"]["round_trips"] > 0
    assert hub["idle"]["complete"]
    assert hub["slow_consumer"]["normal_clients_complete"]
    assert 0 <= hub["burst"]["normal_whole"] <= 5  # reported, whatever the outcome
    for row in rows:
        scenario = row["scenario"]
        if scenario == "rpc":
            assert row["round_trips"] > 0 and row["server_cpu_us_per_round_trip"] >= 0, row
        elif scenario == "rpc_fanout":
            # tiny: 20 connections, 2 per user, 3 users a call: 6 pushes a call, all received.
            assert row["complete"], row
            assert row["calls"] > 0 and row["deliveries"] == row["expected"], row
            assert row["expected"] == row["calls"] * 3 * 2, row
            assert row["server_cpu_us_per_delivery"] >= 0, row
        elif scenario == "fanout_4k":
            assert row["complete"] and row["in_order"], row
            assert row["deliveries"] == row["expected"] == 20 * 20, row
            peak, held = row["peak_rss_growth_mib"], row["held_rss_growth_mib"]
            assert isinstance(peak, int | float) and isinstance(held, int | float), row
            assert peak >= held, row
        elif scenario == "burst":
            assert 0 <= row["normal_whole"] <= 5 and 0 <= row["normal_closed"] <= 5, row
            assert row["slow_client"], row
            assert isinstance(row["peak_rss_growth_mib"], int | float), row
            assert isinstance(row["rss_growth_mib"], int | float), row
    assert "| server |" in result.stdout  # the readable table
    for heading in ("### rpc_fanout (", "### fanout_4k (", "server_cpu_us_per_round_trip"):
        assert heading in result.stdout
