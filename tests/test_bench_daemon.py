"""The daemon benchmark (tools/bench_daemon.py) works: its quick mode starts the real `earshot run`
with 1 and 3 real-time file sources and a real Mosquitto, and reports CPU, RSS, lag and losses beside
the scorer-only figure of the same run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.mark.skipif(not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()),
                    reason="needs mosquitto (apt-get install mosquitto)")
def test_quick_daemon_benchmark(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_daemon.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=560, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["streams"] for r in rows] == [1, 3]
    for r in rows:
        assert r["exit_code"] == 0 and r["samples_lost"] == 0
        assert r["hops"] >= 10 * r["streams"]  # every source was scored
        assert 0 < r["cpu_pct"] < 200 and 20 < r["rss_mb"] < 2000
        assert 0 <= r["lag_p99_ms"] < 5000
        assert r["runtime"] in ("onnx", "torch") and r["scorer_pct_per_stream"] > 0
        assert 0 < r["wakeups_per_s"] < 100_000  # the daemon sleeps between hops
    assert "scorer %/str" in proc.stdout and "marginal" in proc.stdout
