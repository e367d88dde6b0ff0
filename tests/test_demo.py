"""`kvrouter demo` end to end as a user runs it: real emulator and router processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_small_run_reports_pods_own_counters(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrouter.cli", "demo", "--policies", "round_robin,kv_aware",
         "--requests", "30", "--rate", "10", "--speedup", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kv_aware" in proc.stdout and "report:" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert [r["policy"] for r in results] == ["round_robin", "kv_aware"]
    for r in results:
        # Every request reached exactly one pod, as the pods themselves count it.
        assert r["failed"] == 0
        assert sum(r["pod_requests"]) == r["requests"] == 30
        assert 0.0 <= r["pod_hit_rate"] <= 1.0
    assert results[0]["pod_requests"] == [8, 8, 7, 7]  # round robin over 4 pods
    assert (out / "report.html").read_text().startswith("<!doctype html>")
