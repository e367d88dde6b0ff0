"""The three reports (simulate, replay, demo) rendered by a real browser at 1,400 px: nothing
may overflow the window or be clipped inside a box (the H1 was once the absolute trace path
and the table was cut off in a scrolling <pre>). Skips, saying why, without Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from browser_check import chromium_or_skip, overflow

from kvrouter.cli import main
from simulator.emulator.fleet import EmulatedCluster
from simulator.replay import ReplayConfig, TokenBlocks, replay
from simulator.report import write_report
from simulator.sweep import open_trace

LONG_DIR = ("a-rather-long-directory-name/with/several/levels/of/nesting/that/users/really/have/"
            "on/their/machines")


def _mooncake_like(directory: Path, requests: int = 30) -> Path:
    directory.mkdir(parents=True)
    trace = directory / "mooncake_trace_2024_conversation_without_sessions.jsonl"
    trace.write_text("".join(
        json.dumps({"timestamp": 250 * i, "input_length": 512 * (1 + i % 3), "output_length": 4,
                    "hash_ids": [i % 4, 100 + i % 3, 200 + i][: 1 + i % 3]}) + "\n"
        for i in range(requests)))
    return trace


def test_simulate_report_fits_1400px(tmp_path: Path) -> None:
    chromium_or_skip()
    trace = _mooncake_like(tmp_path / LONG_DIR)
    out = tmp_path / "sim"
    assert main(["simulate", "--trace", str(trace), "--backends", "2,3", "--policies",
                 "round_robin,session_affinity,kv_aware,least_loaded", "--out", str(out),
                 "--quiet", "--jobs", "1"]) == 0
    assert overflow(out / "report.html") == []


async def test_replay_report_with_errors_fits_1400px(tmp_path: Path) -> None:
    chromium_or_skip()
    trace = _mooncake_like(tmp_path / LONG_DIR, requests=8)
    async with EmulatedCluster(count=1, time_scale=20.0, kv_events_endpoint=None,
                               max_model_len=1024) as cluster:
        config = ReplayConfig(target=cluster.urls[0], model="tiny-llama", timeout_s=30,
                              speedup=20.0)
        result = await replay(open_trace(str(trace), 0, None, None), config,
                              TokenBlocks(2048, 5, 0))
    assert result["failed"] > 0  # the 1,536-token prompts exceed max_model_len
    out = tmp_path / "replay"
    path = write_report(out, [result], "kvrouter replay: " + trace.name,
                        {"trace": str(trace), "target": cluster.urls[0]})
    assert "maximum context length" in path.read_text()
    assert overflow(path) == []


def test_demo_report_fits_1400px(tmp_path: Path) -> None:
    chromium_or_skip()
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "kvrouter.cli", "demo", "--policies", "round_robin,kv_aware",
         "--pods", "2", "--requests", "12", "--rate", "12", "--speedup", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert overflow(out / "report.html") == []


def test_the_check_catches_a_clipped_table(tmp_path: Path) -> None:
    """The check itself: a wide table inside a scrolling <pre> and a long unbreakable H1."""
    chromium_or_skip()
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body style='max-width:1000px'><h1>" + "x" * 300
                    + "</h1><pre style='overflow-x:auto'>" + "column " * 300
                    + "</pre></body></html>")
    problems = overflow(page)
    assert any(p.startswith("page is ") for p in problems), problems
    assert any(p.startswith("pre clips") for p in problems), problems
