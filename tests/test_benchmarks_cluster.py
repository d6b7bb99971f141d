"""The two-node benchmark (benchmarks/cluster.py) runs end to end on a tiny load.

This checks that the scenarios work and report their figures, not how fast anything is.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cluster_benchmark_runs_every_scenario(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.cluster", "--tiny", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        orjson.loads(line)
        for f in tmp_path.glob("cluster-*.jsonl")
        for line in f.read_text().splitlines()
    ]
    assert {(r["scenario"], r["setup"]) for r in rows} == {
        (s, setup)
        for s in ("fanout", "to_users", "rpc_fanout", "latency")
        for setup in ("single node", "two nodes")
    }
    for row in rows:
        assert row["complete"] and row["deliveries"] == row["expected"] > 0, row
        assert row["latency"]["p99_us"] >= row["latency"]["p50_us"] > 0, row
        # The receiving node's collections in the window are reported.
        gcs = row["gc"] if isinstance(row["gc"], list) else [row["gc"]]
        assert gcs and all(len(g["collections"]) == 3 for g in gcs), row
        if row["setup"] == "two nodes":
            assert row["redis_cpu_us_per_delivery"] is not None, row
            backplane = row["backplane"]
            assert backplane["publish_drops"] == 0, row
            # Pipelined: never more round trips than publishes.
            assert 0 < backplane["publish_batches"] <= backplane["published"], row
