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
    scenarios = {"fanout", "to_users", "rpc", "idle", "slow_consumer", "burst"}
    servers = {"trio_gw", "websockets", "trio-websocket naive"}
    assert seen == {(s, v) for s in scenarios for v in servers}
    hub = {r["scenario"]: r for r in rows if r["server"] == "trio_gw"}
    for scenario in ("fanout", "to_users"):
        assert hub[scenario]["complete"] and hub[scenario]["in_order"], hub[scenario]
        assert hub[scenario]["deliveries"] == hub[scenario]["expected"] > 0
    assert hub["rpc"]["round_trips"] > 0
    assert hub["idle"]["complete"]
    assert hub["slow_consumer"]["normal_clients_complete"]
    assert 0 <= hub["burst"]["normal_whole"] <= 5  # reported, whatever the outcome
    assert "| server |" in result.stdout  # the readable table
